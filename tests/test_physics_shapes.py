"""Shared primitive shapes for the physics tests (occupancy grids and meshes); holds no tests itself."""

from __future__ import annotations

import functools

import numpy as np
import trimesh

MESH_BATCH = 8  # every mesh-path test simulates chunks of this size with mesh_sim_config(): one compile


@functools.cache
def mesh_simulator():
    """One jitted simulator with the default config, shared by the test modules (compiled once per session)."""
    import jax

    from dso_jax.physics import rollout

    return jax.jit(rollout.make_simulator(rollout.mesh_sim_config()))


def grid_centres(d: int) -> np.ndarray:
    return (np.arange(d) + 0.5) / d - 0.5


def box_occ(lo, hi, d: int = 32) -> np.ndarray:
    """Solid axis-aligned box [lo, hi] in the grid frame, as a bool (d, d, d) occupancy."""
    c = grid_centres(d)
    x, y, z = np.meshgrid(c, c, c, indexing="ij")
    return (x >= lo[0]) & (x <= hi[0]) & (y >= lo[1]) & (y <= hi[1]) & (z >= lo[2]) & (z <= hi[2])


def rotated_box_occ(extents, tilt_deg: float, d: int = 32) -> np.ndarray:
    """Box of the given extents centred at 0, rotated about x by tilt_deg (it stands on an edge)."""
    c = grid_centres(d)
    p = np.stack(np.meshgrid(c, c, c, indexing="ij"), -1)
    t = np.deg2rad(tilt_deg)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    q = p @ rot  # inverse rotation of the points
    return np.all(np.abs(q) <= np.asarray(extents) / 2, axis=-1)


def box_mesh(extents, center=(0, 0, 0), tilt_deg: float = 0.0) -> trimesh.Trimesh:
    m = trimesh.creation.box(extents=extents)
    if tilt_deg:
        m.apply_transform(trimesh.transformations.rotation_matrix(np.deg2rad(tilt_deg), [1, 0, 0]))
    m.apply_translation(center)
    return m


def l_mesh(overhang: bool) -> trimesh.Trimesh:
    """A post with an arm on top (two touching boxes, concatenated); with overhang=True the arm reaches far past
    the post's base and the object topples."""
    post = box_mesh((0.15, 0.2, 0.8), center=(-0.375, 0, -0.1))
    arm_len = 0.9 if overhang else 0.15
    arm = box_mesh((arm_len, 0.2, 0.2), center=(-0.45 + arm_len / 2, 0, 0.4))
    return trimesh.util.concatenate([post, arm])


def wedge_mesh() -> trimesh.Trimesh:
    """A convex wedge (triangular prism) lying on one rectangular face."""
    v = np.array(
        [
            [-0.4, -0.3, -0.2],
            [0.4, -0.3, -0.2],
            [-0.4, 0.3, -0.2],
            [0.4, 0.3, -0.2],
            [-0.4, -0.3, 0.3],
            [-0.4, 0.3, 0.3],
        ]
    )
    return trimesh.convex.convex_hull(v)
