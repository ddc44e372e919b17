"""Small building blocks shared by the TRELLIS ports: norms, embedders, feed-forward, patchify.

Names of submodules mirror the PyTorch attribute names so that conversion is a mechanical rename
(``mlp.0`` -> ``mlp_0``; see ``dso_jax.convert.rules``). Norms compute in float32 and cast back to
the input dtype, like TRELLIS's ``LayerNorm32``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


class LayerNorm32(nn.Module):
    """LayerNorm over the last axis, computed in float32, cast back to the input dtype.

    With ``affine`` it owns ``scale`` and ``bias`` (PyTorch ``weight``/``bias``), float32.
    """

    epsilon: float = 1e-6
    affine: bool = False

    @nn.compact
    def __call__(self, x):
        y = layer_norm_no_affine(x.astype(jnp.float32), self.epsilon)
        if self.affine:
            c = x.shape[-1]
            y = y * self.param("scale", nn.initializers.ones, (c,), jnp.float32)
            y = y + self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return y.astype(x.dtype)


def layer_norm_no_affine(x, epsilon: float):
    """Parameter-free layer norm over the last axis in float32 (``F.layer_norm(x, x.shape[-1:])``)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + epsilon)).astype(x.dtype)


class MultiHeadRMSNorm(nn.Module):
    """TRELLIS's per-head q/k norm: ``normalize(x) * gamma * sqrt(dim)`` in float32.

    ``F.normalize`` divides by ``max(||x||_2, 1e-12)``; gamma has shape (heads, dim).
    """

    dim: int
    heads: int

    @nn.compact
    def __call__(self, x):  # (B, L, H, D)
        gamma = self.param("gamma", nn.initializers.ones, (self.heads, self.dim), jnp.float32)
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
        y = x32 / jnp.maximum(norm, 1e-12) * gamma * math.sqrt(self.dim)
        return y.astype(x.dtype)


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding ``[cos(t w), sin(t w)]`` (cosine first), float32. t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """``Linear(256 -> C) -> SiLU -> Linear(C -> C)`` on the sinusoidal embedding, float32."""

    hidden_size: int
    frequency_embedding_size: int = 256

    @nn.compact
    def __call__(self, t):  # (B,) -> (B, C)
        h = timestep_embedding(t, self.frequency_embedding_size)
        h = nn.Dense(self.hidden_size, dtype=jnp.float32, name="mlp_0")(h)
        h = nn.silu(h)
        return nn.Dense(self.hidden_size, dtype=jnp.float32, name="mlp_2")(h)


def absolute_position_embedding(coords: np.ndarray, channels: int) -> np.ndarray:
    """TRELLIS's ``AbsolutePositionEmbedder``: per axis ``[sin(x nu), cos(x nu)]``, zero padded.

    coords: (N, A) integer coordinates; returns (N, channels) float32. Computed in float32 like
    the original so the stored ``pos_emb`` buffer is reproduced to rounding.
    """
    coords = np.asarray(coords)
    n, axes = coords.shape
    freq_dim = channels // axes // 2
    freqs = (np.arange(freq_dim, dtype=np.float32) / np.float32(freq_dim)).astype(np.float32)
    freqs = (1.0 / (np.float32(10000.0) ** freqs)).astype(np.float32)
    out = np.outer(coords.reshape(-1).astype(np.float32), freqs).astype(np.float32)
    emb = np.concatenate([np.sin(out), np.cos(out)], axis=-1).reshape(n, -1)
    if emb.shape[1] < channels:
        emb = np.concatenate([emb, np.zeros((n, channels - emb.shape[1]), np.float32)], axis=-1)
    return emb.astype(np.float32)


def voxel_position_embedding(coords, channels: int, resolution: int):
    """:func:`absolute_position_embedding` of integer coords (..., 3) in [0, resolution), traceable (jit).

    A lookup in the per-axis table ``absolute_position_embedding(arange(resolution)[:, None], 2 f)``
    (the same float32 values, bitwise); for sparse voxels whose coords are only known on device.
    """
    f = channels // 3 // 2
    table = jnp.asarray(absolute_position_embedding(np.arange(resolution)[:, None], 2 * f))  # (R, 2f): [sin, cos]
    emb = jnp.take(table, coords, axis=0).reshape(*coords.shape[:-1], 6 * f)
    return jnp.pad(emb, [(0, 0)] * (coords.ndim - 1) + [(0, channels - 6 * f)])


def grid_coords(resolution: int, axes: int = 3) -> np.ndarray:
    """Integer coordinates of a dense grid in 'ij' order: row n = (x, y, z) with n = r^2 x + r y + z."""
    mesh = np.meshgrid(*[np.arange(resolution)] * axes, indexing="ij")
    return np.stack(mesh, axis=-1).reshape(-1, axes)


class FeedForwardNet(nn.Module):
    """``Linear(C -> r C) -> GELU(tanh) -> Linear(r C -> C)``."""

    channels: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        hidden = int(self.channels * self.mlp_ratio)
        h = nn.Dense(hidden, dtype=self.dtype, name="mlp_0")(x)
        h = jax.nn.gelu(h, approximate=True)
        return nn.Dense(self.channels, dtype=self.dtype, name="mlp_2")(h)


def patchify(x, patch_size: int):
    """(B, C, D, H, W) -> (B, C p^3, D/p, H/p, W/p), channel index c p^3 + i p^2 + j p + k."""
    if patch_size == 1:
        return x
    b, c, *spatial = x.shape
    p = patch_size
    x = x.reshape(b, c, spatial[0] // p, p, spatial[1] // p, p, spatial[2] // p, p)
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * p**3, spatial[0] // p, spatial[1] // p, spatial[2] // p)


def unpatchify(x, patch_size: int):
    """Inverse of :func:`patchify`."""
    if patch_size == 1:
        return x
    b, cp, *spatial = x.shape
    p = patch_size
    c = cp // p**3
    x = x.reshape(b, c, p, p, p, *spatial)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c, spatial[0] * p, spatial[1] * p, spatial[2] * p)


def cast_block_weights(params, dtype):
    """Cast the Linear/Conv kernels and biases inside the torso (``blocks_*``, ``middle_block_*``, and the SLat
    flow's ``input_blocks_*``/``out_blocks_*``) to ``dtype``.

    Mirrors TRELLIS's fp16 torso (norm scales and RMS gammas stay float32). For inference and
    sampling: the per-call float32 -> bf16 weight conversion then happens once, not every forward.
    A float32 ``dtype`` returns ``params`` unchanged.
    """
    if jnp.dtype(dtype) == jnp.float32:
        return params

    def cast(path, leaf):
        names = [getattr(k, "key", str(k)) for k in path]
        in_torso = any(n.startswith(("blocks_", "middle_block_", "input_blocks_", "out_blocks_")) for n in names)
        if in_torso and names[-1] in ("kernel", "bias") and not any(n.startswith("norm") for n in names):
            return leaf.astype(dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(cast, params)
