"""Swin windowed self-attention on padded sparse features (TRELLIS's ``attn_mode="swin"``, the SLat decoders).

TRELLIS (``sparse/attention/windowed_attn.py``) puts voxel p of object b in window
``(b, (p + shift) // window)`` and runs attention within each window; blocks alternate shift 0 and
``window // 2``. With static shapes: the rows of each object are sorted by window
(:func:`window_partition`, host side, built once) and cut into chunks of ``window³`` rows, the most a
window can hold, so a window spans at most two consecutive chunks; each chunk attends to itself and its
two neighbours with a same-window mask. No row ever sees another window or another object.

Full (per-object) attention needs no partition: ``dso_jax.models.attention`` passes each object's
valid length as ``query_seq_lengths`` / ``key_value_seq_lengths`` (cuDNN on GPU, masked XLA elsewhere).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dso_jax.sparse import tables
from dso_jax.sparse.spatial import gather_rows


@struct.dataclass
class WindowPartition:
    """The window sort of one level: see ``tables.window_partition``."""

    perm: jax.Array  # (B, P) int32 row at each sorted position (N for padding)
    window_ids: jax.Array  # (B, P) int32 window of each sorted position (-1 for padding)
    inverse: jax.Array  # (B, N) int32 sorted position of each row (P for padding)
    window: int = struct.field(pytree_node=False, default=8)
    shift: int = struct.field(pytree_node=False, default=0)


def window_partition(coords, mask, window: int, shift: int = 0) -> WindowPartition:
    """Host side: the :class:`WindowPartition` of a level's coords (B, N, 3) and mask (B, N)."""
    perm, wid, inverse = tables.window_partition(np.asarray(coords), np.asarray(mask), window, shift)
    return WindowPartition(perm=perm, window_ids=wid, inverse=inverse, window=window, shift=shift)


def _with_neighbour_chunks(a, fill):
    """(B, C, K, ...) -> (B, C, 3K, ...): each chunk preceded by the previous and followed by the next one."""
    pad = [(0, 0), (1, 1)] + [(0, 0)] * (a.ndim - 2)
    p = jnp.pad(a, pad, constant_values=fill)
    return jnp.concatenate([p[:, :-2], p[:, 1:-1], p[:, 2:]], axis=2)


def windowed_attention(q, k, v, part: WindowPartition, implementation: Optional[str] = None):
    """q, k, v (B, N, H, D) -> (B, N, H, D): softmax attention (scale 1/sqrt(D)) within each window of ``part``."""
    b, n, h, d = q.shape
    chunk = part.window**3
    p = part.perm.shape[1]
    c = p // chunk

    def sort(x):  # (B, N, H, D) -> (B, C, K, H, D) in window order
        return gather_rows(x.reshape(b, n, h * d), part.perm).reshape(b, c, chunk, h, d)

    qs = sort(q).reshape(b * c, chunk, h, d)
    ks = _with_neighbour_chunks(sort(k), 0).reshape(b * c, 3 * chunk, h, d)
    vs = _with_neighbour_chunks(sort(v), 0).reshape(b * c, 3 * chunk, h, d)
    wq = part.window_ids.reshape(b, c, chunk)
    wk = _with_neighbour_chunks(wq, -1)
    mask = (wq[..., :, None] == wk[..., None, :]).reshape(b * c, 1, chunk, 3 * chunk)  # padding sees padding only
    out = jax.nn.dot_product_attention(qs, ks, vs, mask=mask, implementation=implementation)
    return gather_rows(out.reshape(b, p, h * d), part.inverse).reshape(b, n, h, d)
