"""Strict checks of converted weights: one error listing every problem, and the ``--verify`` run.

``tree_diff`` compares a parameter tree with the abstract tree of the model
(``jax.eval_shape(module.init, ...)['params']``) and raises a single :class:`ConversionError` whose
message has one line per missing, unexpected, mis-shaped or mis-typed key, each naming the source
file. The model is passed in by the caller, so this package does not import ``dso_jax.models``.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from dso_jax.convert.rules import flatten


class ConversionError(ValueError):
    """Weights do not match the architecture; the message names the file and every bad key."""


def _fmt(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def diff_lines(
    found: Mapping[str, tuple[tuple[int, ...], str]],
    expected: Mapping[str, tuple[tuple[int, ...], Optional[str]]],
    *,
    source: str,
) -> list[str]:
    """One line per problem. Values are (shape, dtype name); an expected dtype None means "any float"."""
    lines = []
    for key in expected:
        if key not in found:
            lines.append(f"{source}: missing key {key!r} (expected shape {_fmt(expected[key][0])})")
    for key in found:
        if key not in expected:
            lines.append(f"{source}: unexpected key {key!r} (shape {_fmt(found[key][0])}, {found[key][1]})")
    for key, (shape, dtype) in expected.items():
        if key not in found:
            continue
        got_shape, got_dtype = found[key]
        if tuple(got_shape) != tuple(shape):
            lines.append(f"{source}: mis-shaped key {key!r}: shape {_fmt(got_shape)}, expected {_fmt(shape)}")
        elif dtype is None and not is_float(got_dtype):
            lines.append(f"{source}: mis-typed key {key!r}: dtype {got_dtype}, expected a floating type")
        elif dtype is not None and got_dtype != dtype:
            lines.append(f"{source}: mis-typed key {key!r}: dtype {got_dtype}, expected {dtype}")
    return lines


def is_float(dtype_name: str) -> bool:
    try:
        return np.issubdtype(np.dtype(dtype_name), np.floating)
    except TypeError:  # ml_dtypes names (bfloat16) are floats numpy does not know by name
        return dtype_name in ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def raise_if(lines: Sequence[str], what: str) -> None:
    if lines:
        raise ConversionError(f"{what}: {len(lines)} problem(s)\n" + "\n".join(lines))


def check_finite(params: Mapping, *, source: str, what: str = "weights") -> None:
    """Raise one ConversionError naming every tensor of ``params`` (nested or flat) with NaN or Inf values."""
    lines = []
    for key, v in flatten(params).items():
        a = np.asarray(v)
        if is_float(a.dtype.name):
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            if bad:
                lines.append(f"{source}: tensor {key!r} has {bad} non-finite value(s) of {a.size}")
    raise_if(lines, f"{source}: non-finite {what}")


def tree_diff(params: Mapping, expected: Mapping, *, source: str, what: str = "converted params") -> None:
    """Raise one ConversionError unless ``params`` has exactly the keys, shapes and dtypes of ``expected``.

    Both are nested dicts (``expected`` typically of ``jax.ShapeDtypeStruct``); keys are compared
    '/'-joined.
    """
    found = {k: (tuple(v.shape), np.dtype(v.dtype).name) for k, v in flatten(params).items()}
    want = {k: (tuple(v.shape), np.dtype(v.dtype).name) for k, v in flatten(expected).items()}
    raise_if(diff_lines(found, want, source=source), f"{what} do not match the model")


def check_finite_and_deterministic(apply_fn: Callable, params, inputs: Sequence, *, name: str) -> dict:
    """Run ``jax.jit(apply_fn)(params, *inputs)`` twice; raise unless finite and bitwise equal.

    Returns summary statistics of the output (shape, mean, std, max |y|).
    """
    import jax  # this check runs the model; the rest of the package is numpy-only

    fn = jax.jit(apply_fn)
    first = np.asarray(jax.block_until_ready(fn(params, *inputs)))
    second = np.asarray(jax.block_until_ready(fn(params, *inputs)))
    bad = int(np.size(first) - np.count_nonzero(np.isfinite(first)))
    if bad:
        raise ConversionError(f"{name}: output has {bad} non-finite value(s) of {first.size}")
    if not np.array_equal(first, second):
        diff = float(np.max(np.abs(first.astype(np.float64) - second.astype(np.float64))))
        raise ConversionError(
            f"{name}: two runs on the same inputs differ (max |diff| {diff:.3g}); on GPU, "
            "XLA_FLAGS=--xla_gpu_deterministic_ops=true selects deterministic kernels"
        )
    y = first.astype(np.float64)
    return {
        "shape": tuple(first.shape),
        "mean": float(y.mean()),
        "std": float(y.std()),
        "max_abs": float(np.abs(y).max()),
    }
