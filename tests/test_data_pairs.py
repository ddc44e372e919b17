"""Pair sampling follows DSO's rules and is a pure function of (seed, step)."""

import numpy as np
import pytest

from dso_jax.data import dso_pairs, synthetic, tfds_dso

SHAPES = dict(cond_len=4, cond_channels=8, latent_channels=2, resolution=4)


def _meta(angle_lists, views=2):
    return [{"object_id": f"o{i}", "num_views": views, "angles": a} for i, a in enumerate(angle_lists)]


def test_objects_without_both_labels_are_dropped_and_threshold_is_strict():
    index = dso_pairs.PairIndex.from_metadata(_meta([[1.0, 30.0], [1.0, 2.0], [25.0, 40.0], [20.0, 19.99]]), 20.0)
    assert index.objects.tolist() == [0, 3]
    assert index.dropped == 2
    # DSO's training label: stable iff angle < 20, so exactly 20 deg is unstable.
    assert index.stable[1].tolist() == [1] and index.unstable[1].tolist() == [0]


def test_no_usable_object_is_an_error():
    with pytest.raises(ValueError, match="both a stable"):
        dso_pairs.PairIndex.from_metadata(_meta([[1.0, 2.0]]), 20.0)


def test_pairs_are_deterministic_and_labelled_correctly():
    angles = [[5.0, 50.0, 10.0, 60.0], [1.0, 2.0, 3.0, 4.0], [30.0, 3.0, 40.0, 45.0]]
    index = dso_pairs.PairIndex.from_metadata(_meta(angles, views=3), 20.0)
    a = dso_pairs.sample_pairs(index, seed=0, step=7, n=500)
    assert np.array_equal(a, dso_pairs.sample_pairs(index, seed=0, step=7, n=500))
    assert not np.array_equal(a, dso_pairs.sample_pairs(index, seed=0, step=8, n=500))
    assert not np.array_equal(a, dso_pairs.sample_pairs(index, seed=1, step=7, n=500))
    assert set(a[:, 0].tolist()) == {0, 2}  # object 1 has no unstable latent
    assert set(a[:, 1].tolist()) == {0, 1, 2}  # every view is drawn
    for rec, _, win, lose in a:
        assert angles[rec][win] < 20.0 <= angles[rec][lose]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    records = synthetic.make_records(num_objects=5, views=2, latents_per_view=3, **SHAPES)
    path = synthetic.write_tfds(str(tmp_path_factory.mktemp("ds")), records)
    return path, records


def _source(path, **kw):
    args = dict(threshold=20.0, seed=3, global_batch=4, grad_accum=2, cond_channels=8, latent_shape=(2, 4, 4, 4))
    args.update(kw)
    return dso_pairs.PairSource(path, **args)


def test_batches_hold_the_sampled_records(dataset):
    path, records = dataset
    src = _source(path)
    assert src.index.dropped == 1  # synthetic's last object is all-stable
    batch, rows = src.batch(5), src.pairs(5)
    assert batch["cond"].shape == (2, 4, 4, 8) and batch["x0_win"].shape == (2, 4, 2, 4, 4, 4)
    assert batch["cond"].dtype == tfds_dso.BF16
    for a, b in np.ndindex(rows.shape[:2]):
        rec, view, win, lose = rows[a, b]
        r = records[rec]
        assert np.array_equal(batch["cond"][a, b], r["cond"][view])
        assert np.array_equal(batch["x0_win"][a, b], r["latents"][win])
        assert np.array_equal(batch["x0_lose"][a, b], r["latents"][lose])
        assert r["angles"][win] < 20.0 <= r["angles"][lose]


def test_process_shares_tile_the_global_batch(dataset):
    path, _ = dataset
    whole = _source(path).batch(2)
    parts = [_source(path, process_index=p, process_count=2).batch(2) for p in range(2)]
    for k in whole:
        assert np.array_equal(whole[k], np.concatenate([p[k] for p in parts], axis=1))


def test_prefetched_iteration_equals_direct_batches(dataset):
    path, _ = dataset
    src = _source(path)
    got = list(src.iterate(3, 6, prefetch=2))
    assert [s for s, _ in got] == [3, 4, 5]
    for s, b in got:
        assert all(np.array_equal(b[k], src.batch(s)[k]) for k in b)


def test_shape_mismatch_names_the_dataset_and_shapes(dataset):
    path, _ = dataset
    with pytest.raises(ValueError, match=r"cond shape \(4, 8\), the model expects \(S, 16\)"):
        _source(path, cond_channels=16)
    with pytest.raises(ValueError, match=r"latent shape \(2, 4, 4, 4\), the model expects \(8, 4, 4, 4\)"):
        _source(path, latent_shape=(8, 4, 4, 4))


def test_missing_path_is_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dso_pairs TFDS dataset"):
        _source(str(tmp_path / "nowhere"))
