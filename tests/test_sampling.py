"""Sampler semantics that need no PyTorch: schedule, guidance window, CFG batching, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dso_jax import flow
from dso_jax.sampling import euler_schedule, guided_steps, sample


def test_schedule_matches_trellis_table():
    # trellis.md §5: N = 12, r = 3.
    want = [1, 0.9706, 0.9375, 0.9, 0.8571, 0.8077, 0.75, 0.6818, 0.6, 0.5, 0.375, 0.2143, 0]
    np.testing.assert_allclose(euler_schedule(12, 3.0), want, atol=5e-5)


@pytest.mark.parametrize("steps,guided", [(12, 10), (25, 19)])
def test_guidance_interval_is_inclusive_on_rescaled_t(steps, guided):
    ts = euler_schedule(steps, 3.0)
    assert guided_steps(ts, 7.5, (0.5, 1.0)).sum() == guided
    assert guided_steps(ts, 0.0, (0.5, 1.0)).sum() == 0


def _linear_model(params, x, t, cond):
    # v depends on x, t and the condition so CFG, timing and batching all matter; cond=None is the zero condition.
    c = jnp.zeros(x.shape[:1]) if cond is None else jnp.mean(cond, axis=(1, 2))
    return params["a"] * x + 1e-3 * t[:, None, None, None, None] + c[:, None, None, None, None]


def _reference_loop(params, noise, cond, steps, rescale_t, w, interval):
    ts = euler_schedule(steps, rescale_t)
    x = np.asarray(noise, np.float64)
    for i in range(steps):
        t, tp = ts[i], ts[i + 1]
        tv = np.full((x.shape[0],), 1000 * t)
        v_c = np.asarray(_linear_model(params, x, jnp.asarray(tv), cond), np.float64)
        if interval[0] <= t <= interval[1]:
            v_u = np.asarray(_linear_model(params, x, jnp.asarray(tv), jnp.zeros_like(cond)), np.float64)
            v_c = (1 + w) * v_c - w * v_u
        x = x - (t - tp) * v_c
    return x


def test_sample_matches_plain_loop_and_jits():
    key = jax.random.PRNGKey(0)
    noise = flow.normal(key, (3, 2, 4, 4, 4))
    cond = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 6))
    params = {"a": jnp.float32(-0.7)}
    kw = dict(steps=12, rescale_t=3.0, cfg_strength=7.5, cfg_interval=(0.5, 1.0))
    got = jax.jit(lambda p, n, c: sample(_linear_model, p, n, c, **kw))(params, noise, cond)
    want = _reference_loop(params, noise, cond, 12, 3.0, 7.5, (0.5, 1.0))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_single_cond_broadcasts_over_batch():
    noise = flow.normal(jax.random.PRNGKey(0), (4, 2, 4, 4, 4))
    cond = jax.random.normal(jax.random.PRNGKey(1), (1, 5, 6))
    kw = dict(steps=4, rescale_t=1.0, cfg_strength=3.0, cfg_interval=(0.0, 1.0))
    a = sample(_linear_model, {"a": jnp.float32(0.1)}, noise, cond, **kw)
    b = sample(_linear_model, {"a": jnp.float32(0.1)}, noise, jnp.repeat(cond, 4, axis=0), **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
