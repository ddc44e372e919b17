"""Deterministic latent codec of the toy world: 32³ occupancy <-> the stage-1 latent shape (8, 16, 16, 16).

`encode` is a 2x2x2 space-to-depth with values ±scale, `decode` its inverse with the latent's values as logits
(occupancy = logits > 0, as TRELLIS reads its decoder). The channel order is TRELLIS's `pixel_shuffle_3d`
(trellis.md §3.2): ``latent[4i + 2j + k, X, Y, Z] = occ[2X + i, 2Y + j, 2Z + k]``, so the same SS flow class and
sampler apply unchanged. The physics code takes the decoded 32³ grid as it is (any D³ grid over the
[-0.5, 0.5]³ cube). All functions are jittable and take any number of leading batch axes.
"""

from __future__ import annotations

import jax.numpy as jnp

LATENT_SHAPE = (8, 16, 16, 16)
RES = 32
# The toy world is simulated on TRELLIS's 64³ grid (each decoded voxel split into 2³): there MJX agrees with the
# world's static check on every held-out object, at 32³ on 91% (bench/RESULTS.md, "Online DSO that does not forget").
SIM_UPSAMPLE = 2


def encode(occ, scale: float = 1.0):
    """(..., 32, 32, 32) bool/0-1 occupancy -> (..., 8, 16, 16, 16) float32 latent with values ±scale."""
    occ = jnp.asarray(occ)
    lead = occ.shape[:-3]
    if occ.shape[-3:] != (RES, RES, RES):
        raise ValueError(f"encode expects (..., {RES}, {RES}, {RES}) occupancy, got {occ.shape}")
    x = occ.reshape(lead + (16, 2, 16, 2, 16, 2))
    n = len(lead)
    x = jnp.transpose(x, tuple(range(n)) + tuple(n + a for a in (1, 3, 5, 0, 2, 4)))  # (..., i, j, k, X, Y, Z)
    x = x.reshape(lead + LATENT_SHAPE)
    return jnp.where(x > 0, jnp.float32(scale), jnp.float32(-scale))


def decode(latent):
    """(..., 8, 16, 16, 16) latent -> (..., 32, 32, 32) float32 logits (occupancy = logits > 0)."""
    z = jnp.asarray(latent, dtype=jnp.float32)
    lead = z.shape[:-4]
    if z.shape[-4:] != LATENT_SHAPE:
        raise ValueError(f"decode expects (..., 8, 16, 16, 16) latents, got {z.shape}")
    n = len(lead)
    x = z.reshape(lead + (2, 2, 2, 16, 16, 16))
    x = jnp.transpose(x, tuple(range(n)) + tuple(n + a for a in (3, 0, 4, 1, 5, 2)))  # (..., X, i, Y, j, Z, k)
    return x.reshape(lead + (RES, RES, RES))


def decoder_fn(dec_params, latent):
    """The codec as a stage-1 decoder: (N, 8, 16, 16, 16) latents -> (N, 1, 32, 32, 32) logits; no weights
    (``dec_params`` is ``{}``), the signature of a TRELLIS decoder's apply function."""
    del dec_params
    return decode(latent)[:, None]
