"""SLat flow conversion: released dtypes, strictness, export, the CLI (folder and prefix), ``load_pretrained``.

Checkpoints are random TRELLIS-format files written by ``helpers_trellis`` at the released dtypes (tiny
widths; ``DSO_JAX_SLOW_TESTS=1`` adds the released architecture through the CLI, ~1.2 GB on disk).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers_trellis import (
    DECODER_NAME,
    FLOW_NAME,
    RELEASED_SLAT_ARGS,
    SLAT_NAME,
    TINY_SLAT_ARGS,
    random_state_dict,
    write_checkpoint,
    write_trellis_folder,
)
from safetensors.numpy import load_file
from twins import slat_twin as st

import convert_trellis
from dso_jax import cli, sparse
from dso_jax.convert import rules, trellis, trellis_slat
from dso_jax.convert.verify import ConversionError
from dso_jax.models import load_pretrained
from dso_jax.models.pretrained import convert_trellis as convert_folder
from dso_jax.models.slat_flow import SLatFlowModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = {"name": trellis_slat.SLAT_FLOW, "args": dict(TINY_SLAT_ARGS)}
SLOW = os.environ.get("DSO_JAX_SLOW_TESTS") == "1"
TORSO = ("input_blocks.", "blocks.", "out_blocks.")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("trellis"))
    write_trellis_folder(out, slat_args=TINY_SLAT_ARGS)
    return out


@pytest.fixture(scope="module")
def dst(src, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("converted"))
    logs = []
    folders = convert_folder(src, out, verify=True, log=logs.append)
    assert folders == [os.path.join(out, n) for n in (FLOW_NAME, DECODER_NAME, SLAT_NAME)]
    assert any(line.startswith(f"verify {out}/{SLAT_NAME}: output (1, 512, 8) finite") for line in logs), logs
    return out


def test_released_dtypes_convert_exactly(src):
    sd = load_file(os.path.join(src, "ckpts", SLAT_NAME + ".safetensors"))
    half = {k for k, v in sd.items() if v.dtype == np.float16}
    assert half == {k for k in sd if k.startswith(TORSO) and ".norm" not in k and "rms_norm" not in k}
    assert all(sd[k].dtype == np.float32 for k in set(sd) - half)  # t_embedder, io layers, norms, RMS gammas
    flat = rules.flatten(trellis.convert_state_dict(sd, CFG))
    for e in trellis.key_table(CFG):
        assert flat[e.flax_key].dtype == np.float32
        back = rules.leaf_rule(e.kind, e.torch_key).to_torch(flat[e.flax_key])
        np.testing.assert_array_equal(back, sd[e.torch_key].astype(np.float32))  # fp16 -> fp32 is exact
    w = sd["input_blocks.0.conv1.conv.weight"]  # spconv (O, kx, ky, kz, I) -> (kx, ky, kz, I, O)
    assert flat["input_blocks_0/conv1/conv/kernel"][2, 0, 1, 5, 3] == np.float32(w[3, 2, 0, 1, 5])


def test_export_round_trips_and_loads_into_the_twin():
    sd = random_state_dict(CFG, seed=4)
    back = trellis.params_to_torch_state_dict(trellis.convert_state_dict(sd, CFG), CFG)
    assert list(back) == list(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype, k
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    st.SLatFlowModel(**CFG["args"]).load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


KEY = "out_blocks.0.conv1.conv.weight"  # (16, 3, 3, 3, 128): concat[h, skip] of 2 x 64 channels -> 16


def convert_bad(sd):
    with pytest.raises(ConversionError) as info:
        trellis.convert_state_dict(sd, CFG, source="slat.safetensors")
    return str(info.value)


def test_renamed_missing_and_misshaped_keys_are_named():
    sd = random_state_dict(CFG)
    sd["out_blocks.0.conv1.conv.weights"] = sd.pop(KEY)
    del sd["input_blocks.1.skip_connection.bias"]
    sd["blocks.1.self_attn.to_qkv.weight"] = sd["blocks.1.self_attn.to_qkv.weight"][:, :60]
    msg = convert_bad(sd)
    assert msg.startswith("slat.safetensors does not match SLatFlowModel: 4 problem(s)")
    for line in (
        f"slat.safetensors: missing key '{KEY}' (expected shape (16, 3, 3, 3, 128))",
        "slat.safetensors: unexpected key 'out_blocks.0.conv1.conv.weights' (shape (16, 3, 3, 3, 128), float16)",
        "slat.safetensors: missing key 'input_blocks.1.skip_connection.bias' (expected shape (64,))",
        "slat.safetensors: mis-shaped key 'blocks.1.self_attn.to_qkv.weight': shape (192, 60), expected (192, 64)",
    ):
        assert line in msg


def test_bad_config_is_named():
    with pytest.raises(ConversionError, match="patch_size 4 needs log2 = len"):
        trellis.key_table({**CFG, "args": {**TINY_SLAT_ARGS, "patch_size": 4}})
    with pytest.raises(ConversionError, match="unknown arg 'io_block_channel' for SLatFlowModel"):
        trellis.key_table({**CFG, "args": {**TINY_SLAT_ARGS, "io_block_channel": [16]}})


def test_converted_folder_layout_and_manifest(src, dst):
    folder = os.path.join(dst, SLAT_NAME)
    assert sorted(os.listdir(folder)) == ["config.json", "manifest.json", "params.safetensors"]
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["model"] == "SLatFlowModel" and manifest["buffers"] == {}
    source = load_file(os.path.join(src, "ckpts", SLAT_NAME + ".safetensors"))
    assert {t["name"]: (tuple(t["shape"]), t["dtype"]) for t in manifest["tensors"]} == {
        k: (v.shape, v.dtype.name) for k, v in source.items()
    }
    rule = {t["name"]: t["rule"] for t in manifest["tensors"]}
    assert rule["input_blocks.0.conv1.conv.weight"] == "spconv.weight" and rule["out_layer.weight"] == "linear.weight"
    assert manifest["params"]["count"] == sum(
        v.size for v in load_file(os.path.join(folder, "params.safetensors")).values()
    )


def test_stage1_only_folder_still_converts(tmp_path):  # stage 2 is converted only when its files are there
    src = str(tmp_path / "trellis")
    write_trellis_folder(src)
    assert [os.path.basename(f) for f in convert_folder(src, str(tmp_path / "out"), log=lambda _: None)] == [
        FLOW_NAME,
        DECODER_NAME,
    ]


def test_cli_converts_the_slat_prefix_and_load_pretrained_takes_dst(src, tmp_path):
    prefix = os.path.join(src, "ckpts", SLAT_NAME)
    run = subprocess.run(
        [sys.executable, "convert_trellis.py", "--src", prefix, "--dst", str(tmp_path), "--verify"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert run.returncode == 0, run.stderr
    assert f"verify {tmp_path}/{SLAT_NAME}: output (1, 512, 8) finite and deterministic" in run.stdout
    apply_fn, params = load_pretrained(str(tmp_path))  # DST holds exactly one converted model: that one
    assert isinstance(apply_fn.module, SLatFlowModel)
    jax.tree.map(np.testing.assert_array_equal, params, load_pretrained(prefix)[1])


def test_cli_refuses_a_bad_slat_checkpoint(tmp_path, capsys, monkeypatch):
    sd = random_state_dict(CFG)
    del sd["out_blocks.1.emb_layers.1.weight"]
    prefix = write_checkpoint(str(tmp_path / "ckpts" / SLAT_NAME), CFG, sd)
    argv = ["convert_trellis.py", "--src", prefix, "--dst", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)
    assert cli.run(lambda: convert_trellis.main(argv[1:])) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"{prefix}.safetensors: missing key 'out_blocks.1.emb_layers.1.weight'" in err
    assert "Traceback" not in err and not os.path.exists(tmp_path / "out" / SLAT_NAME)


def test_load_pretrained_output_matches_the_twin(src, dst):
    prefix = os.path.join(src, "ckpts", SLAT_NAME)
    apply_fn, params = load_pretrained(os.path.join(dst, SLAT_NAME))
    assert apply_fn.module.dtype == jnp.float32 and all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    twin = st.SLatFlowModel(**{**TINY_SLAT_ARGS, "use_fp16": False})
    twin.load_state_dict({k: torch.from_numpy(v).float() for k, v in load_file(prefix + ".safetensors").items()})
    coords = sparse.example_coords((500, 320), 16, seed=3)
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((len(coords), 8)).astype(np.float32)
    t, cond = np.array([700.0, 40.0], np.float32), rng.standard_normal((2, 4, 32)).astype(np.float32)
    x = sparse.from_trellis(coords, feats, resolution=16, downsamples=apply_fn.module.downsamples, quantum=256)
    _, out = sparse.to_trellis(jax.jit(apply_fn)(params, x, t, cond))
    with torch.no_grad():
        ref = twin(st.from_numpy(coords, feats), torch.from_numpy(t), torch.from_numpy(cond)).feats.numpy()
    assert np.max(np.abs(out - ref)) <= 1e-4 * np.max(np.abs(ref))


@pytest.mark.skipif(not SLOW, reason="set DSO_JAX_SLOW_TESTS=1 (the released architecture: 1.2 GB file, minutes)")
def test_cli_converts_the_released_architecture(tmp_path):
    config = {"name": trellis_slat.SLAT_FLOW, "args": dict(RELEASED_SLAT_ARGS)}
    prefix = write_checkpoint(str(tmp_path / "ckpts" / SLAT_NAME), config, random_state_dict(config))
    assert os.path.getsize(prefix + ".safetensors") > 1_203_701_792  # the tensors plus the header
    run = subprocess.run(
        [sys.executable, "convert_trellis.py", "--src", prefix, "--dst", str(tmp_path / "out"), "--verify"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert run.returncode == 0, run.stderr
    assert "600,432,520 params" in run.stdout and "finite and deterministic" in run.stdout
