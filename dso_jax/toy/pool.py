"""The online trainer's conditions in the toy world: a pool of training-split objects, sampled per step.

The pool (``pool_size`` training-split objects) is drawn once from the run's seed; the conditions of step
``s`` are a permutation sample of the pool keyed by ``(seed, s)``, so a resumed run sees the same
conditions as an uninterrupted one. (The held-out conditions are ``dso_jax.toy.heldout``'s.)
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from dso_jax.toy import condition, objects


class ConditionPool:
    """``iterate(start, stop, prefetch)`` -> ``(step, {'cond': (B_local, L, C) float32})``."""

    def __init__(self, seed: int, global_batch: int, pool_size: int, process_index: int = 0, process_count: int = 1):
        if global_batch > pool_size:
            raise ValueError(f"data.toy_pool_size {pool_size} < conditions per step {global_batch}")
        if global_batch % process_count:
            raise ValueError(f"conditions per step {global_batch} not divisible by {process_count} processes")
        objs = objects.sample_objects(seed, pool_size, "train")
        self.cond = condition.tokens(objs["occ"])  # (P, L, C)
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
