"""Index tables of sparse voxel sets, built once per object on the host (numpy) and reused on device.

All tables work on the padded layout of :mod:`dso_jax.sparse.batch`: coords (B, N, 3), mask (B, N)
with each object's valid rows first. A table entry that points nowhere holds the *sentinel* = the row
count of the array it indexes, so device code gathers with ``mode='fill'`` (zeros) and never reads
another object's rows. Vectorised over voxels (sorted packed keys + ``searchsorted``); the only
Python loops are over objects.
"""

from __future__ import annotations

import numpy as np

# The 27 offsets of a 3³ kernel in spconv's weight order: k = 9 (dx + 1) + 3 (dy + 1) + (dz + 1).
OFFSETS = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), axis=-1).reshape(27, 3)
# The 8 children of a voxel in TRELLIS's SparseSubdivide order (torch.nonzero of a 2³ cube): k = 4 i + 2 j + l.
CHILDREN = np.stack(np.meshgrid(*[np.arange(2)] * 3, indexing="ij"), axis=-1).reshape(8, 3)


def bucket_size(n: int, quantum: int) -> int:
    """The token bucket of ``n`` rows: the smallest positive multiple of ``quantum`` holding them."""
    if quantum <= 0:
        raise ValueError(f"bucket quantum must be positive, got {quantum}")
    return max(quantum, -(-int(n) // quantum) * quantum)


def _valid(coords, mask):
    coords, mask = np.asarray(coords, np.int64), np.asarray(mask, bool)
    if coords.ndim != 3 or coords.shape[-1] != 3 or mask.shape != coords.shape[:2]:
        raise ValueError(f"expected coords (B, N, 3) and mask (B, N), got {coords.shape} and {mask.shape}")
    return coords, mask


def neighbour_table(coords, mask) -> np.ndarray:
    """(B, N, 27) int32: the row of voxel ``p + OFFSETS[k]`` in the same object, or N if it is not active.

    Padding rows get N everywhere. This is the rulebook of a submanifold 3³ convolution.
    """
    coords, mask = _valid(coords, mask)
    b, n, _ = coords.shape
    bi, slot = np.nonzero(mask)
    xyz = coords[bi, slot] + 1  # shifted so that p + delta >= 0
    span = int(xyz.max()) + 2 if len(xyz) else 1

    def pack(obj, c):
        return ((obj * span + c[..., 0]) * span + c[..., 1]) * span + c[..., 2]

    keys = pack(bi, xyz)
    order = np.argsort(keys, kind="stable")
    sorted_keys, sorted_rows = keys[order], slot[order]
    query = pack(bi[:, None], xyz[:, None, :] + OFFSETS[None])  # (M, 27)
    pos = np.minimum(np.searchsorted(sorted_keys, query), len(sorted_keys) - 1)
    out = np.full((b, n, 27), n, np.int32)
    out[bi, slot] = np.where(sorted_keys[pos] == query, sorted_rows[pos], n)
    return out


def downsample_map(coords, mask, quantum: int):
    """TRELLIS's ``SparseDownsample(2)`` structure: parents ``coords // 2``, unique and sorted (x, y, z).

    Returns (coarse coords (B, N', 3) int32, coarse mask (B, N'), parent (B, N) int32 with N' for padding,
    children (B, N', 8) int32: the finer rows of each parent in ascending order, N for none, divisor (B, N')
    float32 = children + 1, 1 on padding). N' is the smallest multiple of ``quantum`` that holds every
    object's parents.
    """
    coords, mask = _valid(coords, mask)
    b, n, _ = coords.shape
    per = []
    for i in range(b):
        cells, inverse, counts = np.unique(coords[i, mask[i]] // 2, axis=0, return_inverse=True, return_counts=True)
        per.append((cells, inverse.reshape(-1), counts))
    n1 = bucket_size(max(len(p[0]) for p in per), quantum)
    out_coords = np.zeros((b, n1, 3), np.int32)
    out_mask = np.zeros((b, n1), bool)
    parent = np.full((b, n), n1, np.int32)
    children = np.full((b, n1, 8), n, np.int32)
    divisor = np.ones((b, n1), np.float32)
    for i, (cells, inverse, counts) in enumerate(per):
        m = len(cells)
        out_coords[i, :m], out_mask[i, :m] = cells, True
        parent[i, : len(inverse)] = inverse
        divisor[i, :m] = counts + 1
        rows = np.argsort(inverse, kind="stable")  # finer rows grouped by parent, ascending within a parent
        sorted_parent = inverse[rows]
        rank = np.arange(len(rows)) - np.searchsorted(sorted_parent, sorted_parent)
        children[i, sorted_parent, rank] = rows
    return out_coords, out_mask, parent, children, divisor


def subdivide_coords(coords, mask):
    """TRELLIS's ``SparseSubdivide``: voxel i becomes rows 8 i + k at ``2 coords + CHILDREN[k]``.

    Returns (coords (B, 8 N, 3) int32, mask (B, 8 N)); valid rows stay first.
    """
    coords, mask = _valid(coords, mask)
    b, n, _ = coords.shape
    child = (2 * coords[:, :, None, :] + CHILDREN[None, None]).reshape(b, 8 * n, 3)
    child_mask = np.repeat(mask, 8, axis=1)
    return np.where(child_mask[..., None], child, 0).astype(np.int32), child_mask


def subdivide_neighbours(neighbours) -> np.ndarray:
    """The (B, 8 N, 27) neighbour table of a level's subdivision (``subdivide_coords``' rows) from its (B, N, 27) one.

    Child k of voxel p sits at ``2 p + CHILDREN[k]``; its neighbour at offset d is child ``(c + d) mod 2`` of the
    parent's neighbour at offset ``floor((c + d) / 2)`` (c = CHILDREN[k]), so the finer table is a gather of the
    coarser one: no search over the 8x (64x for two subdivisions) rows. Sentinels stay sentinels (N -> 8 N).
    """
    nbrs = np.asarray(neighbours)
    if nbrs.ndim != 3 or nbrs.shape[-1] != 27:
        raise ValueError(f"expected a (B, N, 27) neighbour table, got shape {nbrs.shape}")
    b, n, _ = nbrs.shape
    t = CHILDREN[:, None, :] + OFFSETS[None]  # (8, 27, 3): child corner + offset, in [-1, 2]
    up = np.floor_divide(t, 2)  # the parent's offset, in {-1, 0, 1}
    parent_offset = 9 * (up[..., 0] + 1) + 3 * (up[..., 1] + 1) + (up[..., 2] + 1)  # (8, 27)
    kid = t - 2 * up
    child = (4 * kid[..., 0] + 2 * kid[..., 1] + kid[..., 2]).astype(np.int32)  # (8, 27)
    # 8 p on the coarse table (sentinel n -> 8 n), then one gather and two in-place passes over the fine one:
    # 8 p + child < 8 n for a real neighbour, >= 8 n for the sentinel, which the minimum maps back to 8 n
    eight = np.where(nbrs < n, 8 * nbrs.astype(np.int32), np.int32(8 * n))
    out = np.take(eight, parent_offset.reshape(-1), axis=2)  # (B, N, 8 * 27)
    out += child.reshape(-1)
    np.minimum(out, np.int32(8 * n), out=out)
    return out.reshape(b, 8 * n, 27)


def window_partition(coords, mask, window: int, shift: int = 0):
    """Swin windows of TRELLIS's ``calc_window_partition``: voxel p is in window ``(p + shift) // window``.

    The rows of each object are sorted by window and cut into chunks of ``window³`` rows (a window
    spans at most two consecutive chunks). Returns (perm (B, P) int32: the row at each sorted position,
    N for padding; window (B, P) int32: its window id, -1 for padding; inverse (B, N) int32: the sorted
    position of each row, P for padding), with P a multiple of ``window³``.
    """
    coords, mask = _valid(coords, mask)
    b, n, _ = coords.shape
    chunk = window**3
    p = bucket_size(n, chunk)
    perm = np.full((b, p), n, np.int32)
    wid = np.full((b, p), -1, np.int32)
    inverse = np.full((b, n), p, np.int32)
    for i in range(b):
        m = int(mask[i].sum())
        _, win = np.unique((coords[i, :m] + shift) // window, axis=0, return_inverse=True)
        win = win.reshape(-1)
        order = np.argsort(win, kind="stable")
        perm[i, :m], wid[i, :m] = order, win[order]
        inverse[i, order] = np.arange(m)
    return perm, wid, inverse
