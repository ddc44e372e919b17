"""Held-out evaluation of a policy: stable rate, mean angle and faithfulness (IoU), plus the run summary.

The same jitted rollout as the online step (sample -> decode -> simulate) runs on a fixed set of held-out
conditions with fixed noise, once for the pretrained model (overlay at identity) and once after
training, so "before" and "after" differ only in the overlay.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dso_jax.data import toy_metrics


def evaluate(
    rollout: Callable, params, dec_params, cond: np.ndarray, key, *, batch: int, reference: Optional[np.ndarray] = None
) -> dict:
    """Roll out ``cond`` (N, S, Cc) in chunks of ``batch`` conditions (the last chunk padded).

    Returns numpy per-candidate arrays (N, K): stable, angle, iou (when ``reference`` (N, D, D, D) is given,
    IoU of each candidate's occupancy to its conditioning object), occ of the first candidate (N, D, D, D),
    and the means stable_rate, mean_angle, iou.
    """
    n = cond.shape[0]
    outs = []
    for i, start in enumerate(range(0, n, batch)):
        chunk = cond[start : start + batch]
        m = chunk.shape[0]
        if m < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - m, 0)])
        ro = rollout(params, dec_params, jnp.asarray(chunk), jax.random.fold_in(key, i))
        out = {k: np.asarray(ro[k])[:m] for k in ("stable", "angle")}
        out["occ"] = np.asarray(ro["occ"][:, 0])[:m]
        if reference is not None:
            ref = jnp.asarray(reference[start : start + m])
            out["iou"] = np.asarray(toy_metrics.iou_3d(ro["occ"][:m], ref[:, None]))
        outs.append(out)
    res = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    res["stable_rate"] = float(np.mean(res["stable"]))
    res["mean_angle"] = float(np.mean(res["angle"]))
    if reference is not None:
        res["iou"] = float(np.mean(res["iou"]))
    return res


def write_summary(workdir: str, before: dict, after: dict, seconds: float, extra: Optional[dict] = None) -> dict:
    """``summary.json`` with the before/after figures and the wall time; returns the dict."""
    summary = {
        "stable_rate_before": before["stable_rate"],
        "stable_rate_after": after["stable_rate"],
        "mean_angle_before": before["mean_angle"],
        "mean_angle_after": after["mean_angle"],
        "iou_before": before.get("iou", float("nan")),
        "iou_after": after.get("iou", float("nan")),
        "seconds": float(seconds),
    }
    summary.update(extra or {})
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def print_summary(summary: dict) -> None:
    rows = [("stable rate", "stable_rate"), ("mean angle (deg)", "mean_angle"), ("IoU to condition", "iou")]
    print(f"\n{'held-out':18s} {'before':>10s} {'after':>10s}")
    for label, key in rows:
        print(f"{label:18s} {summary[key + '_before']:10.4f} {summary[key + '_after']:10.4f}")
    print(f"{'wall time (s)':18s} {summary['seconds']:10.1f}")


def plot_curve(path: str, steps, values, ylabel: str, title: str) -> None:
    """A line plot (PNG) of one metric over training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(steps, values, marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
