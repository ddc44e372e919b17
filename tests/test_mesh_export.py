"""Occupancy -> watertight mesh -> y-up GLB (TRELLIS's to_glb frame), in the unit cube."""

import numpy as np
import pytest
import trimesh

from dso_jax import mesh_export


def _tall_box(d=32):
    occ = np.zeros((d, d, d), bool)
    occ[12:20, 10:22, 0:28] = True  # x 8 voxels, y 12 voxels, z (native up) 28 voxels, on the floor of the grid
    return occ


def test_box_mesh_is_closed_outward_and_in_the_unit_cube_frame():
    d = 32
    mesh = mesh_export.occupancy_to_mesh(_tall_box(d), smooth_iterations=0)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume > 0  # outward normals
    # Voxel i spans [i/D - 0.5, (i+1)/D - 0.5]; the iso-surface sits within 0.05 voxel of the faces.
    lo, hi = mesh.bounds
    np.testing.assert_allclose(lo, np.array([12, 10, 0]) / d - 0.5, atol=0.06 / d)
    np.testing.assert_allclose(hi, np.array([20, 22, 28]) / d - 0.5, atol=0.06 / d)
    np.testing.assert_allclose(mesh.volume, 8 * 12 * 28 / d**3, rtol=0.03)


def test_noisy_occupancy_still_gives_a_watertight_mesh():
    occ = np.random.default_rng(0).random((24, 24, 24)) > 0.5  # checkerboard ties everywhere
    mesh = mesh_export.occupancy_to_mesh(occ)
    assert mesh.is_watertight


def test_smoothing_keeps_the_mesh_closed_and_its_volume():
    raw = mesh_export.occupancy_to_mesh(_tall_box(), smooth_iterations=0)
    smooth = mesh_export.occupancy_to_mesh(_tall_box())
    assert smooth.is_watertight
    assert not np.allclose(raw.vertices, smooth.vertices)
    np.testing.assert_allclose(smooth.volume, raw.volume, rtol=0.02)


def test_glb_is_y_up_via_trellis_frame_change(tmp_path):
    occ = _tall_box()
    path = str(tmp_path / "box.glb")
    native = mesh_export.occupancy_to_glb(occ, path)
    loaded = trimesh.load(path, force="mesh")
    assert loaded.is_watertight
    ext = loaded.extents
    assert np.argmax(ext) == 1  # native +z (the tall axis) is GLB +y
    np.testing.assert_allclose(loaded.vertices, native.vertices @ mesh_export.Z_UP_TO_Y_UP.T, atol=1e-6)
    # (x, y, z) -> (x, z, -y): the native floor (min z) is the GLB's min y; native +y maps to GLB -z.
    np.testing.assert_allclose(loaded.bounds[0, 1], native.bounds[0, 2], atol=1e-6)
    np.testing.assert_allclose(loaded.bounds[1, 2], -native.bounds[0, 1], atol=1e-6)
    assert loaded.volume > 0  # a rotation, not a mirror: still outward


def test_empty_and_malformed_grids_are_rejected_with_a_reason():
    with pytest.raises(mesh_export.EmptyOccupancyError, match="empty occupancy"):
        mesh_export.occupancy_to_mesh(np.zeros((8, 8, 8), bool))
    with pytest.raises(ValueError, match="cubic"):
        mesh_export.occupancy_to_mesh(np.ones((8, 8, 4), bool))
