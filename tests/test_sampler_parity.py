"""``dso_jax.sampling.sample`` vs a twin of TRELLIS's ``FlowEulerGuidanceIntervalSampler`` (``trellis.md`` §5).

Same tiny random flow model (the Flax port and its PyTorch twin, fp32), same noise (drawn with
``torch.manual_seed`` + ``torch.randn`` on the CPU, as the pipeline does). The Flax sampler batches
the guided pair into one 2B call while the twin makes two calls, so agreement is to float rounding:
max |diff| <= 1e-5 x max |sample| (measured below 1e-6).
"""

import jax
import numpy as np
import pytest
import torch
from helpers_trellis import TINY_FLOW_ARGS, flow_pair
from twins import trellis_twin as tw

from dso_jax.sampling import sample

ARGS = {**TINY_FLOW_ARGS, "use_fp16": False}


@pytest.fixture(scope="module")
def models():
    apply_fn, params, twin = flow_pair(ARGS, seed=11)
    return apply_fn, params, twin.eval()


@pytest.mark.parametrize(
    "steps,rescale_t,cfg_strength,cfg_interval,cond_batch",
    [
        (12, 3.0, 7.5, (0.5, 1.0), 1),  # DSO / app settings; t_9 = 0.5 sits on the interval edge
        (25, 3.0, 5.0, (0.5, 1.0), 2),  # pipeline.json settings
        (6, 1.0, 3.0, (0.0, 1.0), 2),  # method defaults except steps: CFG on every step
    ],
)
def test_sampler_matches_trellis_twin(models, steps, rescale_t, cfg_strength, cfg_interval, cond_batch):
    apply_fn, params, twin = models
    r = ARGS["resolution"]
    torch.manual_seed(0)
    noise = torch.randn(2, ARGS["in_channels"], r, r, r)
    cond = torch.randn(cond_batch, 5, ARGS["cond_channels"])
    neg_cond = torch.zeros_like(cond)
    ref, _ = tw.FlowEulerGuidanceIntervalSampler(sigma_min=1e-5).sample(
        twin,
        noise,
        cond,
        neg_cond,
        steps=steps,
        rescale_t=rescale_t,
        cfg_strength=cfg_strength,
        cfg_interval=cfg_interval,
    )
    run = jax.jit(
        lambda p, x, c, n: sample(
            apply_fn, p, x, c, n, steps=steps, rescale_t=rescale_t, cfg_strength=cfg_strength, cfg_interval=cfg_interval
        )
    )
    out = np.asarray(run(params, noise.numpy(), cond.numpy(), neg_cond.numpy()))
    ref = ref.numpy()
    err, scale = np.max(np.abs(out - ref)), np.max(np.abs(ref))
    print(f"sampler steps={steps}: max abs err {err:.3g}, scale {scale:.3g}, ratio {err / scale:.3g}")
    assert err <= 1e-5 * scale


def test_default_neg_cond_is_zeros(models):
    apply_fn, params, twin = models
    r = ARGS["resolution"]
    torch.manual_seed(1)
    noise, cond = torch.randn(1, ARGS["in_channels"], r, r, r), torch.randn(1, 3, ARGS["cond_channels"])
    ref, _ = tw.FlowEulerGuidanceIntervalSampler(1e-5).sample(
        twin, noise, cond, torch.zeros_like(cond), steps=4, rescale_t=3.0, cfg_strength=7.5, cfg_interval=(0.5, 1.0)
    )
    out = np.asarray(
        sample(
            apply_fn,
            params,
            noise.numpy(),
            cond.numpy(),
            steps=4,
            rescale_t=3.0,
            cfg_strength=7.5,
            cfg_interval=(0.5, 1.0),
        )
    )
    assert np.max(np.abs(out - ref.numpy())) <= 1e-5 * np.max(np.abs(ref.numpy()))
