"""``sampling.sample_slat`` vs a twin of TRELLIS's ``sample_slat`` (guidance-interval Euler sampler + denormalisation).

Same tiny random SLat flow on both sides (fp32), same noise: ``torch.manual_seed`` then ``torch.randn(M, 8)``
on the CPU over the pipeline's coords, as TRELLIS draws it. The Flax sampler batches the guided pair
into one 2B call (structure tiled inside the jit); the twin makes two calls. Tolerance: max |diff| <=
1e-4 x max |sample| (measured ~2e-6).
"""

import jax
import numpy as np
import pytest
import torch
from helpers_trellis import PIPELINE, TINY_SLAT_ARGS, slat_pair
from twins import slat_twin as st

from dso_jax import sparse
from dso_jax.sampling import DSO_STAGE2, SLAT_NORMALIZATION, SamplerSettings, sample_slat

torch.set_num_threads(2)
ARGS = {**TINY_SLAT_ARGS, "use_fp16": False}


@pytest.fixture(scope="module")
def models():
    apply_fn, params, twin = slat_pair(ARGS, seed=7)
    return apply_fn, params, twin.eval()


def noise_batch(counts, seed):
    coords = sparse.example_coords(counts, ARGS["resolution"], seed=seed)
    torch.manual_seed(seed)
    eps = torch.randn(len(coords), ARGS["in_channels"])
    x = sparse.from_trellis(
        coords, eps.numpy(), resolution=ARGS["resolution"], downsamples=1, quantum=512, coarse_quantum=128
    )
    return coords, eps, x


def test_normalization_is_pipeline_json():
    want = PIPELINE["args"]["slat_normalization"]
    assert {k: list(v) for k, v in SLAT_NORMALIZATION.items()} == want


@pytest.mark.parametrize(
    "settings,cond_batch",
    [(DSO_STAGE2, 1), (SamplerSettings(steps=5, cfg_strength=5.0, cfg_interval=(0.0, 1.0), rescale_t=1.0), 2)],
)
def test_sample_slat_matches_trellis_twin(models, settings, cond_batch):
    apply_fn, params, twin = models
    coords, eps, x = noise_batch((400, 250), seed=0)
    cond = torch.randn(cond_batch, 5, ARGS["cond_channels"])
    neg = torch.zeros_like(cond)
    normalization = PIPELINE["args"]["slat_normalization"]
    ref = st.sample_slat(
        twin, st.SparseTensor(eps, torch.from_numpy(coords)), cond, neg, normalization, **settings.to_dict()
    )
    run = jax.jit(lambda p, x, c, n: sample_slat(apply_fn, p, x, c, n, **settings.to_dict()))
    out = run(params, x, cond.numpy(), neg.numpy())
    out_coords, out_feats = sparse.to_trellis(out)
    np.testing.assert_array_equal(out_coords, ref.coords.numpy())
    ref = ref.feats.numpy()
    err, scale = np.max(np.abs(out_feats - ref)), np.max(np.abs(ref))
    print(f"sample_slat {settings}: max abs err {err:.3g}, scale {scale:.3g}, ratio {err / scale:.3g}")
    assert err <= 1e-4 * scale
    assert not np.asarray(out.feats)[~np.asarray(out.mask)].any()

    # One compiled sampler serves other objects of other sizes in the same (512, 128) buckets.
    _, _, other = noise_batch((90, 480), seed=1)
    assert np.isfinite(np.asarray(run(params, other, cond.numpy(), neg.numpy()).feats)).all()
    assert run._cache_size() == 1
