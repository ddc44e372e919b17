"""Sparse operators (``dso_jax.sparse``) vs the PyTorch twin of TRELLIS's (``tests/twins/slat_twin.py``), fp32 on CPU.

Every batch holds two objects of different voxel counts. Tolerance: max |flax - torch| <= 1e-5 x max |torch|
for single operators (measured below 1e-6); index maps and coords must match exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from twins import slat_twin as st

from dso_jax import sparse
from dso_jax.convert import rules
from dso_jax.models.attention import dot_product_attention
from dso_jax.models.layers import absolute_position_embedding, voxel_position_embedding

torch.set_num_threads(2)
REL = 1e-5
RES = 16


def assert_close(out, ref, rel=REL):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err, scale = np.max(np.abs(out - ref)), np.max(np.abs(ref))
    assert scale > 1e-3, f"degenerate reference (max |y| = {scale})"
    print(f"max abs err {err:.3g}, scale {scale:.3g}, ratio {err / scale:.3g}")
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} x scale {scale:.3g}"


def data(counts=(300, 170), channels=6, seed=0, downsamples=1):
    coords = sparse.example_coords(counts, RES, seed=seed)
    feats = np.random.default_rng(seed).standard_normal((len(coords), channels)).astype(np.float32)
    batch = sparse.from_trellis(coords, feats, resolution=RES, downsamples=downsamples, quantum=128, coarse_quantum=32)
    return coords, feats, batch


def valid(x, level):
    """Rows of (B, N, ...) ``x`` on ``level`` in TRELLIS's order: (M, ...)."""
    b, n = np.nonzero(np.asarray(level.mask))
    return np.asarray(x)[b, n]


@pytest.mark.parametrize("k", [3, 1])
def test_submanifold_conv_matches_dense_conv_at_active_sites(k):
    coords, feats, x = data()
    w = np.random.default_rng(1).standard_normal((5, k, k, k, 6)).astype(np.float32)  # spconv (O, k, k, k, I)
    b = np.random.default_rng(2).standard_normal(5).astype(np.float32)
    kernel = rules.leaf_rule("spconv", "conv.weight").to_flax(w)  # (k, k, k, I, O)
    out = jax.jit(sparse.submanifold_conv)(x.feats, x.levels[0].neighbours, kernel, b)
    ref = st._dense_submconv(st.from_numpy(coords, feats), torch.from_numpy(w), torch.from_numpy(b))
    assert_close(valid(out, x.levels[0]), ref.numpy())


def test_neighbour_table_is_the_dense_grid_lookup():
    coords, _, x = data()
    nbr, mask, c = (np.asarray(a) for a in (x.levels[0].neighbours, x.mask, x.coords))
    n = mask.shape[1]
    for obj in range(2):
        grid = -np.ones((RES + 2,) * 3, np.int64)
        m = int(mask[obj].sum())
        grid[tuple((c[obj, :m] + 1).T)] = np.arange(m)
        for o, d in enumerate(sparse.tables.OFFSETS):
            want = grid[tuple((c[obj, :m] + 1 + d).T)]
            np.testing.assert_array_equal(nbr[obj, :m, o], np.where(want < 0, n, want))
        assert (nbr[obj, m:] == n).all()  # padding is nobody's neighbour and has none


def test_twin_gather_conv_equals_its_dense_oracle():  # the bench's fast PyTorch path
    coords, feats, _ = data()
    w, b = torch.randn(4, 3, 3, 3, 6), torch.randn(4)
    x = st.from_numpy(coords, feats)
    assert_close(st._gather_submconv(x, w, b).numpy(), st._dense_submconv(x, w, b).numpy())


def test_downsample_divides_by_children_plus_one():
    # Object 0: voxels (0,0,0), (1,1,1) share parent (0,0,0); (4,4,4) is alone. Object 1: one voxel.
    coords = np.array([[0, 0, 0, 0], [0, 1, 1, 1], [0, 4, 4, 4], [1, 2, 2, 2]])
    feats = np.array([[2.0], [4.0], [6.0], [5.0]], np.float32)
    x = sparse.from_trellis(coords, feats, resolution=8, downsamples=1, quantum=4, coarse_quantum=4)
    out = np.asarray(sparse.downsample(x.feats, x.levels[1]))
    np.testing.assert_allclose(valid(out, x.levels[1])[:, 0], [2.0, 3.0, 2.5])  # (2+4)/3, 6/2, 5/2
    ref = st.SparseDownsample()(st.from_numpy(coords, feats))
    np.testing.assert_allclose(ref.feats[:, 0].numpy(), [2.0, 3.0, 2.5])  # TRELLIS's scatter_reduce call agrees


def test_downsample_and_upsample_match_trellis_order_and_values():
    coords, feats, x = data(channels=5)
    coarse = x.levels[1]
    down = jax.jit(sparse.downsample)(x.feats, coarse)
    t_down = st.SparseDownsample()(st.from_numpy(coords, feats))
    c_coarse, f_coarse = sparse.to_trellis(sparse.SparseBatch(feats=down, levels=x.levels[1:]))
    np.testing.assert_array_equal(c_coarse, t_down.coords.numpy())  # same parents, same (sorted) order
    assert_close(f_coarse, t_down.feats.numpy())
    up = jax.jit(sparse.upsample)(down * 2.0, coarse)
    t_up = st.SparseUpsample()(t_down * 2.0)
    np.testing.assert_array_equal(t_up.coords.numpy(), coords)
    assert_close(valid(up, x.levels[0]), t_up.feats.numpy())
    assert not np.asarray(up)[~np.asarray(x.mask)].any()  # padding children get zeros


def test_subdivide_matches_trellis():
    coords, feats, x = data(downsamples=0)
    kids, kid_mask = sparse.tables.subdivide_coords(x.coords, x.mask)
    sub = sparse.subdivide(x.feats)
    ref = st.subdivide(st.from_numpy(coords, feats))
    level = sparse.SparseLevel(coords=kids, mask=kid_mask, resolution=2 * RES)
    c, f = sparse.to_trellis(sparse.SparseBatch(feats=sub, levels=(level,)))
    np.testing.assert_array_equal(c, ref.coords.numpy())
    np.testing.assert_array_equal(f, ref.feats.numpy())


def test_group_norm_is_per_object():
    coords, feats, x = data(channels=8)
    gn = sparse.SparseGroupNorm32(4)
    params = {"scale": jnp.linspace(0.5, 1.5, 8), "bias": jnp.linspace(-1, 1, 8)}
    out = jax.jit(lambda p, f, m: gn.apply({"params": p}, f, m))(params, x.feats * 3.0 + 1.0, x.mask)
    ref_mod = st.SparseGroupNorm32(4, 8)
    with torch.no_grad():
        ref_mod.weight.copy_(torch.tensor(np.asarray(params["scale"])))
        ref_mod.bias.copy_(torch.tensor(np.asarray(params["bias"])))
        ref = ref_mod(st.from_numpy(coords, feats * 3.0 + 1.0)).feats.numpy()
    assert_close(valid(out, x.levels[0]), ref)


def _qkv(m, seed, h=2, d=8):
    return [np.random.default_rng(seed + i).standard_normal((m, h, d)).astype(np.float32) for i in range(3)]


@pytest.mark.parametrize("window,shift", [(4, 0), (4, 2), (8, 4)])
def test_windowed_attention_matches_trellis_windows(window, shift):
    coords, _, x = data(downsamples=0)
    q, k, v = _qkv(len(coords), seed=3)
    part = sparse.window_partition(x.coords, x.mask, window, shift)
    pad = lambda a: sparse.from_trellis(coords, a.reshape(len(a), -1), resolution=RES, quantum=128).feats
    out = jax.jit(sparse.windowed_attention)(*(pad(a).reshape(2, -1, 2, 8) for a in (q, k, v)), part)
    ref = st.windowed_self_attention(*map(torch.from_numpy, (q, k, v)), torch.from_numpy(coords), window, shift)
    assert_close(valid(out, x.levels[0]), ref.numpy())


def test_bucketed_window_attention_is_the_per_window_oracle():
    """The twin's fast swin path (the GPU bench's) equals its one-call-per-window oracle, windows of mixed sizes."""
    coords, _, _ = data()
    q, k, v = map(torch.from_numpy, _qkv(len(coords), seed=4))
    c = torch.from_numpy(coords)
    buckets = st.window_buckets(c, 4, 2)
    assert len(buckets) > 1 and sum(int(valid.sum()) for _, valid in buckets) == len(coords)  # each row once
    out = st.bucketed_window_attention(q, k, v, buckets)
    assert_close(out.numpy(), st.windowed_self_attention(q, k, v, c, 4, 2).numpy())


def test_full_attention_is_per_object_with_no_leakage():
    coords, _, x = data(downsamples=0)
    q, k, v = (
        sparse.from_trellis(coords, a.reshape(len(a), -1), resolution=RES, quantum=128).feats.reshape(2, -1, 2, 8)
        for a in _qkv(len(coords), seed=5)
    )
    lengths = x.levels[0].lengths
    out = np.asarray(jax.jit(lambda *a: dot_product_attention(*a, "xla", lengths))(q, k, v))
    for obj in range(2):
        n = int(lengths[obj])
        ref = st.sdpa_rows(*(torch.from_numpy(a[obj, :n]) for a in (q, k, v))).numpy()
        assert_close(out[obj, :n], ref)
        assert not out[obj, n:].any()  # padding queries return 0
    # Changing object 1 (and every padding row) leaves object 0's outputs bitwise unchanged.
    k2, v2 = jnp.asarray(k).at[1].multiply(-3.0).at[0, int(lengths[0]) :].set(7.0), jnp.asarray(v).at[1].add(1.0)
    out2 = np.asarray(jax.jit(lambda *a: dot_product_attention(*a, "xla", lengths))(q, k2, v2))
    np.testing.assert_array_equal(out2[0], out[0])


def test_voxel_position_embedding_is_the_ape_bitwise():
    coords = np.random.default_rng(0).integers(0, 32, (2, 50, 3)).astype(np.int32)
    out = np.asarray(jax.jit(lambda c: voxel_position_embedding(c, 1024, 32))(coords))
    np.testing.assert_array_equal(out.reshape(100, 1024), absolute_position_embedding(coords.reshape(100, 3), 1024))
