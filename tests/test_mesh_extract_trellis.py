"""dso_jax.mesh_extract against TRELLIS's own FlexiCubes code, run from fetched sources (opt-in).

    DSO_JAX_FLEXICUBES_SRC=/work/ext/FlexiCubes DSO_JAX_TRELLIS_SRC=/work/ext/TRELLIS pytest tests/test_mesh_extract_trellis.py

FlexiCubes is github:MaxtirError/FlexiCubes (TRELLIS's submodule), TRELLIS github:microsoft/TRELLIS, each exported
to a folder (``git archive``). The mesh comparison needs torch (test-only) and both folders.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from twins import trellis_flexicubes as tf

from dso_jax import mesh_extract as mx

FC_SRC = os.environ.get("DSO_JAX_FLEXICUBES_SRC", "")
TRELLIS_SRC = os.environ.get("DSO_JAX_TRELLIS_SRC", "")
needs_fc = pytest.mark.skipif(not FC_SRC, reason="set DSO_JAX_FLEXICUBES_SRC to a FlexiCubes checkout")
needs_both = pytest.mark.skipif(
    not (FC_SRC and TRELLIS_SRC), reason="set DSO_JAX_FLEXICUBES_SRC and DSO_JAX_TRELLIS_SRC to the checkouts"
)
TOL = 1e-5  # float32 on both sides; observed ~2e-7 (vertices and colours)


@needs_fc
def test_generated_tables_equal_flexicubes_tables():
    spec = importlib.util.spec_from_file_location("flexicubes_tables", os.path.join(FC_SRC, "tables.py"))
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    edge_patch, num_vd, check, check_dir = mx.case_tables()
    for case in range(256):
        ours = [sorted(np.flatnonzero(edge_patch[case] == i)) for i in range(num_vd[case])]
        theirs = [[e for e in row if e != -1] for row in tables.dmc_table[case] if row[0] != -1]
        assert ours == theirs, case  # same patches, same patch order, same edge order
    np.testing.assert_array_equal(num_vd, tables.num_vd_table)
    theirs = np.array(tables.check_table)
    np.testing.assert_array_equal(check, theirs[:, 0] == 1)
    np.testing.assert_array_equal(check_dir, theirs[:, 1:4])
    np.testing.assert_array_equal(theirs[check, 4], 255 - np.flatnonzero(check))


def _assert_same(ours: mx.Mesh, theirs):
    got = tf.compare_meshes(ours, theirs)
    assert got["vertices"][0] == got["vertices"][1] and got["faces"][0] == got["faces"][1], got
    assert got["one_to_one"] and got["faces_equal_as_sets"], got
    assert got["same_arrays"], got  # TRELLIS's vertex and face order too
    assert got["max_vertex_err_same_order"] <= TOL and got["max_color_err_same_order"] <= TOL, got


@needs_both
def test_random_sign_patterns_match_trellis():
    # Random active sets and SDFs near zero: every case, ambiguous faces, C16/C19 inversions, cubes outside
    # the active set and at the grid boundary all occur.
    res = 12
    mesher = tf.trellis_mesher(TRELLIS_SRC, FC_SRC, res)
    for seed in range(4):
        rng = np.random.default_rng(seed)
        xyz = np.argwhere(rng.random((res, res, res)) < 0.1 + 0.15 * seed)
        feats = rng.normal(size=(len(xyz), mx.FEAT_CHANNELS)).astype(np.float32)
        feats[:, mx.SDF] = rng.normal(size=(len(xyz), 8)) * 0.05 + 0.02 * (seed - 1.5)
        _assert_same(mx.extract_mesh(xyz, feats, res), mesher(xyz, feats))


@needs_both
def test_torus_shell_matches_trellis():
    res = 32
    xyz = tf.shell_coords(tf.torus(), res, coarse=res // 4)
    feats = tf.sdf_features(tf.torus(), xyz, res, seed=1)
    _assert_same(mx.extract_mesh(xyz, feats, res), tf.trellis_mesher(TRELLIS_SRC, FC_SRC, res)(xyz, feats))


@needs_both
def test_flexicubes_of_the_mesh_decoder_output_matches_trellis():
    """The SparseBatch adapter on a (tiny, random-weight) mesh decoder's own output, object by object, against
    TRELLIS's SparseFeatures2Mesh at the decoder's output grid (16³ SLat -> 64³)."""
    import jax
    from helpers_trellis import TINY_MESH_DECODER_ARGS, decoder_pair

    from dso_jax import sparse
    from dso_jax.convert import trellis_slat
    from dso_jax.models.slat_decoders import decoder_input

    apply_fn, params, _ = decoder_pair(trellis_slat.SLAT_MESH_DECODER, TINY_MESH_DECODER_ARGS, seed=7)
    coords = sparse.example_coords((260, 120), 16, seed=7)
    feats = np.random.default_rng(7).standard_normal((len(coords), 8)).astype(np.float32)
    raw = jax.jit(apply_fn)(params, decoder_input(coords, feats, quantum=256, **apply_fn.module.input_kwargs))
    ours = mx.flexicubes(raw)
    mesher = tf.trellis_mesher(TRELLIS_SRC, FC_SRC, raw.resolution)
    rows, out = sparse.to_trellis(raw)
    assert len(ours) == 2
    for b in range(2):
        sel = rows[:, 0] == b
        assert len(ours[b].faces) > 0
        _assert_same(ours[b], mesher(rows[sel, 1:].astype(np.int64), out[sel]))
