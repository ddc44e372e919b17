"""The Flax SLat mesh / Gaussian decoders vs their PyTorch twins (``tests/twins/slat_decoder_twin.py``), fp32 on CPU;
pinned sizes and key tables; the subdivided levels' tables.

Weights: one random state dict at the released dtypes, loaded into both sides (the Flax side through the strict
converter). Inputs: two objects of unequal voxel counts in one padded batch. Tolerance: max |flax - torch| <=
1e-4 x max |torch|. The mesh decoder runs at a 16³ grid (output 64³: 64x the voxels), the full-width
variants keep the released widths (768 channels, 12 heads, 8³ windows) with 2 blocks; ``DSO_JAX_SLOW_TESTS=1``
adds the released 64³ grid.
"""

import os

import helpers_trellis  # noqa: E402
import jax
import numpy as np
import pytest
import torch
from helpers_trellis import (
    RELEASED_GS_DECODER_ARGS,
    RELEASED_MESH_DECODER_ARGS,
    TINY_GS_DECODER_ARGS,
    TINY_MESH_DECODER_ARGS,
    decoder_pair,
)
from twins import slat_decoder_twin as dt
from twins import slat_twin as st

from dso_jax import sparse
from dso_jax.convert import rules, trellis, trellis_slat
from dso_jax.models.pretrained import abstract_params, example_inputs, model_from_config
from dso_jax.models.slat_decoders import block_shifts, decoder_input
from dso_jax.sparse import tables

torch.set_num_threads(2)
REL = 1e-4
SLOW = os.environ.get("DSO_JAX_SLOW_TESTS") == "1"
MESH, GS = trellis_slat.SLAT_MESH_DECODER, trellis_slat.SLAT_GS_DECODER


def assert_parity(out, ref, rel=REL):
    helpers_trellis.assert_parity(out, ref, rel)


def check_decoder(name, args, counts, seed=0, quantum=256):
    apply_fn, params, twin = decoder_pair(name, args, seed=seed)
    rng = np.random.default_rng(seed)
    coords = sparse.example_coords(counts, args["resolution"], seed=seed)
    feats = (2.0 * rng.standard_normal((len(coords), args["latent_channels"]))).astype(np.float32)
    x = decoder_input(coords, feats, quantum=quantum, **apply_fn.module.input_kwargs)
    out = jax.jit(apply_fn)(params, x)
    out_coords, out_feats = sparse.to_trellis(out)
    with torch.no_grad():
        ref = twin(st.from_numpy(coords, feats))
    np.testing.assert_array_equal(out_coords, ref.coords.numpy())  # same voxels in TRELLIS's (subdivide) order
    assert_parity(out_feats, ref.feats.numpy())
    assert not np.asarray(out.feats)[~np.asarray(out.mask)].any()  # padding rows are zero
    return out


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {  # every other arg in one run
            "attn_mode": "full",
            "qk_rms_norm": True,
            "mlp_ratio": 2.5,
            "num_heads": None,
            "num_head_channels": 32,
            "representation_config": {"use_color": False},
        },
    ],
)
def test_mesh_decoder_tiny(overrides):
    out = check_decoder(MESH, {**TINY_MESH_DECODER_ARGS, **overrides}, counts=(300, 170))
    assert out.resolution == 64 and out.feats.shape == (
        2,
        64 * 512,
        101 if not overrides.get("representation_config") else 53,
    )


@pytest.mark.parametrize("overrides", [{}, {"attn_mode": "full", "qk_rms_norm": True}])
def test_gaussian_decoder_tiny(overrides):
    out = check_decoder(GS, {**TINY_GS_DECODER_ARGS, **overrides}, counts=(700, 380), seed=1)
    assert out.resolution == 16 and out.feats.shape == (2, 768, 448)


def test_mesh_decoder_full_width_two_blocks():
    check_decoder(MESH, {**RELEASED_MESH_DECODER_ARGS, "num_blocks": 2, "resolution": 16}, counts=(230, 140), seed=2)


def test_gaussian_decoder_full_width_two_blocks():
    check_decoder(GS, {**RELEASED_GS_DECODER_ARGS, "num_blocks": 2}, counts=(600, 350), seed=3)


@pytest.mark.skipif(not SLOW, reason="set DSO_JAX_SLOW_TESTS=1 (the released 64³ grid: 256³ output, minutes)")
def test_mesh_decoder_full_width_released_grid():
    check_decoder(MESH, {**RELEASED_MESH_DECODER_ARGS, "num_blocks": 2}, counts=(1500, 900), seed=4, quantum=2048)


def test_swin_windows_are_trellis_windows():
    """Each block sees the windows of (coords + shift) // window; odd blocks shift by window // 2 (TRELLIS)."""
    assert block_shifts("swin", 4, 8) == (0, 4, 0, 4) and block_shifts("full", 4, 8) == ()
    coords = sparse.example_coords((400, 250), 16, seed=5)
    x = decoder_input(
        coords, np.zeros((len(coords), 8), np.float32), resolution=16, window_size=4, shifts=(0, 2), quantum=256
    )
    level = x.levels[0]
    for part in level.windows:
        perm, wid = np.asarray(part.perm), np.asarray(part.window_ids)
        for b in range(2):
            valid = wid[b] >= 0
            rows = perm[b][valid]
            cells = (np.asarray(level.coords)[b, rows] + part.shift) // 4
            # the sorted rows come in runs of one window each, and one window id is one cell
            for w in np.unique(wid[b][valid]):
                assert len(np.unique(cells[wid[b][valid] == w], axis=0)) == 1
            assert len(np.unique(wid[b][valid])) == len(np.unique(cells, axis=0))


def test_subdivided_levels_are_trellis_subdivisions():
    coords = sparse.example_coords((300, 120), 16, seed=6)
    x = decoder_input(coords, np.zeros((len(coords), 8), np.float32), resolution=16, subdivisions=2, quantum=256)
    assert [lv.resolution for lv in x.levels] == [16, 32, 64] and [lv.size for lv in x.levels] == [512, 4096, 32768]
    twin = st.from_numpy(coords, np.zeros((len(coords), 1), np.float32))
    for k in (1, 2):
        twin = st.subdivide(twin)
        lv = x.levels[k]
        b, n = np.nonzero(np.asarray(lv.mask))
        np.testing.assert_array_equal(np.c_[b, np.asarray(lv.coords)[b, n]], twin.coords.numpy())
        np.testing.assert_array_equal(lv.neighbours, tables.neighbour_table(lv.coords, lv.mask))  # searched afresh


def test_bad_inputs_are_named():
    module = model_from_config(MESH, TINY_MESH_DECODER_ARGS)
    (x,) = example_inputs(module, batch=2)
    params = abstract_params(module)
    flat = sparse.SparseBatch(feats=x.feats, levels=x.levels[:1])
    with pytest.raises(ValueError, match=r"x needs 2 subdivided level\(s\) with neighbour tables: build it with"):
        jax.eval_shape(lambda p: module.apply({"params": p}, flat), params)
    bare = x.replace(levels=(x.levels[0].replace(windows=()),) + x.levels[1:])
    with pytest.raises(ValueError, match=r"needs the window partition of shift 0; x has shifts \[\]"):
        jax.eval_shape(lambda p: module.apply({"params": p}, bare), params)
    with pytest.raises(ValueError, match=r"x.feats has shape \(2, 512, 3\), expected \(B, N, 8\)"):
        jax.eval_shape(lambda p: module.apply({"params": p}, x.replace(feats=x.feats[..., :3])), params)
    for overrides, err, match in (
        ({"pe_mode": "rope"}, NotImplementedError, "'rope' does not run in TRELLIS either"),
        ({"attn_mode": "shift_window"}, NotImplementedError, "needs TRELLIS's vox2seq CUDA extension"),
    ):
        bad = model_from_config(MESH, {**TINY_MESH_DECODER_ARGS, **overrides})
        with pytest.raises(err, match=match):
            jax.eval_shape(lambda: bad.init(jax.random.PRNGKey(0), x))


# ----------------------------------------------------------------------------------------------------
# Sizes and key tables
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, args, entries, params, nbytes",
    [
        (MESH, RELEASED_MESH_DECODER_ARGS, 120, 90_926_693, 181_891_796),  # trellis.md §4.6, the HF file sizes
        (GS, RELEASED_GS_DECODER_ARGS, 101, 85_369_024, 171_441_280),
    ],
)
def test_released_sizes(name, args, entries, params, nbytes):
    table = trellis.key_table({"name": name, "args": args})
    assert len(table) == entries
    assert sum(int(np.prod(e.shape)) for e in table if e.kind != rules.BUFFER) == params
    assert sum(int(np.prod(e.shape)) * np.dtype(e.released).itemsize for e in table) == nbytes
    shapes = abstract_params(model_from_config(name, args))  # eval_shape: nothing allocated
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == params


def test_released_key_entries():
    mesh = {
        e.torch_key: (e.shape, e.released)
        for e in trellis.key_table({"name": MESH, "args": RELEASED_MESH_DECODER_ARGS})
    }
    want = {  # trellis.md §4.6
        "input_layer.weight": ((768, 8), "float32"),
        "blocks.11.attn.to_qkv.weight": ((2304, 768), "float16"),
        "blocks.0.mlp.mlp.2.bias": ((768,), "float16"),
        "upsample.0.act_layers.0.weight": ((768,), "float32"),
        "upsample.0.out_layers.0.conv.weight": ((192, 3, 3, 3, 768), "float16"),
        "upsample.0.out_layers.1.bias": ((192,), "float32"),
        "upsample.0.skip_connection.conv.weight": ((192, 1, 1, 1, 768), "float16"),
        "upsample.1.out_layers.3.conv.weight": ((96, 3, 3, 3, 96), "float16"),
        "out_layer.weight": ((101, 96), "float32"),
    }
    assert {k: mesh[k] for k in want} == want
    assert not any("norm" in k and k.startswith("blocks.") for k in mesh)  # block LNs have no parameters
    gs = trellis.key_table({"name": GS, "args": RELEASED_GS_DECODER_ARGS})
    assert (gs[0].torch_key, gs[0].kind, gs[0].shape, gs[0].released) == (
        "offset_perturbation",
        "buffer",
        (32, 3),
        "float32",
    )
    assert (gs[-2].torch_key, gs[-2].shape, gs[-2].released) == ("out_layer.weight", (448, 768), "float32")


TABLE_CASES = [
    (MESH, TINY_MESH_DECODER_ARGS),
    (MESH, {**TINY_MESH_DECODER_ARGS, "qk_rms_norm": True, "use_fp16": False, "representation_config": {}}),
    (GS, TINY_GS_DECODER_ARGS),
    (GS, {**TINY_GS_DECODER_ARGS, "qk_rms_norm": True, "num_heads": None, "num_head_channels": 16}),
]


@pytest.mark.parametrize("name, args", TABLE_CASES)
def test_key_table_is_the_twin_state_dict(name, args):
    cls = dt.SLatMeshDecoder if name == MESH else dt.SLatGaussianDecoder
    sd = cls(**args).state_dict()
    table = trellis.key_table({"name": name, "args": args})
    assert [e.torch_key for e in table] == list(sd)
    assert {e.torch_key: (e.shape, e.released) for e in table} == {
        k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in sd.items()
    }


@pytest.mark.parametrize(
    "name, args", TABLE_CASES + [(MESH, RELEASED_MESH_DECODER_ARGS), (GS, RELEASED_GS_DECODER_ARGS)]
)
def test_key_table_matches_the_flax_module(name, args):
    config = {"name": name, "args": args}
    shapes = {k: tuple(v.shape) for k, v in rules.flatten(abstract_params(model_from_config(**config))).items()}
    assert trellis.expected_flax_shapes(config) == shapes


def test_bad_configs_are_named():
    with pytest.raises(trellis.ConversionError, match="model_channels 64 must be a multiple of 256"):
        trellis.key_table({"name": MESH, "args": {**TINY_MESH_DECODER_ARGS, "model_channels": 64}})
    with pytest.raises(
        trellis.ConversionError, match=r"needs representation_config with \['num_gaussians', 'voxel_size'\]"
    ):
        trellis.key_table({"name": GS, "args": {**TINY_GS_DECODER_ARGS, "representation_config": None}})
    with pytest.raises(trellis.ConversionError, match="unknown arg 'window' for SLatMeshDecoder"):
        trellis.key_table({"name": MESH, "args": {**TINY_MESH_DECODER_ARGS, "window": 8}})
