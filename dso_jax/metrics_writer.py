"""The one metrics writer of every trainer: TensorBoard events and ``metrics.jsonl`` in the workdir.

Process 0 writes; the other processes keep the interval sums only (the NaN/Inf guard runs everywhere).
A run that starts at step ``start`` (a resume, or a fresh run after a crash before the first checkpoint)
first drops the ``metrics.jsonl`` rows of steps after ``start`` (written by the process that died after its
last checkpoint, and about to be written again) and tells TensorBoard to purge its events from
``start + 1`` on, so no step is logged twice. View the events with ``tensorboard --logdir WORKDIR``.

Rows are ``{"step": s, key: value, ...}``: training interval means (TensorBoard ``train/KEY``) and held-out
evaluations made during training as ``heldout_KEY`` (TensorBoard ``heldout/KEY``).
"""

from __future__ import annotations

import json
import os

import numpy as np

METRICS_FILE = "metrics.jsonl"
EVENTS_DIR = "tb"


def read_rows(workdir: str) -> list[dict]:
    """The rows of ``workdir/metrics.jsonl`` in file order ([] when there is none)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if line.endswith("\n"):
                    raise ValueError(f"{path}: line {n} is not JSON") from None
                break  # a last line cut off by a kill: the rows before it stand
    return rows


def _drop_rows_after(workdir: str, start: int) -> None:
    """Rewrite ``metrics.jsonl`` without the rows of steps > ``start`` (atomically: temp file, rename)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return
    kept = [r for r in read_rows(workdir) if int(r.get("step", 0)) <= start]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)


class MetricWriter:
    """Interval means of per-step metrics, written at ``flush``; ``start`` is the step the run begins at."""

    def __init__(self, workdir: str, enabled: bool, start: int = 0):
        self.writer = self.jsonl = None
        if enabled:
            from tensorboardX import SummaryWriter

            _drop_rows_after(workdir, start)
            self.writer = SummaryWriter(os.path.join(workdir, EVENTS_DIR), purge_step=start + 1 if start else None)
            self.jsonl = open(os.path.join(workdir, METRICS_FILE), "a")
        self.sums: dict = {}
        self.count = 0
        self.last: dict = {}

    def add(self, step: int, metrics: dict) -> None:
        """Check and accumulate the metrics of the update that brought the run to ``step``."""
        metrics = {k: float(v) for k, v in metrics.items()}
        bad = [k for k, v in metrics.items() if not np.isfinite(v)]
        if bad:
            raise FloatingPointError(f"step {step}: non-finite {', '.join(f'{k}={metrics[k]}' for k in bad)}; stopping")
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        self.last = metrics

    def flush(self, step: int, extra: dict) -> dict:
        """Write the means since the last flush plus ``extra`` as the row of ``step``; returns that row."""
        means = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        means.update(extra)
        self._write(step, "train", means, means)
        self.sums, self.count = {}, 0
        return means

    def add_heldout(self, step: int, metrics: dict) -> None:
        """Record a held-out evaluation made during training (``eval.every``) as ``heldout_*`` keys."""
        metrics = {k: float(v) for k, v in metrics.items()}
        self._write(step, "heldout", metrics, {f"heldout_{k}": v for k, v in metrics.items()})

    def _write(self, step: int, tag: str, scalars: dict, row: dict) -> None:
        if self.writer is None:
            return
        for k, v in scalars.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(f"{tag}/{k}", v, step)
        self.writer.flush()
        self.jsonl.write(json.dumps({"step": step, **row}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.jsonl.close()
