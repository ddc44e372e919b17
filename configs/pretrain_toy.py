"""Pre-training of the toy world's stage-1 flow model (``ported_weights/toy``); every key declared once.

    python scripts/pretrain_toy.py --config configs/pretrain_toy.py --workdir runs/pretrain_toy --out ported_weights/toy

The shipped ``ported_weights/toy`` was made on one H100 with these defaults plus
``--config.train.workers=7 --config.train.max_seconds=370`` (its manifest has the exact command): 9490 steps
in 6 min 11 s, data-bound at ~28 steps/s. On a CPU the same run takes days; ``--config.train.steps`` and
``--config.data.batch_size`` scale it down (a 600-step, batch-32 CPU run of an earlier 64-channel model
sampled voxel noise).

Variants: ``:micro`` (a few steps of a tiny model, for tests). The model is TRELLIS's
``SparseStructureFlowModel`` at toy size: the codec's (8, 16, 16, 16) latent in 2³ patches (512 tokens) and
cross-attention to the 64 condition tokens of 64 channels of ``dso_jax.toy.condition``.
"""

import ml_collections

from configs import common
from dso_jax import sampling

TOY_SS_FLOW_ARGS = dict(
    resolution=16,
    in_channels=8,
    model_channels=128,  # 64 channels x 3 blocks reached only IoU 0.42 in the same time (bench/RESULTS.md)
    cond_channels=64,
    out_channels=8,
    num_blocks=2,
    num_heads=2,  # head_dim 64 as in TRELLIS
    mlp_ratio=4,
    patch_size=2,
    pe_mode="ape",
    qk_rms_norm=True,
    use_fp16=False,
)


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "SparseStructureFlowModel"
    c.model.args = ml_collections.ConfigDict(TOY_SS_FLOW_ARGS)
    c.model.init = "trellis"  # 'trellis' (trellis.md §2.8: zero adaLN and out_layer) | 'flax' (module defaults)

    c.data = ml_collections.ConfigDict()
    c.data.batch_size = 256  # objects per step, fresh from the train split (a function of (seed, step))
    c.data.latent_scale = 1.0  # the codec's ±scale

    c.flow = ml_collections.ConfigDict()  # TRELLIS's pre-training convention (trellis.md §6)
    c.flow.t_mu = 1.0
    c.flow.t_sigma = 1.0
    c.flow.sigma_min = 1e-5
    c.flow.p_uncond = 0.1  # the condition becomes zeros (neg_cond) with this probability

    c.optim = ml_collections.ConfigDict()
    c.optim.schedule = "warmup_cosine"  # dso_jax.optim
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 500
    c.optim.final_lr_frac = 0.05  # cosine decay from lr to lr * this at train.steps
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0
    c.optim.ema_decay = 0.999  # the exported weights are this EMA of the params; 0 exports the params

    c.train = ml_collections.ConfigDict()
    c.train.steps = 13000  # the shipped model: stopped by train.max_seconds = 370 at step 9490 on one H100
    c.train.log_every = 500
    c.train.workers = 0  # processes building batches ahead of the accelerator; 0 = one host thread
    c.train.max_seconds = 0.0  # stop (and export) after this much training wall time; 0 = run all steps
    c.train.eval_every = 0  # quick static-only held-out evaluation while training; 0 = never

    # The evaluation's sampler, also the main job's (configs/common.apply_toy): dso_jax.sampling.TOY.
    c.sampler = ml_collections.ConfigDict(sampling.TOY.to_dict())

    # The held-out protocol of dso_jax.toy.heldout (the main job's): noise fixed by (seed, conditions, batch).
    c.eval = ml_collections.ConfigDict()
    c.eval.seed = 1234  # held-out conditions and noise
    c.eval.num_conditions = 64  # 0 skips the final evaluation
    c.eval.num_candidates = 4  # samples per held-out condition
    c.eval.batch = 16  # conditions per candidates call
    c.eval.physics = "mjx"  # 'mjx' (the physics section's verdict, plus the static check) | 'static'
    c.eval.quick_conditions = 16  # conditions of the in-training evaluation (static check only)
    c.eval.render = 6  # conditions drawn into workdir/heldout_samples.png; 0 = none

    c.physics = common.physics_defaults()  # the MJX verdict of eval.physics = 'mjx' (dso_jax.physics.rollout)

    return common.apply_variants(c, arg, {"micro": apply_micro})


def apply_micro(c: ml_collections.ConfigDict) -> None:
    """A few steps of a tiny model, for tests."""
    c.model.args.model_channels = 32
    c.model.args.num_blocks = 1
    c.model.args.num_heads = 1
    c.data.batch_size = 4
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 2
    c.optim.ema_decay = 0.0
    c.train.steps = 12
    c.train.log_every = 4
    c.sampler.steps = 2
    c.eval.num_conditions = 2
    c.eval.num_candidates = 1
    c.eval.batch = 2
    c.eval.physics = "static"
    c.eval.render = 1
