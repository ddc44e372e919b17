"""Sparse voxel data in fixed shapes (DESIGN.md rule 8): the padded ``SparseBatch``, index tables built once
per object on the host, and TRELLIS's sparse operators on device (submanifold conv, 2x down/upsample,
subdivide, per-object norms, swin windowed attention)."""

from dso_jax.sparse.attention import WindowPartition, window_partition, windowed_attention
from dso_jax.sparse.batch import COARSE_QUANTUM, TOKEN_QUANTUM, SparseBatch, SparseLevel, from_trellis, to_trellis
from dso_jax.sparse.conv import SparseConv3d, submanifold_conv
from dso_jax.sparse.examples import example_coords
from dso_jax.sparse.norm import SparseGroupNorm32, group_norm
from dso_jax.sparse.spatial import downsample, gather_rows, subdivide, upsample
from dso_jax.sparse.tables import bucket_size

__all__ = [
    "COARSE_QUANTUM",
    "TOKEN_QUANTUM",
    "SparseBatch",
    "SparseConv3d",
    "SparseGroupNorm32",
    "SparseLevel",
    "WindowPartition",
    "bucket_size",
    "downsample",
    "example_coords",
    "from_trellis",
    "gather_rows",
    "group_norm",
    "submanifold_conv",
    "subdivide",
    "to_trellis",
    "upsample",
    "window_partition",
    "windowed_attention",
]
