"""A run's report: ``summary.json`` (the before/after figures and the wall time), the final table, PNG curves.

Plots go through matplotlib (Agg, no display needed); the PNGs lie next to the TensorBoard events.
"""

from __future__ import annotations

import json
import os
from typing import Optional

SUMMARY_FILE = "summary.json"


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
    path = os.path.join(workdir, SUMMARY_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)
    return summary


def print_summary(summary: dict) -> None:
    rows = [("stable rate", "stable_rate"), ("mean angle (deg)", "mean_angle"), ("IoU to condition", "iou")]
    print(f"\n{'held-out':18s} {'before':>10s} {'after':>10s}")
    for label, key in rows:
        print(f"{label:18s} {summary[key + '_before']:10.4f} {summary[key + '_after']:10.4f}")
    print(f"{'wall time (s)':18s} {summary['seconds']:10.1f}")


def plot_curve(path: str, steps, values, ylabel: str, title: str, *, label: str = "", more=()) -> None:
    """A line plot (PNG) of one metric over training steps; ``more``: further (steps, values, label) series
    on the same axes (with a legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(steps, values, marker="o", markersize=3, label=label or None)
    for m_steps, m_values, m_label in more:
        ax.plot(m_steps, m_values, marker="s", markersize=4, label=m_label)
    if label or more:
        ax.legend(fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
