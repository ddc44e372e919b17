"""DSO's pair sampling over a :mod:`dso_jax.data.tfds_dso` dataset, deterministic in (seed, step).

Each pair is drawn as DSO's ``SyntheticDataset`` does (``dso.md`` §2.4): an object uniformly among
those with at least one stable (angle < threshold) and one unstable latent; a condition view
uniformly among its views; a stable and an unstable latent uniformly among all of the object's
latents (any view). The pairs of optimizer step ``s`` depend only on ``(seed, s)``, so the data
position of a run is its step and a resumed run replays the same batches.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
from typing import Iterator, Sequence

import numpy as np

from dso_jax.data import tfds_dso


@dataclasses.dataclass(frozen=True)
class PairIndex:
    """Which objects can form a pair, with their stable / unstable latent indices."""

    objects: np.ndarray  # (O,) record indices of usable objects
    num_views: np.ndarray  # (O,)
    stable: tuple  # O arrays of latent indices
    unstable: tuple
    dropped: int  # objects without both labels

    @classmethod
    def from_metadata(cls, objects_meta: Sequence[dict], threshold: float) -> PairIndex:
        keep, views, stable, unstable = [], [], [], []
        for i, obj in enumerate(objects_meta):
            angles = np.asarray(obj["angles"], np.float32)
            s, u = np.flatnonzero(angles < threshold), np.flatnonzero(angles >= threshold)
            if len(s) and len(u):
                keep.append(i)
                views.append(int(obj["num_views"]))
                stable.append(s)
                unstable.append(u)
        if not keep:
            raise ValueError(f"no object has both a stable (< {threshold} deg) and an unstable latent")
        return cls(np.asarray(keep), np.asarray(views), tuple(stable), tuple(unstable), len(objects_meta) - len(keep))


def sample_pairs(index: PairIndex, seed: int, step: int, n: int) -> np.ndarray:
    """(n, 4) int64 rows (record, view, win latent, lose latent) for optimizer step ``step``."""
    rng = np.random.default_rng([int(seed), int(step)])
    o = rng.integers(0, len(index.objects), n)
    u = rng.random((n, 3))  # view, win, lose: uniform picks within the chosen object
    view = np.floor(u[:, 0] * index.num_views[o]).astype(np.int64)
    win = np.array([index.stable[j][int(x * len(index.stable[j]))] for j, x in zip(o, u[:, 1])], np.int64)
    lose = np.array([index.unstable[j][int(x * len(index.unstable[j]))] for j, x in zip(o, u[:, 2])], np.int64)
    return np.stack([index.objects[o], view, win, lose], axis=1)


class PairSource:
    """Offline label source: batches ``{'cond', 'x0_win', 'x0_lose'}`` shaped (A, B_local, ...).

    ``A`` = micro-batches per step, ``B_local`` = this process's share of each micro-batch.
    """

    def __init__(
        self,
        path: str,
        *,
        threshold: float,
        seed: int,
        global_batch: int,
        grad_accum: int,
        cond_channels: int,
        latent_shape: Sequence[int],
        process_index: int = 0,
        process_count: int = 1,
        workers: int = 4,
    ):
        self.records, meta = tfds_dso.open_dataset(path)
        self.path = path
        cond_shape, lat_shape = tuple(meta["cond_shape"]), tuple(meta["latent_shape"])
        if len(cond_shape) != 2 or cond_shape[1] != cond_channels:
            raise ValueError(f"{path}: cond shape {cond_shape}, the model expects (S, {cond_channels})")
        if lat_shape != tuple(latent_shape):
            raise ValueError(f"{path}: latent shape {lat_shape}, the model expects {tuple(latent_shape)}")
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
        self.index = PairIndex.from_metadata(meta["objects"], threshold)
        self.seed, self.grad_accum, self.global_batch = seed, grad_accum, global_batch
        self.local_batch = global_batch // process_count
        self.lo = process_index * self.local_batch
        self.meta = meta
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))

    def pairs(self, step: int) -> np.ndarray:
        """This process's (A, B_local, 4) pair table of ``step``."""
        rows = sample_pairs(self.index, self.seed, step, self.grad_accum * self.global_batch)
        rows = rows.reshape(self.grad_accum, self.global_batch, 4)
        return rows[:, self.lo : self.lo + self.local_batch]

    def batch(self, step: int) -> dict:
        rows = self.pairs(step)
        flat = rows.reshape(-1, 4)
        wanted = sorted(set(flat[:, 0].tolist()))
        recs = dict(zip(wanted, self._pool.map(self._read, wanted)))
        cond = np.stack([recs[r]["cond"][v] for r, v, _, _ in flat])
        win = np.stack([recs[r]["latents"][w] for r, _, w, _ in flat])
        lose = np.stack([recs[r]["latents"][l] for r, _, _, l in flat])
        shape = rows.shape[:2]
        return {
            "cond": cond.reshape(shape + cond.shape[1:]),  # (A, B, S, Cc) bf16
            "x0_win": win.reshape(shape + win.shape[1:]),  # (A, B, C, R, R, R) bf16
            "x0_lose": lose.reshape(shape + lose.shape[1:]),
        }

    def _read(self, record: int) -> dict:
        rec = self.records[record]
        expected = self.meta["objects"][record]
        object_id = rec["object_id"].decode() if isinstance(rec["object_id"], bytes) else str(rec["object_id"])
        if object_id != expected["object_id"]:
            raise ValueError(f"{self.path}: record {record} is not object {expected['object_id']}; rebuild the dataset")
        return rec

    def iterate(self, start: int, stop: int, prefetch: int = 2) -> Iterator[tuple]:
        """Yield ``(step, batch)`` for ``start <= step < stop``, loading ``prefetch`` steps ahead."""
        return _prefetch(((s, self.batch(s)) for s in range(start, stop)), prefetch)

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)


_DONE = object()


def _prefetch(it: Iterator, size: int) -> Iterator:
    """Run ``it`` in a daemon thread, ``size`` items ahead; exceptions re-raise in the consumer."""
    if size <= 0:
        yield from it
        return
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def work():
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put(item)
            q.put(_DONE)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    threading.Thread(target=work, daemon=True).start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
