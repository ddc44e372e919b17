"""Small synthetic DSO-style datasets for tests and the ``:tiny`` configs.

Each object has ``views`` condition token sets and ``latents_per_view`` latents per view. Stable
latents sit near an object-specific pattern ``+m``, unstable ones near ``-m``, so fitting the
winners and unlearning the losers is a learnable signal. The last object has only stable
latents, so the "objects without both labels are dropped" path always runs.
"""

from __future__ import annotations

import numpy as np

from dso_jax.data import tfds_dso


def make_records(
    *,
    num_objects: int,
    views: int,
    latents_per_view: int,
    cond_len: int,
    cond_channels: int,
    latent_channels: int,
    resolution: int,
    seed: int = 0,
) -> list:
    """A list of :data:`tfds_dso.ObjectRecord`s (numpy, bf16 arrays)."""
    rng = np.random.default_rng(seed)
    lat_shape = (latent_channels, resolution, resolution, resolution)
    records = []
    for o in range(num_objects):
        cond = rng.standard_normal((views, cond_len, cond_channels), np.float32)
        pattern = rng.standard_normal(lat_shape, np.float32)
        n = views * latents_per_view
        all_stable = o == num_objects - 1
        stable = np.ones(n, bool) if all_stable else rng.permutation(np.arange(n) % 2 == 0)
        angles = np.where(stable, rng.uniform(0.0, 15.0, n), rng.uniform(25.0, 90.0, n)).astype(np.float16)
        sign = np.where(stable, 1.0, -1.0).astype(np.float32)[:, None, None, None, None]
        latents = sign * pattern[None] + 0.3 * rng.standard_normal((n,) + lat_shape, np.float32)
        image_ids = np.repeat(np.arange(views), latents_per_view)
        glb_ids = np.tile(np.arange(latents_per_view), views)
        records.append(
            {
                "object_id": f"obj{o:04d}",
                "image_ids": np.arange(views, dtype=np.int32),
                "cond": cond.astype(tfds_dso.BF16),
                "latents": latents.astype(tfds_dso.BF16),
                "latent_image_ids": image_ids.astype(np.int32),
                "latent_glb_ids": glb_ids.astype(np.int32),
                "angles": angles.astype(np.float32),
            }
        )
    return records


def records_from_config(data_cfg, model_args, seed: int) -> list:
    s = data_cfg.synthetic
    return make_records(
        num_objects=s.num_objects,
        views=s.views_per_object,
        latents_per_view=s.latents_per_view,
        cond_len=s.cond_len,
        cond_channels=model_args.cond_channels,
        latent_channels=model_args.in_channels,
        resolution=model_args.resolution,
        seed=seed,
    )


def write_tfds(data_dir: str, records: list) -> str:
    """Build the TFDS dataset from ``records``; returns the dataset directory."""
    return tfds_dso.build(
        data_dir, lambda: iter(records), num_models_per_image=max(int(r["latent_glb_ids"].max()) + 1 for r in records)
    )
