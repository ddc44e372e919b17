"""The toy world's held-out protocol: one measurement of a model for pretraining, ``eval_toy`` and the main job.

A model is evaluated on the first ``n`` held-out objects of ``seed`` (objects whose visible parameters never
occur in training, :func:`heldout_set`): their conditions go through the policy's candidates function
(``dso_jax.candidates``: K samples per condition with the configured sampler, decoded, and simulated when the
function has a simulator) in chunks of ``batch`` conditions, the noise of chunk ``i`` drawn from
``fold_in(key(seed), i)`` (so ``seed``, ``n`` and ``batch`` fix the noise: the last chunk is padded by
repeating its last condition and the padding is dropped). Then per candidate: IoU and front IoU to the
conditioning object, the static check, the voxel count ratio, and the verdict (the simulator's when the
candidates function has one, else the static check). "Before" and "after" a fine-tuning run differ only in
the overlay.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dso_jax.batching import map_in_chunks
from dso_jax.toy import condition, metrics, objects


def heldout_set(seed: int, n: int) -> dict:
    """n held-out objects, deterministic in ``seed``: `objects.sample_objects`'s fields (occ (n, R, R, R) bool,
    kind, stable, margin, params) plus cond (n, L, C) float32."""
    objs = objects.sample_objects(seed, n, "heldout")
    return dict(objs, cond=condition.tokens(objs["occ"]))


def evaluate(candidates: Callable, params, dec_params, held: dict, *, seed: int, batch: int) -> dict:
    """Run the protocol on ``held`` (:func:`heldout_set`) with ``candidates(params, dec_params, cond, key)``.

    Returns numpy per-candidate arrays (n, K): occ (n, K, R, R, R), stable, iou, front_iou, static_stable,
    voxel_ratio (and angle with a simulator), plus ``summary``: their means (stable_rate, mean_angle, iou, ...),
    ``stability`` ('mjx' or 'static') and per-kind figures.
    """
    key = jax.random.key(seed)

    def chunk(cond, i):
        out = candidates(params, dec_params, jnp.asarray(cond), jax.random.fold_in(key, i))
        return {k: v for k, v in out.items() if k != "z"}

    res = map_in_chunks(chunk, held["cond"], batch, with_index=True)
    res.update(metrics.occupancy_metrics(res["occ"], held["occ"]))
    simulated = "stable" in res
    if not simulated:
        res["stable"] = res["static_stable"]
    summary = {
        "stability": "mjx" if simulated else "static",
        "stable_rate": float(np.mean(res["stable"])),
        "iou": float(np.mean(res["iou"])),
        "front_iou": float(np.mean(res["front_iou"])),
        "static_stable_rate": float(np.mean(res["static_stable"])),
        "voxel_ratio": float(np.mean(res["voxel_ratio"])),
        "empty_rate": float(np.mean(res["voxel_ratio"] == 0)),
    }
    if simulated:
        summary["mean_angle"] = float(np.mean(res["angle"]))
        summary["mjx_static_agreement"] = float(np.mean(res["stable"] == res["static_stable"]))
    summary["per_kind"] = {
        name: {
            "conditions": int(sel.sum()),
            "iou": float(res["iou"][sel].mean()),
            "stable_rate": float(res["stable"][sel].mean()),
        }
        for k, name in enumerate(objects.KINDS)
        if (sel := held["kind"] == k).any()
    }
    res["summary"] = summary
    return res


def world_reference(held: dict, samples_per_condition: int, seed: int) -> dict:
    """What the world itself gives on these conditions: hidden resamples of each conditioning object, their
    static stable rate and their IoU to the conditioning object (the ceiling a faithful model nears)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 11]))
    occ = np.stack([objects.completions(p, samples_per_condition, rng)["occ"] for p in held["params"]])
    st = objects.static_stability(occ)
    iou = np.asarray(metrics.iou_3d(occ, held["occ"][:, None]))
    return {
        "iou": float(iou.mean()),
        "static_stable_rate": float(st["stable"].mean()),
        "conditioning_objects_static_stable_rate": float(held["stable"].mean()),
    }
