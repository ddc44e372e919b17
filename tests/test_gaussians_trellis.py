"""dso_jax.gaussians against TRELLIS's own decoder read-out and Gaussian class, from a fetched checkout (opt-in).

DSO_JAX_TRELLIS_SRC=/work/ext/TRELLIS pytest tests/test_gaussians_trellis.py
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from twins.trellis_gaussians import trellis_gaussians

from dso_jax import gaussians as gs

TRELLIS_SRC = os.environ.get("DSO_JAX_TRELLIS_SRC", "")
pytestmark = pytest.mark.skipif(not TRELLIS_SRC, reason="set DSO_JAX_TRELLIS_SRC to a TRELLIS checkout")


def test_gaussians_match_trellis_representation():
    rng = np.random.default_rng(0)
    keys = rng.choice(64**3, size=7, replace=False)
    coords = np.stack([np.array([1, 0, 1, 0, 0, 1, 0]), keys // 4096, keys // 64 % 64, keys % 64], 1)
    feats = (rng.normal(size=(7, 448)) * 2).astype(np.float32)
    cfg = gs.RELEASED_GS_CONFIG
    theirs = trellis_gaussians(TRELLIS_SRC)(coords, feats, cfg, cfg["resolution"])
    ours = gs.gaussians_from_decoder(coords, feats)
    np.testing.assert_allclose(gs.offset_perturbation(32, 1.5), theirs[0]["perturbation"], rtol=1e-6)
    assert len(ours) == len(theirs) == 2
    for o, t in zip(ours, theirs):
        for key in ("xyz", "features_dc", "scaling", "rotation", "opacity"):
            np.testing.assert_allclose(o[key], t[key], rtol=1e-5, atol=1e-6, err_msg=key)
