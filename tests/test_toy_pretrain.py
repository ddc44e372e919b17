"""Toy pre-training: the objective is TRELLIS's, the loss goes down, and the exported folder loads back."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain_toy as pretrain_config
from dso_jax import flow
from dso_jax.models import load_pretrained
from dso_jax.toy import codec as toy_codec
from dso_jax.toy import condition as toy_condition
from dso_jax.toy import objects as toy
from dso_jax.toy import pretrain as pretrain_toy


@pytest.fixture(scope="module")
def micro():
    return pretrain_config.get_config("micro")


def test_batches_are_a_function_of_seed_and_step():
    a = toy.train_batch(0, 5, 3)
    assert a.shape == (3, 32, 32, 32) and a.dtype == bool
    np.testing.assert_array_equal(a, toy.train_batch(0, 5, 3))
    assert not np.array_equal(a, toy.train_batch(0, 6, 3))
    assert not np.array_equal(a, toy.train_batch(1, 5, 3))


def test_worker_processes_give_the_same_batches_as_one_thread():
    one = list(pretrain_toy.train_batches(3, 2, 4, workers=0))
    many = pretrain_toy.train_batches(3, 2, 4, workers=2)
    assert len(one) == 4
    for step, a in enumerate(one):
        np.testing.assert_array_equal(a, toy.train_batch(3, step, 2))
        np.testing.assert_array_equal(next(many), a)  # packed across processes, unpacked bit for bit
    many.close()  # a consumer that stops early shuts the pool down


def test_trellis_init_zeroes_modulation_and_output(micro):
    _, module = pretrain_toy.build(micro)
    params = pretrain_toy.init_params(module, micro)
    assert not np.any(params["out_layer"]["kernel"]) and not np.any(params["out_layer"]["bias"])
    assert not np.any(params["blocks_0"]["adaLN_modulation_1"]["kernel"])
    assert np.std(params["blocks_0"]["self_attn"]["to_qkv"]["kernel"]) > 0
    assert np.allclose(np.std(params["t_embedder"]["mlp_0"]["kernel"]), 0.02, rtol=0.2)


def test_flow_loss_is_trellis_objective(micro):
    """Re-derive the loss by hand: x_t = (1-t)x0 + (s + (1-s)t)eps, target (1-s)eps - x0, dropped cond = 0."""
    apply_fn, module = pretrain_toy.build(micro)
    params = pretrain_toy.init_params(module, micro)
    params = jax.tree.map(lambda p: p + 0.01, params)  # non-zero output
    occ = toy.train_batch(0, 0, 4)
    key = jax.random.PRNGKey(3)
    loss, _ = pretrain_toy.flow_loss(apply_fn, params, occ, key, micro.flow, 1.0)

    k_t, k_eps, k_drop = jax.random.split(key, 3)
    keep = jax.random.uniform(k_drop, (4,)) >= micro.flow.p_uncond
    cond = jnp.where(keep[:, None, None], toy_condition.condition_tokens(occ), 0.0)
    t = jax.nn.sigmoid(micro.flow.t_mu + micro.flow.t_sigma * jax.random.normal(k_t, (4,)))
    eps = flow.normal(k_eps, (4,) + toy_codec.LATENT_SHAPE)  # jax.random.normal, drawn flat (tests/test_losses.py)
    x0 = toy_codec.encode(occ)
    s = micro.flow.sigma_min
    tb = t[:, None, None, None, None]
    x_t = (1 - tb) * x0 + (s + (1 - s) * tb) * eps
    pred = apply_fn(params, x_t, 1000.0 * t, cond)
    expected = jnp.mean(jnp.square(pred - ((1 - s) * eps - x0)))
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)


def test_micro_run_loss_decreases_and_folder_loads_back(micro, tmp_path):
    workdir, out = str(tmp_path / "work"), str(tmp_path / "toy")
    manifest = pretrain_toy.pretrain_and_evaluate(micro, workdir, out, log=lambda s: None)
    hist = manifest["history"]
    assert hist[-1]["loss"] < hist[0]["loss"], [h["loss"] for h in hist]

    for f in ("params.safetensors", "config.json", "manifest.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f) == {"name": "SparseStructureFlowModel", "args": micro.model.args.to_dict()}
    with open(os.path.join(out, "manifest.json")) as f:
        written = json.load(f)
    assert written["steps"] == micro.train.steps and written["seed"] == micro.seed
    ev = written["evaluation"]
    with open(os.path.join(workdir, "eval.json")) as f:
        assert json.load(f) == ev
    assert ev["stability"] == micro.eval.physics == "static"
    assert os.path.isfile(os.path.join(workdir, "heldout_samples.png"))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [4, 8, 12]  # the shared metrics writer's rows

    apply_fn, params = load_pretrained(out)
    again_ev = pretrain_toy.evaluate(apply_fn, params, micro)["summary"]  # the manifest holds the folder's figures
    assert (again_ev["iou"], again_ev["stable_rate"]) == (ev["iou"], ev["stable_rate"])
    x = jnp.zeros((2,) + toy_codec.LATENT_SHAPE)
    v = apply_fn(params, x, jnp.full((2,), 500.0), jnp.zeros((2, 64, 64)))
    assert v.shape == x.shape and bool(jnp.all(jnp.isfinite(v)))

    # the same config and seed reproduce the run
    again = pretrain_toy.train(micro, str(tmp_path / "again"), log=lambda s: None)[0]
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_max_seconds_stops_early_and_says_so(micro, tmp_path):
    cfg = micro.copy_and_resolve_references()
    cfg.unlock()
    cfg.train.max_seconds = 1e-9  # reached after the first step
    lines = []
    _, record = pretrain_toy.train(cfg, str(tmp_path), log=lines.append)
    assert record["steps_done"] == 1 and record["history"][-1]["step"] == 1
    assert any("max_seconds" in line for line in lines)
