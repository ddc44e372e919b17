"""Deterministic latent codec of the toy world: 32³ occupancy <-> the stage-1 latent shape (8, 16, 16, 16).

`encode` is a 2x2x2 space-to-depth with values ±scale, `decode` its inverse with the latent's values as logits
(occupancy = logits > 0, as TRELLIS reads its decoder). The channel order is TRELLIS's `pixel_shuffle_3d`
(trellis.md §3.2): ``latent[4i + 2j + k, X, Y, Z] = occ[2X + i, 2Y + j, 2Z + k]``, so the same SS flow class and
sampler apply unchanged. `decode_to_64` repeats each voxel 2x2x2 for the physics code's 64³ grid (the
32-voxel i covers 64-voxels 2i and 2i + 1, so voxel centres and the [-0.5, 0.5]³ cube are kept).
All functions are jittable and take any number of leading batch axes.
"""

from __future__ import annotations

import jax.numpy as jnp

LATENT_SHAPE = (8, 16, 16, 16)
RES = 32


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


def occupancy(latent):
    """(..., 8, 16, 16, 16) latent -> (..., 32, 32, 32) bool occupancy."""
    return decode(latent) > 0


def upsample_64(x):
    """(..., 32, 32, 32) -> (..., 64, 64, 64), each voxel repeated 2x2x2 (nearest neighbour)."""
    for ax in (-3, -2, -1):
        x = jnp.repeat(x, 2, axis=ax)
    return x


def decode_to_64(latent):
    """(..., 8, 16, 16, 16) latent -> (..., 64, 64, 64) float32 logits on TRELLIS's 64³ grid (> 0: occupied)."""
    return upsample_64(decode(latent))
