"""TRELLIS -> Flax conversion: rules, key tables, released dtypes, strictness, files, CLI and loading."""

import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers_cli import error_line, run_script
from helpers_trellis import (
    DECODER_NAME,
    FLOW_NAME,
    TINY_DECODER_ARGS,
    TINY_FLOW_ARGS,
    random_state_dict,
    write_checkpoint,
    write_trellis_folder,
)
from safetensors.numpy import load_file, save_file
from twins import trellis_twin as tw

from dso_jax.convert import rules, trellis
from dso_jax.convert.verify import ConversionError, tree_diff
from dso_jax.models import load_pretrained
from dso_jax.models.pretrained import buffers_of, model_from_config
from dso_jax.models.pretrained import convert_trellis as convert_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOW_CFG = {"name": trellis.FLOW, "args": dict(TINY_FLOW_ARGS)}
DEC_CFG = {"name": trellis.DECODER, "args": dict(TINY_DECODER_ARGS)}


def flow_buffers(config=FLOW_CFG):
    return buffers_of(model_from_config(config["name"], config["args"]))


# ----------------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "torch_key,kind,flax_key",
    [
        ("blocks.3.adaLN_modulation.1.weight", "linear", "blocks_3/adaLN_modulation_1/kernel"),
        ("t_embedder.mlp.0.bias", "linear", "t_embedder/mlp_0/bias"),
        ("blocks.0.mlp.mlp.2.weight", "linear", "blocks_0/mlp/mlp_2/kernel"),
        ("blocks.1.norm2.weight", "layernorm", "blocks_1/norm2/scale"),
        ("out_layer.0.weight", "layernorm", "out_layer_0/scale"),
        ("out_layer.0.weight", "groupnorm", "out_layer_0/scale"),
        ("middle_block.1.conv2.weight", "conv3d", "middle_block_1/conv2/kernel"),
        ("blocks.0.self_attn.q_rms_norm.gamma", "rmsnorm", "blocks_0/self_attn/q_rms_norm/gamma"),
        ("pos_emb", rules.BUFFER, None),
    ],
)
def test_flax_key(torch_key, kind, flax_key):
    assert rules.flax_key(torch_key, kind) == flax_key


def test_leaf_layouts():
    w = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)  # Linear (out, in)
    k = rules.leaf_rule("linear", "x.weight").to_flax(w)
    assert k.shape == (4, 6) and k[1, 5] == w[5, 1]
    c = np.arange(5 * 3 * 2 * 3 * 4, dtype=np.float32).reshape(5, 3, 2, 3, 4)  # Conv3d (O, I, kx, ky, kz)
    ck = rules.leaf_rule("conv3d", "x.weight").to_flax(c)
    assert ck.shape == (2, 3, 4, 3, 5) and ck[1, 2, 3, 2, 4] == c[4, 2, 1, 2, 3]
    for kind, a, f in (("linear", w, k), ("conv3d", c, ck)):
        rule = rules.leaf_rule(kind, "x.weight")
        np.testing.assert_array_equal(rule.to_torch(f), a)
        assert rule.flax_shape(a.shape) == f.shape
    with pytest.raises(ValueError, match="no conversion rule"):
        rules.leaf_rule("linear", "x.gamma")


# ----------------------------------------------------------------------------------------------------
# Key tables vs the twins (both written from the reference) and vs the module-type conversion path
# ----------------------------------------------------------------------------------------------------

TABLE_CASES = [
    (tw.SparseStructureFlowModel, FLOW_CFG),
    (
        tw.SparseStructureFlowModel,
        {
            "name": trellis.FLOW,
            "args": {
                **TINY_FLOW_ARGS,
                "share_mod": True,
                "qk_rms_norm": False,
                "qk_rms_norm_cross": True,
                "use_fp16": False,
            },
        },
    ),
    (tw.SparseStructureDecoder, DEC_CFG),
    (
        tw.SparseStructureDecoder,
        {"name": trellis.DECODER, "args": {**TINY_DECODER_ARGS, "channels": [32, 32], "norm_type": "group"}},
    ),
]


@pytest.mark.parametrize("cls,config", TABLE_CASES)
def test_key_table_is_the_twin_state_dict(cls, config):
    sd = cls(**config["args"]).state_dict()
    table = trellis.key_table(config)
    assert [e.torch_key for e in table] == list(sd)  # names and order
    assert {e.torch_key: (e.shape, e.released) for e in table} == {
        k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in sd.items()
    }  # shapes and released dtypes


@pytest.mark.parametrize("cls,config", TABLE_CASES)
def test_table_conversion_equals_module_type_conversion(cls, config):
    twin = tw.randomize_(cls(**config["args"]), seed=3)
    if config["name"] == trellis.FLOW:
        twin.pos_emb.copy_(
            tw.ape(
                tw.grid(config["args"]["resolution"] // config["args"]["patch_size"]), config["args"]["model_channels"]
            )
        )
    sd = {k: v.numpy() for k, v in twin.state_dict().items()}
    params = trellis.convert_state_dict(
        sd, config, buffers=flow_buffers(config) if config["name"] == trellis.FLOW else None
    )
    jax.tree.map(np.testing.assert_array_equal, params, tw.flax_params_of(twin))


# ----------------------------------------------------------------------------------------------------
# Released dtypes and the export direction
# ----------------------------------------------------------------------------------------------------


def test_released_dtypes_convert_exactly(tmp_path):
    prefixes = write_trellis_folder(str(tmp_path))
    flow_sd = load_file(prefixes[FLOW_NAME] + ".safetensors")
    half = {k for k, v in flow_sd.items() if v.dtype == np.float16}
    assert half == {k for k in flow_sd if k.startswith("blocks.") and ".norm2." not in k and "rms_norm" not in k}
    assert all(flow_sd[k].dtype == np.float32 for k in set(flow_sd) - half)  # pos_emb, t_embedder, io layers, norms
    dec_sd = load_file(prefixes[DECODER_NAME] + ".safetensors")
    half = {k for k, v in dec_sd.items() if v.dtype == np.float16}
    assert half == {k for k in dec_sd if k.split(".")[0] in ("blocks", "middle_block") and ".conv" in k}

    for sd, config, buffers in ((flow_sd, FLOW_CFG, flow_buffers()), (dec_sd, DEC_CFG, None)):
        flat = rules.flatten(trellis.convert_state_dict(sd, config, buffers=buffers))
        for e in trellis.key_table(config):
            if e.kind != rules.BUFFER:
                assert flat[e.flax_key].dtype == np.float32
                np.testing.assert_array_equal(
                    rules.leaf_rule(e.kind, e.torch_key).to_torch(flat[e.flax_key]), sd[e.torch_key].astype(np.float32)
                )  # fp16 -> fp32 is exact


@pytest.mark.parametrize("config", [FLOW_CFG, DEC_CFG])
def test_export_round_trips_bitwise(config):
    sd = random_state_dict(config, seed=5)
    buffers = flow_buffers() if config["name"] == trellis.FLOW else None
    back = trellis.params_to_torch_state_dict(
        trellis.convert_state_dict(sd, config, buffers=buffers), config, buffers=buffers
    )
    assert list(back) == list(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype, k
        if k != "pos_emb":  # the buffer is exported as recomputed (equal to 1e-6, not bitwise)
            np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    as_f32 = trellis.params_to_torch_state_dict(
        trellis.convert_state_dict(sd, config, buffers=buffers), config, dtype="float32"
    )
    assert "pos_emb" not in as_f32 and all(v.dtype == np.float32 for v in as_f32.values())


def test_exported_state_dict_loads_strictly_into_the_twin():
    sd = random_state_dict(FLOW_CFG, seed=6)
    params = trellis.convert_state_dict(sd, FLOW_CFG, buffers=flow_buffers())
    back = trellis.params_to_torch_state_dict(params, FLOW_CFG, buffers=flow_buffers())
    twin = tw.SparseStructureFlowModel(**FLOW_CFG["args"])
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


# ----------------------------------------------------------------------------------------------------
# Strictness: every problem named, all in one error
# ----------------------------------------------------------------------------------------------------

KEY = "blocks.1.cross_attn.to_kv.weight"


def convert_bad(sd, config=FLOW_CFG):
    with pytest.raises(ConversionError) as info:
        buffers = flow_buffers() if config["name"] == trellis.FLOW else None
        trellis.convert_state_dict(sd, config, buffers=buffers, source="ckpt.safetensors")
    return str(info.value)


def test_renamed_key_is_named():
    sd = random_state_dict(FLOW_CFG)
    sd["blocks.1.cross_attn.to_kvv.weight"] = sd.pop(KEY)
    msg = convert_bad(sd)
    assert f"ckpt.safetensors: missing key '{KEY}' (expected shape (128, 32))" in msg
    assert "ckpt.safetensors: unexpected key 'blocks.1.cross_attn.to_kvv.weight' (shape (128, 32), float16)" in msg


def test_missing_key_is_named():
    sd = random_state_dict(DEC_CFG)
    del sd["middle_block.0.norm2.bias"]
    assert "ckpt.safetensors: missing key 'middle_block.0.norm2.bias' (expected shape (32,))" in convert_bad(
        sd, DEC_CFG
    )


def test_wrong_shape_is_named():
    sd = random_state_dict(FLOW_CFG)
    sd[KEY] = sd[KEY][:, :30]
    assert f"ckpt.safetensors: mis-shaped key '{KEY}': shape (128, 30), expected (128, 32)" in convert_bad(sd)


def test_every_problem_in_one_error():
    sd = random_state_dict(FLOW_CFG)
    sd["extra.weight"] = np.zeros(3, np.float32)
    del sd["out_layer.bias"]
    sd["input_layer.weight"] = sd["input_layer.weight"].T
    sd["blocks.0.norm2.bias"] = sd["blocks.0.norm2.bias"].astype(np.int32)
    msg = convert_bad(sd)
    assert msg.startswith("ckpt.safetensors does not match SparseStructureFlowModel: 4 problem(s)")
    for part in (
        "unexpected key 'extra.weight'",
        "missing key 'out_layer.bias'",
        "mis-shaped key 'input_layer.weight'",
        "mis-typed key 'blocks.0.norm2.bias': dtype int32",
    ):
        assert part in msg


def test_pos_emb_must_equal_the_recomputed_buffer():
    sd = random_state_dict(FLOW_CFG)
    sd["pos_emb"] = sd["pos_emb"].copy()
    sd["pos_emb"][3, 7] += 1e-3
    assert "buffer 'pos_emb' differs from its recomputed value (max |diff| 0.001" in convert_bad(sd)
    with pytest.raises(TypeError, match="pos_emb"):
        trellis.convert_state_dict(random_state_dict(FLOW_CFG), FLOW_CFG)  # no recomputed value given


def test_bad_config_is_named():
    with pytest.raises(ConversionError, match="unknown arg 'model_chanels'"):
        trellis.key_table({"name": trellis.FLOW, "args": {**TINY_FLOW_ARGS, "model_chanels": 3}})
    with pytest.raises(ConversionError, match="missing required arg 'channels'"):
        trellis.key_table(
            {"name": trellis.DECODER, "args": {k: v for k, v in TINY_DECODER_ARGS.items() if k != "channels"}}
        )
    with pytest.raises(ConversionError, match="'NoSuchModel' is not a model we convert"):
        trellis.key_table({"name": "NoSuchModel", "args": {}})


def test_missing_files_name_the_path(tmp_path):
    prefix = str(tmp_path / "ckpts" / "model")
    os.makedirs(tmp_path / "ckpts")
    with open(prefix + ".json", "w") as f:
        json.dump(DEC_CFG, f)
    with pytest.raises(FileNotFoundError, match=f"{prefix}.safetensors: no such file"):
        trellis.read_checkpoint(prefix)
    with open(prefix + ".safetensors", "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(ConversionError, match=f"{prefix}.safetensors: not a readable safetensors file"):
        trellis.read_checkpoint(prefix)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/pipeline.json"):
        trellis.pipeline_stage1_prefixes(str(tmp_path))


def test_tree_diff_lists_every_difference():
    want = {
        "a": {"kernel": jax.ShapeDtypeStruct((2, 3), jnp.float32), "bias": jax.ShapeDtypeStruct((3,), jnp.float32)},
        "b": {"scale": jax.ShapeDtypeStruct((4,), jnp.float32)},
        "c": {"gamma": jax.ShapeDtypeStruct((1,), jnp.float32)},
    }
    got = {
        "a": {"kernel": np.zeros((3, 2), np.float32), "bias": np.zeros(3, np.float16)},
        "b": {"scale": np.zeros(4, np.float32)},
        "d": {"gamma": np.zeros(1, np.float32)},
    }
    with pytest.raises(ConversionError) as info:
        tree_diff(got, want, source="DIR/params.safetensors")
    lines = str(info.value).splitlines()
    assert lines[0] == "converted params do not match the model: 4 problem(s)"
    assert sorted(lines[1:]) == sorted(
        [
            "DIR/params.safetensors: missing key 'c/gamma' (expected shape (1,))",
            "DIR/params.safetensors: unexpected key 'd/gamma' (shape (1,), float32)",
            "DIR/params.safetensors: mis-shaped key 'a/kernel': shape (3, 2), expected (2, 3)",
            "DIR/params.safetensors: mis-typed key 'a/bias': dtype float16, expected float32",
        ]
    )


# ----------------------------------------------------------------------------------------------------
# Folders, CLI and load_pretrained
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("trellis"))
    write_trellis_folder(out)
    return out


@pytest.fixture(scope="module")
def dst(src, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("converted"))
    logs = []
    folders = convert_folder(src, out, verify=True, log=logs.append)
    assert folders == [os.path.join(out, FLOW_NAME), os.path.join(out, DECODER_NAME)]
    assert sum(line.startswith("verify ") and "finite and deterministic" in line for line in logs) == 2
    return out


@pytest.mark.parametrize("name,config", [(FLOW_NAME, FLOW_CFG), (DECODER_NAME, DEC_CFG)])
def test_converted_folder_layout_and_manifest(src, dst, name, config):
    folder, prefix = os.path.join(dst, name), os.path.join(src, "ckpts", name)
    assert sorted(os.listdir(folder)) == ["config.json", "manifest.json", "params.safetensors"]
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f) == config
    flat = load_file(os.path.join(folder, "params.safetensors"))
    assert {k: v.shape for k, v in flat.items()} == trellis.expected_flax_shapes(config)
    assert all(v.dtype == np.float32 for v in flat.values())
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    with open(prefix + ".safetensors", "rb") as f:
        assert manifest["source"]["sha256"] == hashlib.sha256(f.read()).hexdigest()
    source = load_file(prefix + ".safetensors")
    assert {t["name"]: (tuple(t["shape"]), t["dtype"]) for t in manifest["tensors"]} == {
        k: (v.shape, v.dtype.name) for k, v in source.items()
    }
    assert {t["flax"] for t in manifest["tensors"]} - {None} == set(flat)
    assert manifest["params"]["count"] == sum(v.size for v in flat.values())
    with open(os.path.join(dst, "source_pipeline.json")) as f, open(os.path.join(src, "pipeline.json")) as g:
        assert json.load(f) == json.load(g)


def test_cli_converts_one_prefix_and_verifies(src, tmp_path):
    prefix = os.path.join(src, "ckpts", DECODER_NAME)
    run = subprocess.run(
        [sys.executable, "convert_trellis.py", "--src", prefix, "--dst", str(tmp_path), "--verify"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert run.returncode == 0, run.stderr
    assert f"verify {tmp_path}/{DECODER_NAME}: output (1, 1, 64, 64, 64) finite and deterministic" in run.stdout
    assert os.path.isfile(tmp_path / DECODER_NAME / "params.safetensors")
    again = subprocess.run(  # the real __main__: an expected error is one line and exit 2, no traceback
        [sys.executable, "convert_trellis.py", "--src", prefix, "--dst", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.splitlines()[0] == (
        f"convert_trellis.py: error: {tmp_path}: the destination exists and is not empty (remove it, or pass --overwrite)"
    )


def test_cli_refuses_a_bad_checkpoint_naming_the_key_and_leaves_no_partial_dst(tmp_path):
    sd = random_state_dict(DEC_CFG)
    del sd["blocks.0.conv1.bias"]
    prefix = write_checkpoint(str(tmp_path / "ckpts" / DECODER_NAME), DEC_CFG, sd)
    rc, _, err = run_script("convert_trellis", ["--src", prefix, "--dst", tmp_path / "out"])
    assert rc == 2 and f"{prefix}.safetensors: missing key 'blocks.0.conv1.bias'" in error_line(err)
    assert not os.path.exists(tmp_path / "out")
    rc, _, err = run_script("convert_trellis", ["--src", tmp_path / "nothing", "--dst", tmp_path / "out"])
    assert rc == 2 and "nothing: neither a TRELLIS folder" in error_line(err)


def test_a_failure_after_the_first_model_leaves_no_partial_dst(tmp_path):
    prefixes = write_trellis_folder(str(tmp_path / "src"))
    with open(prefixes[DECODER_NAME] + ".safetensors", "wb") as f:
        f.write(b"truncated")  # the second model of the folder is unreadable
    with pytest.raises(ConversionError, match="not a readable safetensors file"):
        convert_folder(str(tmp_path / "src"), str(tmp_path / "dst"), log=lambda _: None)
    assert os.listdir(tmp_path) == ["src"]  # neither DST nor its temporary sibling


def test_existing_non_empty_destination_is_refused_unless_overwrite(src, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="dst: the destination exists and is not empty"):
        convert_folder(src, str(dst), log=lambda _: None)
    assert os.listdir(dst) == ["notes.txt"]
    convert_folder(src, str(dst), overwrite=True, log=lambda _: None)
    assert sorted(os.listdir(dst)) == sorted([DECODER_NAME, FLOW_NAME, "source_pipeline.json"])
    (tmp_path / "file").write_text("x")
    rc, _, err = run_script("convert_trellis", ["--src", src, "--dst", tmp_path / "file"])
    assert rc == 2 and "the destination exists and is a file" in error_line(err)


def test_pipeline_json_without_a_stage1_flow_entry_is_reported(tmp_path):
    write_trellis_folder(str(tmp_path / "src"))
    with open(tmp_path / "src" / "pipeline.json") as f:
        pipe = json.load(f)
    del pipe["args"]["models"]["sparse_structure_flow_model"]
    with open(tmp_path / "src" / "pipeline.json", "w") as f:
        json.dump(pipe, f)
    rc, _, err = run_script("convert_trellis", ["--src", tmp_path / "src", "--dst", tmp_path / "dst"])
    assert rc == 2 and "pipeline.json: args.models has no 'sparse_structure_flow_model' entry" in error_line(err)
    assert not os.path.exists(tmp_path / "dst")


def test_float64_and_non_finite_tensors_are_refused_naming_them():
    sd = random_state_dict(FLOW_CFG)
    sd["out_layer.weight"] = sd["out_layer.weight"].astype(np.float64)
    sd[KEY] = sd[KEY].copy()
    sd[KEY][0, :3] = [np.nan, np.inf, -np.inf]
    msg = convert_bad(sd)
    assert "mis-typed key 'out_layer.weight': dtype float64, expected one of ('float16', 'bfloat16', 'float32')" in msg
    assert f"tensor '{KEY}' has 3 non-finite value(s)" in msg


def test_a_converted_folder_with_non_finite_params_is_refused(dst, tmp_path):
    folder = tmp_path / "nan"
    os.makedirs(folder)
    flat = load_file(os.path.join(dst, DECODER_NAME, "params.safetensors"))
    flat["out_layer_2/bias"] = np.full_like(flat["out_layer_2/bias"], np.nan)
    save_file(flat, str(folder / "params.safetensors"))
    for name in ("config.json", "manifest.json"):
        with open(os.path.join(dst, DECODER_NAME, name)) as f_in, open(folder / name, "w") as f_out:
            f_out.write(f_in.read())
    with pytest.raises(ConversionError, match="tensor 'out_layer_2/bias' has 1 non-finite value"):
        load_pretrained(str(folder))


@pytest.mark.parametrize("name", [FLOW_NAME, DECODER_NAME])
def test_load_pretrained_converted_folder_equals_trellis_prefix(src, dst, name):
    fn_a, params_a = load_pretrained(os.path.join(dst, name))
    fn_b, params_b = load_pretrained(os.path.join(src, "ckpts", name))
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
    assert "params" not in params_a  # the inner dict, what variables['params'] is
    if name == FLOW_NAME:
        inputs = (jnp.ones((1, 4, 8, 8, 8)), jnp.array([500.0]), jnp.ones((1, 3, 32)))
    else:
        inputs = (jnp.ones((1, 4, 4, 4, 4)),)
    out_a, out_b = jax.jit(fn_a)(params_a, *inputs), jax.jit(fn_b)(params_b, *inputs)
    assert out_a.shape == ((1, 4, 8, 8, 8) if name == FLOW_NAME else (1, 1, 16, 16, 16))
    np.testing.assert_allclose(np.asarray(out_a), np.asarray(out_b), rtol=0, atol=1e-5)


def test_load_pretrained_output_matches_the_twin(src):
    prefix = os.path.join(src, "ckpts", FLOW_NAME)
    apply_fn, params = load_pretrained(prefix)
    twin = tw.SparseStructureFlowModel(**{**TINY_FLOW_ARGS, "use_fp16": False})
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(prefix + ".safetensors").items()})
    rng = np.random.default_rng(0)
    x, c = rng.standard_normal((2, 4, 8, 8, 8), np.float32), rng.standard_normal((2, 5, 32), np.float32)
    t = np.array([10.0, 990.0], np.float32)
    with torch.no_grad():
        ref = twin(*map(torch.from_numpy, (x, t, c))).numpy()
    out = np.asarray(jax.jit(apply_fn)(params, x, t, c))
    assert np.max(np.abs(out - ref)) <= 1e-5 * np.max(np.abs(ref))


def test_load_pretrained_dtypes(src):
    prefix = os.path.join(src, "ckpts", FLOW_NAME)
    apply_fn, params = load_pretrained(prefix)
    assert apply_fn.module.dtype == jnp.float32  # CPU default, even though the json says use_fp16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    apply_fn, params = load_pretrained(prefix, dtype="bfloat16")
    assert apply_fn.module.dtype == jnp.bfloat16 and all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_load_pretrained_bad_paths(src, dst, tmp_path):
    with pytest.raises(ValueError, match="TRELLIS pipeline folder; load one model"):
        load_pretrained(src)
    with pytest.raises(ValueError, match="holds converted models"):
        load_pretrained(dst)
    with pytest.raises(FileNotFoundError, match="neither a converted folder"):
        load_pretrained(str(tmp_path / "nope"))


def test_tampered_converted_folder_is_refused(dst, tmp_path):
    folder = tmp_path / "bad"
    os.makedirs(folder)
    flat = load_file(os.path.join(dst, DECODER_NAME, "params.safetensors"))
    del flat["blocks_1/conv/bias"]
    save_file(flat, str(folder / "params.safetensors"))
    for name in ("config.json", "manifest.json"):
        with open(os.path.join(dst, DECODER_NAME, name)) as f_in, open(folder / name, "w") as f_out:
            f_out.write(f_in.read())
    with pytest.raises(ConversionError, match=f"{folder}/params.safetensors: missing key 'blocks_1/conv/bias'"):
        load_pretrained(str(folder))
