"""Row gathers and TRELLIS's resolution changes on padded sparse features (device side, jittable).

* :func:`downsample` is ``SparseDownsample(2)``: each parent gets the sum of its children divided by
  (children + 1). TRELLIS reduces with ``torch.scatter_reduce(zeros, ..., reduce='mean')`` whose
  default ``include_self=True`` counts the zero buffer as one more element (``trellis.md`` §4.3);
  the released weights were trained with it. Sums accumulate in float32.
* :func:`upsample` is ``SparseUpsample(2)``: each child takes its parent's features (nearest).
* :func:`subdivide` is ``SparseSubdivide``: voxel i becomes rows 8 i .. 8 i + 7 (its 2³ children).

The index maps come from :mod:`dso_jax.sparse.tables` (``SparseLevel.parent``, ``.children``, ``.divisor``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gather_rows(x, idx):
    """x (B, N, ...), idx (B, M) int32 -> (B, M, ...): row ``idx`` of each object; out-of-range idx give 0."""
    return jax.vmap(lambda a, i: jnp.take(a, i, axis=0, mode="fill", fill_value=0))(x, idx)


def downsample(x, coarse):
    """x (B, N, C) on the finer level -> (B, N', C) on ``coarse`` (a ``SparseLevel`` with children, divisor).

    Eight gathers over the children table, summed in float32 in a fixed order: no scatter, so the result
    is deterministic on GPU too.
    """
    x32 = x.astype(jnp.float32)
    sums = sum(gather_rows(x32, coarse.children[..., k]) for k in range(coarse.children.shape[-1]))
    return (sums / coarse.divisor[..., None]).astype(x.dtype)


def upsample(x, coarse):
    """x (B, N', C) on ``coarse`` -> (B, N, C) on the finer level it was downsampled from."""
    return gather_rows(x, coarse.parent)


def subdivide(x):
    """(B, N, C) -> (B, 8 N, C): each row repeated for its 8 children (``tables.subdivide_coords`` order)."""
    return jnp.repeat(x, 8, axis=1)
