"""The README's main job (online NFT on the toy world), shortened: it runs end to end from the shipped toy
weights, reports the held-out protocol's figures, writes the curve and the figures, and a rerun of the
finished job leaves its summary alone (one test: the job runs once per suite)."""

import json
import os

import jax
import jax.numpy as jnp
import pytest

from configs import dpo, nft
from dso_jax import online
from dso_jax.candidates import make_candidates_fn, policy_params
from dso_jax.metrics_writer import read_rows
from dso_jax.models import load_pretrained
from dso_jax.physics.rollout import make_stability_fn
from dso_jax.toy import codec, heldout


def _shorten(config):
    config.train.steps = 3
    config.train.batch_size = 2
    config.train.log_every = 1
    config.train.ckpt_every = 2
    config.online.num_candidates = 2
    config.online.updates_per_sample = 1
    config.online.update_conditions = 1  # of train.batch_size 2, usable first (the job's dynamic sampling)
    config.sampler.steps = 2
    config.physics.horizon_s = 0.2
    config.eval.num_conditions = 3
    config.eval.num_candidates = 2
    config.eval.batch = 2
    config.eval.every = 1  # held out after steps 1 and 2 (the last step is the "after" evaluation)
    config.data.toy_pool_size = 8
    return config


def _protocol_before(config) -> dict:
    """The held-out protocol on the pretrained model, computed here (its own jitted candidates function)."""
    apply_fn, base = load_pretrained(config.model.path)
    stability = make_stability_fn(config.physics)
    cands = jax.jit(
        make_candidates_fn(
            apply_fn,
            codec.decoder_fn,
            stability,
            config.sampler,
            codec.LATENT_SHAPE,
            2,
            sim_upsample=codec.SIM_UPSAMPLE,
        )
    )
    held = heldout.heldout_set(config.eval.seed, config.eval.num_conditions)
    res = heldout.evaluate(cands, policy_params(base, None, jnp.float32), {}, held, seed=config.eval.seed, batch=2)
    return res["summary"]


def test_main_job_reports_the_protocols_figures_writes_its_curve_and_keeps_a_finished_summary(tmp_path, capsys):
    """One test, so that pytest-xdist's workers do not each run the job: (1) summary.json is what the job
    returns, its "before" figures are the protocol's on the pretrained model; (2) metrics, the held-out curve,
    the figures and the LoRA exports; (3) rerunning the finished job prints its table and leaves it alone."""
    config = _shorten(nft.get_config("toy"))
    assert os.path.isdir(config.model.path), f"the main job needs the shipped toy model at {config.model.path}"
    workdir = str(tmp_path / "main_job")
    summary = online.train_and_evaluate(config, workdir)

    # (1) the summary and the protocol's figures of the pretrained model
    path = os.path.join(workdir, "summary.json")
    with open(path) as f:
        assert json.load(f) == summary
    before = _protocol_before(config)
    for k in ("stable_rate", "mean_angle", "iou"):
        assert summary[f"{k}_before"] == pytest.approx(before[k], rel=1e-6), k
    assert (summary["loss"], summary["steps"], summary["eval_conditions"]) == ("nft", 3, 3)

    # (2) metrics, curve, figures, exports
    rows = read_rows(workdir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    curve = summary["heldout_curve"]
    assert [row["step"] for row in curve] == [1, 2]
    assert {"heldout_stable_rate", "heldout_mean_angle", "heldout_iou"} <= set(curve[0])
    assert [r for r in rows if "heldout_iou" in r] == curve
    for png in ("stable_rate.png", "generations_before.png", "generations_after.png"):
        assert os.path.getsize(os.path.join(workdir, png)) > 10_000, png
    assert sorted(os.listdir(os.path.join(workdir, "peft"))) == ["step_0000002.safetensors", "step_0000003.safetensors"]

    # (3) a rerun of the finished job
    capsys.readouterr()
    stamp = os.stat(path).st_mtime_ns
    again = online.train_and_evaluate(config, workdir)
    assert again == summary and os.stat(path).st_mtime_ns == stamp  # seconds and all, untouched
    assert f"{summary['seconds']:10.1f}" in capsys.readouterr().out  # the table is printed again
    assert not os.path.exists(os.path.join(workdir, "run.lock"))


def test_dpo_toy_variant_is_online_dpo():
    config = dpo.get_config("toy")
    assert (config.mode, config.loss, config.data.kind, config.decoder.kind) == ("online", "dpo", "toy", "toy_codec")
