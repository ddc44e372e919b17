"""Rectified-flow convention shared by training and sampling (t = 1 is pure noise).

DSO's fine-tuning convention (``dso.md`` §3.2): ``x_t = (1 - t) x0 + t eps``, target ``v = eps - x0``,
the model is fed ``1000 t`` and ``t = sigmoid(mu + sigma n)`` (logit-normal, mu = sigma = 1).
TRELLIS's pre-training adds ``sigma_min`` (1e-5); it is a parameter here, 0 by default like DSO.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

TIME_SCALE = 1000.0  # the model's time input is 1000 t


def normal(key, shape, dtype=jnp.float32):
    """``jax.random.normal(key, shape, dtype)``, bit for bit, drawn as one flat vector and reshaped.

    Threefry is counter-based over the flat index, so the numbers are the same; XLA's CPU compiler takes
    ~13 s on a 5-D draw such as (48, 8, 16, 16, 16) against 0.5 s flat (bench/RESULTS.md, issue 15).
    """
    shape = tuple(shape)
    return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def sample_t(key, shape, mu: float = 1.0, sigma: float = 1.0):
    """Logit-normal training times ``sigmoid(mu + sigma n)``, n ~ N(0, 1); float32 of ``shape``."""
    return jax.nn.sigmoid(mu + sigma * jax.random.normal(key, shape, jnp.float32))


def _bcast(t, x):
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def noisy_latent(x0, eps, t, sigma_min: float = 0.0):
    """``x_t = (1 - t) x0 + (sigma_min + (1 - sigma_min) t) eps``; t has shape (B,)."""
    t = _bcast(t, x0)
    return (1.0 - t) * x0 + (sigma_min + (1.0 - sigma_min) * t) * eps


def velocity_target(x0, eps, sigma_min: float = 0.0):
    """``v = (1 - sigma_min) eps - x0`` (= d x_t / d t)."""
    return (1.0 - sigma_min) * eps - x0


def per_sample_mse(pred, target):
    """Mean squared error over every non-batch element, computed in float32: (B, ...) -> (B,)."""
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return jnp.mean(err.reshape(err.shape[0], -1), axis=1)
