"""DINOv2 ViT-L/14-reg4 in Flax: released sizes, conversion, and parity with a PyTorch twin.

Parity uses random weights saved through a PyTorch state dict and converted by our converter (the hub
weights cannot be downloaded here). Tolerance: max |flax - torch| / max |torch| <= 1e-4 in float32.
"""

import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers_cli import error_line, run_script
from twins.dinov2_twin import DinoV2Twin, randomize_, state_dict_numpy

from dso_jax.convert.dinov2 import (
    ConversionError,
    convert_dinov2_state_dict,
    dinov2_key_table,
    load_converted_dinov2,
    load_dinov2_pth,
    sha256_file,
)
from dso_jax.models import dinov2 as dm

VITL14_REG4_PARAMS = 304_372_736  # dinov2_vitl14_reg (hub: img 518, patch 14, 1024-d, 24 blocks, 4 registers)
VITL14_REG4_ENTRIES = 344  # state-dict tensors, incl. mask_token and the final norm
RTOL = 1e-4

torch.set_num_threads(2)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def random_twin(cfg, seed=0):
    return randomize_(DinoV2Twin(cfg).eval(), seed)


def twin_cond(twin, images_uint8):
    """TRELLIS's encode_image on the twin: /255, ImageNet normalise, x_prenorm, F.layer_norm."""
    x = torch.from_numpy(np.array(images_uint8)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(dm.IMAGENET_MEAN)[:, None, None]) / torch.tensor(dm.IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        feats = twin(x)["x_prenorm"]
    return feats, F.layer_norm(feats, feats.shape[-1:])


def random_images(batch, size, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (batch, size, size, 3)).astype(np.uint8)


def shape_tree(cfg, image_size):
    return jax.eval_shape(lambda: dm.init_params(jax.random.PRNGKey(0), cfg, image_size))


def flat_paths(tree):
    return {"/".join(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --- released sizes -----------------------------------------------------------------------------------


def test_vitl14_reg4_parameter_count_is_pinned():
    shapes = shape_tree(dm.VITL14_REG4, 518)
    assert dm.param_count(shapes) == VITL14_REG4_PARAMS
    assert len(jax.tree_util.tree_leaves(shapes)) == VITL14_REG4_ENTRIES
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(shapes))


def test_twin_at_released_size_has_the_same_count_and_keys_as_the_key_table():
    with torch.device("meta"):
        twin = DinoV2Twin(dm.VITL14_REG4)
    sd = twin.state_dict()
    assert sum(v.numel() for v in sd.values()) == VITL14_REG4_PARAMS
    table = {k: shape for k, _, _, shape in dinov2_key_table(dm.VITL14_REG4)}
    assert {k: tuple(v.shape) for k, v in sd.items()} == table


def test_key_table_produces_exactly_the_flax_tree():
    cfg = dm.VITL14_REG4
    expected = {p: (tuple(s.shape), s.dtype) for p, s in flat_paths(shape_tree(cfg, 518)).items()}
    produced = {}
    for _, fpath, rule, shape in dinov2_key_table(cfg):
        produced[fpath] = (rule(np.broadcast_to(np.float32(0), shape)).shape, jnp.float32)  # zero-copy views
    assert produced == expected


# --- forward parity -----------------------------------------------------------------------------------


def test_full_width_two_blocks_matches_twin_at_112px():
    cfg = dm.get_config("vitl14_reg4_2blocks")  # 1024-d, 16 heads; 8x8 grid interpolated from the stored 37x37
    twin = random_twin(cfg)
    params = convert_dinov2_state_dict(state_dict_numpy(twin), cfg)
    images = random_images(2, 112)
    feats_ref, cond_ref = twin_cond(twin, images)
    feats, cond = jax.jit(
        lambda p, x: (
            dm.DinoVisionTransformer(cfg).apply({"params": p}, dm.normalize_images(x))["x_prenorm"],
            dm.encode_condition(p, x, cfg),
        )
    )(params, images)  # one compile; XLA dedupes the shared forward
    assert feats.shape == cond.shape == (2, 1 + 4 + 64, 1024)
    assert rel_err(feats, feats_ref) <= RTOL
    assert rel_err(cond, cond_ref) <= RTOL


def test_narrow_model_matches_twin_at_518px_with_1374_tokens():
    cfg = dm.get_config("tiny_reg4")  # stored grid 37x37 used as is
    twin = random_twin(cfg, seed=1)
    params = convert_dinov2_state_dict(state_dict_numpy(twin), cfg)
    images = random_images(1, 518, seed=1)
    _, cond_ref = twin_cond(twin, images)
    cond = jax.jit(lambda p, x: dm.encode_condition(p, x, cfg))(params, images)
    assert cond.shape == (1, 1374, cfg.embed_dim) and cond.dtype == jnp.float32
    assert rel_err(cond, cond_ref) <= RTOL


def test_final_norm_outputs_match_twin():
    cfg = dm.get_config("tiny_reg4")
    twin = random_twin(cfg, seed=2)
    params = convert_dinov2_state_dict(state_dict_numpy(twin), cfg)
    x = dm.normalize_images(random_images(2, 56, seed=2))
    out = jax.jit(dm.DinoVisionTransformer(cfg).apply)({"params": params}, x)
    with torch.no_grad():
        ref = twin(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2))
    for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
        assert out[key].shape == tuple(ref[key].shape)
        assert rel_err(out[key], ref[key]) <= RTOL, key


def test_token_order_is_cls_registers_patches_and_registers_get_no_position():
    cfg = dm.DinoV2Config(img_size=56, embed_dim=32, depth=0, num_heads=2)  # stored 4x4 grid, used as is
    params = convert_dinov2_state_dict(state_dict_numpy(random_twin(cfg)), cfg)
    x = jnp.zeros((1, 56, 56, 3))
    tok = jax.jit(dm.DinoVisionTransformer(cfg).apply)({"params": params}, x)["x_prenorm"]  # (1, 1+4+16, 32)
    patch = params["patch_embed"]["proj"]["bias"]  # a zero image embeds to the conv bias
    np.testing.assert_allclose(tok[0, 0], params["cls_token"][0, 0] + params["pos_embed"][0, 0], rtol=1e-6)
    np.testing.assert_array_equal(tok[0, 1:5], params["register_tokens"][0])
    np.testing.assert_allclose(tok[0, 5:], patch + params["pos_embed"][0, 1:], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "grid,offset", [((8, 8), 0.0), ((5, 11), 0.0), ((46, 40), 0.0), ((37, 20), 0.0), ((8, 8), 0.1), ((50, 9), 0.1)]
)
def test_pos_embed_interpolation_matches_torch_antialiased_bicubic(grid, offset):
    cfg = dm.DinoV2Config(embed_dim=8, interpolate_offset=offset)
    pos = np.random.RandomState(0).randn(1, 37 * 37 + 1, 8).astype(np.float32)
    ours = dm.interpolate_pos_embed(jnp.asarray(pos), grid, cfg)
    twin = DinoV2Twin(dm.DinoV2Config(embed_dim=8, depth=0, num_heads=1, interpolate_offset=offset))
    with torch.no_grad():
        twin.pos_embed.copy_(torch.from_numpy(pos))
        ref = twin.pos_for(*grid)
    assert ours.shape == tuple(ref.shape) == (1, grid[0] * grid[1] + 1, 8)
    assert rel_err(ours, ref) <= 1e-5


def test_pos_embed_is_untouched_on_the_stored_37x37_grid():
    pos = jnp.asarray(np.random.RandomState(0).randn(1, 1370, 8).astype(np.float32))
    np.testing.assert_array_equal(dm.interpolate_pos_embed(pos, (37, 37), dm.VITL14_REG4), pos)


def test_bf16_compute_stays_close_to_fp32():
    cfg = dm.get_config("tiny_reg4")
    params = convert_dinov2_state_dict(state_dict_numpy(random_twin(cfg)), cfg)
    images = random_images(1, 56)
    ref = jax.jit(lambda p, x: dm.encode_condition(p, x, cfg))(params, images)
    got = jax.jit(lambda p, x: dm.encode_condition(p, x, cfg, jnp.bfloat16))(params, images)
    assert got.dtype == jnp.float32 and rel_err(got, ref) < 5e-2


# --- conversion ---------------------------------------------------------------------------------------


def test_converter_names_every_missing_unexpected_and_misshaped_key():
    cfg = dm.get_config("tiny_reg4")
    sd = state_dict_numpy(random_twin(cfg))
    del sd["blocks.1.ls2.gamma"]
    sd["blocks.0.attn.q_norm.weight"] = np.zeros(16, np.float32)
    sd["pos_embed"] = np.zeros((1, 257, 64), np.float32)
    with pytest.raises(ConversionError) as e:
        convert_dinov2_state_dict(sd, cfg)
    msg = str(e.value)
    assert "missing: blocks.1.ls2.gamma" in msg
    assert "unexpected: blocks.0.attn.q_norm.weight" in msg
    assert "shape: pos_embed is (1, 257, 64), expected (1, 1370, 64)" in msg


def test_converted_layouts():
    cfg = dm.get_config("tiny_reg4")
    sd = state_dict_numpy(random_twin(cfg))
    p = convert_dinov2_state_dict(sd, cfg)
    np.testing.assert_array_equal(p["blocks_0"]["attn"]["qkv"]["kernel"], sd["blocks.0.attn.qkv.weight"].T)
    np.testing.assert_array_equal(
        p["patch_embed"]["proj"]["kernel"], sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(p["norm"]["scale"], sd["norm.weight"])
    assert all(a.dtype == np.float32 for a in jax.tree_util.tree_leaves(p))


def test_pth_is_read_with_weights_only(tmp_path):
    cfg = dm.get_config("tiny_reg4")
    twin = random_twin(cfg)
    path = str(tmp_path / "w.pth")
    torch.save(twin.state_dict(), path)
    sd = load_dinov2_pth(path)
    np.testing.assert_array_equal(sd["pos_embed"], twin.pos_embed.detach().numpy())
    evil = str(tmp_path / "evil.pth")
    torch.save({"x": pickle.PickleError("arbitrary object")}, evil)  # not loadable with weights_only=True
    with pytest.raises(
        ConversionError, match=r"evil.pth: not loadable with torch.load\(weights_only=True\), refused"
    ) as e:
        load_dinov2_pth(evil)
    assert "\x1b" not in str(e.value) and "\n" not in str(e.value)  # one plain line (torch colours its message)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(open(path, "rb").read()[:100])
    with pytest.raises(ConversionError, match="cut.pth: not a readable PyTorch state dict"):
        load_dinov2_pth(str(cut))


def test_cli_writes_safetensors_config_manifest_and_verifies(tmp_path):
    cfg = dm.get_config("tiny_reg4")
    twin = random_twin(cfg)
    src, dst = str(tmp_path / "dinov2_tiny.pth"), str(tmp_path / "out")
    torch.save(twin.state_dict(), src)
    rc, stdout, _ = run_script("convert_dinov2", ["--src", src, "--dst", dst, "--config", "tiny_reg4", "--verify"])
    assert rc == 0 and "verify ok" in stdout
    manifest = json.load(open(os.path.join(dst, "manifest.json")))
    assert manifest["source_sha256"] == sha256_file(src)
    assert len(manifest["tensors"]) == len(twin.state_dict())
    assert {"name": "blocks_1/mlp/fc1/kernel", "shape": [64, 256], "dtype": "float32"} in manifest["tensors"]
    config, params = load_converted_dinov2(dst)
    assert dm.config_from_dict(config) == cfg
    expected = convert_dinov2_state_dict(state_dict_numpy(twin), cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)


def test_cli_refuses_bad_sources_and_destinations_in_one_line(tmp_path):
    cfg = dm.get_config("tiny_reg4")
    sd = random_twin(cfg).state_dict()
    src = str(tmp_path / "w.pth")
    torch.save(sd, src)
    nan = {k: v.clone() for k, v in sd.items()}
    nan["norm.weight"][0] = float("nan")
    torch.save(nan, tmp_path / "nan.pth")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    argv = ["--config", "tiny_reg4", "--dst"]
    cases = {
        "missing.pth: no such file": ["--src", tmp_path / "missing.pth", *argv, tmp_path / "a"],
        "non-finite: norm.weight has 1 NaN/Inf values": ["--src", tmp_path / "nan.pth", *argv, tmp_path / "b"],
        "full: the destination exists and is not empty": ["--src", src, *argv, tmp_path / "full"],
        "argument --config: invalid choice": ["--src", src, "--config", "vit_huge", "--dst", tmp_path / "c"],
    }
    for needle, args in cases.items():
        rc, _, err = run_script("convert_dinov2", args)
        assert rc == 2 and needle in error_line(err), (needle, err)
    assert sorted(os.listdir(tmp_path)) == ["full", "nan.pth", "w.pth"]  # nothing partial was left behind
