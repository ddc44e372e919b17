"""Image -> TRELLIS stage 1 (+ LoRA) -> latents, occupancy, meshes and simulated labels, batched on one device.

Three jobs share one jitted pipeline (``Generator``: DINOv2 condition -> CFG Euler sampling -> decoder ->
occupancy [-> MJX stability]), each behind a thin script:

* :func:`sample_images` (``scripts/sample.py``): per image and sample a y-up GLB (``dso_jax.mesh_export``),
  the stage-1 latent ``{name}_ss_latent.npy`` (1, C, R, R, R) float32 and the voxel coordinates
  ``{name}_coords.npy`` (N, 4) int32 rows (batch=0, x, y, z) in argwhere order: TRELLIS's layout, so its
  PyTorch stage 2 finishes a textured asset from them::

      coords = torch.from_numpy(np.load("x_000_coords.npy")).int().cuda()
      cond = pipeline.get_cond([pipeline.preprocess_image(image)])
      mesh_and_gaussians = pipeline.decode_slat(pipeline.sample_slat(cond, coords), ["mesh", "gaussian"])

* :func:`generate_dataset` (``scripts/generate_data.py``): DSO's training data (``dso.md`` §2): K latents
  per image with seeds 0..K-1, SS 12 steps CFG 7.5, angles from ``dso_jax.physics``, the DINOv2 condition;
  one ``objects/<object>/<view>.npz`` per finished image (resume skips those), then the
  ``dso_jax.data.tfds_dso`` dataset in the output directory (``data.path`` for training).
* :func:`generate_eval` (``scripts/generate_eval.py``): one mesh per image (seed 1 = DSO's ``bid + 1``) with
  and without a LoRA, named ``{uid}-{view}_{k:03d}.glb`` for ``scripts/evaluate_*.py``.

Noise: TRELLIS's ``torch.manual_seed(seed); torch.randn(...)`` CPU stream is *not* reproduced: the noise of
seed ``s`` is ``jax.random.normal(PRNGKey(s), (C, R, R, R))``, like TRELLIS's a function of the seed only
(not of the image). For TRELLIS's exact noise, save it as .npy (K, C, R, R, R) and pass ``noise_file``.
Bad images are reported (``failures.json``, one line each) and skipped; the batch goes on.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import json
import os
import shutil
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
from tqdm import tqdm

from dso_jax import lora, mesh_export, sampling
from dso_jax.convert import trellis
from dso_jax.convert.rules import sha256_file
from dso_jax.convert.trellis import write_json
from dso_jax.data.images import load_images, parse_color
from dso_jax.models import dinov2, pretrained
from dso_jax.models.layers import cast_block_weights
from dso_jax.models.ss_decoder import occupancy_from_logits

# Architectures for --random_weights (no files): the released ones (trellis.md §2.1, §3.1) and a CPU-sized
# set with the released latent / occupancy shapes ((8, 16, 16, 16) -> 64^3) and 1374 DINOv2 tokens.
RANDOM_PRESETS = {
    "released": (trellis.RELEASED_FLOW_ARGS, trellis.RELEASED_DECODER_ARGS, "vitl14_reg4"),
    "tiny": (
        dict(
            resolution=16,
            in_channels=8,
            out_channels=8,
            model_channels=32,
            cond_channels=64,
            num_blocks=2,
            num_heads=2,
            mlp_ratio=4,
            patch_size=2,
            pe_mode="ape",
            qk_rms_norm=True,
            use_fp16=False,
        ),
        dict(
            out_channels=1,
            latent_channels=8,
            num_res_blocks=1,
            num_res_blocks_middle=1,
            channels=[16, 8, 8],
            use_fp16=False,
        ),
        "tiny_reg4",
    ),
}
DSO_LORA_ALPHA = lora.DSO_ALPHA  # peft files do not store alpha; DSO trained with 128


@dataclasses.dataclass
class Models:
    """Stage-1 flow, decoder and DINOv2: apply functions (``.module`` attached) and float32 params."""

    flow: Callable
    flow_params: dict
    decoder: Callable
    decoder_params: dict
    dinov2_cfg: dinov2.DinoV2Config
    dinov2_params: dict
    source: dict  # what was loaded (paths, random preset, LoRA): recorded with generated data

    @property
    def latent_shape(self) -> tuple:
        m = self.flow.module
        return (m.in_channels,) + (m.resolution,) * 3


# ---------------------------------------------------------------------------------------------- loading


def load_dinov2(path: str) -> tuple[dinov2.DinoV2Config, dict]:
    """A converted DINOv2 folder (``scripts/convert_dinov2.py``) or the hub's ``.pth`` (ViT-L/14 reg4)."""
    from dso_jax.convert import dinov2 as convert

    if path.endswith(".pth"):
        return dinov2.VITL14_REG4, convert.convert_dinov2_state_dict(convert.load_dinov2_pth(path), dinov2.VITL14_REG4)
    cfg_file = os.path.join(path, convert.CONFIG_FILE)
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path}: neither a converted DINOv2 folder (no {convert.CONFIG_FILE}) nor a .pth file")
    with open(cfg_file) as f:
        if "name" in json.load(f):
            raise ValueError(f"{path}: is a converted TRELLIS model folder, not DINOv2 (pass it as --flow/--decoder)")
    config, params = convert.load_converted_dinov2(path)
    return dinov2.config_from_dict(config), params


def random_params(abstract, seed: int) -> dict:
    """Random non-trivial float32 values for a shape tree (no compile): kernels ~ N(0, 1/fan_in), biases
    ~ 0.1 N, norm scales / LayerScale gammas ~ 1 + 0.1 N, other tensors (tokens, embeddings) ~ 0.02 N."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = getattr(path[-1], "key", str(path[-1]))
        w = rng.standard_normal(x.shape, np.float32)
        if name == "kernel":
            w /= np.sqrt(max(int(np.prod(x.shape[:-1])), 1))
        elif name in ("scale", "gamma"):
            w = 1.0 + 0.1 * w
        else:
            w *= 0.1 if name == "bias" else 0.02
        return jnp.asarray(w.astype(x.dtype))

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def _random_model(name: str, args: dict, seed: int):
    module = pretrained.model_from_config(name, args, dtype=pretrained.default_dtype(name, args))
    return pretrained.make_apply_fn(module), random_params(pretrained.abstract_params(module), seed)


def load_models(
    flow: Optional[str] = None,
    decoder: Optional[str] = None,
    dinov2_path: Optional[str] = None,
    *,
    random_weights: Optional[str] = None,
    seed: int = 0,
) -> Models:
    """Load the three models from paths (converted folders / TRELLIS prefixes / DINOv2 .pth). With
    ``random_weights`` ('released' | 'tiny'), the models without a path get random weights of that preset."""
    if random_weights is not None and random_weights not in RANDOM_PRESETS:
        raise ValueError(f"random_weights must be one of {sorted(RANDOM_PRESETS)}, got {random_weights!r}")
    missing = [n for n, p in (("--flow", flow), ("--decoder", decoder), ("--dinov2", dinov2_path)) if not p]
    if missing and random_weights is None:
        raise ValueError(f"no path for {', '.join(missing)}; pass them or --random_weights released|tiny")
    preset = RANDOM_PRESETS.get(random_weights or "tiny")
    f_apply, f_params = pretrained.load_pretrained(flow) if flow else _random_model(trellis.FLOW, preset[0], seed)
    d_apply, d_params = (
        pretrained.load_pretrained(decoder) if decoder else _random_model(trellis.DECODER, preset[1], seed + 1)
    )
    if dinov2_path:
        g_cfg, g_params = load_dinov2(dinov2_path)
    else:
        g_cfg = dinov2.get_config(preset[2])
        g_params = random_params(jax.eval_shape(lambda: dinov2.init_params(jax.random.PRNGKey(0), g_cfg)), seed + 2)
    fm, dm = f_apply.module, d_apply.module
    if fm.cond_channels != g_cfg.embed_dim:
        raise ValueError(f"flow cond_channels {fm.cond_channels} != DINOv2 embed_dim {g_cfg.embed_dim}")
    if fm.out_channels != dm.latent_channels:
        raise ValueError(f"flow out_channels {fm.out_channels} != decoder latent_channels {dm.latent_channels}")
    name = lambda p: os.path.abspath(p) if p else f"random:{random_weights}"  # noqa: E731
    source = dict(
        flow=name(flow), decoder=name(decoder), dinov2=name(dinov2_path), weights_seed=seed if missing else None
    )
    return Models(f_apply, f_params, d_apply, d_params, g_cfg, jax.tree.map(jnp.asarray, g_params), source)


def with_lora(models: Models, path: str, alpha: float = DSO_LORA_ALPHA) -> Models:
    """``models`` with a peft LoRA file (DSO's full state dict or adapter-only) merged into the flow."""

    overlay = lora.load_peft(path, models.flow_params, alpha=alpha, targets=None)
    source = dict(models.source, lora=os.path.abspath(path), lora_alpha=float(alpha))
    return dataclasses.replace(models, flow_params=lora.merge(models.flow_params, overlay), source=source)


# ---------------------------------------------------------------------------------------------- pipeline


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
        occ = occupancy_from_logits(dec_apply(dp, z))  # (I*K, D, D, D) bool, axes (x, y, z)
        return {"latents": z.astype(jnp.float32), "occupancy": occ, "cond": cond.astype(jnp.bfloat16)}

    return jax.jit(run)


@functools.lru_cache(maxsize=4)
def _stability_fn(physics_json: str):
    """jit(occupancy (B, D, D, D)) -> {angle, stable, valid, ...}: a separate program, so the sampling
    pipeline compiles once for sample / eval / data; the occupancy stays on the device in between."""
    from dso_jax.physics.rollout import make_stability_fn

    return jax.jit(make_stability_fn(ml_collections.ConfigDict(json.loads(physics_json))))


@functools.lru_cache(maxsize=8)
def _noise_fn(shape: tuple):
    return jax.jit(jax.vmap(lambda s: jax.random.normal(jax.random.PRNGKey(s), shape, jnp.float32)))


def noise_for_seeds(seeds: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """(K, *shape) float32: ``jax.random.normal(PRNGKey(s), shape)`` per seed (not TRELLIS's torch stream)."""
    return np.asarray(_noise_fn(tuple(int(d) for d in shape))(jnp.asarray(list(seeds), jnp.uint32)))


def load_noise(path: str, num_samples: int, shape: Sequence[int]) -> np.ndarray:
    noise = np.load(path)
    want = (num_samples,) + tuple(shape)
    if noise.shape == tuple(shape) and num_samples == 1:
        noise = noise[None]
    if noise.shape != want:
        raise ValueError(f"{path}: noise has shape {noise.shape}, expected {want} (num_samples, C, R, R, R)")
    return noise.astype(np.float32)


class Generator:
    """The jitted pipeline over a batch of images x K noises; params pre-cast to each model's dtype."""

    def __init__(
        self,
        models: Models,
        sampler: sampling.SamplerSettings = sampling.DSO_STAGE1,
        *,
        images_per_batch: int = 4,
        dinov2_dtype=jnp.float32,
        physics: Optional[ml_collections.ConfigDict] = None,
    ):
        self.models, self.sampler, self.images_per_batch = models, sampler, int(images_per_batch)
        self.dinov2_dtype = jnp.dtype(dinov2_dtype)
        self.physics = physics
        self._fp = cast_block_weights(models.flow_params, models.flow.module.dtype)
        self._dp = cast_block_weights(models.decoder_params, models.decoder.module.dtype)

    def __call__(self, images: np.ndarray, noise: np.ndarray, simulate: bool = False) -> dict:
        """images (I, 518, 518, 3) uint8 with I <= images_per_batch (padded to it), noise (K, C, R, R, R) ->
        device arrays, rows image-major: latents (I*K, C, R, R, R) float32, occupancy (I*K, D, D, D) bool,
        cond (I, S, Cc) bf16 [, angle / stable / valid (I*K,) with ``simulate``]. Dispatch is asynchronous."""
        n = len(images)
        if not 0 < n <= self.images_per_batch:
            raise ValueError(f"{n} images for a batch of {self.images_per_batch}")
        if simulate and self.physics is None:
            raise ValueError("simulate=True needs a Generator built with physics=<sim config>")
        if n < self.images_per_batch:  # pad with the last image: one compiled shape per job
            images = np.concatenate([images, np.repeat(images[-1:], self.images_per_batch - n, 0)])
        m = self.models
        fn = _pipeline_fn(m.flow.module, m.decoder.module, m.dinov2_cfg, self.dinov2_dtype, self.sampler)
        out = fn(self._fp, self._dp, m.dinov2_params, jnp.asarray(images), jnp.asarray(noise, jnp.float32))
        if simulate:
            sim = _stability_fn(self.physics.to_json())(out["occupancy"])
            out.update(angle=sim["angle"], stable=sim["stable"], valid=sim["valid"])
        rows = n * len(noise)
        return {key: (v[:n] if key == "cond" else v[:rows]) for key, v in out.items()}


# ---------------------------------------------------------------------------------------------- helpers


def expand_images(pattern_or_paths) -> list[str]:
    """Sorted files of a glob (or of several globs / paths); raises if nothing matches."""
    patterns = [pattern_or_paths] if isinstance(pattern_or_paths, str) else list(pattern_or_paths)
    paths = sorted({p for pat in patterns for p in (glob.glob(pat) or ([pat] if os.path.isfile(pat) else []))})
    if not paths:
        raise FileNotFoundError(f"no image files match {patterns}")
    return paths


def output_names(paths: Sequence[str], naming_level: int = 1) -> list[str]:
    """Per image: its stem (level 1) or ``{parent}-{stem}`` (level 2, DSO's ``{uid}-{view}``); names must be unique."""
    if naming_level not in (1, 2):
        raise ValueError(f"naming_level must be 1 or 2, got {naming_level}")
    stem = lambda p: os.path.splitext(os.path.basename(p))[0]  # noqa: E731
    names = [
        stem(p) if naming_level == 1 else f"{os.path.basename(os.path.dirname(os.path.abspath(p)))}-{stem(p)}"
        for p in paths
    ]
    dup = sorted(n for n, c in collections.Counter(names).items() if c > 1)
    if dup:
        raise ValueError(f"images share output names {dup[:3]}; use naming level 2 ({{parent}}-{{stem}})")
    return names


def _save_npy(path: str, arr: np.ndarray) -> None:
    with open(path + ".tmp", "wb") as f:
        np.save(f, arr)
    os.replace(path + ".tmp", path)


def _pipelined(gen: Generator, paths: Sequence[str], noise, load_kwargs, simulate, consume, failures, bar):
    """Load chunk i+1 and write chunk i-1 on the host while the device computes chunk i."""
    pending, paths, n = None, list(paths), gen.images_per_batch
    for chunk in (paths[i : i + n] for i in range(0, len(paths), n)):
        images, errors = load_images(chunk, **load_kwargs)
        failures.update({p: r.removeprefix(f"{p}: ") for p, r in errors.items()})
        ok = [p for p in chunk if p not in errors]
        out = gen(images, noise, simulate) if ok else None
        if pending is not None:
            consume(*pending)
        pending = (ok, out) if ok else None
        bar.update(len(chunk))
    if pending is not None:
        consume(*pending)


# ---------------------------------------------------------------------------------------------- sample


def sample_images(
    gen: Generator,
    paths: Sequence[str],
    out_dir: str,
    *,
    num_samples: int = 1,
    seed: int = 0,
    names: Optional[Sequence[str]] = None,
    noise: Optional[np.ndarray] = None,
    background=None,
    smooth_iterations: int = mesh_export.SMOOTH_ITERATIONS,
    log: Callable[[str], None] = print,
) -> dict:
    """Per image and sample k (seed ``seed + k``): ``{name}_{k:03d}.glb``, ``_ss_latent.npy``, ``_coords.npy``.

    Images whose files all exist are skipped (resume; ``OUT/settings.json`` must match). Writes
    ``OUT/failures.json`` ({image or output: reason}) and ``OUT/manifest.json``; returns the manifest.
    """
    names = list(names) if names is not None else output_names(paths)
    seeds = [seed + k for k in range(num_samples)]
    noise = noise_for_seeds(seeds, gen.models.latent_shape) if noise is None else noise
    os.makedirs(out_dir, exist_ok=True)
    suffix = dict(glb=".glb", latent="_ss_latent.npy", coords="_coords.npy")
    files = lambda name, k: {
        key: os.path.join(out_dir, f"{name}_{k:03d}{ext}")  # noqa: E731
        for key, ext in suffix.items()
    }
    done = {
        p
        for p, n in zip(paths, names)
        if all(os.path.exists(f) for k in range(num_samples) for f in files(n, k).values())
    }
    todo = [p for p in paths if p not in done]
    name_of = dict(zip(paths, names))
    failures: dict = {}
    _check_settings(
        os.path.join(out_dir, "settings.json"),
        dict(seeds=seeds, sampler=dataclasses.asdict(gen.sampler), models=gen.models.source),
    )
    manifest = {"images": {}}

    def consume(ok, out):
        latents, occ = np.asarray(out["latents"]), np.asarray(out["occupancy"])
        for i, path in enumerate(ok):
            entries = []
            for k in range(num_samples):
                row, f = i * num_samples + k, files(name_of[path], k)
                xyz = np.argwhere(occ[row]).astype(np.int32)  # (N, 3) x, y, z in argwhere order
                coords = np.concatenate([np.zeros((len(xyz), 1), np.int32), xyz], axis=1)  # (N, 4) batch, x, y, z
                _save_npy(f["latent"], latents[row][None])  # (1, C, R, R, R)
                _save_npy(f["coords"], coords)
                entry = dict(seed=seeds[k], voxels=len(coords), **{key: os.path.basename(v) for key, v in f.items()})
                try:
                    mesh_export.occupancy_to_glb(occ[row], f["glb"], smooth_iterations)
                except mesh_export.EmptyOccupancyError as e:
                    failures[f"{path} sample {k}"] = str(e)
                    entry.pop("glb")
                entries.append(entry)
            manifest["images"][path] = entries

    with tqdm(total=len(paths), desc="sample", unit="img", dynamic_ncols=True) as bar:
        bar.update(len(done))
        _pipelined(gen, todo, noise, dict(background=background), False, consume, failures, bar)
    write_json(os.path.join(out_dir, "failures.json"), failures, sort_keys=True)
    prev = os.path.join(out_dir, "manifest.json")
    if os.path.exists(prev):  # keep the entries of images finished by an earlier run
        with open(prev) as f:
            manifest["images"] = {**json.load(f).get("images", {}), **manifest["images"]}
    write_json(prev, manifest, sort_keys=True)
    log(
        f"sample: {len(todo) - sum(1 for p in todo if p in failures)} images generated, {len(done)} already done, "
        f"{len(failures)} failures -> {out_dir}"
    )
    for key, reason in failures.items():
        log(f"  failed {key}: {reason}")
    return manifest


def generate_eval(
    gen: Generator,
    paths: Sequence[str],
    out_dir: str,
    *,
    lora: Optional[str] = None,
    lora_alpha: float = DSO_LORA_ALPHA,
    ids: Optional[Sequence[str]] = None,
    seed: int = 1,
    num_samples: int = 1,
    background=None,
    log: Callable[[str], None] = print,
) -> dict:
    """DSO's ``finetune.py --eval``: meshes ``{uid}-{view}_{k:03d}.glb`` under ``OUT/base`` and, with a LoRA,
    ``OUT/lora`` (same seeds/noise). ``ids`` (object uids) filters the images only when given, and an
    empty result is an error (DSO applied its Objaverse id filter to every eval set, dropping all real images)."""
    paths = list(paths)
    if ids is not None:
        keep = set(ids)
        kept = [p for p in paths if os.path.basename(os.path.dirname(os.path.abspath(p))) in keep]
        log(f"eval: id filter keeps {len(kept)} of {len(paths)} images")
        if not kept:
            raise ValueError(f"the id filter ({len(keep)} ids) matches none of the {len(paths)} images")
        paths = kept
    names = output_names(paths, naming_level=2)
    runs = {"base": gen}
    if lora:
        runs["lora"] = Generator(
            with_lora(gen.models, lora, lora_alpha),
            gen.sampler,
            images_per_batch=gen.images_per_batch,
            dinov2_dtype=gen.dinov2_dtype,
        )
    return {
        tag: sample_images(
            g,
            paths,
            os.path.join(out_dir, tag),
            num_samples=num_samples,
            seed=seed,
            names=names,
            background=background,
            log=log,
        )
        for tag, g in runs.items()
    }


# ---------------------------------------------------------------------------------------------- data


def object_ids(paths: Sequence[str]) -> list[str]:
    """DSO's ``category/prompt/view.png``: the prompt folder relative to the common category root."""
    prompts = [os.path.dirname(os.path.abspath(p)) for p in paths]
    root = os.path.commonpath([os.path.dirname(d) for d in prompts])
    return [os.path.relpath(d, root) for d in prompts]


def _settings(gen: Generator, num_samples: int, seed: int, noise_file: Optional[str]) -> dict:
    noise = None
    if noise_file:
        noise = dict(path=os.path.abspath(noise_file), sha256=sha256_file(noise_file))
    return dict(
        sampler=dataclasses.asdict(gen.sampler),
        num_samples=num_samples,
        noise_file=noise,
        seeds=[seed + k for k in range(num_samples)],
        models=gen.models.source,
        physics=gen.physics.to_dict(),
        latent_shape=list(gen.models.latent_shape),
    )


def _check_settings(path: str, settings: dict) -> None:
    """First run: record the settings; later runs (resume) must match them, key by key."""
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back
    if not os.path.exists(path):
        write_json(path, settings, sort_keys=True)
        return
    with open(path) as f:
        old = json.load(f)
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
        raise ValueError(
            f"{path}: this run's settings differ from the recorded ones at {diff} "
            f"(e.g. {diff[0]}: {old.get(diff[0])!r} -> {settings.get(diff[0])!r}); use another --out"
        )


def dataset_records(work_dir: str):
    """One :data:`tfds_dso.ObjectRecord` per object folder of finished views, in sorted order.

    View ids are the image stems when all are integers (DSO's ``000.png``), else their sorted positions.
    Samples whose simulation is invalid (empty occupancy) are left out, as DSO drops failed simulations.
    """
    objects = sorted(
        {
            os.path.relpath(os.path.dirname(p), work_dir)
            for p in glob.glob(os.path.join(glob.escape(work_dir), "**", "*.npz"), recursive=True)
        }
    )
    for obj in objects:
        files = sorted(glob.glob(os.path.join(glob.escape(os.path.join(work_dir, obj)), "*.npz")))
        stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
        ids = [int(s) for s in stems] if all(s.isdigit() for s in stems) else list(range(len(stems)))
        cond, lat, lat_img, lat_k, angles = [], [], [], [], []
        for view, f in zip(ids, files):
            with np.load(f) as z:
                cond.append(z["cond_bits"].view(ml_dtypes.bfloat16))
                keep = z["valid"]
                lat.append(z["latent_bits"].view(ml_dtypes.bfloat16)[keep])
                angles.append(z["angle"][keep])
                lat_k.append(np.arange(len(keep))[keep])
                lat_img.append(np.full(int(keep.sum()), view))
        if sum(len(a) for a in angles) == 0:
            continue
        yield dict(
            object_id=obj,
            image_ids=np.asarray(ids, np.int32),
            cond=np.stack(cond),
            latents=np.concatenate(lat),
            latent_image_ids=np.concatenate(lat_img),
            latent_glb_ids=np.concatenate(lat_k),
            angles=np.concatenate(angles),
        )


def build_tfds(out_dir: str, work_dir: str, num_models_per_image: int) -> str:
    """(Re)build ``OUT/dso_pairs/<version>`` from the work files: built aside, then swapped in."""
    import tensorflow_datasets as tfds

    from dso_jax.data import tfds_dso

    tfds.disable_progress_bar()
    tmp, final = os.path.join(out_dir, ".tfds_build"), os.path.join(out_dir, tfds_dso.NAME)
    shutil.rmtree(tmp, ignore_errors=True)
    tfds_dso.build(tmp, lambda: dataset_records(work_dir), num_models_per_image=num_models_per_image)
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(os.path.join(tmp, tfds_dso.NAME), final)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return tfds_dso.find_dataset_dir(out_dir)


def generate_dataset(
    gen: Generator,
    paths: Sequence[str],
    out_dir: str,
    *,
    num_samples: int = 4,
    seed: int = 0,
    noise_file: Optional[str] = None,
    background=None,
    log: Callable[[str], None] = print,
) -> dict:
    """DSO's data generation into ``out_dir`` (``objects/``, ``failures.json``, ``generation.json``,
    ``summary.json`` and the TFDS dataset ``dso_pairs/``); resumable. Returns the summary."""
    if gen.physics is None:
        raise ValueError("generate_dataset needs a Generator built with physics=<sim config>")
    work = os.path.join(out_dir, "objects")
    os.makedirs(work, exist_ok=True)
    _check_settings(os.path.join(out_dir, "generation.json"), _settings(gen, num_samples, seed, noise_file))
    noise = (
        load_noise(noise_file, num_samples, gen.models.latent_shape)
        if noise_file
        else noise_for_seeds([seed + k for k in range(num_samples)], gen.models.latent_shape)
    )
    target = {
        p: os.path.join(work, obj, os.path.splitext(os.path.basename(p))[0] + ".npz")
        for p, obj in zip(paths, object_ids(paths))
    }
    clash = sorted(t for t, c in collections.Counter(target.values()).items() if c > 1)
    if clash:
        raise ValueError(f"several images map to the same work file, e.g. {clash[0]} (same stem in one folder)")
    todo = [p for p in paths if not os.path.exists(target[p])]
    failures: dict = {}
    stats = dict(samples=0, stable=0, invalid=0)

    def consume(ok, out):
        out = jax.device_get({key: v for key, v in out.items() if key != "occupancy"})
        k = num_samples
        for i, path in enumerate(ok):
            rows = slice(i * k, (i + 1) * k)
            os.makedirs(os.path.dirname(target[path]), exist_ok=True)
            with open(target[path] + ".tmp", "wb") as f:  # bf16 stored as its bits; renamed when complete
                np.savez(
                    f,
                    cond_bits=np.asarray(out["cond"][i]).view(np.uint16),
                    latent_bits=np.asarray(out["latents"][rows]).astype(ml_dtypes.bfloat16).view(np.uint16),
                    angle=np.asarray(out["angle"][rows], np.float32),
                    stable=np.asarray(out["stable"][rows]),
                    valid=np.asarray(out["valid"][rows]),
                    image=os.path.abspath(path),
                )
            os.replace(target[path] + ".tmp", target[path])
            stats["samples"] += k
            stats["stable"] += int(np.sum(out["stable"][rows]))
            stats["invalid"] += int(k - np.sum(out["valid"][rows]))
        bar.set_postfix(stable=f"{stats['stable'] / max(stats['samples'], 1):.2f}")

    with tqdm(total=len(paths), desc="generate", unit="img", dynamic_ncols=True) as bar:
        bar.update(len(paths) - len(todo))
        _pipelined(gen, todo, noise, dict(background=background), True, consume, failures, bar)
    write_json(os.path.join(out_dir, "failures.json"), failures, sort_keys=True)
    dataset, objects = None, 0
    if next(dataset_records(work), None) is not None:  # TFDS cannot write an empty split
        from dso_jax.data import tfds_dso

        dataset = build_tfds(out_dir, work, num_models_per_image=num_samples)
        objects = len(tfds_dso.open_dataset(dataset)[1]["objects"])
    summary = dict(
        images=len(paths),
        skipped_done=len(paths) - len(todo),
        generated=len(todo) - len(failures),
        failed=len(failures),
        samples=stats["samples"],
        stable=stats["stable"],
        invalid=stats["invalid"],
        objects=objects,
        dataset=dataset,
    )
    write_json(os.path.join(out_dir, "summary.json"), summary, sort_keys=True)
    log(
        f"generate: {summary['generated']} images generated, {summary['skipped_done']} already done, "
        f"{summary['failed']} failed; {summary['samples']} samples this run ({summary['stable']} stable, "
        f"{summary['invalid']} empty); dataset {dataset or 'not written (no usable sample)'} ({objects} objects)"
    )
    for key, reason in failures.items():
        log(f"  failed {key}: {reason}")
    return summary


# ---------------------------------------------------------------------------------------------- CLI glue


def add_model_args(ap) -> None:
    """The model / sampler flags shared by ``scripts/{sample,generate_data,generate_eval}.py``."""
    s = sampling.DSO_STAGE1
    ap.add_argument("--flow", default="", help="SS flow: converted folder or TRELLIS prefix (.../ckpts/NAME)")
    ap.add_argument("--decoder", default="", help="SS decoder: converted folder or TRELLIS prefix")
    ap.add_argument("--dinov2", default="", help="DINOv2: converted folder (scripts/convert_dinov2.py) or the hub .pth")
    ap.add_argument(
        "--random_weights",
        default=None,
        choices=sorted(RANDOM_PRESETS),
        help="random weights of this preset for the models without a path (demos, benchmarks)",
    )
    ap.add_argument("--weights_seed", type=int, default=0, help="seed of --random_weights")
    ap.add_argument("--steps", type=int, default=s.steps)
    ap.add_argument("--cfg_strength", type=float, default=s.cfg_strength)
    ap.add_argument("--cfg_interval", type=float, nargs=2, default=list(s.cfg_interval))
    ap.add_argument("--rescale_t", type=float, default=s.rescale_t)
    ap.add_argument("--batch_images", type=int, default=4, help="images per device batch (x samples per image rows)")
    ap.add_argument("--dinov2_dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--background",
        default=None,
        type=parse_color,
        help="RGB images without alpha: background colour to key out (R,G,B)",
    )


def generator_from_args(
    args, physics=None, lora: Optional[str] = None, lora_alpha: float = DSO_LORA_ALPHA
) -> Generator:
    models = load_models(
        args.flow or None,
        args.decoder or None,
        args.dinov2 or None,
        random_weights=args.random_weights,
        seed=args.weights_seed,
    )
    if lora:
        models = with_lora(models, lora, lora_alpha)
    sampler = sampling.SamplerSettings(args.steps, args.cfg_strength, tuple(args.cfg_interval), args.rescale_t)
    return Generator(
        models, sampler, images_per_batch=args.batch_images, dinov2_dtype=args.dinov2_dtype, physics=physics
    )
