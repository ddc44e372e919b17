"""Occupancy -> verdict with MJX: physically right verdicts, purity (jit, vmap, nested jit), empty grids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dso_jax.physics import rollout
import physics_shapes as shapes

D = 32


def _cfg():
  cfg = rollout.default_sim_config()
  cfg.horizon_s = 1.5  # every test object has settled or toppled well within this
  return cfg


SHAPES = {
    "cube": (shapes.box_occ((-0.3, -0.3, -0.3), (0.3, 0.3, 0.3), D), True),
    "tall_thin_box": (shapes.box_occ((-0.05, -0.05, -0.5), (0.05, 0.05, 0.5), D), True),
    "tall_box_on_edge": (shapes.rotated_box_occ((0.2, 0.2, 0.8), 12.0, D), False),
    "overhanging_l": (shapes.box_occ((-0.45, -0.1, -0.5), (-0.3, 0.1, 0.5), D)
                      | shapes.box_occ((-0.45, -0.1, 0.3), (0.45, 0.1, 0.5), D), False),
    "short_l": (shapes.box_occ((-0.45, -0.2, -0.5), (-0.1, 0.2, 0.5), D)
                | shapes.box_occ((-0.45, -0.2, 0.3), (0.0, 0.2, 0.5), D), True),
    "empty": (np.zeros((D, D, D), bool), False),
}


@pytest.fixture(scope="module")
def verdicts():
  fn = jax.jit(rollout.make_stability_fn(_cfg()))
  occ = jnp.asarray(np.stack([s for s, _ in SHAPES.values()]))
  return {k: v for k, v in jax.device_get(fn(occ)).items()}


@pytest.mark.parametrize("name", list(SHAPES))
def test_physically_right_verdict(verdicts, name):
  i = list(SHAPES).index(name)
  assert bool(verdicts["stable"][i]) == SHAPES[name][1], {k: v[i] for k, v in verdicts.items()}


def test_outputs_are_finite_with_the_documented_keys(verdicts):
  assert set(verdicts) >= {"angle", "tilt", "stable", "margin", "valid"}
  for k, v in verdicts.items():
    assert v.shape == (len(SHAPES),), k
    assert np.all(np.isfinite(np.asarray(v, float))), k


def test_empty_grid_is_invalid_and_unstable(verdicts):
  i = list(SHAPES).index("empty")
  assert not verdicts["valid"][i] and not verdicts["stable"][i]
  assert verdicts["valid"][:i].all()


def test_stable_objects_barely_move(verdicts):
  for name in ("cube", "tall_thin_box"):
    i = list(SHAPES).index(name)
    assert verdicts["angle"][i] < 1.0 and verdicts["margin"][i] > 0


def test_pure_inside_another_jit_and_under_vmap():
  cfg = _cfg()
  cfg.horizon_s = 0.2
  fn = rollout.make_stability_fn(cfg)
  cube = SHAPES["cube"][0][::2, ::2, ::2]  # 16^3: any static D works
  occ = jnp.asarray(np.stack([cube, np.zeros_like(cube)]), jnp.float32)

  @jax.jit
  def outer(x):  # stands for the training step: the verdict is one piece of a larger jitted function
    out = fn(x)
    return jnp.where(out["stable"], 1.0, -1.0), out

  reward, out = outer(occ)
  np.testing.assert_array_equal(np.asarray(reward), [1.0, -1.0])
  batched = jax.jit(jax.vmap(fn))(jnp.stack([occ, occ[::-1]]))  # (2, B, D, D, D)
  np.testing.assert_array_equal(np.asarray(batched["stable"]), [[True, False], [False, True]])
  np.testing.assert_allclose(np.asarray(batched["angle"][0]), np.asarray(out["angle"]), atol=1e-3)


def test_bad_shapes_raise():
  fn = rollout.make_stability_fn(_cfg())
  with pytest.raises(ValueError):
    fn(jnp.zeros((2, 8, 8, 4)))
