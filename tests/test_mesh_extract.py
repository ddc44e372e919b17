"""FlexiCubes mesh extraction (dso_jax.mesh_extract) on analytic SDFs and small known grids.

Parity with TRELLIS's own extractor is in test_mesh_extract_trellis.py (opt-in, needs the fetched sources).
"""

from __future__ import annotations

import numpy as np
import pytest
import trimesh
from twins import trellis_flexicubes as tf

from dso_jax import mesh_extract as mx


def _mesh(fn, res, band=2.0, seed=None):
    xyz = tf.band_coords(fn, res, band, solid=True)
    return mx.extract_mesh(xyz, tf.sdf_features(fn, xyz, res, seed=seed), res)


def _trimesh(m: mx.Mesh) -> trimesh.Trimesh:
    return trimesh.Trimesh(m.vertices, m.faces, process=False)


def _inside_voxel(res, at):
    """One active voxel at ``at`` whose 8 corner SDFs are −0.5 cell (after TRELLIS's −1/res bias)."""
    feats = np.zeros((1, mx.FEAT_CHANNELS), np.float32)
    feats[:, mx.SDF] = 0.5 / res
    return np.array([at]), feats


# ------------------------------------------------------------------------------------------ case tables
def test_case_tables_partition_the_sign_changing_edges():
    edge_patch, num_vd, _, _ = mx.case_tables()
    for case in range(256):
        inside = (case >> np.arange(8)) & 1
        changes = inside[mx.EDGES[:, 0]] != inside[mx.EDGES[:, 1]]
        np.testing.assert_array_equal(edge_patch[case] >= 0, changes, err_msg=f"case {case}")
        assert set(edge_patch[case][changes]) == set(range(num_vd[case])), case
    assert num_vd[0] == num_vd[255] == 0 and num_vd[1:255].min() == 1 and num_vd.max() == 4


def test_case_tables_resolve_ambiguities_like_flexicubes():
    edge_patch, num_vd, check, check_dir = mx.case_tables()
    assert sorted(np.flatnonzero(edge_patch[1] == 0)) == [0, 3, 8]  # corner 0 alone: its 3 edges
    assert num_vd[0b00000110] == 2  # corners 1, 2 on a face diagonal stay apart
    assert num_vd[255 - 0b00000110] == 1  # ... and their complement is one sheet
    assert num_vd[0b10000001] == 2 and num_vd[255 - 0b10000001] == 2  # body diagonal: apart either way
    assert check.sum() == 36  # FlexiCubes' C16/C19 cases
    assert (num_vd[check] == 1).all() and (num_vd[255 - np.flatnonzero(check)] == 2).all()
    assert (np.abs(check_dir[check]).sum(1) == 1).all() and not check_dir[~check].any()


# ------------------------------------------------------------------------------------- analytic shapes
def test_sphere_is_watertight_with_the_right_area_and_volume():
    r = 0.3
    t = _trimesh(_mesh(tf.sphere(r), 64))
    assert t.is_watertight and t.is_winding_consistent and t.euler_number == 2
    assert t.volume > 0  # faces wound towards positive SDF: normals point out
    assert t.area == pytest.approx(4 * np.pi * r**2, rel=0.01)
    assert t.volume == pytest.approx(4 / 3 * np.pi * r**3, rel=0.01)


def test_box_is_watertight_with_the_right_area_volume_and_bounds():
    half = np.array([0.3, 0.2, 0.23])  # faces off the grid planes (an SDF of exactly 0 flips TRELLIS's winding)
    t = _trimesh(_mesh(tf.box(half), 64))
    assert t.is_watertight and t.is_winding_consistent and t.euler_number == 2
    np.testing.assert_allclose(t.bounds, [-half, half], atol=1e-6)  # flat faces are exact
    assert t.volume == pytest.approx(8 * half.prod(), rel=0.01)
    # No QEF in TRELLIS's FlexiCubes: dual vertices are edge-crossing means, so box edges are chamfered (~1 cell).
    assert t.area == pytest.approx(8 * (half[0] * half[1] + half[1] * half[2] + half[0] * half[2]), rel=0.05)


def test_shell_active_set_gets_an_inner_surface():
    # TRELLIS's untouched grid vertices are "outside" (SDF 1), so a shell of active voxels around a solid
    # sphere closes on both sides: two components, outer normals out and inner normals towards the centre.
    xyz = tf.band_coords(tf.sphere(0.3), 32, band=1.5)
    t = _trimesh(mx.extract_mesh(xyz, tf.sdf_features(tf.sphere(0.3), xyz, 32, seed=None), 32))
    parts = sorted(t.split(only_watertight=True), key=lambda p: p.volume)
    assert len(parts) == 2 and parts[0].volume < 0 < parts[1].volume


def test_sdf_bias_moves_the_surface_out_by_one_cell():
    res, r = 64, 0.3
    xyz = tf.band_coords(tf.sphere(r), res, 3.0, solid=True)
    feats = tf.sdf_features(tf.sphere(r), xyz, res, seed=None)
    feats[:, mx.SDF] -= 1.0 / res  # the raw distance: TRELLIS's −1/res bias makes the zero set r + 1/res
    radius = np.linalg.norm(mx.extract_mesh(xyz, feats, res).vertices, axis=1)
    assert radius.mean() == pytest.approx(r + 1.0 / res, abs=0.05 / res)


def test_deformation_shifts_vertices_by_tanh_over_two_res():
    res, z0, d = 16, 0.03, 0.7
    plane = lambda p: p[..., 2] - z0  # crossings only on z edges
    xyz = tf.band_coords(plane, res, 3.0, solid=True)
    feats = tf.sdf_features(plane, xyz, res, seed=None)
    flat = mx.extract_mesh(xyz, feats, res)
    np.testing.assert_allclose(flat.vertices[:, 2], z0, atol=1e-6)
    feats[:, mx.DEFORM] = np.tile([d, 0.0, 0.0], 8)  # every corner pushed along +x
    moved = mx.extract_mesh(xyz, feats, res)
    inner = np.all(np.abs(flat.vertices[:, :2]) < 0.5 - 3.0 / res, axis=1)  # endpoints all touched
    shift = moved.vertices[inner] - flat.vertices[inner]
    np.testing.assert_allclose(shift, np.tile([np.tanh(d) * (1 - 1e-8) / (2 * res), 0, 0], (inner.sum(), 1)), atol=1e-6)


def test_vertex_colors_are_sigmoid_of_the_rgb_channels():
    res = 32
    xyz = tf.band_coords(tf.sphere(0.3), res, 3.0, solid=True)  # every crossing edge has touched endpoints
    feats = tf.sdf_features(tf.sphere(0.3), xyz, res, seed=None)
    feats[:, mx.COLOR] = np.tile([-1.0, 0.0, 2.0, 9.0, 9.0, 9.0], 8)  # RGB, then the normal map (ignored)
    colors = mx.extract_mesh(xyz, feats, res).vertex_colors
    np.testing.assert_allclose(colors, np.tile(1 / (1 + np.exp([1.0, 0.0, -2.0])), (len(colors), 1)), atol=1e-6)


# ------------------------------------------------------------------------------------- small known grids
def test_single_inside_voxel_closes_through_the_26_cubes_around_it():
    # Its 8 corners are the only negative vertices; it is not a surface cube itself. The 26 neighbours are
    # outside the active set (zero-init weights): one dual vertex each, one quad per outward corner edge.
    xyz, feats = _inside_voxel(8, [3, 4, 2])
    m = mx.extract_mesh(xyz, feats, 8)
    assert (len(m.vertices), len(m.faces)) == (26, 48)
    t = _trimesh(m)
    assert t.is_watertight and t.is_winding_consistent and t.volume > 0
    cell = (np.array([3, 4, 2]) + 0.5) / 8 - 0.5
    assert np.abs(m.vertices - cell).max() < 1.0 / 8  # around the voxel, within the next cell
    np.testing.assert_allclose(m.vertex_colors, 0.5, atol=1e-7)  # sigmoid(0) on both ends of every edge
    feats[:, mx.WEIGHTS] = np.random.default_rng(0).normal(size=(1, 21)) * 3  # the voxel's own weights
    again = mx.extract_mesh(xyz, feats, 8)  # ... are unused: only non-surface cube
    np.testing.assert_array_equal(again.faces, m.faces)
    np.testing.assert_array_equal(again.vertices, m.vertices)


def test_voxel_at_the_grid_corner_drops_quads_on_the_boundary():
    # Negative vertices {0,1}³: the 7 surface cubes in range give 7 vertices; of the 12 in-grid crossing
    # edges only the 3 from vertex (1,1,1) are shared by 4 cubes, so 3 quads = 6 triangles (an open mesh).
    m = mx.extract_mesh(*_inside_voxel(4, [0, 0, 0]), 4)
    assert (len(m.vertices), len(m.faces)) == (7, 6)


def test_gamma_chooses_the_quad_diagonal():
    res = 16
    xyz = tf.band_coords(tf.sphere(0.3), res, 3.0, solid=True)
    feats = tf.sdf_features(tf.sphere(0.3), xyz, res, seed=None)
    base = mx.extract_mesh(xyz, feats, res)
    feats[:, mx.WEIGHTS.start + 20] = np.where(xyz.sum(1) % 2 == 0, 4.0, -4.0)  # checkerboard γ
    split = mx.extract_mesh(xyz, feats, res)
    np.testing.assert_array_equal(split.vertices, base.vertices)  # γ only triangulates
    assert split.faces.shape == base.faces.shape and not np.array_equal(split.faces, base.faces)
    assert _trimesh(split).is_watertight


# ----------------------------------------------------------------------------------------- batch API
def test_flexicubes_splits_a_batch_by_index():
    xyz, feats = _inside_voxel(8, [3, 4, 2])
    coords = np.array([[0, 3, 4, 2], [2, 1, 1, 1]])
    meshes = mx.flexicubes(coords, np.concatenate([feats, feats]), res=8)
    assert [len(m.faces) for m in meshes] == [48, 0, 48]  # object 1 has no voxels
    shift = np.broadcast_to((np.array([1, 1, 1]) - [3, 4, 2]) / 8, meshes[0].vertices.shape)  # same voxel, moved
    np.testing.assert_allclose(meshes[2].vertices - meshes[0].vertices, shift, atol=1e-6)
    assert len(mx.flexicubes(coords, np.concatenate([feats, feats]), res=8, num_objects=4)) == 4


def test_all_outside_gives_an_empty_mesh():
    xyz, feats = _inside_voxel(8, [3, 4, 2])
    feats[:, mx.SDF] = 0.5  # positive everywhere
    m = mx.extract_mesh(xyz, feats, 8)
    assert m.vertices.shape == (0, 3) and m.faces.shape == (0, 3) and m.vertex_colors.shape == (0, 3)


@pytest.mark.parametrize(
    "coords, feats, match",
    [
        (np.zeros((2, 4), int), np.zeros((2, 100), np.float32), r"feats must be \(M, 101\)"),
        (np.zeros((2, 3), int), np.zeros((2, 101), np.float32), r"coords must be \(M, 4\)"),
        (np.array([[0, 1, 2, 8]]), np.zeros((1, 101), np.float32), "x, y, z < 8"),
        (np.array([[0, 1, 2, 3], [0, 1, 2, 3]]), np.zeros((2, 101), np.float32), "duplicate voxels"),
    ],
)
def test_bad_input_names_the_problem(coords, feats, match):
    with pytest.raises(ValueError, match=match):
        mx.flexicubes(coords, feats, res=8)
