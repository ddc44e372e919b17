"""dso_jax.batching: chunks of exactly `batch` rows, padding by the last row, outputs trimmed; map_rows in a jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dso_jax.batching import map_in_chunks, map_rows, pad_rows


def test_chunks_have_fixed_shape_and_outputs_are_trimmed():
    x = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    seen = []

    def fn(chunk, i):
        seen.append((i, chunk["x"].shape, chunk["x"][-1, 0]))
        return {"y": chunk["x"] * 2, "s": chunk["x"].sum(axis=1)}

    out = map_in_chunks(fn, {"x": x}, 4, with_index=True)
    assert [s[1] for s in seen] == [(4, 3)] * 3  # one compiled shape
    assert seen[-1][2] == 9.0  # the last chunk is padded with its own final row
    np.testing.assert_array_equal(out["y"], x * 2)
    np.testing.assert_array_equal(out["s"], x.sum(axis=1))


def test_pad_rows_and_errors():
    padded, n = pad_rows(np.array([1, 2]), 4)
    assert n == 2 and padded.tolist() == [1, 2, 2, 2]
    with pytest.raises(ValueError, match="do not fit"):
        pad_rows(np.zeros(5), 4)
    with pytest.raises(ValueError, match="disagree"):
        map_in_chunks(lambda c: c, {"a": np.zeros(3), "b": np.zeros(4)}, 2)
    with pytest.raises(ValueError, match="positive"):
        map_in_chunks(lambda c: c, np.zeros(3), 0)


def test_map_rows_computes_in_chunks_inside_a_jit_with_gradients():
    calls = []

    def fn(x, c):  # (N, 2), None -> (N,), (N, 2): records the rows it is traced with
        calls.append(x.shape[0])
        return {"s": jnp.sum(x**2, axis=1), "x": 3 * x}

    x = jnp.arange(12.0).reshape(6, 2)
    out = jax.jit(map_rows(fn, 2))(x, None)
    assert calls == [2]  # traced once, on chunks of 2 rows
    np.testing.assert_allclose(np.asarray(out["s"]), np.sum(np.asarray(x) ** 2, axis=1))
    np.testing.assert_allclose(np.asarray(out["x"]), 3 * np.asarray(x))
    grad = jax.grad(lambda a: jnp.sum(map_rows(fn, 3)(a, None)["s"]))(x)
    np.testing.assert_allclose(np.asarray(grad), 2 * np.asarray(x))
    calls.clear()
    map_rows(fn, 4)(x, None)  # 6 rows do not split into 4s: one call on all rows
    map_rows(fn, 0)(x, None)
    assert calls == [6, 6]
