"""The work files of ``scripts/generate_data.py`` and their assembly into the :mod:`dso_jax.data.tfds_dso` dataset.

Per finished image (DSO's ``category/prompt/view.png``) one ``WORK/<object>/<view>.npz`` holds its DINOv2
condition and K latents (bf16 stored as their uint16 bits, so the file is plain numpy), the simulated
angles and the stable / valid flags. Files are renamed into place when complete, so their presence marks
a finished image (resume). :func:`build_tfds` turns all of them into the dataset that training reads
(TFDS is imported only there).
"""

from __future__ import annotations

import glob
import os
import shutil
from typing import Iterator, Sequence

import ml_dtypes
import numpy as np


def object_ids(paths: Sequence[str]) -> list[str]:
    """DSO's ``category/prompt/view.png``: the prompt folder relative to the common category root."""
    prompts = [os.path.dirname(os.path.abspath(p)) for p in paths]
    root = os.path.commonpath([os.path.dirname(d) for d in prompts])
    return [os.path.relpath(d, root) for d in prompts]


def write_view(path: str, *, cond, latents, angle, stable, valid, image: str) -> None:
    """One image's work file: cond (S, Cc) bf16, latents (K, C, R, R, R), angle / stable / valid (K,)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        np.savez(
            f,
            cond_bits=np.asarray(cond).astype(ml_dtypes.bfloat16).view(np.uint16),
            latent_bits=np.asarray(latents).astype(ml_dtypes.bfloat16).view(np.uint16),
            angle=np.asarray(angle, np.float32),
            stable=np.asarray(stable, bool),
            valid=np.asarray(valid, bool),
            image=os.path.abspath(image),
        )
    os.replace(path + ".tmp", path)


def dataset_records(work_dir: str) -> Iterator[dict]:
    """One :data:`tfds_dso.ObjectRecord` per object folder of finished views, in sorted order.

    View ids are the image stems when all are integers (DSO's ``000.png``), else their sorted positions.
    Samples whose simulation is invalid (empty occupancy, non-finite latent) are left out, as DSO drops
    failed simulations.
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
            try:
                with np.load(f) as z:
                    cond.append(z["cond_bits"].view(ml_dtypes.bfloat16))
                    keep = z["valid"]
                    lat.append(z["latent_bits"].view(ml_dtypes.bfloat16)[keep])
                    angles.append(z["angle"][keep])
            except (OSError, ValueError, KeyError) as e:
                raise ValueError(f"{f}: unreadable work file ({e}); delete it to regenerate that image") from None
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
    import tensorflow_datasets as tfds  # lazily: sampling never needs TFDS

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
