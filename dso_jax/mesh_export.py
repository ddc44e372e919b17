"""Meshes -> GLB in TRELLIS's unit-cube frame: stage 1's occupancy (marching cubes) and stage 2's final mesh.

A stage-1 occupancy (D, D, D) has axes (x, y, z) of TRELLIS's native z-up frame; voxel i has its centre at
``(i + 0.5) / D - 0.5`` (``trellis.md`` §1.5). The mesh is the ~0.5 iso-surface of the occupancy padded
by one empty voxel on every side (so it is closed), extracted with scikit-image's marching cubes
(Lewiner), then lightly smoothed with trimesh's Taubin filter (shrink-free, keeps the topology).
The GLB is written y-up like TRELLIS's ``to_glb``: ``(x, y, z) -> (x, z, -y)``, a proper rotation, so
face winding (outward normals) is kept. Stage 2's FlexiCubes mesh (``dso_jax.mesh_extract``, optionally
``dso_jax.mesh_postprocess``) is written the same way with its vertex colours (:func:`write_colored_glb`).
"""

from __future__ import annotations

import os

import numpy as np
import trimesh

# TRELLIS's to_glb: native z-up (x, y, z) -> GLB y-up (x, z, -y). Rows map native to GLB coordinates.
Z_UP_TO_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
SMOOTH_ITERATIONS = 5  # Taubin passes; enough to take the voxel staircase off, not to round corners much
# On a binary grid a level of exactly 0.5 ties marching cubes' face-saddle test (a checkerboard face has
# saddle value 0.5), which leaves non-manifold edges; just below 0.5 decides every tie as "connected"
# (voxels sharing an edge join, as the physics' solid cubes do) and moves the surface by 0.05 voxel.
ISO_LEVEL = 0.45


class EmptyOccupancyError(ValueError):
    """The occupancy has no occupied voxel, so there is no surface to mesh."""


def occupancy_to_mesh(occ, smooth_iterations: int = SMOOTH_ITERATIONS) -> trimesh.Trimesh:
    """(D, D, D) occupancy (bool, or floats thresholded at 0.5) -> watertight mesh in the native z-up frame.

    Vertices lie in [-0.5, 0.5]^3 (the unit cube of the grid); normals point out of the object.
    Raises :class:`EmptyOccupancyError` for an empty grid.
    """
    from skimage import measure

    occ = np.asarray(occ)
    if occ.ndim != 3 or len(set(occ.shape)) != 1:
        raise ValueError(f"occupancy must be a cubic (D, D, D) grid, got shape {occ.shape}")
    filled = (occ > 0.5) if np.issubdtype(occ.dtype, np.floating) else occ.astype(bool)
    if not filled.any():
        raise EmptyOccupancyError("empty occupancy: no voxel is occupied (all logits <= 0)")
    d = occ.shape[0]
    padded = np.pad(filled.astype(np.float32), 1)  # (D+2,)^3: the surface cannot touch the border -> closed
    verts, faces, _, _ = measure.marching_cubes(padded, level=ISO_LEVEL, method="lewiner")
    # Padded index p is voxel p - 1, whose centre is (p - 1 + 0.5) / D - 0.5.
    verts = (verts - 0.5) / d - 0.5
    # skimage orients faces for a surface whose inside is *below* the level; ours is above: flip them.
    mesh = trimesh.Trimesh(vertices=verts, faces=faces[:, ::-1], process=True)
    if smooth_iterations > 0:
        trimesh.smoothing.filter_taubin(mesh, iterations=smooth_iterations)
    return mesh


def to_y_up(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A copy of a native z-up mesh in GLB's y-up frame, TRELLIS's (x, y, z) -> (x, z, -y)."""
    out = mesh.copy()
    out.vertices = np.asarray(mesh.vertices) @ Z_UP_TO_Y_UP.T
    return out


def write_glb(mesh_z_up: trimesh.Trimesh, path: str) -> str:
    """Write a native z-up mesh as a y-up GLB (atomically: a partial file never has the final name)."""
    data = to_y_up(mesh_z_up).export(file_type="glb")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def occupancy_to_glb(occ, path: str, smooth_iterations: int = SMOOTH_ITERATIONS) -> trimesh.Trimesh:
    """Mesh ``occ`` and write it to ``path`` as a y-up GLB; returns the native z-up mesh."""
    mesh = occupancy_to_mesh(occ, smooth_iterations)
    write_glb(mesh, path)
    return mesh


def write_colored_glb(vertices, faces, vertex_colors, path: str) -> trimesh.Trimesh:
    """A native z-up mesh with per-vertex RGB in [0, 1] -> a y-up GLB with a COLOR_0 attribute (atomically); returns
    the z-up trimesh. Raises ``ValueError`` for a mesh without faces."""
    faces = np.asarray(faces)
    if faces.size == 0:
        raise ValueError("empty mesh: stage 2 found no surface (every FlexiCubes SDF has one sign)")
    rgb = np.clip(np.round(np.asarray(vertex_colors, np.float64) * 255), 0, 255).astype(np.uint8)
    rgba = np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], axis=1)
    mesh = trimesh.Trimesh(np.asarray(vertices, np.float64), faces, vertex_colors=rgba, process=False)
    write_glb(mesh, path)
    return mesh
