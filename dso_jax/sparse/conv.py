"""Submanifold sparse convolution (spconv's ``SubMConv3d``, TRELLIS's ``SparseConv3d``) on padded features.

Output only at active voxels, input only from active neighbours (``trellis.md`` §4.3)::

    out[p] = b + sum_{delta in {-1, 0, 1}^3, p + delta active} W[delta + 1] . in[p + delta]

with the (B, N, 27) neighbour table of ``SparseLevel.neighbours``. Each of the 27 offsets is one
gather and one matmul accumulated in float32 (``preferred_element_type``), so no (N, 27, Cin) array
is ever built (Cin reaches 2048 in the SLat flow); the offsets run in a ``lax.scan`` (one compiled
gather + matmul per conv instead of 26, which keeps compile times short). Kernel size 1 (the decoders' skip) is a matmul.
Parameters: ``kernel`` (k, k, k, Cin, Cout) (spconv's (Cout, k, k, k, Cin) transposed by the
converter), ``bias`` (Cout,), under a child named ``conv`` like TRELLIS's wrapper module.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dso_jax.sparse.spatial import gather_rows

Dtype = Any
CENTRE = 13  # the (0, 0, 0) offset in the 3³ table


def submanifold_conv(x, neighbours: Optional[jnp.ndarray], kernel, bias=None, dtype: Dtype = None):
    """x (B, N, Cin), neighbours (B, N, 27) (unused for k = 1), kernel (k, k, k, Cin, Cout) -> (B, N, Cout)."""
    k, cin, cout = kernel.shape[0], kernel.shape[3], kernel.shape[4]
    dtype = x.dtype if dtype is None else dtype
    x, w = x.astype(dtype), kernel.astype(dtype)
    mm = lambda a, wk: jnp.einsum("bnc,co->bno", a, wk, preferred_element_type=jnp.float32)
    if k == 1:
        acc = mm(x, w.reshape(cin, cout))
    elif k == 3:
        if neighbours is None:
            raise ValueError("submanifold_conv: a 3x3x3 kernel needs the level's neighbour table")
        w = w.reshape(27, cin, cout)
        others = np.array([o for o in range(27) if o != CENTRE])

        def step(acc, offset):  # one neighbour offset: gather (B, N, Cin), matmul, accumulate
            w_o, idx = offset
            return acc + mm(gather_rows(x, idx), w_o), None

        acc = mm(x, w[CENTRE])  # every active voxel is its own centre neighbour
        acc, _ = jax.lax.scan(step, acc, (w[others], jnp.moveaxis(neighbours[..., others], -1, 0)))
    else:
        raise ValueError(f"submanifold_conv: kernel size must be 1 or 3, got {k}")
    if bias is not None:
        acc = acc + bias.astype(jnp.float32)
    return acc.astype(dtype)


class SubMConv3d(nn.Module):
    """The parameters and compute of one submanifold conv (spconv's module inside TRELLIS's wrapper)."""

    features: int
    kernel_size: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, neighbours=None):
        k = self.kernel_size
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (k, k, k, x.shape[-1], self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return submanifold_conv(x, neighbours, kernel, bias, self.dtype)


class SparseConv3d(nn.Module):
    """TRELLIS's ``SparseConv3d(Cin, Cout, k)`` (stride 1: submanifold); parameters live in child ``conv``."""

    features: int
    kernel_size: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, neighbours=None):  # x (B, N, Cin) -> (B, N, Cout)
        return SubMConv3d(self.features, self.kernel_size, self.dtype, name="conv")(x, neighbours)
