"""dso_jax.batching: chunks of exactly `batch` rows, padding by the last row, outputs trimmed."""

import numpy as np
import pytest

from dso_jax.batching import map_in_chunks, pad_rows


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
