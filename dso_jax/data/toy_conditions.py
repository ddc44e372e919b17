"""Conditions of the toy world for the online trainer: a training pool and a fixed held-out set.

The pool (``pool_size`` training-split objects) is drawn once from the run's seed; the conditions of step
``s`` are a permutation sample of the pool keyed by ``(seed, s)``, so a resumed run sees the same
conditions as an uninterrupted one. The held-out set (objects whose visible parameters never occur in
training) carries the conditioning occupancies for the IoU measure.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from dso_jax.data import toy


class ToyConditionSource:
    """``iterate(start, stop, prefetch)`` -> ``(step, {'cond': (B_local, L, C) float32})``."""

    def __init__(self, seed: int, global_batch: int, pool_size: int, process_index: int = 0, process_count: int = 1):
        if global_batch > pool_size:
            raise ValueError(f"data.toy_pool_size {pool_size} < conditions per step {global_batch}")
        if global_batch % process_count:
            raise ValueError(f"conditions per step {global_batch} not divisible by {process_count} processes")
        objs = toy.sample_objects(seed, pool_size, "train")
        self.cond = toy.conditions(objs["occ"])  # (P, L, C)
        self.seed, self.global_batch = seed, global_batch
        per = global_batch // process_count
        self.rows = slice(process_index * per, (process_index + 1) * per)

    def batch(self, step: int) -> dict:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 7, step]))
        idx = rng.choice(len(self.cond), self.global_batch, replace=False)[self.rows]
        return {"cond": self.cond[idx]}

    def iterate(self, start: int, stop: int, prefetch: int = 0) -> Iterator[tuple[int, dict]]:
        del prefetch  # batches are index lookups into a host array
        for step in range(start, stop):
            yield step, self.batch(step)

    def close(self) -> None:
        pass


def heldout(seed: int, n: int) -> dict:
    """n held-out objects, deterministic in ``seed``: `toy.sample_objects`'s fields (occ (n, R, R, R) bool,
    kind, stable, margin, params) plus cond (n, L, C) float32."""
    objs = toy.sample_objects(seed, n, "heldout")
    return dict(objs, cond=toy.conditions(objs["occ"]))
