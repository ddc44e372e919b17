"""Run a fixed-shape (jitted) function over a long leading axis in chunks: pad, run, unpad.

Jitted functions compile once per input shape. ``map_in_chunks`` feeds ``fn`` chunks of exactly
``batch`` rows (the last one padded by repeating its final row, so padding is always valid input),
cuts every output back to the real rows and concatenates the chunks. Inputs and outputs are pytrees
whose leaves share the leading axis; outputs come back as numpy arrays. ``map_rows`` is the same inside
a jit (``lax.map`` over equal chunks, differentiable): on a CPU, model calls on a few rows at a time keep
XLA's buffers small enough for malloc to reuse and for the cache (bench/RESULTS.md, issue 15).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np


def pad_rows(tree, batch: int):
    """Pad every leaf of ``tree`` to ``batch`` rows by repeating its last row; returns (padded, real rows)."""
    n = _rows(tree)
    if n > batch:
        raise ValueError(f"pad_rows: {n} rows do not fit a batch of {batch}")
    if n == batch:
        return tree, n
    pad = lambda x: np.concatenate([np.asarray(x), np.repeat(np.asarray(x)[-1:], batch - n, 0)])
    return jax.tree.map(pad, tree), n


def map_in_chunks(fn: Callable[..., Any], tree, batch: int, *, with_index: bool = False):
    """``fn(chunk)`` (or ``fn(chunk, i)`` with ``with_index``) over chunks of ``batch`` rows of ``tree``.

    Returns the outputs' pytree concatenated along axis 0 as numpy, trimmed to the input's row count.
    """
    if batch <= 0:
        raise ValueError(f"map_in_chunks: batch must be positive, got {batch}")
    n = _rows(tree)
    if n == 0:
        raise ValueError("map_in_chunks: no rows to process")
    outs = []
    for i, start in enumerate(range(0, n, batch)):
        chunk, m = pad_rows(jax.tree.map(lambda x: np.asarray(x)[start : start + batch], tree), batch)
        out = fn(chunk, i) if with_index else fn(chunk)
        outs.append(jax.tree.map(lambda y: np.asarray(jax.device_get(y))[:m], out))
    return jax.tree.map(lambda *ys: np.concatenate(ys, axis=0), *outs)


def map_rows(fn: Callable[..., Any], rows: int) -> Callable[..., Any]:
    """``fn(*args)`` computed ``rows`` leading rows at a time inside a jit (``lax.map``; differentiable).

    Every array argument (None passes through) and every output leaf shares the leading axis N; with
    ``rows`` 0, or N not a multiple of ``rows`` larger than it, ``fn`` runs on all N rows at once.
    """

    def mapped(*args):
        n = _rows([a for a in args if a is not None])
        if rows <= 0 or rows >= n or n % rows:
            return fn(*args)
        split = lambda a: None if a is None else a.reshape((n // rows, rows) + a.shape[1:])  # noqa: E731
        out = jax.lax.map(lambda xs: fn(*xs), tuple(split(a) for a in args))
        return jax.tree.map(lambda y: y.reshape((n,) + y.shape[2:]), out)

    return mapped


def _rows(tree) -> int:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError("map_in_chunks: empty input")
    rows = {int(np.shape(x)[0]) for x in leaves}
    if len(rows) != 1:
        raise ValueError(f"map_in_chunks: leaves disagree on the leading axis ({sorted(rows)})")
    return rows.pop()
