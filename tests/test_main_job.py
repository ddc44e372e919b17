"""The README's main job (online DRO on the toy world), shortened: it runs end to end from the shipped
toy weights and writes the summary, the curve and the before/after renders."""

import json
import os

from configs import dpo, dro
from dso_jax import train


def _shorten(config):
    config.train.steps = 2
    config.train.batch_size = 2
    config.train.log_every = 1
    config.train.ckpt_every = 2
    config.online.num_candidates = 2
    config.online.updates_per_sample = 1
    config.sampler.steps = 2
    config.physics.horizon_s = 0.2
    config.eval.num_conditions = 2
    config.eval.num_candidates = 2
    config.eval.batch = 2
    config.data.toy_pool_size = 8
    return config


def test_shortened_main_job_writes_the_summary(tmp_path):
    config = _shorten(dro.get_config("toy"))
    config.train.steps = 3
    config.eval.every = 1  # held out after steps 1 and 2 (the last step is the "after" evaluation)
    assert os.path.isdir(config.model.path), f"the main job needs the shipped toy model at {config.model.path}"
    train.train_and_evaluate(config, str(tmp_path))
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)
    keys = {
        "stable_rate_before",
        "stable_rate_after",
        "mean_angle_before",
        "mean_angle_after",
        "iou_before",
        "iou_after",
        "seconds",
    }
    assert keys <= set(summary)
    assert 0.0 <= summary["stable_rate_after"] <= 1.0 and 0.0 <= summary["iou_after"] <= 1.0
    curve = summary["heldout_curve"]
    assert [row["step"] for row in curve] == [1, 2]
    assert all(0.0 <= row["heldout_stable_rate"] <= 1.0 and 0.0 <= row["heldout_iou"] <= 1.0 for row in curve)
    for png in ("stable_rate.png", "generations_before.png", "generations_after.png"):
        assert (tmp_path / png).stat().st_size > 0, png


def test_dpo_toy_variant_is_online_dpo():
    config = dpo.get_config("toy")
    assert (config.mode, config.loss, config.data.kind, config.decoder.kind) == ("online", "dpo", "toy", "toy_codec")
