"""Faithfulness of a generated toy object to the object whose front view conditioned it.

Two measures, both jittable and batched over leading axes:
- `iou_3d`: IoU of the two occupancies. The headline: it sees the visible part and the hidden one, so a
  model that turns a top-heavy completion into a stable one pays for the hidden voxels it changes, and a
  model that degenerates (blobs, extruded slabs) pays fully. It is what "mean IoU to the conditioning
  object" means in the toy world's acceptance test.
- `front_iou`: IoU of the front silhouettes (what the condition determines). A stable completion of the same
  condition scores 1.0, so it isolates faithfulness to the condition from the hidden-part choices.
`occupancy_metrics` adds the static check and the voxel count ratio (numpy) for the held-out protocol.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dso_jax.toy import objects


def _iou(a, b, axes):
    inter = jnp.sum(a & b, axis=axes)
    union = jnp.sum(a | b, axis=axes)
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0).astype(jnp.float32)


def iou_3d(a, b):
    """(..., R, R, R) occupancies -> (...,) float32 IoU (1 where both are empty)."""
    return _iou(jnp.asarray(a) > 0, jnp.asarray(b) > 0, (-3, -2, -1))


def front_iou(a, b):
    """(..., R, R, R) occupancies -> (...,) float32 IoU of the silhouettes seen along y (image axes x, z)."""
    sa = jnp.any(jnp.asarray(a) > 0, axis=-2)
    sb = jnp.any(jnp.asarray(b) > 0, axis=-2)
    return _iou(sa, sb, (-2, -1))


def occupancy_metrics(gen, ref) -> dict:
    """Per-object metrics of generations gen (n, S, R³) against their conditioning objects ref (n, R³):
    iou, front_iou, static stable (an empty grid is unstable), voxel count ratio; numpy arrays of shape (n, S)."""
    gen = np.asarray(gen, dtype=bool)
    ref = np.asarray(ref, dtype=bool)[:, None]
    count = gen.sum(axis=(-3, -2, -1))
    return dict(
        iou=np.asarray(iou_3d(gen, ref)),
        front_iou=np.asarray(front_iou(gen, ref)),
        static_stable=objects.static_stability(gen)["stable"] & (count > 0),
        voxel_ratio=count / np.maximum(ref.sum(axis=(-3, -2, -1)), 1),
    )
