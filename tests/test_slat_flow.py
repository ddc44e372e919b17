"""The Flax SLat flow model vs its PyTorch twin (``tests/twins/slat_twin.py``), fp32 on CPU; pinned sizes.

Weights: one random state dict at the released dtypes, loaded into both sides (the Flax side through the
strict converter). Inputs: two objects of different voxel counts in one padded batch. Tolerance:
max |flax - torch| <= 1e-4 x max |torch| (measured 2-3e-6 of the scale, tiny and full width). The 2-block
full-width test keeps the released widths (1024 channels, 16 heads, io channels 128, cond 1024) on
a 64³ grid with ~2-3k voxels per object; ``DSO_JAX_SLOW_TESTS=1`` adds a larger (6k + 4k voxel) variant.
"""

import os

import helpers_trellis  # noqa: E402
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers_trellis import RELEASED_SLAT_ARGS, TINY_SLAT_ARGS, random_state_dict, slat_pair
from twins import slat_twin as st

from dso_jax import sparse
from dso_jax.convert import rules, trellis, trellis_slat
from dso_jax.models.pretrained import abstract_params, example_inputs, model_from_config
from dso_jax.models.slat_flow import SparseResBlock3d

torch.set_num_threads(2)
REL = 1e-4
SLOW = os.environ.get("DSO_JAX_SLOW_TESTS") == "1"


def assert_parity(out, ref, rel=REL):
    helpers_trellis.assert_parity(out, ref, rel)


def slat_inputs(args, counts, cond_len=6, seed=0, quantum=256, coarse_quantum=64):
    """(coords (M, 4), feats (M, C), t (B,), cond (B, S, Cc)) and the matching SparseBatch."""
    rng = np.random.default_rng(seed)
    coords = sparse.example_coords(counts, args["resolution"], seed=seed)
    feats = rng.standard_normal((len(coords), args["in_channels"])).astype(np.float32)
    t = np.array([870.0, 130.0][: len(counts)], np.float32)
    cond = rng.standard_normal((len(counts), cond_len, args["cond_channels"])).astype(np.float32)
    downsamples = len(args.get("io_block_channels") or ())
    x = sparse.from_trellis(
        coords,
        feats,
        resolution=args["resolution"],
        downsamples=downsamples,
        quantum=quantum,
        coarse_quantum=coarse_quantum,
    )
    return (coords, feats, t, cond), x


def check_model(args, counts, seed=0, **kw):
    apply_fn, params, twin = slat_pair(args, seed=seed)
    (coords, feats, t, cond), x = slat_inputs(args, counts, seed=seed, **kw)
    out = jax.jit(apply_fn)(params, x, t, cond)
    out_coords, out_feats = sparse.to_trellis(out)
    with torch.no_grad():
        ref = twin(st.from_numpy(coords, feats), torch.from_numpy(t), torch.from_numpy(cond))
    np.testing.assert_array_equal(out_coords, ref.coords.numpy())  # the same voxels, in the input's order
    assert_parity(out_feats, ref.feats.numpy())
    assert not np.asarray(out.feats)[~np.asarray(out.mask)].any()  # padding rows are zero


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_io_res_blocks": 3, "mlp_ratio": 2.5, "qk_rms_norm_cross": True},
        {"use_skip_connection": False, "qk_rms_norm": False, "num_heads": None, "num_head_channels": 16},
        {"io_block_channels": None, "share_mod": True},
    ],
)
def test_slat_flow_tiny(overrides):
    check_model({**TINY_SLAT_ARGS, **overrides}, counts=(700, 380))


def _block_params(twin_block):
    """Flax params of a twin SparseResBlock3d through the conversion rules (kind from the key)."""
    kind = lambda k: "layernorm" if ".norm" in f".{k}" else "spconv" if ".conv." in k else "linear"
    flat = {}
    for k, v in twin_block.state_dict().items():
        flat[rules.flax_key(k, kind(k))] = rules.leaf_rule(kind(k), k).to_flax(v.numpy())
    return rules.unflatten(flat)


@pytest.mark.parametrize("mode", ["plain", "downsample", "upsample"])
def test_sparse_res_block(mode):
    cin, cout = (12, 12) if mode == "plain" else (12, 20)
    (coords, feats, _, _), x = slat_inputs({**TINY_SLAT_ARGS, "in_channels": cin}, (700, 380), seed=4)
    twin = st.randomize_(
        st.SparseResBlock3d(cin, 32, cout, downsample=mode == "downsample", upsample=mode == "upsample"), 5
    )
    block = SparseResBlock3d(cin, 32, cout, downsample=mode == "downsample", upsample=mode == "upsample")
    emb = np.random.default_rng(6).standard_normal((2, 32)).astype(np.float32)
    fine, coarse = x.levels
    inp, h, level_out = st.from_numpy(coords, feats), x.feats, coarse if mode == "downsample" else fine
    if mode == "upsample":  # the input lives on the coarse level, made by the downsample it pairs with
        inp, h = st.SparseDownsample()(inp), sparse.downsample(x.feats, coarse)
    out = jax.jit(lambda p, h, e: block.apply({"params": p}, h, e, fine, coarse))(_block_params(twin), h, emb)
    with torch.no_grad():
        ref = twin(inp, torch.from_numpy(emb))
    b, n = np.nonzero(np.asarray(level_out.mask))
    np.testing.assert_array_equal(np.c_[b, np.asarray(level_out.coords)[b, n]], ref.coords.numpy())
    assert_parity(np.asarray(out)[b, n], ref.feats.numpy(), rel=1e-5)


def test_slat_flow_full_width_two_blocks():
    check_model({**RELEASED_SLAT_ARGS, "num_blocks": 2}, counts=(2600, 1900), quantum=1024, coarse_quantum=256)


@pytest.mark.skipif(not SLOW, reason="set DSO_JAX_SLOW_TESTS=1 (about 1.5 min on 2 cores)")
def test_slat_flow_full_width_two_blocks_large():
    check_model({**RELEASED_SLAT_ARGS, "num_blocks": 2}, counts=(6000, 4000), quantum=4096, coarse_quantum=1024)


def test_one_compile_serves_objects_of_different_sizes_in_a_bucket():
    apply_fn, params, _ = slat_pair(TINY_SLAT_ARGS, seed=1)
    fn = jax.jit(apply_fn)
    for counts, seed in (((700, 380), 0), ((520, 610), 1), ((900, 40), 2)):
        _, x = slat_inputs(TINY_SLAT_ARGS, counts, seed=seed, quantum=1024, coarse_quantum=256)
        assert x.feats.shape[1] == 1024 and x.levels[1].size == 256  # same buckets, different voxel counts
        fn(params, x, jnp.array([500.0, 20.0]), jnp.ones((2, 6, 32))).feats.block_until_ready()
    assert fn._cache_size() == 1


def test_remat_and_bf16_torso():
    apply_fn, params, _ = slat_pair(TINY_SLAT_ARGS, seed=2)
    (_, _, t, cond), x = slat_inputs(TINY_SLAT_ARGS, (300, 200), seed=2)
    ref = np.asarray(jax.jit(apply_fn)(params, x, t, cond).feats)
    remat = model_from_config(trellis_slat.SLAT_FLOW, {**TINY_SLAT_ARGS, "use_checkpoint": True})
    out = jax.jit(lambda p: remat.apply({"params": p}, x, t, cond).feats)(params)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-5)
    half = model_from_config(trellis_slat.SLAT_FLOW, TINY_SLAT_ARGS, dtype=jnp.bfloat16)
    out = np.asarray(jax.jit(lambda p: half.apply({"params": p}, x, t, cond).feats)(params))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert np.max(np.abs(out - ref)) <= 0.1 * np.max(np.abs(ref))  # bf16 torso: loose, not parity


def test_bad_inputs_are_named():
    module = model_from_config(trellis_slat.SLAT_FLOW, TINY_SLAT_ARGS)
    x, t, cond = example_inputs(module, batch=2)
    params = abstract_params(module)
    flat = sparse.SparseBatch(feats=x.feats, levels=x.levels[:1])
    with pytest.raises(
        ValueError, match=r"x has 1 level\(s\), needs 2: build it with sparse.from_trellis\(\.\.\., downsamples=1\)"
    ):
        jax.eval_shape(lambda: module.apply({"params": params}, flat, t, cond))
    with pytest.raises(ValueError, match=r"x.feats has shape \(2, 512, 3\), expected \(B, N, 8\)"):
        jax.eval_shape(lambda: module.apply({"params": params}, x.replace(feats=x.feats[..., :3]), t, cond))
    for overrides, match in (
        ({"pe_mode": "rope"}, "'rope' does not run in TRELLIS either"),
        ({"share_mod": True}, "share_mod with io_block_channels does not run in TRELLIS either"),
        ({"io_block_channels": [16, 32], "patch_size": 4}, "2 io stages; TRELLIS's down/upsample caches collide"),
    ):
        bad = model_from_config(trellis_slat.SLAT_FLOW, {**TINY_SLAT_ARGS, **overrides})
        with pytest.raises(NotImplementedError, match=match):
            jax.eval_shape(lambda: bad.init(jax.random.PRNGKey(0), x, t, cond))


# ----------------------------------------------------------------------------------------------------
# Sizes and key tables
# ----------------------------------------------------------------------------------------------------


def test_released_param_count_via_eval_shape():
    shapes = abstract_params(model_from_config(trellis_slat.SLAT_FLOW, RELEASED_SLAT_ARGS))  # nothing allocated
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 600_432_520  # trellis.md §4.4


def test_released_key_table_sizes_and_entries():
    table = trellis.key_table({"name": trellis_slat.SLAT_FLOW, "args": RELEASED_SLAT_ARGS})
    params = sum(int(np.prod(e.shape)) for e in table)  # the SLat flow has no buffers
    nbytes = sum(int(np.prod(e.shape)) * np.dtype(e.released).itemsize for e in table)
    assert (len(table), params, nbytes) == (526, 600_432_520, 1_203_701_792)  # trellis.md §4.4, the HF file size
    by_key = {e.torch_key: (e.shape, e.released) for e in table}
    want = {  # trellis.md §4.4
        "input_layer.weight": ((128, 8), "float32"),
        "input_blocks.0.norm1.weight": ((128,), "float32"),
        "input_blocks.0.conv1.conv.weight": ((128, 3, 3, 3, 128), "float16"),
        "input_blocks.1.conv1.conv.weight": ((1024, 3, 3, 3, 128), "float16"),
        "input_blocks.1.conv2.conv.bias": ((1024,), "float16"),
        "input_blocks.1.emb_layers.1.weight": ((2048, 1024), "float16"),
        "input_blocks.1.skip_connection.weight": ((1024, 128), "float16"),
        "blocks.23.self_attn.q_rms_norm.gamma": ((16, 64), "float32"),
        "blocks.0.adaLN_modulation.1.weight": ((6144, 1024), "float16"),
        "out_blocks.0.norm1.bias": ((2048,), "float32"),
        "out_blocks.0.conv1.conv.weight": ((128, 3, 3, 3, 2048), "float16"),
        "out_blocks.0.skip_connection.weight": ((128, 2048), "float16"),
        "out_blocks.1.conv1.conv.weight": ((128, 3, 3, 3, 256), "float16"),
        "out_blocks.1.emb_layers.1.weight": ((256, 1024), "float16"),
        "out_layer.weight": ((8, 128), "float32"),
    }
    assert {k: by_key[k] for k in want} == want
    assert "input_blocks.0.skip_connection.weight" not in by_key and "pos_emb" not in by_key


TABLE_CASES = [
    TINY_SLAT_ARGS,
    {**TINY_SLAT_ARGS, "io_block_channels": [16, 32], "patch_size": 4, "num_io_res_blocks": 3, "use_fp16": False},
    {**TINY_SLAT_ARGS, "use_skip_connection": False, "qk_rms_norm_cross": True},
    {**TINY_SLAT_ARGS, "io_block_channels": None, "share_mod": True},
]


@pytest.mark.parametrize("args", TABLE_CASES)
def test_key_table_is_the_twin_state_dict(args):
    sd = st.SLatFlowModel(**args).state_dict()
    table = trellis.key_table({"name": trellis_slat.SLAT_FLOW, "args": args})
    assert [e.torch_key for e in table] == list(sd)
    assert {e.torch_key: (e.shape, e.released) for e in table} == {
        k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in sd.items()
    }


@pytest.mark.parametrize(
    "args", [RELEASED_SLAT_ARGS] + [a for a in TABLE_CASES if len(a["io_block_channels"] or ()) < 2]
)
def test_key_table_matches_the_flax_module(args):
    config = {"name": trellis_slat.SLAT_FLOW, "args": args}
    shapes = {k: tuple(v.shape) for k, v in rules.flatten(abstract_params(model_from_config(**config))).items()}
    assert trellis.expected_flax_shapes(config) == shapes


def test_elastic_name_is_the_same_model():
    config = {"name": "ElasticSLatFlowModel", "args": TINY_SLAT_ARGS}
    sd = random_state_dict(config)
    a = trellis.convert_state_dict(sd, config)
    b = trellis.convert_state_dict(sd, {**config, "name": trellis_slat.SLAT_FLOW})
    jax.tree.map(np.testing.assert_array_equal, a, b)
