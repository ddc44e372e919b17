"""``SparseBatch``: voxel features of several objects in a padded, fixed-shape layout (DESIGN.md rule 8).

TRELLIS's ``SparseTensor`` stacks the voxels of all objects into one (M, C) array with (M, 4)
``[batch, x, y, z]`` coords. Here every object gets the same number of rows N, a *token bucket*
(a multiple of a quantum, so one compiled program serves every object size in the bucket):

* ``feats`` (B, N, C): the features, the only part that changes from step to step;
* ``levels``: the *structure*, built once on the host (numpy) by :func:`from_trellis` and reused by
  every block and every sampler step. ``levels[0]`` describes the rows of ``feats``: coords (B, N, 3)
  int32, a valid mask (B, N) with each object's valid rows first, in the input's order, and the
  submanifold 3³ neighbour table. ``levels[k + 1]`` is ``levels[k]`` downsampled 2x (TRELLIS's
  ``SparseDownsample``), with its own bucket (attention cost is quadratic in it), the map from
  each finer row to its parent row and from each row to its (at most 8) finer children.

Padding rows have zero coords, are never anybody's neighbour or parent, and carry finite values;
models zero them on output. :func:`to_trellis` returns the valid rows in TRELLIS's layout.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dso_jax.sparse import tables
from dso_jax.sparse.tables import bucket_size

TOKEN_QUANTUM = 4096  # the finest level's bucket is a multiple of this (TRELLIS trained with <= 32768 voxels)
COARSE_QUANTUM = 1024  # the buckets of the downsampled levels


@struct.dataclass
class SparseLevel:
    """One resolution of a batch of objects: which rows are voxels, where they are, who their neighbours are."""

    coords: jax.Array  # (B, N, 3) int32, padding rows 0
    mask: jax.Array  # (B, N) bool, each object's valid rows first
    neighbours: Optional[jax.Array] = None  # (B, N, 27) int32 rows of the 3³ neighbourhood; N marks "none"
    parent: Optional[jax.Array] = None  # (B, N_finer) int32: the row here of each finer row's parent; N for padding
    children: Optional[jax.Array] = None  # (B, N, 8) int32: the finer rows of each row here; N_finer for none
    divisor: Optional[jax.Array] = None  # (B, N) float32: children + 1 (TRELLIS's mean counts its zero buffer)
    windows: tuple = ()  # swin WindowPartitions of this level (sparse.attention), one per shift, built on the host
    resolution: int = struct.field(pytree_node=False, default=64)

    @property
    def lengths(self) -> jax.Array:
        """(B,) int32 valid rows per object."""
        return jnp.sum(self.mask, axis=-1, dtype=jnp.int32)

    @property
    def size(self) -> int:
        return self.mask.shape[1]


@struct.dataclass
class SparseBatch:
    """Features (B, N, C) on ``levels[0]`` plus the coarser levels a model needs; see the module docstring."""

    feats: jax.Array
    levels: tuple

    @property
    def coords(self) -> jax.Array:
        return self.levels[0].coords

    @property
    def mask(self) -> jax.Array:
        return self.levels[0].mask

    @property
    def resolution(self) -> int:
        return self.levels[0].resolution

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    def with_feats(self, feats) -> SparseBatch:
        """``feats`` (k B, N, C') on this structure; k > 1 repeats the structure k times along the object axis
        (the 2B call of batched classifier-free guidance). Jittable."""
        reps, rest = divmod(feats.shape[0], self.batch_size)
        if rest or feats.shape[1] != self.mask.shape[1]:
            raise ValueError(
                f"with_feats: feats {tuple(feats.shape)} do not fit {self.batch_size} objects x {self.mask.shape[1]} rows"
            )
        levels = self.levels
        if reps > 1:
            levels = jax.tree.map(lambda a: jnp.concatenate([a] * reps, axis=0), levels)
        return SparseBatch(feats=feats, levels=levels)


def from_trellis(
    coords,
    feats,
    *,
    resolution: int = 64,
    downsamples: int = 0,
    quantum: int = TOKEN_QUANTUM,
    coarse_quantum: int = COARSE_QUANTUM,
    neighbours: bool = True,
) -> SparseBatch:
    """TRELLIS's ``SparseTensor`` layout -> :class:`SparseBatch`.

    coords (M, 4) ``[batch, x, y, z]`` integers in [0, resolution), rows grouped by ascending batch
    index (TRELLIS's layout); feats (M, C). ``downsamples`` coarser levels are built (the SLat flow
    model needs ``log2(patch_size)``). Raises ValueError naming the problem for bad input.
    """
    coords = np.asarray(coords)
    feats = np.asarray(feats)
    if coords.ndim != 2 or coords.shape[1] != 4 or not np.issubdtype(coords.dtype, np.integer):
        raise ValueError(
            f"from_trellis: coords must be (M, 4) integers [batch, x, y, z], got {coords.shape} {coords.dtype}"
        )
    if feats.ndim != 2 or feats.shape[0] != coords.shape[0]:
        raise ValueError(f"from_trellis: feats must be (M, C) with M = {coords.shape[0]}, got {feats.shape}")
    if coords.shape[0] == 0:
        raise ValueError("from_trellis: no voxels")
    b_idx, xyz = coords[:, 0].astype(np.int64), coords[:, 1:].astype(np.int64)
    if np.any(np.diff(b_idx) < 0) or b_idx[0] < 0:
        raise ValueError(
            "from_trellis: coords[:, 0] (batch index) must be non-negative and non-decreasing (TRELLIS layout)"
        )
    if xyz.min() < 0 or xyz.max() >= resolution:
        raise ValueError(f"from_trellis: voxel coords must lie in [0, {resolution}), got [{xyz.min()}, {xyz.max()}]")
    counts = np.bincount(b_idx)
    if np.any(counts == 0):
        raise ValueError(f"from_trellis: objects {np.flatnonzero(counts == 0).tolist()} have no voxels")
    codes = (b_idx * resolution + xyz[:, 0]) * resolution**2 + xyz[:, 1] * resolution + xyz[:, 2]
    if len(np.unique(codes)) != len(codes):
        raise ValueError("from_trellis: duplicate voxel coords within an object")

    b, n = len(counts), bucket_size(counts.max(), quantum)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(len(b_idx)) - starts[b_idx]  # row of each voxel within its object
    c = np.zeros((b, n, 3), np.int32)
    c[b_idx, slot] = xyz
    f = np.zeros((b, n, feats.shape[1]), feats.dtype)
    f[b_idx, slot] = feats
    mask = np.arange(n)[None, :] < counts[:, None]
    levels = [_level(c, mask, resolution, neighbours)]
    for _ in range(downsamples):
        fine = levels[-1]
        cc, cmask, parent, children, divisor = tables.downsample_map(fine.coords, fine.mask, coarse_quantum)
        coarse = _level(cc, cmask, fine.resolution // 2, neighbours)
        levels.append(coarse.replace(parent=parent, children=children, divisor=divisor))
    return SparseBatch(feats=f, levels=tuple(levels))


def _level(coords, mask, resolution, neighbours) -> SparseLevel:
    nbrs = tables.neighbour_table(coords, mask) if neighbours else None
    return SparseLevel(coords=coords, mask=mask, neighbours=nbrs, resolution=resolution)


def to_trellis(batch: SparseBatch) -> tuple[np.ndarray, np.ndarray]:
    """:class:`SparseBatch` -> (coords (M, 4) int32 ``[batch, x, y, z]``, feats (M, C)), the valid rows in the
    order :func:`from_trellis` was given them."""
    mask = np.asarray(batch.mask)
    b_idx, slot = np.nonzero(mask)  # row-major: object by object, valid rows in order
    xyz = np.asarray(batch.coords)[b_idx, slot]
    coords = np.concatenate([b_idx[:, None].astype(np.int32), xyz.astype(np.int32)], axis=1)
    return coords, np.asarray(batch.feats)[b_idx, slot]
