"""Toy latent codec: exact round trip, TRELLIS's channel order, the decoder of online runs."""

import jax
import numpy as np

from dso_jax.models.ss_decoder import occupancy_from_logits
from dso_jax.toy import codec as toy_codec
from dso_jax.toy import objects as toy


def _occ(n=5):
    return toy.sample_objects(7, n)["occ"]


def test_round_trip_is_exact_batched_and_single():
    occ = _occ()
    z = toy_codec.encode(occ)
    assert z.shape == (5, 8, 16, 16, 16) and z.dtype == np.float32
    assert set(np.unique(np.asarray(z))) == {-1.0, 1.0}
    np.testing.assert_array_equal(np.asarray(toy_codec.decode(z) > 0), occ)
    np.testing.assert_array_equal(np.asarray(toy_codec.decode(toy_codec.encode(occ[0])) > 0), occ[0])
    np.testing.assert_array_equal(np.asarray(toy_codec.decode(z)), np.where(occ, 1.0, -1.0))


def test_scaled_variant_and_jit():
    occ = _occ(2)
    z = jax.jit(lambda o: toy_codec.encode(o, scale=0.5))(occ)
    assert set(np.unique(np.asarray(z))) == {-0.5, 0.5}
    np.testing.assert_array_equal(np.asarray(jax.jit(toy_codec.decode)(z) > 0), occ)


def test_channel_order_is_trellis_pixel_shuffle():
    """latent[4i + 2j + k, X, Y, Z] = occ[2X + i, 2Y + j, 2Z + k] (trellis.md §3.2, with one output channel)."""
    occ = _occ(1)[0]
    z = np.asarray(toy_codec.encode(occ))
    for i in range(2):
        for j in range(2):
            for k in range(2):
                np.testing.assert_array_equal(z[4 * i + 2 * j + k] > 0, occ[i::2, j::2, k::2])


def test_decoder_fn_reads_like_a_trellis_decoder():
    """The online runs' decoder: (N, 1, 32³) logits with TRELLIS's readout (occupied iff logit > 0)."""
    occ = _occ(2)
    logits = toy_codec.decoder_fn({}, toy_codec.encode(occ))
    assert logits.shape == (2, 1, 32, 32, 32) and logits.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(occupancy_from_logits(logits)), occ)
