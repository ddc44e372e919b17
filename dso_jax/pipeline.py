"""Image -> DINOv2 condition -> TRELLIS stage 1 (CFG Euler sampling) -> occupancy [-> MJX stability], batched; then
stage 2 (:class:`Stage2`): occupancy -> SLat sampling -> mesh decoder -> FlexiCubes mesh (+ Gaussian decoder).

:class:`Generator` is the jitted pipeline behind ``scripts/{sample,generate_data,generate_eval}.py``
(the jobs in ``dso_jax.generate``): a batch of I preprocessed images times K noises gives image-major rows
(I*K) of latents, occupancies and a finiteness flag; the stability check is a second jitted program on the
occupancy, so the sampling program compiles once for every job. Models come from
``dso_jax.models.pretrained.load_models`` (LoRA merged by ``with_lora``: stage 1 only, as in DSO) and
``dso_jax.models.stage2.load_stage2``.

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

from dso_jax import flow, gaussians, mesh_extract, sampling
from dso_jax.batching import pad_rows
from dso_jax.models import dinov2, pretrained
from dso_jax.models.layers import cast_block_weights
from dso_jax.models.slat_decoders import decoder_input
from dso_jax.models.ss_decoder import occupancy_from_logits
from dso_jax.models.stage2 import Stage2Models
from dso_jax.sparse.batch import COARSE_QUANTUM, TOKEN_QUANTUM, SparseBatch, from_trellis

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
        return {
            "latents": z.astype(jnp.float32),
            "occupancy": occ,
            "finite": finite,
            "cond": cond.astype(jnp.bfloat16),  # what DSO stores
            "cond_f32": cond.astype(jnp.float32),  # what stage 2 conditions on
        }

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
    # flow.normal: the same numbers, drawn flat (XLA's CPU compiler takes ~8 s on the vmapped 4-D draw, 0.4 s flat)
    return jax.jit(jax.vmap(lambda s: flow.normal(jax.random.PRNGKey(s), shape, jnp.float32)))


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
        return {key: (v[:n] if key.startswith("cond") else v[:rows]) for key, v in out.items()}


# ---------------------------------------------------------------------------------------------- stage 2

OBJECTS_PER_BATCH = 1  # stage-2 objects per device batch (each (batch, token bucket) shape compiles once)
STAGE2_NOISE_STREAM = 2  # fold_in of a seed's key that draws its stage-2 noise (stage 1 draws from the key itself)


@functools.lru_cache(maxsize=16)
def _slat_fn(flow_module, sampler: sampling.SamplerSettings):
    """jit(params, batch: SparseBatch (structure), cond (B, S, Cc), seeds (B,)) -> denormalised SLat feats (B, N, C).

    The noise of voxel (x, y, z) is row ``(x R + y) R + z`` of ``normal(fold_in(PRNGKey(seed), 2), (R³, C))``: a
    function of the seed and the voxel only, whatever the bucket or batch (TRELLIS continues its torch stream)."""
    apply_fn = pretrained.make_apply_fn(flow_module)

    def run(params, batch, cond, seeds):
        r, c = batch.resolution, flow_module.in_channels

        def eps(seed, xyz):  # (N, 3) -> (N, C)
            table = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), STAGE2_NOISE_STREAM), (r**3, c))
            return jnp.take(table, (xyz[:, 0] * r + xyz[:, 1]) * r + xyz[:, 2], axis=0)

        noise = jnp.where(batch.mask[..., None], jax.vmap(eps)(seeds, batch.coords), 0.0)
        return sampling.sample_slat(apply_fn, params, batch.replace(feats=noise), cond, **sampler.to_dict()).feats

    return jax.jit(run)


@functools.lru_cache(maxsize=16)
def _decode_fn(module):
    """jit(params, batch: SparseBatch (structure), feats (B, N, C)) -> the decoder's out_layer feats."""
    apply_fn = pretrained.make_apply_fn(module)
    return jax.jit(lambda p, batch, feats: apply_fn(p, batch.replace(feats=feats)).feats)


class Stage2:
    """TRELLIS's ``sample_slat`` + ``decode_slat(['mesh', 'gaussian'])`` + mesh extraction on stage-1 structures.

    Objects go in batches of ``objects_per_batch`` (the last one padded by repeating an object), each padded to a
    token bucket (a multiple of ``quantum`` voxels; the mesh decoder's levels 8x and 64x that): one compile per
    (batch, bucket). Structures (index tables, swin partitions, subdivided levels) are built on the host once per
    batch and shared by every sampler step and both decoders. Params are pre-cast to each model's dtype.
    """

    def __init__(
        self,
        models: Stage2Models,
        sampler: sampling.SamplerSettings = sampling.DSO_STAGE2,
        *,
        objects_per_batch: int = OBJECTS_PER_BATCH,
        quantum: int = TOKEN_QUANTUM,
        coarse_quantum: int = COARSE_QUANTUM,
    ):
        if objects_per_batch <= 0:
            raise ValueError(f"stage-2 objects per batch must be positive, got {objects_per_batch}")
        self.models, self.sampler, self.objects_per_batch = models, sampler, int(objects_per_batch)
        self.quantum, self.coarse_quantum = int(quantum), int(coarse_quantum)
        cast = lambda fn, p: None if fn is None else cast_block_weights(p, fn.module.dtype)  # noqa: E731
        self._params = dict(
            flow=cast(models.slat_flow, models.slat_flow_params),
            mesh=cast(models.mesh_decoder, models.mesh_decoder_params),
            gs=cast(models.gs_decoder, models.gs_decoder_params),
        )

    @property
    def gaussians(self) -> bool:
        return self.models.gs_decoder is not None

    def structures(self, voxels: Sequence[np.ndarray]) -> tuple[SparseBatch, SparseBatch]:
        """Host side: per-object voxels (N_i, 3) -> (the SLat flow's batch, the decoders' batch), same rows."""
        coords = np.concatenate([np.c_[np.full((len(v), 1), b, np.int32), v] for b, v in enumerate(voxels)])
        zeros = np.zeros((len(coords), self.models.slat_flow.module.in_channels), np.float32)
        flow = self.models.slat_flow.module
        res = flow.resolution
        fb = from_trellis(
            coords,
            zeros,
            resolution=res,
            downsamples=flow.downsamples,
            quantum=self.quantum,
            coarse_quantum=self.coarse_quantum,
        )
        db = decoder_input(coords, zeros, quantum=self.quantum, **self.models.mesh_decoder.module.input_kwargs)
        return fb, db

    def sample(self, flow_batch: SparseBatch, cond, seeds) -> jax.Array:
        """Denormalised SLat feats (B, N, C) on device; cond (B, S, Cc), seeds (B,) ints."""
        fn = _slat_fn(self.models.slat_flow.module, self.sampler)
        return fn(self._params["flow"], flow_batch, jnp.asarray(cond, jnp.float32), jnp.asarray(seeds, jnp.uint32))

    def decode_mesh(self, dec_batch: SparseBatch, slat) -> SparseBatch:
        """The mesh decoder's raw output on the host: a SparseBatch of (B, 64 N, 101) on the 4x-finer voxels."""
        feats = _decode_fn(self.models.mesh_decoder.module)(self._params["mesh"], dec_batch, slat)
        return SparseBatch(feats=np.asarray(feats), levels=(dec_batch.levels[-1],))

    def decode_gaussians(self, dec_batch: SparseBatch, slat) -> SparseBatch:
        top = dec_batch.replace(levels=dec_batch.levels[:1])
        feats = _decode_fn(self.models.gs_decoder.module)(self._params["gs"], top, slat)
        return SparseBatch(feats=np.asarray(feats), levels=top.levels)

    def __call__(self, voxels: Sequence[np.ndarray], cond, seeds: Sequence[int]) -> list[dict]:
        """Per object (its voxels (N_i, 3) at the SLat grid, its cond (S, Cc), its seed) -> {mesh: mesh_extract.Mesh
        (TRELLIS's z-up frame), gaussians: dict of gaussians_from_decoder (when the Gaussian decoder is loaded)}.
        Objects are sorted by size into batches so that a batch's bucket fits its objects tightly."""
        n = len(voxels)
        if not (len(cond) == len(seeds) == n):
            raise ValueError(f"stage 2: {n} structures, {len(cond)} conds, {len(seeds)} seeds")
        if any(len(v) == 0 for v in voxels):
            raise ValueError("stage 2: an object has no voxels (stage 1's occupancy is empty)")
        order = np.argsort([len(v) for v in voxels], kind="stable")
        out: list = [None] * n
        k = self.objects_per_batch
        cond = np.asarray(cond, np.float32)
        for start in range(0, n, k):
            idx = list(order[start : start + k])
            idx += [idx[-1]] * (k - len(idx))  # pad the batch by repeating an object
            fb, db = self.structures([voxels[i] for i in idx])
            slat = self.sample(fb, cond[idx], [int(seeds[i]) for i in idx])
            meshes = mesh_extract.flexicubes(self.decode_mesh(db, slat))
            gs = None
            if self.gaussians:
                cfg = gaussians.decoder_config(self.models.gs_decoder.module)
                gs = gaussians.gaussians_from_decoder(self.decode_gaussians(db, slat), config=cfg)
            for j, i in enumerate(idx[: min(k, n - start)]):
                out[i] = dict(mesh=meshes[j], gaussians=None if gs is None else gs[j])
        return out
