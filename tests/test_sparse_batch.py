"""``SparseBatch``: TRELLIS's layout in and out, token buckets, the coarse level, bad input, one compile per bucket."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dso_jax import sparse


def trellis_data(counts=(50, 20, 35), res=8, channels=3, seed=0):
    coords = sparse.example_coords(counts, res, seed=seed)
    return coords, np.random.default_rng(seed).standard_normal((len(coords), channels)).astype(np.float32)


def test_round_trip_keeps_the_input_order():
    coords, feats = trellis_data()
    rng = np.random.default_rng(1)
    for b in range(3):  # shuffle rows within each object: TRELLIS needs batch-contiguous rows, nothing more
        rows = np.flatnonzero(coords[:, 0] == b)
        perm = rng.permutation(rows)
        coords[rows], feats[rows] = coords[perm], feats[perm]
    x = sparse.from_trellis(coords, feats, resolution=8, quantum=16)
    c, f = sparse.to_trellis(x)
    np.testing.assert_array_equal(c, coords)
    np.testing.assert_array_equal(f, feats)


def test_layout_buckets_and_padding():
    coords, feats = trellis_data()
    x = sparse.from_trellis(coords, feats, resolution=8, downsamples=1, quantum=16, coarse_quantum=8)
    assert x.feats.shape == (3, 64, 3) and x.coords.shape == (3, 64, 3) and x.coords.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(x.levels[0].lengths), [50, 20, 35])
    assert (np.asarray(x.mask) == (np.arange(64)[None] < np.array([[50], [20], [35]]))).all()  # valid rows first
    assert not np.asarray(x.feats)[~np.asarray(x.mask)].any() and not np.asarray(x.coords)[~np.asarray(x.mask)].any()
    coarse = x.levels[1]
    assert coarse.resolution == 4 and coarse.size % 8 == 0 and coarse.size >= int(np.max(coarse.lengths))
    assert [sparse.bucket_size(n, 4096) for n in (1, 4096, 4097, 30000)] == [4096, 4096, 8192, 32768]


def test_coarse_level_is_the_unique_sorted_parents():
    coords, feats = trellis_data()
    x = sparse.from_trellis(coords, feats, resolution=8, downsamples=1, quantum=16, coarse_quantum=8)
    coarse = x.levels[1]
    for b in range(3):
        want, inverse, counts = np.unique(
            coords[coords[:, 0] == b, 1:] // 2, axis=0, return_inverse=True, return_counts=True
        )
        m = len(want)
        np.testing.assert_array_equal(np.asarray(coarse.coords)[b, :m], want)
        np.testing.assert_array_equal(np.asarray(coarse.divisor)[b, :m], counts + 1)
        n = int(x.levels[0].lengths[b])
        np.testing.assert_array_equal(np.asarray(coarse.parent)[b, :n], inverse.reshape(-1))
        assert (np.asarray(coarse.parent)[b, n:] == coarse.size).all()  # padding has no parent
        kids = np.asarray(coarse.children)[b]
        for j in range(m):  # each parent lists exactly its children, ascending, then the sentinel
            want_kids = np.flatnonzero(inverse.reshape(-1) == j)
            np.testing.assert_array_equal(kids[j], np.r_[want_kids, np.full(8 - len(want_kids), 64)])
        assert (kids[m:] == 64).all()


def test_with_feats_tiles_the_structure():
    coords, feats = trellis_data()
    x = sparse.from_trellis(coords, feats, resolution=8, downsamples=1, quantum=16, coarse_quantum=8)
    y = x.with_feats(jnp.zeros((6, 64, 5)))
    assert y.batch_size == 6 and y.feats.shape == (6, 64, 5)
    for a, b in zip(jax.tree.leaves(x.levels), jax.tree.leaves(y.levels)):
        np.testing.assert_array_equal(np.asarray(b), np.concatenate([np.asarray(a)] * 2))
    with pytest.raises(ValueError, match=r"feats \(4, 64, 5\) do not fit 3 objects x 64 rows"):
        x.with_feats(jnp.zeros((4, 64, 5)))


@pytest.mark.parametrize(
    "coords,match",
    [
        (np.array([[1, 0, 0, 0], [0, 1, 1, 1]]), "non-decreasing"),
        (np.array([[0, 0, 0, 0], [0, 0, 0, 0]]), "duplicate voxel coords"),
        (np.array([[0, 0, 0, 9], [0, 1, 1, 1]]), r"must lie in \[0, 8\), got \[0, 9\]"),
        (np.array([[0, 0, 0, 0], [2, 1, 1, 1]]), r"objects \[1\] have no voxels"),
        (np.zeros((2, 3), np.int64), r"coords must be \(M, 4\) integers"),
    ],
)
def test_bad_input_is_named(coords, match):
    with pytest.raises(ValueError, match=match):
        sparse.from_trellis(coords, np.zeros((len(coords), 2), np.float32), resolution=8)


def test_one_compile_per_bucket():
    fn = jax.jit(lambda x: sparse.submanifold_conv(x.feats, x.levels[0].neighbours, jnp.ones((3, 3, 3, 3, 2))))
    for counts, seed in (((50, 20, 35), 0), ((12, 60, 3), 1)):  # different voxel counts, same 64-row bucket
        fn(sparse.from_trellis(*trellis_data(counts, seed=seed), resolution=8, quantum=64)).block_until_ready()
    assert fn._cache_size() == 1
    fn(sparse.from_trellis(*trellis_data((70, 20, 35)), resolution=8, quantum=64)).block_until_ready()  # 128 rows
    assert fn._cache_size() == 2
