"""The image -> 3D jobs behind ``scripts/{sample,generate_data,generate_eval}.py``, on ``dso_jax.pipeline.Generator``.

* :func:`sample_images` (``scripts/sample.py``): per image and sample a y-up GLB (``dso_jax.mesh_export``),
  the stage-1 latent ``{name}_ss_latent.npy`` (1, C, R, R, R) float32 and the voxel coordinates
  ``{name}_coords.npy`` (N, 4) int32 rows (batch=0, x, y, z) in argwhere order: TRELLIS's layout, so its
  PyTorch stage 2 finishes a textured asset from them::

      coords = torch.from_numpy(np.load("x_000_coords.npy")).int().cuda()
      cond = pipeline.get_cond([pipeline.preprocess_image(image)])
      mesh_and_gaussians = pipeline.decode_slat(pipeline.sample_slat(cond, coords), ["mesh", "gaussian"])

* :func:`generate_dataset` (``scripts/generate_data.py``): DSO's training data (``dso.md`` §2): K latents
  per image with seeds 0..K-1, SS 12 steps CFG 7.5, angles from ``dso_jax.physics``, the DINOv2 condition;
  one work file per finished image (``dso_jax.data.generated``; resume skips those), then the
  ``dso_jax.data.tfds_dso`` dataset in the output directory (``data.path`` for training).
* :func:`generate_eval` (``scripts/generate_eval.py``): one mesh per image (seed 1 = DSO's ``bid + 1``) with
  and without a LoRA, named ``{uid}-{view}_{k:03d}.glb`` for ``scripts/evaluate_*.py``.

Bad images and non-finite samples are reported (``failures.json``, one line each) and skipped; the batch
goes on. Every job records its settings on the first run and refuses to resume into a folder of other settings.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

from dso_jax import cli, mesh_export, sampling
from dso_jax.convert.files import write_json
from dso_jax.convert.rules import sha256_file
from dso_jax.data import generated
from dso_jax.data.images import load_images, parse_color
from dso_jax.models import pretrained
from dso_jax.pipeline import IMAGES_PER_BATCH, Generator, load_noise, noise_for_seeds

DSO_DATA_SAMPLES = 4  # DSO's data: K latents per image, seeds 0..K-1
DSO_EVAL_SEED = 1  # DSO's finetune.py --eval: one model per image with seed bid + 1
NONFINITE = "non-finite sample: the stage-1 latent has NaN/Inf values (check the weights and the LoRA)"


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


def _make_out_dir(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path}: exists and is a file; --out names an output folder")
    os.makedirs(path, exist_ok=True)


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


def _log_failures(log, failures: dict) -> None:
    for key, reason in failures.items():
        log(f"  failed {key}: {reason}")


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
    _make_out_dir(out_dir)
    suffix = dict(glb=".glb", latent="_ss_latent.npy", coords="_coords.npy")
    files = lambda name, k: {key: os.path.join(out_dir, f"{name}_{k:03d}{ext}") for key, ext in suffix.items()}  # noqa: E731
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
        latents, occ, finite = (np.asarray(out[k]) for k in ("latents", "occupancy", "finite"))
        for i, path in enumerate(ok):
            entries = []
            for k in range(num_samples):
                row, f = i * num_samples + k, files(name_of[path], k)
                if not finite[row]:
                    failures[f"{path} sample {k}"] = NONFINITE
                    entries.append(dict(seed=seeds[k], error=NONFINITE))
                    continue
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
    _log_failures(log, failures)
    return manifest


def generate_eval(
    gen: Generator,
    paths: Sequence[str],
    out_dir: str,
    *,
    lora: Optional[str] = None,
    lora_alpha: Optional[float] = None,
    ids: Optional[Sequence[str]] = None,
    seed: int = DSO_EVAL_SEED,
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
        uid = lambda p: os.path.basename(os.path.dirname(os.path.abspath(p)))  # noqa: E731
        kept = [p for p in paths if uid(p) in keep]
        unmatched = sorted(keep - {uid(p) for p in kept})
        log(f"eval: id filter keeps {len(kept)} of {len(paths)} images; {len(unmatched)} ids have no image")
        if not kept:
            raise ValueError(
                f"the id filter ({len(keep)} ids, e.g. {sorted(keep)[:3]}) matches none of the {len(paths)} images "
                "(the uid is the image's folder name)"
            )
        paths = kept
    names = output_names(paths, naming_level=2)
    runs = {"base": gen}
    if lora:
        runs["lora"] = Generator(
            pretrained.with_lora(gen.models, lora, lora_alpha),
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


def generate_dataset(
    gen: Generator,
    paths: Sequence[str],
    out_dir: str,
    *,
    num_samples: int = DSO_DATA_SAMPLES,
    seed: int = 0,
    noise_file: Optional[str] = None,
    background=None,
    log: Callable[[str], None] = print,
) -> dict:
    """DSO's data generation into ``out_dir`` (``objects/``, ``failures.json``, ``generation.json``,
    ``summary.json`` and the TFDS dataset ``dso_pairs/``); resumable. Returns the summary."""
    if gen.physics is None:
        raise ValueError("generate_dataset needs a Generator built with physics=<sim config>")
    noise = (  # checked before anything is written
        load_noise(noise_file, num_samples, gen.models.latent_shape)
        if noise_file
        else noise_for_seeds([seed + k for k in range(num_samples)], gen.models.latent_shape)
    )
    _make_out_dir(out_dir)
    work = os.path.join(out_dir, "objects")
    os.makedirs(work, exist_ok=True)
    _check_settings(os.path.join(out_dir, "generation.json"), _settings(gen, num_samples, seed, noise_file))
    target = {
        p: os.path.join(work, obj, os.path.splitext(os.path.basename(p))[0] + ".npz")
        for p, obj in zip(paths, generated.object_ids(paths))
    }
    clash = sorted(t for t, c in collections.Counter(target.values()).items() if c > 1)
    if clash:
        raise ValueError(f"several images map to the same work file, e.g. {clash[0]} (same stem in one folder)")
    todo = [p for p in paths if not os.path.exists(target[p])]
    failures: dict = {}
    stats = dict(samples=0, stable=0, invalid=0, nonfinite=0)

    def consume(ok, out):
        out = jax.device_get({key: v for key, v in out.items() if key != "occupancy"})
        k = num_samples
        for i, path in enumerate(ok):
            rows = slice(i * k, (i + 1) * k)
            finite = np.asarray(out["finite"][rows])
            for j in np.flatnonzero(~finite):
                failures[f"{path} sample {j}"] = NONFINITE
            valid = np.asarray(out["valid"][rows]) & finite
            generated.write_view(
                target[path],
                cond=out["cond"][i],
                latents=np.nan_to_num(np.asarray(out["latents"][rows])),  # invalid rows are never read back
                angle=out["angle"][rows],
                stable=np.asarray(out["stable"][rows]) & valid,
                valid=valid,
                image=path,
            )
            stats["samples"] += k
            stats["stable"] += int(np.sum(out["stable"][rows] & valid))
            stats["invalid"] += int(k - np.sum(valid))
            stats["nonfinite"] += int(k - np.sum(finite))
        bar.set_postfix(stable=f"{stats['stable'] / max(stats['samples'], 1):.2f}")

    with tqdm(total=len(paths), desc="generate", unit="img", dynamic_ncols=True) as bar:
        bar.update(len(paths) - len(todo))
        _pipelined(gen, todo, noise, dict(background=background), True, consume, failures, bar)
    write_json(os.path.join(out_dir, "failures.json"), failures, sort_keys=True)
    dataset, objects = None, 0
    if next(generated.dataset_records(work), None) is not None:  # TFDS cannot write an empty split
        from dso_jax.data import tfds_dso

        dataset = generated.build_tfds(out_dir, work, num_models_per_image=num_samples)
        objects = len(tfds_dso.open_dataset(dataset)[1]["objects"])
    failed_images = sum(1 for key in failures if key in set(todo))
    summary = dict(
        images=len(paths),
        skipped_done=len(paths) - len(todo),
        generated=len(todo) - failed_images,
        failed=failed_images,
        samples=stats["samples"],
        stable=stats["stable"],
        invalid=stats["invalid"],
        nonfinite=stats["nonfinite"],
        objects=objects,
        dataset=dataset,
    )
    write_json(os.path.join(out_dir, "summary.json"), summary, sort_keys=True)
    log(
        f"generate: {summary['generated']} images generated, {summary['skipped_done']} already done, "
        f"{summary['failed']} failed; {summary['samples']} samples this run ({summary['stable']} stable, "
        f"{summary['invalid']} invalid, of which {summary['nonfinite']} non-finite); "
        f"dataset {dataset or 'not written (no usable sample)'} ({objects} objects)"
    )
    _log_failures(log, failures)
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
        choices=sorted(pretrained.RANDOM_PRESETS),
        help="random weights of this preset for the models without a path (demos, benchmarks)",
    )
    ap.add_argument("--weights_seed", type=cli.non_negative_int, default=0, help="seed of --random_weights")
    ap.add_argument("--steps", type=cli.positive_int, default=s.steps)
    ap.add_argument("--cfg_strength", type=cli.non_negative_float, default=s.cfg_strength)
    ap.add_argument("--cfg_interval", type=cli.non_negative_float, nargs=2, default=list(s.cfg_interval))
    ap.add_argument("--rescale_t", type=cli.positive_float, default=s.rescale_t)
    ap.add_argument("--batch_images", type=cli.positive_int, default=IMAGES_PER_BATCH, help="images per device batch")
    ap.add_argument("--dinov2_dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--background",
        default=None,
        type=_color,
        help="RGB images without alpha: background colour to key out (R,G,B)",
    )


def _color(text: str):
    try:
        return parse_color(text)
    except ValueError as e:  # argparse shows an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(e)) from None


def add_lora_args(ap, help: str) -> None:
    """``--lora FILE`` and ``--lora_alpha`` (default: the file's own alpha, else DSO's 128)."""
    ap.add_argument("--lora", default="", help=help)
    ap.add_argument(
        "--lora_alpha",
        type=cli.positive_float,
        default=None,
        help="LoRA alpha; default: the file's (safetensors metadata or adapter_config.json beside it), else DSO's 128",
    )


def generator_from_args(
    args, physics=None, lora: Optional[str] = None, lora_alpha: Optional[float] = None
) -> Generator:
    lo, hi = args.cfg_interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"--cfg_interval {lo:g} {hi:g}: expected 0 <= LO <= HI <= 1 (on the rescaled time)")
    models = pretrained.load_models(
        args.flow or None,
        args.decoder or None,
        args.dinov2 or None,
        random_weights=args.random_weights,
        seed=args.weights_seed,
    )
    if lora:
        models = pretrained.with_lora(models, lora, lora_alpha)
    sampler = sampling.SamplerSettings(args.steps, args.cfg_strength, (lo, hi), args.rescale_t)
    return Generator(
        models, sampler, images_per_batch=args.batch_images, dinov2_dtype=args.dinov2_dtype, physics=physics
    )
