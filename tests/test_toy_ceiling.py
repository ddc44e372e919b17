"""The world's ceiling (dso_jax.toy.ceiling): the IoU of the stable hidden-part resamples of held-out conditions."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from dso_jax.toy import ceiling, objects


def _verdict(value):
    return lambda occ: {"stable": jnp.full((occ.shape[0],), value), "valid": jnp.ones((occ.shape[0],), bool)}


def test_ceiling_averages_the_stable_resamples_only():
    every = ceiling.world_ceiling(1234, 3, k=4, stability_fn=_verdict(True), chunk=5)
    assert every["stable_rate"] == 1.0 and every["covered"] == 1.0
    assert every["ceiling_iou"] == pytest.approx(every["iou_all"], rel=1e-6)  # all stable: the ceiling is every IoU
    assert 0.0 < every["ceiling_iou"] <= every["best_iou"] <= 1.0
    none = ceiling.world_ceiling(1234, 3, k=4, stability_fn=_verdict(False))
    assert none["covered"] == 0.0 and math.isnan(none["ceiling_iou"])
    static = ceiling.world_ceiling(1234, 3, k=4)  # the world's own check decides
    assert static["iou_all"] == pytest.approx(every["iou_all"], rel=1e-6)  # the same resamples, another verdict
    assert 0.0 < static["stable_rate"] < 1.0 and static["ceiling_iou"] != pytest.approx(static["iou_all"])


def test_resamples_keep_the_condition():
    """What makes it a ceiling: the resamples share the conditioning object's visible part (its condition)."""
    rng = np.random.default_rng(0)
    p = objects.sample_params(rng)
    q = objects.resample_hidden(p, rng)
    assert objects.split_of(p) == objects.split_of(q)
