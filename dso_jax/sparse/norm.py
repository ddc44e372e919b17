"""Per-object normalisation of padded sparse features.

TRELLIS's ``SparseGroupNorm32`` runs ``nn.GroupNorm`` on each object's (1, C, N_k) feature matrix:
statistics per object and group, over that object's voxels only. Here padding rows are masked out of
the statistics. The per-voxel LayerNorm the SLat models use (``LayerNorm32`` on the feats) needs no
mask: it is ``dso_jax.models.layers.LayerNorm32`` applied to (B, N, C). (TRELLIS's
``SparseLayerNorm`` normalises a (1, C, N_k) matrix over its last axis, which only works when N_k equals
its normalized_shape; no released model uses it.)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def group_norm(x, mask, num_groups: int, epsilon: float = 1e-5):
    """x (B, N, C), mask (B, N) -> float32 (B, N, C) normalised per object and channel group (biased variance)."""
    b, n, c = x.shape
    if c % num_groups:
        raise ValueError(f"group_norm: {c} channels do not split into {num_groups} groups")
    g = x.astype(jnp.float32).reshape(b, n, num_groups, c // num_groups)
    m = mask.astype(jnp.float32)[:, :, None, None]
    count = jnp.maximum(jnp.sum(m, axis=(1, 3), keepdims=True) * (c // num_groups), 1.0)
    mean = jnp.sum(g * m, axis=(1, 3), keepdims=True) / count
    var = jnp.sum(jnp.square((g - mean) * m), axis=(1, 3), keepdims=True) / count
    return ((g - mean) * jax.lax.rsqrt(var + epsilon)).reshape(b, n, c)


class SparseGroupNorm32(nn.Module):
    """``SparseGroupNorm32(num_groups, C)``: per-object GroupNorm in float32, cast back; ``scale``/``bias`` (C,)."""

    num_groups: int
    epsilon: float = 1e-5
    affine: bool = True

    @nn.compact
    def __call__(self, x, mask):  # x (B, N, C), mask (B, N)
        y = group_norm(x, mask, self.num_groups, self.epsilon)
        if self.affine:
            c = x.shape[-1]
            y = y * self.param("scale", nn.initializers.ones, (c,), jnp.float32)
            y = y + self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return y.astype(x.dtype)
