"""Every config key of dso_jax training, declared once.

``dro.py``, ``dpo.py`` and ``sft.py`` start from :func:`get_config` and change values only; the
``:tiny`` variant (:func:`apply_tiny`) shrinks the model and data so the trainer runs on a CPU.
Defaults are DSO's (``dso.md`` §4): AdamW lr 5e-6, wd 0.01, 2000 warmup steps then constant,
grad clip 1.0, 6 pairs x 2 accumulation per device, LoRA r 64 / alpha 128, logit-normal t (1, 1).
"""

from __future__ import annotations

import json
import os

import ml_collections

from dso_jax import lora, sampling
from dso_jax.convert import trellis
from dso_jax.physics.metrics import STABLE_THRESHOLD_DEG
from dso_jax.toy import codec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# TRELLIS's released stage-1 json args (trellis.md §2.1, §3.1), defined once in dso_jax.convert.trellis.
TRELLIS_SS_FLOW_ARGS = trellis.RELEASED_FLOW_ARGS
TRELLIS_SS_DEC_ARGS = trellis.RELEASED_DECODER_ARGS
DINO_TOKENS = 1374  # 1 CLS + 4 registers + 37 x 37 patches


def physics_defaults() -> ml_collections.ConfigDict:
    """``dso_jax.physics.rollout.default_sim_config()``, imported when a config is built, not when it is imported."""
    from dso_jax.physics import rollout

    return rollout.default_sim_config()


def get_config() -> ml_collections.ConfigDict:
    """The full key set with DSO's DRO values; the loss configs override what differs."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mode = "offline"  # 'offline': labelled pairs from a dataset (DSO); 'online': in-step simulator (issue 5)
    c.loss = "dro"  # 'dro' | 'dpo' | 'sft' | 'nft' (DiffusionNFT: online mode only, dso_jax.online_losses)

    c.model = ml_collections.ConfigDict()
    c.model.name = "SparseStructureFlowModel"  # TRELLIS class name
    c.model.args = ml_collections.ConfigDict(TRELLIS_SS_FLOW_ARGS)
    c.model.path = ""  # '' = random init; else a converted folder or TRELLIS prefix for dso_jax.models.load_pretrained
    c.model.compute_dtype = "auto"  # 'auto' (bf16 on GPU/TPU, float32 on CPU) | 'float32' | 'bfloat16'
    # Rematerialise each block in the backward pass (TRELLIS's use_checkpoint). On: 12 latents x 4096
    # tokens x 24 blocks of saved activations would not fit the 0.5x-of-DSO memory budget (bench/RESULTS.md).
    c.model.remat = True
    # What a rematerialised block keeps for the backward pass (dso_jax.models.remat.POLICIES): 'nothing' recomputes
    # the whole block (TRELLIS's use_checkpoint); 'attention' keeps the attention kernels' outputs.
    c.model.remat_policy = "nothing"
    c.model.attn_impl = "auto"  # 'auto' | 'xla' | 'cudnn' | 'mgpu[:BQxBKVxSTEPS]' (dso_jax/models/attention.py)

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = lora.DSO_RANK
    c.lora.alpha = lora.DSO_ALPHA
    c.lora.targets = lora.DEFAULT_TARGETS

    c.optim = ml_collections.ConfigDict()
    c.optim.schedule = "constant_with_warmup"  # dso_jax.optim: diffusers' constant_with_warmup, as DSO
    c.optim.lr = 5e-6
    c.optim.warmup_steps = 2000  # linear 0 -> lr over this many optimizer steps, then constant
    c.optim.weight_decay = 0.01  # AdamW (decoupled), on the LoRA overlay only
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0  # global norm; 0 disables

    c.train = ml_collections.ConfigDict()
    c.train.steps = 4000  # optimizer steps
    c.train.batch_size = 6  # pairs per device per micro-batch
    c.train.grad_accum = 2  # micro-batches per optimizer step
    c.train.log_every = 10
    c.train.ckpt_every = 500
    c.train.keep_ckpts = 3
    c.train.peft_export = "full"  # beside each checkpoint: 'full' (DSO-style state dict) | 'lora' | 'none'

    c.flow = ml_collections.ConfigDict()
    c.flow.t_mu = 1.0
    c.flow.t_sigma = 1.0

    c.dpo = ml_collections.ConfigDict()
    c.dpo.beta = 500.0

    # DiffusionNFT (loss 'nft', online; the formula is dso_jax.online_losses'). Defaults: DiffusionNFT's
    # (github.com/NVlabs/DiffusionNFT, config/nft.py: beta 1, adv_clip_max 5, KL beta 1e-4, decay_type 1).
    c.nft = ml_collections.ConfigDict()
    c.nft.beta = 1.0  # v± = v_old ± beta (v - v_old); the trust region to the old policy weighs adv_clip * beta
    c.nft.adv_clip = 5.0  # group-normalised advantages clipped to ±adv_clip, then r = 1/2 + A / (2 adv_clip)
    c.nft.kl_weight = 1e-4  # the anchor to the frozen base: + kl_weight * mean ||v - v_base||^2 (0: no base pass)
    c.nft.adaptive_weight = True  # divide each candidate's x0-space error by its (stop-gradient) mean |error|
    c.nft.old_decay = 0.5  # the old policy after each sampling round: decay * old + (1 - decay) * overlay ...
    c.nft.old_decay_ramp = 500  # ... with decay rising linearly from 0 over this many optimizer steps (0: constant)

    c.data = ml_collections.ConfigDict()
    c.data.kind = "tfds"  # 'tfds': a dataset built by dso_jax.data.tfds_dso | 'synthetic': made in the workdir
    c.data.path = ""  # the TFDS dataset directory (or its data_dir)
    c.data.stable_threshold = STABLE_THRESHOLD_DEG  # degrees; stable iff angle < threshold (DSO's training label)
    c.data.prefetch = 2  # batches loaded ahead by a host thread
    c.data.workers = 4  # host threads reading records
    c.data.synthetic = ml_collections.ConfigDict()
    c.data.synthetic.num_objects = 16
    c.data.synthetic.views_per_object = 2
    c.data.synthetic.latents_per_view = 4
    c.data.synthetic.cond_len = DINO_TOKENS
    c.data.toy_pool_size = 1024  # online toy runs: training-split objects whose conditions are sampled per step
    # (online toy runs are evaluated on held-out conditions by dso_jax.toy.heldout: see the eval section)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = all devices not used by the other axis
    c.mesh.fsdp = 1
    c.mesh.distributed = False  # call jax.distributed.initialize() (multi-host)

    # Online mode (config.mode = "online"): the sampler of the fresh candidates, and how many per condition.
    c.sampler = ml_collections.ConfigDict(sampling.DSO_STAGE1.to_dict())  # steps, cfg_strength, cfg_interval, rescale_t

    c.online = ml_collections.ConfigDict()
    c.online.num_candidates = 4  # samples drawn per condition before labelling (train.batch_size conditions per device)
    c.online.updates_per_sample = 1  # optimizer steps per sampling round
    # Dynamic sampling: conditions whose candidates all agree are masked; with 0 < n < train.batch_size the
    # update keeps n of the train.batch_size sampled conditions per device, usable ones first (oversampling).
    c.online.update_conditions = 0
    # The training candidates' sampler steps (0: sampler.steps). Fewer steps make a round cheaper; the held-out
    # protocol always samples with ``sampler`` (so "before" and "after" stay comparable).
    c.online.sampler_steps = 0
    # The online step's and the held-out protocol's samplers draw this many latents at a time (0: all B·K at once;
    # ``batching.map_rows``, the same samples). On a CPU, chunks of 8 keep XLA's buffers in malloc's heap and in
    # cache instead of fresh page-faulted mmaps (bench/RESULTS.md, issue 15); on an accelerator leave 0.
    c.online.sample_rows = 0

    # Online mode decodes the sampled latents to occupancy before simulating them.
    c.decoder = ml_collections.ConfigDict()
    c.decoder.kind = "trellis"  # 'trellis': SparseStructureDecoder | 'toy_codec': the toy world's exact codec
    c.decoder.path = ""  # '' = random init of decoder.args; else a converted folder or TRELLIS prefix
    c.decoder.args = ml_collections.ConfigDict(TRELLIS_SS_DEC_ARGS)
    c.decoder.sim_upsample = 1  # the simulator sees the decoded grid upsampled this many times (nearest)

    # Held-out evaluation of online runs (before and after training): dso_jax.toy.heldout's protocol, whose
    # noise is fixed by (seed, num_conditions, batch).
    c.eval = ml_collections.ConfigDict()
    c.eval.seed = 1234  # held-out conditions and sampling noise
    c.eval.num_conditions = 64
    c.eval.num_candidates = 4  # samples per held-out condition
    c.eval.batch = 16  # conditions per candidates call
    c.eval.every = 0  # online: also evaluate held out every this many steps (metrics.jsonl heldout_*); 0 = never

    c.physics = physics_defaults()  # the occupancy path's defaults (K = 24; bench/RESULTS.md, Physics)
    return c


def apply_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A CPU-sized run: tiny DiT, synthetic data, a few dozen steps, a larger lr so the loss moves."""
    c.model.args = ml_collections.ConfigDict(
        dict(
            TRELLIS_SS_FLOW_ARGS,
            resolution=8,
            model_channels=32,
            cond_channels=16,
            num_blocks=2,
            num_heads=2,
            use_fp16=False,
        )
    )
    c.model.compute_dtype = "float32"
    c.model.remat = False
    c.lora.rank = 4
    c.lora.alpha = 8.0
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 5
    c.train.steps = 40
    c.train.batch_size = 4
    c.train.grad_accum = 2
    c.train.log_every = 5
    c.train.ckpt_every = 10
    c.train.keep_ckpts = 2
    c.data.kind = "synthetic"
    c.data.workers = 2
    c.data.synthetic.num_objects = 8
    c.data.synthetic.views_per_object = 2
    c.data.synthetic.latents_per_view = 3
    c.data.synthetic.cond_len = 8
    return c


def apply_toy(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The main job: online DSO on the toy world with the shipped toy model, on a 2-core CPU in minutes."""
    c.mode = "online"
    c.model.path = os.path.join(REPO, "ported_weights", "toy")
    # The architecture is the shipped model's own (its config.json), so config and weights cannot drift apart.
    with open(os.path.join(c.model.path, "config.json")) as f:
        c.model.args = ml_collections.ConfigDict(json.load(f)["args"])
    c.model.remat = False
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.optim.lr = 5e-4  # bench/RESULTS.md, main job: 1e-3 traded too much IoU for stability
    c.optim.warmup_steps = 10
    c.train.steps = 48
    c.train.batch_size = 6  # conditions per step (online)
    c.train.grad_accum = 1
    c.train.log_every = 4
    c.train.ckpt_every = 24
    c.train.keep_ckpts = 2
    c.data.kind = "toy"
    c.decoder.kind = "toy_codec"
    c.decoder.sim_upsample = codec.SIM_UPSAMPLE  # the toy world's physics grid (64³)
    c.sampler.update(sampling.TOY.to_dict())  # the toy model's recommended sampler
    c.online.num_candidates = 8
    c.online.updates_per_sample = 2
    c.eval.num_conditions = 48
    c.eval.num_candidates = 4
    c.eval.batch = 16
    return c


def apply_variants(c: ml_collections.ConfigDict, arg: str | None, variants: dict) -> ml_collections.ConfigDict:
    """Apply the ``:arg`` variants (comma-separated names of ``variants``, in order) and lock the key set."""
    for variant in [a for a in (arg or "").split(",") if a]:
        if variant not in variants:
            known = ", ".join(repr(v) for v in variants)
            raise ValueError(f"unknown config variant {variant!r} (known: {known})")
        variants[variant](c)
    c.lock()
    return c


def finalize(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """The DSO configs' variants: ``:tiny``, ``:toy``."""
    return apply_variants(c, arg, {"tiny": apply_tiny, "toy": apply_toy})
