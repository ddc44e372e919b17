"""The toy world's condition: one front depth image of the object, turned into a few tokens.

The camera is orthographic and looks along +y from the front (small y), like TRELLIS's front view; per
(x, z) pixel it records whether the ray hits the object and the depth of the first hit. It sees the front of
every part and nothing behind it, so back legs, the depth of a base or a backpack stay unknown
(`objects.py`). The tokens replace DINOv2's (1374, 1024) with a fixed, deterministic, non-learned map:
patchify the (hit, depth) image into P×P patches, rotate each patch vector by a seeded random orthogonal
matrix (no information is lost) and append 2-D sinusoidal position features. Defaults: R = 32, P = 4 give
L = 64 tokens of C = 64 channels (32 content + 32 position). All functions are jittable and batched.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def front_depth(occ):
    """(..., R, R, R) occupancy -> hit (..., R, R) bool and depth (..., R, R) float32, image axes (x, z).

    depth = 1 - 2·(y_first + 0.5)/R on hits (near ≈ +1, far ≈ -1) and 0 on background.
    """
    occ = jnp.asarray(occ) > 0
    res = occ.shape[-1]
    hit = jnp.any(occ, axis=-2)
    first = jnp.argmax(occ, axis=-2)  # the first True along +y
    depth = jnp.where(hit, 1.0 - 2.0 * (first + 0.5) / res, 0.0).astype(jnp.float32)
    return hit, depth


@functools.cache
def _projection(n: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return (q * np.sign(np.diag(r))).astype(np.float32)  # (n, n) orthogonal


@functools.cache
def _positions(grid: int, dim: int) -> np.ndarray:
    """(grid², dim) sinusoidal features of the patch row (x) and column (z); dim/2 per axis."""
    per = dim // 2
    freqs = np.pi * 2.0 ** np.arange(per // 2) / grid  # (per/2,)
    pos = np.arange(grid) + 0.5
    f = np.concatenate([np.sin(pos[:, None] * freqs), np.cos(pos[:, None] * freqs)], axis=-1)  # (grid, per)
    px = np.repeat(f, grid, axis=0)  # token n = grid·u + v: u indexes x
    pz = np.tile(f, (grid, 1))
    return np.concatenate([px, pz], axis=-1).astype(np.float32)


def condition_tokens(occ, patch: int = 4, dim: int = 64, seed: int = 0):
    """(..., R, R, R) occupancy -> (..., L, dim) float32 tokens, L = (R/patch)², token n = (R/patch)·u + v
    for the patch at x-index u and z-index v. The first 2·patch² channels are content, the rest position."""
    hit, depth = front_depth(occ)
    res = hit.shape[-1]
    g, c = res // patch, 2 * patch * patch
    if res % patch or dim < c + 4 or (dim - c) % 4:
        raise ValueError(
            f"need R % patch == 0 and dim >= 2·patch² + 4 with (dim - 2·patch²) % 4 == 0, "
            f"got R={res}, patch={patch}, dim={dim}"
        )
    lead = hit.shape[:-2]
    img = jnp.stack([2.0 * hit.astype(jnp.float32) - 1.0, depth], axis=-1)  # (..., R, R, 2)
    n = len(lead)
    x = img.reshape(lead + (g, patch, g, patch, 2))
    x = jnp.transpose(x, tuple(range(n)) + tuple(n + a for a in (0, 2, 1, 3, 4)))  # (..., u, v, px, pz, 2)
    x = x.reshape(lead + (g * g, c)) @ jnp.asarray(_projection(c, seed))  # (..., L, c)
    pos = jnp.broadcast_to(jnp.asarray(_positions(g, dim - c)), lead + (g * g, dim - c))
    return jnp.concatenate([x, pos], axis=-1)


_condition_tokens_jit = jax.jit(condition_tokens, static_argnames=("patch", "dim", "seed"))


def tokens(occ, **kwargs) -> np.ndarray:
    """Condition tokens of a batch of occupancies as numpy: (n, L, C) float32 (jitted `condition_tokens`)."""
    return np.asarray(_condition_tokens_jit(np.asarray(occ), **kwargs))
