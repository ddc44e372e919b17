"""LoRA overlays vs peft on the PyTorch twin of the SS flow model.

DSO's checkpoints are ``accelerator.save_state`` of a ``get_peft_model(flow_model, LoraConfig(...))``:
the whole peft-wrapped state dict as safetensors, base blocks in fp16, factors in fp32. The tests
make such a file with peft on the twin, load it into base + overlay and compare outputs in float32
(tolerance 1e-4 of the output scale; measured ~1e-6), then export ours and load it back into peft
exactly as DSO's ``example.py`` does (strict ``load_state_dict`` into a fresh peft model).
"""

import json
import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
import helpers_trellis  # noqa: E402
from helpers_trellis import RELEASED_FLOW_ARGS, TINY_FLOW_ARGS, random_state_dict, write_checkpoint  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from twins import trellis_twin as tw  # noqa: E402

from dso_jax import lora  # noqa: E402
from dso_jax.convert import peft as peft_io  # noqa: E402
from dso_jax.convert import trellis  # noqa: E402
from dso_jax.models.pretrained import abstract_params, buffers_of, load_pretrained, make_apply_fn, model_from_config  # noqa: E402

torch.set_num_threads(2)
RANK, ALPHA = 4, 8.0
TARGETS = ["to_q", "to_kv", "to_out", "to_qkv"]  # DSO's LoraConfig
REL = 1e-4


def assert_parity(out, ref, rel=REL):
    helpers_trellis.assert_parity(out, ref, rel)


def peft_twin(state_dict, *, fp16=True, lora_b_seed=None):
    """DSO's set-up: the (fp16-torso) twin with released-dtype weights, wrapped by peft."""
    twin = tw.SparseStructureFlowModel(**{**TINY_FLOW_ARGS, "use_fp16": fp16})
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    model = peft.get_peft_model(
        twin, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
    )
    if lora_b_seed is not None:  # peft starts B at zero; make the adapter matter
        g = torch.Generator().manual_seed(lora_b_seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


@torch.no_grad()
def run_fp32(peft_model, x, t, cond):
    """Forward in float32 (DSO's fp16 torso cast up exactly; LoRA factors are fp32 already)."""
    peft_model.base_model.model.to_fp32()
    return peft_model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(cond)).numpy()


@pytest.fixture(scope="module")
def world():
    config = {"name": trellis.FLOW, "args": dict(TINY_FLOW_ARGS)}
    sd = random_state_dict(config, seed=0)
    module = model_from_config(trellis.FLOW, config["args"])
    params = trellis.convert_state_dict(sd, config, buffers=buffers_of(module))
    rng = np.random.default_rng(5)
    r = TINY_FLOW_ARGS["resolution"]
    x = rng.standard_normal((2, TINY_FLOW_ARGS["in_channels"], r, r, r)).astype(np.float32)
    t = np.array([731.0, 250.5], np.float32)
    cond = rng.standard_normal((2, 6, TINY_FLOW_ARGS["cond_channels"])).astype(np.float32)
    return dict(
        config=config, sd=sd, module=module, params=params, apply=jax.jit(make_apply_fn(module)), inputs=(x, t, cond)
    )


@pytest.fixture(scope="module")
def dso_file(world, tmp_path_factory):
    """A checkpoint saved the way DSO saves it: the peft-wrapped model's full state dict."""
    model = peft_twin(world["sd"], lora_b_seed=1)
    path = str(tmp_path_factory.mktemp("dso") / "model.safetensors")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path, metadata={"format": "pt"})
    return path, model


# ------------------------------------------------------------------ import


def test_dso_checkpoint_layout_is_what_we_expect(dso_file):
    keys = load_file(dso_file[0]).keys()
    assert "base_model.model.blocks.0.self_attn.to_qkv.base_layer.weight" in keys
    assert "base_model.model.blocks.0.self_attn.to_qkv.lora_A.default.weight" in keys
    assert "base_model.model.blocks.1.cross_attn.to_kv.lora_B.default.weight" in keys
    assert "base_model.model.pos_emb" in keys and "base_model.model.blocks.0.mlp.mlp.0.weight" in keys


def test_import_dso_checkpoint_reproduces_peft_outputs(world, dso_file):
    path, model = dso_file
    overlay = peft_io.load_peft(path, world["params"], alpha=ALPHA)
    assert overlay.scale == ALPHA / RANK and lora.rank_of(overlay) == RANK
    x, t, cond = world["inputs"]
    ours = world["apply"](lora.merge(world["params"], overlay), x, t, cond)
    ref = run_fp32(model, x, t, cond)
    assert_parity(ours, ref)
    base = world["apply"](world["params"], x, t, cond)
    assert np.max(np.abs(np.asarray(base) - ref)) > 100 * REL * np.max(np.abs(ref)), (
        "the adapter must change the output"
    )


def _same_overlay(a, b):
    assert a.scale == b.scale
    jax.tree_util.tree_map(
        lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), a.factors, b.factors
    )


@pytest.mark.parametrize("spelling", ["peft_adapter_only", "no_prefix", "ddp_module", "bf16_factors", "torch_tensors"])
def test_key_spellings(world, dso_file, spelling, tmp_path):
    path, model = dso_file
    want = peft_io.load_peft(path, world["params"], alpha=ALPHA)
    full = load_file(path)
    if spelling == "peft_adapter_only":  # get_peft_model_state_dict: no '.default', prefix kept
        state = peft.get_peft_model_state_dict(model)
        assert any(k.endswith("lora_A.weight") for k in state)
    elif spelling == "no_prefix":  # the LoRA-injected module's own state dict
        state = model.base_model.model.state_dict()
        assert not any(k.startswith("base_model.") for k in state)
    elif spelling == "ddp_module":
        state = {"module." + k: v for k, v in full.items()}
    elif spelling == "bf16_factors":  # read through JAX (numpy has no bfloat16); compare to rounded factors
        state = {k: v.to(torch.bfloat16) if "lora_" in k else v for k, v in full.items()}
        want = peft_io.load_peft({k: v.float() for k, v in state.items()}, world["params"], alpha=ALPHA)
    else:
        state = full
    p = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(p))
    _same_overlay(peft_io.load_peft(str(p), world["params"], alpha=ALPHA), want)
    _same_overlay(peft_io.load_peft(state, world["params"], alpha=ALPHA), want)  # in-memory state dicts too


# ------------------------------------------------------------------ export


def test_export_loads_into_dso_example_unchanged(world, tmp_path):
    overlay = lora.init_overlay(jax.random.PRNGKey(0), world["params"], rank=RANK, alpha=ALPHA)
    fac = jax.tree_util.tree_map_with_path(
        lambda p, v: 0.2 * jax.random.normal(jax.random.PRNGKey(len(str(p))), v.shape) if p[-1].key == "b" else v,
        overlay.factors,
    )
    overlay = overlay.replace(factors=fac)
    path = tmp_path / "ours.safetensors"
    peft_io.save_peft(path, world["params"], overlay, config=world["module"])
    stored = load_file(str(path))
    assert (
        stored["base_model.model.blocks.0.self_attn.to_qkv.base_layer.weight"].dtype == torch.float16
    )  # released dtypes
    assert stored["base_model.model.blocks.0.self_attn.to_qkv.lora_A.default.weight"].dtype == torch.float32

    # DSO's example.py: get_peft_model(pretrained, LoraConfig(...)).load_state_dict(load_file(ckpt)), strict
    model = peft_twin(random_state_dict(world["config"], seed=99))  # different base: the file must carry ours
    model.load_state_dict(load_file(str(path)))
    x, t, cond = world["inputs"]
    assert_parity(run_fp32(model, x, t, cond), world["apply"](lora.merge(world["params"], overlay), x, t, cond))
    _same_overlay(peft_io.load_peft(str(path), world["params"], alpha=ALPHA), overlay)  # and round-trips


def test_adapter_only_export_loads_with_set_peft_model_state_dict(world, tmp_path):
    overlay = peft_io.load_peft(peft_state(world), world["params"], alpha=ALPHA)
    path = tmp_path / "adapter.safetensors"
    peft_io.save_peft(path, world["params"], overlay, full_state_dict=False)
    assert all(".default." not in k and k.startswith("base_model.model.") for k in load_file(str(path)))
    model = peft_twin(world["sd"])
    res = peft.set_peft_model_state_dict(model, load_file(str(path)))
    assert not res.unexpected_keys
    x, t, cond = world["inputs"]
    assert_parity(run_fp32(model, x, t, cond), world["apply"](lora.merge(world["params"], overlay), x, t, cond))


def peft_state(world):
    """A peft state dict (torch tensors) with non-trivial factors."""
    return peft_twin(world["sd"], lora_b_seed=3).state_dict()


# ------------------------------------------------------------------ init, merge, count


def test_init_is_peft_default_and_identity(world):
    params = world["params"]
    overlay = lora.init_overlay(jax.random.PRNGKey(0), params, rank=RANK, alpha=ALPHA)
    model = peft_twin(world["sd"])
    peft_names = {
        n.replace("base_model.model.", "").rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if "lora_A" in n
    }
    assert {lora.torch_name(p) for p in lora.target_paths(params)} == peft_names  # same modules as peft's targets
    assert lora.count(overlay) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    for path in lora.target_paths(params):
        m = lora.get_path(overlay.factors, path)
        fan_in, fan_out = lora.get_path(params, path)["kernel"].shape
        assert m["a"].shape == (fan_in, RANK) and m["b"].shape == (RANK, fan_out)
        assert m["a"].dtype == jnp.float32 and not np.any(np.asarray(m["b"]))
        assert np.max(np.abs(np.asarray(m["a"]))) <= 1 / math.sqrt(fan_in)
        peft_a = dict(model.named_parameters())[f"base_model.model.{lora.torch_name(path)}.lora_A.default.weight"]
        assert peft_a.abs().max().item() <= 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) bound
    merged = lora.merge(params, overlay)
    jax.tree_util.tree_map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), merged, params)


def test_init_a_is_uniform_with_peft_bound():
    base = {"to_q": {"kernel": jnp.zeros((256, 64))}}
    a = np.asarray(lora.init_overlay(jax.random.PRNGKey(0), base, rank=64, alpha=128).factors["to_q"]["a"])
    bound = 1 / 16
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
    np.testing.assert_allclose(a.var(), bound**2 / 3, rtol=0.05)


def test_released_overlay_size_and_shapes_first():
    module = model_from_config(trellis.FLOW, RELEASED_FLOW_ARGS)
    shapes = abstract_params(module)
    overlay = jax.eval_shape(lambda k: lora.init_overlay(k, shapes, rank=64, alpha=128), jax.random.PRNGKey(0))
    assert len(lora.target_paths(shapes)) == 120  # 5 Linears x 24 blocks (dso.md §4)
    assert lora.count(overlay) == 20_447_232  # 851,968 per block x 24
    assert overlay.scale == 2.0


def test_merge_is_jittable_and_touches_only_targets(world):
    params = world["params"]
    overlay = peft_io.load_peft(peft_state(world), params, alpha=ALPHA)
    merged = jax.jit(lora.merge)(params, overlay)
    flat_m, flat_p = trellis.rules.flatten(merged), trellis.rules.flatten(params)
    assert flat_m.keys() == flat_p.keys()
    for k in flat_p:
        changed = not np.array_equal(np.asarray(flat_m[k]), np.asarray(flat_p[k]))
        mod = tuple(k.split("/")[:-1])
        assert changed == (k.endswith("kernel") and mod in lora.target_paths(params)), k
    p = ("blocks_1", "cross_attn", "to_kv")
    m = lora.get_path(overlay.factors, p)
    want = np.asarray(lora.get_path(params, p)["kernel"]) + overlay.scale * np.asarray(m["a"]) @ np.asarray(m["b"])
    np.testing.assert_allclose(np.asarray(lora.get_path(merged, p)["kernel"]), want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ errors


def test_clear_errors(world, dso_file):
    params = world["params"]
    good = {k: v for k, v in load_file(dso_file[0]).items() if "lora_" in k}
    qkv_a = "base_model.model.blocks.0.self_attn.to_qkv.lora_A.default.weight"
    qkv_b = "base_model.model.blocks.0.self_attn.to_qkv.lora_B.default.weight"
    cases = {
        "rank 4, expected 8": ({**good}, dict(rank=8)),
        "mixes LoRA ranks": (
            {**good, qkv_a: torch.zeros(2, good[qkv_a].shape[1]), qkv_b: torch.zeros(good[qkv_b].shape[0], 2)},
            {},
        ),
        "shape mismatch at blocks.0.self_attn.to_qkv": ({**good, qkv_a: torch.zeros(RANK, 7)}, {}),
        "not targets": (
            {
                **good,
                "base_model.model.blocks.0.mlp.mlp.0.lora_A.default.weight": torch.zeros(RANK, 64),
                "base_model.model.blocks.0.mlp.mlp.0.lora_B.default.weight": torch.zeros(256, RANK),
            },
            {},
        ),
        "lacks LoRA factors": ({k: v for k, v in good.items() if "blocks.1.cross_attn.to_q." not in k}, {}),
        "only lora_A": ({k: v for k, v in good.items() if k != qkv_b}, dict(targets=None)),
        "holds no LoRA weights": ({"base_model.model.pos_emb": torch.zeros(1)}, {}),
        "several adapters": ({**good, qkv_a.replace(".default.", ".other."): good[qkv_a]}, {}),
    }
    for message, (state, kw) in cases.items():
        with pytest.raises(ValueError, match=message):
            peft_io.load_peft(state, params, alpha=ALPHA, **kw)
    # a partial adapter is fine when asked for
    partial = {k: v for k, v in good.items() if "blocks.1.cross_attn.to_q." not in k}
    assert len(lora.target_paths(params)) - 1 == len(
        lora.modules(peft_io.load_peft(partial, params, alpha=ALPHA, targets=None))
    )


def test_missing_truncated_or_pickled_files_are_refused_in_one_line(world, dso_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        peft_io.load_peft(str(tmp_path / "nope.safetensors"), world["params"], alpha=ALPHA)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors: not a readable safetensors file"):
        peft_io.load_peft(str(bad), world["params"], alpha=ALPHA)
    data = open(dso_file[0], "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])  # a download cut short
    with pytest.raises(ValueError, match="cut.safetensors: not a readable safetensors file, truncated"):
        peft_io.load_peft(str(cut), world["params"], alpha=ALPHA)
    state = load_file(dso_file[0])
    for name in ("lora.pt", "lora.bin", "disguised.safetensors"):  # torch.save's zip, whatever the name
        torch.save(state, tmp_path / name)
        with pytest.raises(ValueError, match=f"{name}: a pickled PyTorch file") as e:
            peft_io.load_peft(str(tmp_path / name), world["params"], alpha=ALPHA)
        assert "\n" not in str(e.value)


def test_non_finite_factors_are_refused_naming_the_tensor(world, dso_file, tmp_path):
    state = load_file(dso_file[0])
    key = "base_model.model.blocks.1.cross_attn.to_kv.lora_B.default.weight"
    state[key] = state[key].clone()
    state[key][3, 1] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=f"nan.safetensors: tensor '{key}' has non-finite values"):
        peft_io.load_peft(str(path), world["params"], alpha=ALPHA)


def test_full_export_needs_the_model(world, tmp_path):
    overlay = lora.init_overlay(jax.random.PRNGKey(0), world["params"], rank=RANK, alpha=ALPHA)
    with pytest.raises(ValueError, match="config="):
        peft_io.save_peft(tmp_path / "x.safetensors", world["params"], overlay)


# ------------------------------------------------------------------ alpha travels with the file


def _random_overlay(params, rank, alpha, seed=0):
    overlay = lora.init_overlay(jax.random.PRNGKey(seed), params, rank=rank, alpha=alpha)
    b = jax.tree_util.tree_map_with_path(
        lambda p, v: (
            0.2 * jax.random.normal(jax.random.PRNGKey(seed + len(str(p))), v.shape) if p[-1].key == "b" else v
        ),
        overlay.factors,
    )
    return overlay.replace(factors=b)


@pytest.mark.parametrize("full", [True, False])
def test_our_exports_carry_rank_alpha_and_targets(world, tmp_path, full):
    # The case: a rank-8 / alpha-16 LoRA (scale 2) read back with DSO's alpha 128 was 8x too strong.
    overlay = _random_overlay(world["params"], rank=8, alpha=16.0)
    path = tmp_path / "out" / "step_0000010.safetensors"
    peft_io.save_peft(path, world["params"], overlay, full_state_dict=full, config=world["module"] if full else None)
    declared = peft_io.read_config(str(path))
    assert (declared.rank, declared.alpha, declared.targets) == (8, 16.0, tuple(sorted(TARGETS)))
    assert "(metadata)" in declared.source
    assert os.listdir(tmp_path / "out") == ["step_0000010.safetensors"]  # a run's folder of exports: metadata only
    peft_io.save_peft(
        tmp_path / "peft" / peft_io.ADAPTER_WEIGHTS, world["params"], overlay, full_state_dict=False
    )  # a peft folder: adapter_config.json beside
    with open(tmp_path / "peft" / peft_io.ADAPTER_CONFIG) as f:
        cfg = json.load(f)
    assert (cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == (8, 16.0, sorted(TARGETS))
    loaded = peft_io.load_peft(str(path), world["params"])  # no alpha given: the file's
    assert loaded.scale == 2.0
    _same_overlay(loaded, overlay)
    assert peft_io.load_peft(str(path), world["params"], alpha=4.0).scale == 0.5  # an explicit alpha still wins


def test_a_file_without_metadata_reads_the_adapter_config_beside_it_else_dso_alpha(world, dso_file, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(open(dso_file[0], "rb").read())  # DSO's own layout: no r / lora_alpha metadata
    assert peft_io.load_peft(str(path), world["params"]).scale == lora.DSO_ALPHA / RANK  # DSO's documented 128
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": 3.0}))
    assert peft_io.load_peft(str(path), world["params"]).scale == 3.0 / RANK
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 3.0}))
    with pytest.raises(ValueError, match="adapter_config.json: declares r=16, but the tensors of .* have rank 4"):
        peft_io.load_peft(str(path), world["params"])
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": RANK, "alpha_pattern": {"to_q": 2.0}}))
    with pytest.raises(ValueError, match="per-module"):
        peft_io.load_peft(str(path), world["params"])


def test_peft_loads_our_folder_with_the_right_scaling(world, tmp_path):
    overlay = _random_overlay(world["params"], rank=RANK, alpha=3.0, seed=4)  # scale 0.75, not peft's default
    folder = tmp_path / "adapter"
    peft_io.save_peft(folder / peft_io.ADAPTER_WEIGHTS, world["params"], overlay, full_state_dict=False)
    twin = tw.SparseStructureFlowModel(**{**TINY_FLOW_ARGS, "use_fp16": True})
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in world["sd"].items()}, strict=True)
    model = peft.PeftModel.from_pretrained(twin, str(folder))
    assert model.peft_config["default"].lora_alpha == 3.0 and model.peft_config["default"].r == RANK
    x, t, cond = world["inputs"]
    assert_parity(run_fp32(model, x, t, cond), world["apply"](lora.merge(world["params"], overlay), x, t, cond))


@pytest.mark.parametrize("rslora", [False, True])
def test_a_peft_save_pretrained_folder_loads_with_its_alpha(world, tmp_path, rslora):
    twin = tw.SparseStructureFlowModel(**{**TINY_FLOW_ARGS, "use_fp16": True})
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in world["sd"].items()}, strict=True)
    config = peft.LoraConfig(r=RANK, lora_alpha=3.0, target_modules=TARGETS, use_rslora=rslora)
    model = peft.get_peft_model(twin, config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(tmp_path / "saved"))
    merged, info = peft_io.apply_lora(world["params"], str(tmp_path / "saved"))  # the folder, no alpha given
    assert info["alpha"] == 3.0 and info["alpha_from"].endswith("adapter_config.json") and info["rank"] == RANK
    x, t, cond = world["inputs"]
    assert_parity(world["apply"](merged, x, t, cond), run_fp32(model, x, t, cond))


def test_apply_lora_warns_when_only_part_of_the_targets_is_adapted(world, dso_file):
    full = {k: v for k, v in load_file(dso_file[0]).items() if "lora_" in k}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft_io.apply_lora(world["params"], full, alpha=ALPHA)  # complete: silent
    partial = {k: v for k, v in full.items() if ".cross_attn." not in k}
    with pytest.warns(peft_io.PartialLoraWarning, match=r"adapts 4 of the 10 modules"):
        merged, info = peft_io.apply_lora(world["params"], partial, alpha=ALPHA)
    assert info["modules"] == 4  # self_attn to_qkv, to_out per block
    kv = ("blocks_0", "cross_attn", "to_kv")
    np.testing.assert_array_equal(lora.get_path(merged, kv)["kernel"], lora.get_path(world["params"], kv)["kernel"])


# ------------------------------------------------------------------ load_pretrained(lora=...)


def test_load_pretrained_applies_a_dso_checkpoint(world, dso_file, tmp_path):
    prefix = write_checkpoint(str(tmp_path / "ckpts" / "flow"), world["config"], world["sd"])
    path, model = dso_file
    apply_fn, params = load_pretrained(prefix, dtype=jnp.float32, lora=path, lora_alpha=ALPHA)
    x, t, cond = world["inputs"]
    assert_parity(jax.jit(apply_fn)(params, x, t, cond), run_fp32(model, x, t, cond))
    _, default = load_pretrained(prefix, dtype=jnp.float32, lora=path)  # DSO's file has no metadata: alpha 128
    want = lora.merge(world["params"], peft_io.load_peft(path, world["params"], alpha=lora.DSO_ALPHA))
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6), default, want)
