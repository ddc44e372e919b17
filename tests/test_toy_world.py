"""Toy world generators: determinism, splits, physical sanity, the stable/unstable mix and its ambiguity."""

import numpy as np
import pytest
from scipy import ndimage

from dso_jax.toy import condition as toy_condition
from dso_jax.toy import objects as toy


@pytest.fixture(scope="module")
def train():
    return toy.sample_objects(0, 600)


def _depth_key(occ):
    hit, depth = toy_condition.front_depth(occ)
    return np.asarray(hit).tobytes() + np.asarray(depth).tobytes()


def test_shapes_and_dtypes(train):
    assert train["occ"].shape == (600, 32, 32, 32) and train["occ"].dtype == bool
    assert train["kind"].shape == (600,) and train["kind"].dtype == np.int32
    assert train["stable"].dtype == bool and train["margin"].dtype == np.float32
    assert len(train["params"]) == 600
    assert set(np.unique(train["kind"])) == set(range(len(toy.KINDS)))


def test_deterministic_by_seed_and_prefix_stable(train):
    again = toy.sample_objects(0, 50)
    np.testing.assert_array_equal(again["occ"], train["occ"][:50])
    np.testing.assert_array_equal(again["kind"], train["kind"][:50])
    other = toy.sample_objects(1, 50)
    assert not np.array_equal(other["occ"], again["occ"])


def test_heldout_split_is_disjoint_by_condition(train):
    held = toy.sample_objects(0, 150, split="heldout")
    assert all(toy.split_of(p) == "heldout" for p in held["params"])
    assert all(toy.split_of(p) == "train" for p in train["params"])
    train_keys = {_depth_key(o) for o in train["occ"]}
    assert not any(_depth_key(o) in train_keys for o in held["occ"])
    with pytest.raises(ValueError):
        toy.sample_objects(0, 1, split="test")


def test_objects_are_one_piece_on_the_floor_inside_the_grid():
    rng = np.random.default_rng(3)
    for _ in range(150):
        p = toy.sample_params(rng)
        for q in (p, toy.stable_variant(p)):
            canvas = toy._draw(q, 32)
            assert not canvas.clipped, q
            assert canvas.occ[:, :, 0].any(), q
            assert ndimage.label(canvas.occ)[1] == 1, q


def test_static_stability_known_cases():
    occ = np.zeros((2, 32, 32, 32), dtype=bool)
    occ[0, 14:18, 14:18, 0:20] = True  # upright column: COM over its centre, 2 voxels from each edge
    occ[1, 14:18, 14:18, 0:12] = True  # column with a long arm at the top reaching +y
    occ[1, 14:18, 18:31, 10:12] = True
    st = toy.static_stability(occ)
    assert st["stable"].tolist() == [True, False]
    np.testing.assert_allclose(st["margin"][0], 2 / 32, atol=1e-6)
    np.testing.assert_allclose(st["com"][0], [0.0, 0.0, 10 / 32 - 0.5], atol=1e-6)
    assert st["margin"][1] < 0 and st["com"][1][1] > 2 / 32 and st["tilt"][1] > 20


def test_mix_of_stable_and_unstable_within_band(train):
    assert 0.4 <= train["stable"].mean() <= 0.6
    for k in range(len(toy.KINDS)):
        assert 0.3 <= train["stable"][train["kind"] == k].mean() <= 0.75, toy.KINDS[k]


def test_labels_are_clear_for_a_simulator(train):
    st = toy.static_stability(train["occ"][:200])
    np.testing.assert_allclose(st["margin"], train["margin"][:200])
    assert np.all(np.abs(train["margin"]) >= toy.MIN_MARGIN - 1e-6)
    assert np.all(st["tilt"][~st["stable"]] >= toy.MIN_TILT_DEG)


def test_condition_does_not_determine_stability(train):
    """Hidden resamples keep the front view bit for bit, yet most conditions have both labels."""
    rng = np.random.default_rng(0)
    both = []
    for i in range(40):
        c = toy.completions(train["params"][i], 8, rng)
        key = _depth_key(train["occ"][i])
        assert all(_depth_key(o) == key for o in c["occ"])
        both.append(c["stable"].any() and not c["stable"].all())
    assert np.mean(both) >= 0.85


def test_every_condition_has_a_stable_completion(train):
    for i in range(120):
        sv = toy.build(toy.stable_variant(train["params"][i]))
        assert toy.static_stability(sv)["margin"] >= toy.MIN_MARGIN, train["params"][i]
        assert _depth_key(sv) == _depth_key(train["occ"][i])


def test_other_resolution_rasterises_the_same_object():
    p = toy.sample_params(np.random.default_rng(5))
    o32, o64 = toy.build(p, 32), toy.build(p, 64)
    assert o64.shape == (64, 64, 64)
    assert abs(o64.sum() / (8 * o32.sum()) - 1) < 0.2
    assert toy.static_stability(o64)["stable"] == toy.static_stability(o32)["stable"]


def test_offline_dataset_layout():
    d = toy.make_dataset(0, 6, k=3)
    assert d["occ_bits"].shape == (6, 3, 32**3 // 8) and d["occ_bits"].dtype == np.uint8
    assert d["stable"].shape == (6, 3) and d["cond"].shape == (6, 64, 64)
    occ = toy.unpack_occ(d["occ_bits"])
    np.testing.assert_array_equal(occ[:, 0], toy.sample_objects(0, 6)["occ"])
    np.testing.assert_array_equal(toy.static_stability(occ)["stable"], d["stable"])
    np.testing.assert_allclose(d["cond"], toy_condition.tokens(occ[:, 1]))  # completions share the condition
