"""Image -> DINOv2 condition -> TRELLIS stage 1 (CFG Euler sampling) -> occupancy [-> MJX stability], batched.

:class:`Generator` is the jitted pipeline behind ``scripts/{sample,generate_data,generate_eval}.py``
(the jobs in ``dso_jax.generate``): a batch of I preprocessed images times K noises gives image-major rows
(I*K) of latents, occupancies and a finiteness flag; the stability check is a second jitted program on the
occupancy, so the sampling program compiles once for every job. Models come from
``dso_jax.models.pretrained.load_models`` (LoRA merged by ``with_lora``).

Noise: TRELLIS's ``torch.manual_seed(seed); torch.randn(...)`` CPU stream is *not* reproduced: the noise of
seed ``s`` is ``jax.random.normal(PRNGKey(s), (C, R, R, R))``, like TRELLIS's a function of the seed only
(not of the image). For TRELLIS's exact noise, save it as .npy (K, C, R, R, R) and pass it to ``load_noise``.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dso_jax import sampling
from dso_jax.batching import pad_rows
from dso_jax.models import dinov2, pretrained
from dso_jax.models.layers import cast_block_weights
from dso_jax.models.ss_decoder import occupancy_from_logits

IMAGES_PER_BATCH = 4  # images per device batch (x K noises = rows): one compiled shape per job


@functools.lru_cache(maxsize=16)
def _pipeline_fn(flow_module, dec_module, dino_cfg, dino_dtype, sampler: sampling.SamplerSettings):
    """jit(images (I, 518, 518, 3) uint8, noise (K, C, R, R, R)) -> dict; rows are image-major (I*K)."""
    flow_apply, dec_apply = pretrained.make_apply_fn(flow_module), pretrained.make_apply_fn(dec_module)

    def run(fp, dp, gp, images, noise):
        i, k = images.shape[0], noise.shape[0]
        cond = dinov2.encode_condition(gp, images, dino_cfg, dino_dtype)  # (I, S, Cc)
        rows_cond = jnp.repeat(cond, k, axis=0)  # (I*K, S, Cc)
        rows_noise = jnp.tile(noise, (i,) + (1,) * (noise.ndim - 1))  # (I*K, C, R, R, R)
        z = sampling.sample_from_config(flow_apply, fp, rows_noise, rows_cond, sampler)
        finite = jnp.all(jnp.isfinite(z), axis=tuple(range(1, z.ndim)))  # (I*K,)
        occ = occupancy_from_logits(dec_apply(dp, z))  # (I*K, D, D, D) bool, axes (x, y, z)
        return {"latents": z.astype(jnp.float32), "occupancy": occ, "finite": finite, "cond": cond.astype(jnp.bfloat16)}

    return jax.jit(run)


@functools.lru_cache(maxsize=4)
def stability_fn(physics_json: str):
    """jit(occupancy (B, D, D, D)) -> {angle, stable, valid, ...} for a sim config given as JSON (hashable):
    a program apart from sampling, so the sampling pipeline compiles once for sample / eval / data; the
    occupancy stays on the device in between."""
    from dso_jax.physics.rollout import make_stability_fn

    return jax.jit(make_stability_fn(ml_collections.ConfigDict(json.loads(physics_json))))


@functools.lru_cache(maxsize=8)
def _noise_fn(shape: tuple):
    return jax.jit(jax.vmap(lambda s: jax.random.normal(jax.random.PRNGKey(s), shape, jnp.float32)))


def noise_for_seeds(seeds: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """(K, *shape) float32: ``jax.random.normal(PRNGKey(s), shape)`` per seed (not TRELLIS's torch stream)."""
    return np.asarray(_noise_fn(tuple(int(d) for d in shape))(jnp.asarray(list(seeds), jnp.uint32)))


def load_noise(path: str, num_samples: int, shape: Sequence[int]) -> np.ndarray:
    """A .npy of shape (num_samples, C, R, R, R) (or (C, R, R, R) for one sample) -> float32; checked."""
    want = (num_samples,) + tuple(shape)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such noise file")
    try:
        noise = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy array ({e})") from None
    if not isinstance(noise, np.ndarray):  # an .npz archive
        raise ValueError(f"{path}: an .npz archive; the noise must be one .npy array of shape {want}")
    if not np.issubdtype(noise.dtype, np.floating):
        raise ValueError(f"{path}: noise has dtype {noise.dtype}, expected floats of shape {want}")
    if noise.shape == tuple(shape) and num_samples == 1:
        noise = noise[None]
    if noise.shape != want:
        raise ValueError(f"{path}: noise has shape {noise.shape}, expected {want} (num_samples, C, R, R, R)")
    if not np.all(np.isfinite(noise)):
        raise ValueError(f"{path}: noise has {int(noise.size - np.isfinite(noise).sum())} non-finite values")
    return noise.astype(np.float32)


class Generator:
    """The jitted pipeline over a batch of images x K noises; params pre-cast to each model's dtype."""

    def __init__(
        self,
        models: pretrained.Models,
        sampler: sampling.SamplerSettings = sampling.DSO_STAGE1,
        *,
        images_per_batch: int = IMAGES_PER_BATCH,
        dinov2_dtype=jnp.float32,
        physics: Optional[ml_collections.ConfigDict] = None,
    ):
        if images_per_batch <= 0:
            raise ValueError(f"images per batch must be positive, got {images_per_batch}")
        self.models, self.sampler, self.images_per_batch = models, sampler, int(images_per_batch)
        self.dinov2_dtype = jnp.dtype(dinov2_dtype)
        self.physics = physics
        self._fp = cast_block_weights(models.flow_params, models.flow.module.dtype)
        self._dp = cast_block_weights(models.decoder_params, models.decoder.module.dtype)

    def __call__(self, images: np.ndarray, noise: np.ndarray, simulate: bool = False) -> dict:
        """images (I, 518, 518, 3) uint8 with I <= images_per_batch (padded to it), noise (K, C, R, R, R) ->
        device arrays, rows image-major: latents (I*K, C, R, R, R) float32, occupancy (I*K, D, D, D) bool,
        finite (I*K,) bool, cond (I, S, Cc) bf16 [, angle / stable / valid (I*K,) with ``simulate``].
        Dispatch is asynchronous."""
        n = len(images)
        if not 0 < n <= self.images_per_batch:
            raise ValueError(f"{n} images for a batch of {self.images_per_batch}")
        if simulate and self.physics is None:
            raise ValueError("simulate=True needs a Generator built with physics=<sim config>")
        images, _ = pad_rows(images, self.images_per_batch)  # one compiled shape per job
        m = self.models
        fn = _pipeline_fn(m.flow.module, m.decoder.module, m.dinov2_cfg, self.dinov2_dtype, self.sampler)
        out = fn(self._fp, self._dp, m.dinov2_params, jnp.asarray(images), jnp.asarray(noise, jnp.float32))
        if simulate:
            sim = stability_fn(self.physics.to_json())(out["occupancy"])
            out.update(angle=sim["angle"], stable=sim["stable"], valid=sim["valid"])
        rows = n * len(noise)
        return {key: (v[:n] if key == "cond" else v[:rows]) for key, v in out.items()}
