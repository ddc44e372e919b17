"""The image -> 3D jobs behind ``scripts/{sample,generate_data,generate_eval}.py``, on ``dso_jax.pipeline.Generator``.

* :func:`sample_images` (``scripts/sample.py``): per image and sample a y-up GLB (``dso_jax.mesh_export``): with a
  :class:`~dso_jax.pipeline.Stage2`, the final FlexiCubes mesh with vertex colours (post-processed like TRELLIS's
  ``to_glb`` unless told otherwise) and the Gaussians ``{name}.ply``; without, stage 1's marching-cubes mesh.
  Always the stage-1 latent ``{name}_ss_latent.npy`` (1, C, R, R, R) float32 and the voxel coordinates
  ``{name}_coords.npy`` (N, 4) int32 rows (batch=0, x, y, z) in argwhere order: TRELLIS's layout, so its
  PyTorch stage 2 can finish a textured asset from them too::

      coords = torch.from_numpy(np.load("x_000_coords.npy")).int().cuda()
      cond = pipeline.get_cond([pipeline.preprocess_image(image)])
      mesh_and_gaussians = pipeline.decode_slat(pipeline.sample_slat(cond, coords), ["mesh", "gaussian"])

* :func:`generate_dataset` (``scripts/generate_data.py``): DSO's training data (``dso.md`` §2): K latents
  per image with seeds 0..K-1, SS 12 steps CFG 7.5, angles from ``dso_jax.physics`` (labels ``occupancy``: MJX on
  the stage-1 occupancy; ``mesh``: DSO's recipe, MJX's mesh path on each latent's final post-processed stage-2
  mesh, prepared as DSO's label script prepares its GLB), the DINOv2 condition;
  one work file per finished image (``dso_jax.data.generated``; resume skips those), then the
  ``dso_jax.data.tfds_dso`` dataset in the output directory (``data.path`` for training).
* :func:`generate_eval` (``scripts/generate_eval.py``): one mesh per image (seed 1 = DSO's ``bid + 1``) with
  and without a LoRA, named ``{uid}-{view}_{k:03d}.glb`` for ``scripts/evaluate_*.py``.

Bad images and non-finite samples are reported (``failures.json``, one line each) and skipped; the batch
goes on. Every job records its settings on the first run and refuses to resume into a folder of other settings.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

from dso_jax import final_mesh, gaussians, mesh_export, mesh_postprocess
from dso_jax.convert.files import write_json
from dso_jax.convert.rules import sha256_file
from dso_jax.data import generated
from dso_jax.data.images import load_images
from dso_jax.models import pretrained
from dso_jax.pipeline import Generator, Stage2, load_noise, noise_for_seeds

DSO_DATA_SAMPLES = 4  # DSO's data: K latents per image, seeds 0..K-1
DSO_EVAL_SEED = 1  # DSO's finetune.py --eval: one model per image with seed bid + 1
NONFINITE = "non-finite sample: the stage-1 latent has NaN/Inf values (check the weights and the LoRA)"
EMPTY = "empty occupancy: stage 1 occupied no voxel, nothing for stage 2"
LABELS = ("occupancy", "mesh")  # generate_data --labels: MJX on the occupancy (fast) or on the final mesh (DSO)


def _stage2_settings(stage2: Optional[Stage2], post) -> dict:
    if stage2 is None:
        return dict(stage=1)
    return dict(
        stage=2,
        stage2_sampler=dataclasses.asdict(stage2.sampler),
        stage2_models=stage2.models.source,
        postprocess=dataclasses.asdict(post) if post is not None else None,
    )


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
    stage2: Optional[Stage2] = None,
    postprocess: Optional[mesh_postprocess.PostprocessSettings] = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Per image and sample k (seed ``seed + k``): ``{name}_{k:03d}.glb``, ``_ss_latent.npy``, ``_coords.npy`` and,
    with ``stage2`` and its Gaussian decoder, ``.ply``. ``postprocess`` applies to stage 2's mesh (None: raw).

    Images whose files all exist are skipped (resume; ``OUT/settings.json`` must match). Writes
    ``OUT/failures.json`` ({image or output: reason}) and ``OUT/manifest.json``; returns the manifest.
    """
    names = list(names) if names is not None else output_names(paths)
    seeds = [seed + k for k in range(num_samples)]
    noise = noise_for_seeds(seeds, gen.models.latent_shape) if noise is None else noise
    _make_out_dir(out_dir)
    suffix = dict(glb=".glb", latent="_ss_latent.npy", coords="_coords.npy")
    if stage2 is not None and stage2.gaussians:
        suffix["ply"] = ".ply"
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
        dict(
            seeds=seeds,
            sampler=dataclasses.asdict(gen.sampler),
            models=gen.models.source,
            **_stage2_settings(stage2, postprocess),
        ),
    )
    manifest = {"images": {}}

    def write_asset(res, f, entry, key):
        stats: dict = {}
        mesh = final_mesh.final_mesh(res, postprocess, stats)
        try:
            mesh_export.write_colored_glb(mesh.vertices, mesh.faces, mesh.vertex_colors, f["glb"])
            entry.update(faces=len(mesh.faces), **{f"mesh_{k}": v for k, v in stats.items()})
        except ValueError as e:  # an empty mesh
            failures[key] = str(e)
            entry.pop("glb")
        if "ply" in f:
            gaussians.save_ply(f["ply"], res["gaussians"])

    def consume(ok, out):
        latents, occ, finite = (np.asarray(out[k]) for k in ("latents", "occupancy", "finite"))
        cond = np.asarray(out["cond_f32"]) if stage2 is not None else None
        jobs = []  # stage-2 work of this chunk: one batched call
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
                if stage2 is None:
                    try:
                        mesh_export.occupancy_to_glb(occ[row], f["glb"], smooth_iterations)
                    except mesh_export.EmptyOccupancyError as e:
                        failures[f"{path} sample {k}"] = str(e)
                        entry.pop("glb")
                elif not len(xyz):
                    failures[f"{path} sample {k}"] = EMPTY
                    entry.pop("glb"), entry.pop("ply", None)
                else:
                    jobs.append((xyz, cond[i], seeds[k], f, entry, f"{path} sample {k}"))
                entries.append(entry)
            manifest["images"][path] = entries
        if jobs:
            results = stage2([j[0] for j in jobs], [j[1] for j in jobs], [j[2] for j in jobs])
            for (_, _, _, f, entry, key), res in zip(jobs, results):
                write_asset(res, f, entry, key)

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
    stage2: Optional[Stage2] = None,
    postprocess: Optional[mesh_postprocess.PostprocessSettings] = mesh_postprocess.PostprocessSettings(),
    log: Callable[[str], None] = print,
) -> dict:
    """DSO's ``finetune.py --eval``: meshes ``{uid}-{view}_{k:03d}.glb`` under ``OUT/base`` and, with a LoRA,
    ``OUT/lora`` (same seeds/noise; the LoRA changes stage 1 only). With ``stage2`` they are the final meshes,
    post-processed as DSO's ``to_glb(simplify=0.95, fill_holes=True)`` (``postprocess``); without, stage 1's. ``ids`` (object uids) filters the images only when given, and an
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
            stage2=stage2,
            postprocess=postprocess,
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
    labels: str = "occupancy",
    stage2: Optional[Stage2] = None,
    postprocess: Optional[mesh_postprocess.PostprocessSettings] = mesh_postprocess.PostprocessSettings(),
    build_dataset: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """DSO's data generation into ``out_dir`` (``objects/``, ``failures.json``, ``generation.json``,
    ``summary.json`` and the TFDS dataset ``dso_pairs/``); resumable. Returns the summary.

    ``labels``: 'occupancy' simulates the stage-1 occupancy (fast); 'mesh' (needs ``stage2``) each latent's final
    stage-2 mesh after ``postprocess`` (DSO's recipe: its labels come from ``to_glb(simplify=0.95,
    fill_holes=True)`` meshes) with the Generator's physics config (``rollout.SIM_PRESETS['mesh']`` in the CLI).
    ``build_dataset=False`` stops after the work files (no TFDS import; a later run over the same ``out_dir`` builds
    it)."""
    if gen.physics is None:
        raise ValueError("generate_dataset needs a Generator built with physics=<sim config>")
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
    if labels == "mesh" and stage2 is None:
        raise ValueError("labels='mesh' needs the stage-2 models (a Stage2)")
    noise = (  # checked before anything is written
        load_noise(noise_file, num_samples, gen.models.latent_shape)
        if noise_file
        else noise_for_seeds([seed + k for k in range(num_samples)], gen.models.latent_shape)
    )
    _make_out_dir(out_dir)
    work = os.path.join(out_dir, "objects")
    os.makedirs(work, exist_ok=True)
    settings = _settings(gen, num_samples, seed, noise_file)
    settings.update(labels=labels, **(_stage2_settings(stage2, postprocess) if labels == "mesh" else {}))
    _check_settings(os.path.join(out_dir, "generation.json"), settings)
    simulate = None
    if labels == "mesh":
        from dso_jax.physics import rollout

        simulate = jax.jit(rollout.make_simulator(gen.physics))  # one compile: every chunk has the same row count
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
        if labels == "mesh":
            out = dict(out, **_mesh_labels(ok, out))
        out = jax.device_get({key: v for key, v in out.items() if key not in ("occupancy", "cond_f32")})
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

    def _mesh_labels(ok, out):  # the chunk's final meshes -> angle / stable / valid per row
        occ, finite, cond = (np.asarray(out[key]) for key in ("occupancy", "finite", "cond_f32"))
        rows = len(ok) * num_samples
        meshes = [None] * rows
        todo_rows = [r for r in range(rows) if finite[r] and occ[r].any()]
        if todo_rows:
            res = stage2(
                [np.argwhere(occ[r]).astype(np.int32) for r in todo_rows],
                [cond[r // num_samples] for r in todo_rows],
                [seed + r % num_samples for r in todo_rows],
            )
            for r, x in zip(todo_rows, res):
                meshes[r] = final_mesh.final_mesh(x, postprocess)
        empty = mesh_postprocess.MeshArrays(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64), np.zeros((0, 3)))
        pad = gen.images_per_batch * num_samples  # one simulate shape for every chunk
        verdicts = final_mesh.mesh_verdicts(
            [m if m is not None else empty for m in meshes] + [empty] * (pad - rows), gen.physics, simulate
        )
        return {key: v[:rows] for key, v in verdicts.items()}

    with tqdm(total=len(paths), desc="generate", unit="img", dynamic_ncols=True) as bar:
        bar.update(len(paths) - len(todo))
        _pipelined(gen, todo, noise, dict(background=background), labels == "occupancy", consume, failures, bar)
    write_json(os.path.join(out_dir, "failures.json"), failures, sort_keys=True)
    dataset, objects = None, 0
    if build_dataset and next(generated.dataset_records(work), None) is not None:  # TFDS can't write an empty split
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
        f"dataset {dataset or ('not written (no usable sample)' if build_dataset else 'not built')} ({objects} objects)"
    )
    _log_failures(log, failures)
    return summary
