"""Toy condition tokens and faithfulness metrics."""

import jax
import numpy as np

from dso_jax.toy import condition as toy_condition
from dso_jax.toy import metrics as toy_metrics
from dso_jax.toy import objects as toy


def _objs(n=6):
    return toy.sample_objects(11, n)


def test_token_shapes_and_batching():
    d = _objs()
    tok = toy_condition.tokens(d["occ"])
    assert tok.shape == (6, 64, 64) and tok.dtype == np.float32  # (32 / 4)² tokens of 64 channels
    single = np.asarray(toy_condition.condition_tokens(d["occ"][2]))
    np.testing.assert_allclose(tok[2], single, atol=1e-6)
    assert np.isfinite(tok).all()
    small = np.asarray(jax.jit(lambda o: toy_condition.condition_tokens(o, patch=2, dim=16))(d["occ"][:2]))
    assert small.shape == (2, 256, 16)


def test_tokens_are_an_invertible_map_of_the_front_depth():
    d = _objs(3)
    tok = toy_condition.tokens(d["occ"])
    content = tok[..., :32] @ toy_condition._projection(32, 0).T  # (3, 64, 32): undo the rotation
    hit, depth = toy_condition.front_depth(d["occ"])
    patches = np.stack([2.0 * np.asarray(hit) - 1.0, np.asarray(depth)], -1).reshape(3, 8, 4, 8, 4, 2)
    np.testing.assert_allclose(content, patches.transpose(0, 1, 3, 2, 4, 5).reshape(3, 64, 32), atol=1e-5)
    np.testing.assert_array_equal(tok[0, :, 32:], tok[1, :, 32:])  # position features are shared


def test_hidden_parts_do_not_change_the_condition_but_visible_ones_do():
    d = _objs(4)
    rng = np.random.default_rng(0)
    comp = toy.completions(d["params"][0], 6, rng)
    assert len({o.tobytes() for o in comp["occ"]}) > 1  # the completions differ, their tokens do not
    np.testing.assert_array_equal(
        toy_condition.tokens(comp["occ"]), np.repeat(toy_condition.tokens(d["occ"][:1]), 6, 0)
    )
    tok = toy_condition.tokens(d["occ"])
    assert all(not np.allclose(tok[0], tok[j]) for j in range(1, 4))


def test_front_depth_sees_the_first_surface_along_plus_y():
    occ = np.zeros((32, 32, 32), dtype=bool)
    occ[3, 10:20, 5] = True
    occ[3, 4, 6] = True
    hit, depth = toy_condition.front_depth(occ)
    hit, depth = np.asarray(hit), np.asarray(depth)
    assert hit.sum() == 2 and hit[3, 5] and hit[3, 6]
    np.testing.assert_allclose([depth[3, 5], depth[3, 6], depth[0, 0]], [1 - 2 * 10.5 / 32, 1 - 2 * 4.5 / 32, 0.0])


def test_metrics():
    d = _objs(3)
    occ = d["occ"]
    np.testing.assert_allclose(np.asarray(toy_metrics.iou_3d(occ, occ)), 1.0)
    np.testing.assert_allclose(np.asarray(toy_metrics.front_iou(occ, occ)), 1.0)
    shifted = np.roll(occ, 3, axis=2)  # moved backwards (+y): same silhouette, different voxels
    np.testing.assert_allclose(np.asarray(toy_metrics.front_iou(occ, shifted)), 1.0)
    assert np.all(np.asarray(toy_metrics.iou_3d(occ, shifted)) < 0.9)
    half = occ.copy()
    half[:, :, :, 16:] = False
    expect = half.sum((1, 2, 3)) / occ.sum((1, 2, 3))
    np.testing.assert_allclose(np.asarray(jax.jit(toy_metrics.iou_3d)(occ, half)), expect, rtol=1e-6)
    assert float(toy_metrics.iou_3d(np.zeros((32,) * 3, bool), np.zeros((32,) * 3, bool))) == 1.0
