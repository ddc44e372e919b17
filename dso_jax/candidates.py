"""A policy's candidates with their verdicts: sample K latents per condition, decode, simulate.

This is what the online step does to make its own training labels and what the held-out protocol
(``dso_jax.toy.heldout``) measures; both call the same function, so "what was trained on" and "what was
measured" cannot drift apart. (The MJX simulation itself is ``dso_jax.physics.rollout``.)
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from dso_jax import flow, lora
from dso_jax.batching import map_rows
from dso_jax.models.layers import cast_block_weights
from dso_jax.models.ss_decoder import occupancy_from_logits
from dso_jax.sampling import sample_from_config

ApplyFn = Callable[..., jax.Array]
DecodeFn = Callable[..., jax.Array]  # decode_fn(dec_params, z (N, C, R, R, R)) -> logits (N, 1, D, D, D)
StabilityFn = Callable[[jax.Array], dict]  # occ (N, D, D, D) -> {'stable', 'angle', 'valid', ...} of (N,)


def policy_params(base, overlay, dtype):
    """base ⊕ overlay (``overlay=None``: the base alone) without gradient, block weights pre-cast to ``dtype``."""
    params = jax.lax.stop_gradient(base if overlay is None else lora.merge(base, overlay))
    return cast_block_weights(params, dtype)


def upsample(occ, factor: int):
    """(N, D, D, D) -> (N, fD, fD, fD): every voxel split into f³ (nearest neighbour; the same solid)."""
    for axis in (1, 2, 3):
        occ = jnp.repeat(occ, factor, axis=axis) if factor > 1 else occ
    return occ


def make_candidates_fn(
    apply_fn: ApplyFn,
    decode_fn: DecodeFn,
    stability_fn: Optional[StabilityFn],
    sampler_cfg,
    latent_shape,
    num_candidates: int,
    *,
    sim_upsample: int = 1,
    rows: int = 0,
):
    """``candidates(params, dec_params, cond (B, S, Cc), key) -> dict`` of z (B, K, C, R, R, R) and occ
    (B, K, D, D, D), and with a ``stability_fn`` stable / angle / valid (B, K); K = ``num_candidates``,
    ``params`` already merged (:func:`policy_params`). The noise of all B·K samples is one draw from ``key``.
    The simulator sees the decoded grid upsampled ``sim_upsample`` times (:func:`upsample`; the toy codec's
    32³ on TRELLIS's 64³ grid); ``occ`` stays the decoded grid. ``rows`` > 0 samples that many of the B·K
    latents at a time (``batching.map_rows``; the same samples, computed in chunks)."""
    k = num_candidates

    def candidates(params, dec_params, cond, key):
        b = cond.shape[0]
        cond_k = jnp.repeat(cond, k, axis=0)  # (B K, S, Cc), candidates of a condition adjacent
        noise = flow.normal(key, (b * k,) + tuple(latent_shape))
        draw = map_rows(lambda n, c: sample_from_config(apply_fn, params, n, c, sampler_cfg), rows)
        z = draw(noise, cond_k)  # (B K, C, R, R, R)
        occ = occupancy_from_logits(decode_fn(dec_params, z))  # (B K, D, D, D)
        out = {"z": z.reshape((b, k) + z.shape[1:]), "occ": occ.reshape((b, k) + occ.shape[1:])}
        if stability_fn is not None:
            verdict = stability_fn(upsample(occ, sim_upsample))
            out.update(
                stable=(verdict["stable"] & verdict["valid"]).reshape(b, k),
                angle=verdict["angle"].reshape(b, k),
                valid=verdict["valid"].reshape(b, k),
            )
        return out

    return candidates
