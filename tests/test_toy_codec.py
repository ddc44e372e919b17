"""Toy latent codec: exact round trip, TRELLIS's channel order, the 64³ upsampling."""

import jax
import numpy as np

from dso_jax.data import toy, toy_codec


def _occ(n=5):
    return toy.sample_objects(7, n)["occ"]


def test_round_trip_is_exact_batched_and_single():
    occ = _occ()
    z = toy_codec.encode(occ)
    assert z.shape == (5, 8, 16, 16, 16) and z.dtype == np.float32
    assert set(np.unique(np.asarray(z))) == {-1.0, 1.0}
    np.testing.assert_array_equal(np.asarray(toy_codec.occupancy(z)), occ)
    np.testing.assert_array_equal(np.asarray(toy_codec.occupancy(toy_codec.encode(occ[0]))), occ[0])
    np.testing.assert_array_equal(np.asarray(toy_codec.decode(z)), np.where(occ, 1.0, -1.0))


def test_scaled_variant_and_jit():
    occ = _occ(2)
    z = jax.jit(lambda o: toy_codec.encode(o, scale=0.5))(occ)
    assert set(np.unique(np.asarray(z))) == {-0.5, 0.5}
    np.testing.assert_array_equal(np.asarray(jax.jit(toy_codec.occupancy)(z)), occ)


def test_channel_order_is_trellis_pixel_shuffle():
    """latent[4i + 2j + k, X, Y, Z] = occ[2X + i, 2Y + j, 2Z + k] (trellis.md §3.2, with one output channel)."""
    occ = _occ(1)[0]
    z = np.asarray(toy_codec.encode(occ))
    for i in range(2):
        for j in range(2):
            for k in range(2):
                np.testing.assert_array_equal(z[4 * i + 2 * j + k] > 0, occ[i::2, j::2, k::2])


def test_decode_to_64_is_nearest_neighbour():
    occ = _occ(2)
    logits = toy_codec.decode_to_64(toy_codec.encode(occ))
    assert logits.shape == (2, 64, 64, 64) and logits.dtype == np.float32
    o64 = np.asarray(logits) > 0
    for a in range(2):
        for b in range(2):
            for c in range(2):
                np.testing.assert_array_equal(o64[:, a::2, b::2, c::2], occ)
