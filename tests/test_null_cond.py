"""The exact zero-condition shortcut: ``cond=None`` equals TRELLIS's all-zero ``neg_cond``, model and sampler.

With an all-zero context every cross-attention key is ``to_kv``'s key bias, so the softmax is uniform and every
query gets the value bias: the block's cross-attention output is ``to_out(value bias)``. Weights are random and
non-trivial (biases included: with zero biases the claim would hold trivially). Tolerance: fp32, 2e-5 of the
output scale (the shortcut skips a softmax average of identical values; measured ~1e-7).
"""

import jax
import jax.numpy as jnp
import numpy as np

from dso_jax import flow, sparse
from dso_jax.models import pretrained
from dso_jax.sampling import sample, sample_slat

TOL = 2e-5

FLOW_ARGS = dict(
    resolution=8, in_channels=8, out_channels=8, model_channels=64, cond_channels=32, num_blocks=2, num_heads=4,
    mlp_ratio=4, patch_size=1, pe_mode="ape", qk_rms_norm=True, use_fp16=False,
)  # fmt: skip
SLAT_ARGS = dict(
    resolution=16, in_channels=8, out_channels=8, model_channels=64, cond_channels=32, num_blocks=2, num_heads=4,
    mlp_ratio=4, patch_size=2, num_io_res_blocks=1, io_block_channels=[16], pe_mode="ape", qk_rms_norm=True,
    use_fp16=False,
)  # fmt: skip


def _model(name, args, seed=0):
    module = pretrained.model_from_config(name, args)
    apply_fn = jax.jit(pretrained.make_apply_fn(module))  # one compile per (shape, cond or None), not op by op
    return apply_fn, pretrained.random_params(pretrained.abstract_params(module), seed)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def test_ss_flow_none_cond_equals_zero_cond():
    apply_fn, params = _model("SparseStructureFlowModel", FLOW_ARGS)
    x = flow.normal(jax.random.PRNGKey(1), (2, 8, 8, 8, 8))
    t = jnp.array([900.0, 300.0])
    zeros = jnp.zeros((2, 11, 32))
    want = apply_fn(params, x, t, zeros)
    got = apply_fn(params, x, t, None)
    assert _rel(got, want) < TOL
    # and the zero condition is not a no-op: a real condition gives a different output
    assert _rel(apply_fn(params, x, t, jax.random.normal(jax.random.PRNGKey(2), (2, 11, 32))), want) > 1e-3


def test_sampler_shortcut_matches_batched_zero_cfg():
    apply_fn, params = _model("SparseStructureFlowModel", FLOW_ARGS)
    noise = flow.normal(jax.random.PRNGKey(3), (2, 8, 8, 8, 8))
    cond = jax.random.normal(jax.random.PRNGKey(4), (2, 11, 32))
    kw = dict(steps=4, rescale_t=3.0, cfg_strength=5.0, cfg_interval=(0.5, 1.0))
    fast = sample(apply_fn, params, noise, cond, **kw)
    slow = sample(apply_fn, params, noise, cond, null_cond=False, **kw)
    assert _rel(fast, slow) < TOL


def test_slat_flow_and_sampler_none_cond():
    apply_fn, params = _model("SLatFlowModel", SLAT_ARGS, seed=5)
    coords = sparse.example_coords([120, 70], 16, seed=0)
    feats = np.random.default_rng(0).standard_normal((len(coords), 8)).astype(np.float32)
    x = sparse.from_trellis(coords, feats, resolution=16, downsamples=1, quantum=128, coarse_quantum=64)
    t = jnp.array([800.0, 200.0])
    want = apply_fn(params, x, t, jnp.zeros((2, 7, 32))).feats
    assert _rel(apply_fn(params, x, t, None).feats, want) < TOL
    cond = jax.random.normal(jax.random.PRNGKey(6), (2, 7, 32))
    kw = dict(steps=3, rescale_t=3.0, cfg_strength=3.0, cfg_interval=(0.5, 1.0))
    fast = sample_slat(apply_fn, params, x, cond, **kw).feats
    slow = sample_slat(apply_fn, params, x, cond, null_cond=False, **kw).feats
    assert _rel(fast, slow) < TOL
