"""Pre-training the toy world's stage-1 flow model with TRELLIS's convention (``trellis.md`` §6).

The world (`toy.py`) replaces TRELLIS's data: each training example is one object of the train split,
its latent is `toy_codec.encode(occ)` (±1) and its condition `toy_condition.condition_tokens(occ)`.
The objective is TRELLIS's: ``x_t = (1 - t) x0 + (sigma_min + (1 - sigma_min) t) eps``, target
``(1 - sigma_min) eps - x0``, logit-normal t, the condition replaced by zeros with probability
``p_uncond`` (the unconditional input that classifier-free guidance subtracts), mean squared error.

Everything here is a pure function of arrays and an ``apply_fn(params, x, t, cond)``; this module does
not import the model classes (``dso_jax.pretrain_toy`` ties them together). The batch of step s depends
only on (seed, s), and the step's randomness is ``fold_in(key, step)``, so a run is a function of its seed.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dso_jax import flow
from dso_jax.data import toy, toy_codec, toy_condition, toy_metrics

ApplyFn = Callable[..., jax.Array]


# ------------------------------------------------------------------------------------------------ data


def model_inputs(occ, latent_scale: float = 1.0):
    """(B, 32³) occupancy -> x0 (B, 8, 16, 16, 16) and cond (B, 64, 64); jittable."""
    return toy_codec.encode(occ, latent_scale), toy_condition.condition_tokens(occ)


# ---------------------------------------------------------------------------------------------- init


def trellis_init(params: dict, key: jax.Array) -> dict:
    """TRELLIS's initialisation (``trellis.md`` §2.8) of a flow model's params: Xavier-uniform Linears
    with zero biases, N(0, 0.02) timestep-embedder Linears, zeroed ``adaLN_modulation`` and ``out_layer``.

    Norm scales and RMS gammas keep their ones; only 2-D ``kernel`` leaves and their biases change.
    """
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    out = {}
    for i, (name, value) in enumerate(sorted(flat.items())):
        parts = name.split("/")
        leaf, module = parts[-1], parts[:-1]
        k = jax.random.fold_in(key, i)
        if leaf not in ("kernel", "bias") or (leaf == "kernel" and value.ndim != 2):
            out[name] = value
        elif any(p == "out_layer" or p.startswith("adaLN_modulation") for p in module) or leaf == "bias":
            out[name] = jnp.zeros_like(value)
        elif "t_embedder" in module:
            out[name] = 0.02 * jax.random.normal(k, value.shape, value.dtype)
        else:
            out[name] = jax.nn.initializers.xavier_uniform()(k, value.shape, value.dtype)
    return flax.traverse_util.unflatten_dict(out, sep="/")


# ---------------------------------------------------------------------------------------- optimizer


def lr_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``lr``, then cosine decay to ``lr * final_lr_frac`` at ``total_steps``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim_cfg.lr,
        warmup_steps=optim_cfg.warmup_steps,
        decay_steps=max(total_steps, optim_cfg.warmup_steps + 1),
        end_value=optim_cfg.lr * optim_cfg.final_lr_frac,
    )


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (TRELLIS trains its flow models with AdamW and clipping)."""
    adamw = optax.adamw(
        lr_schedule(optim_cfg, total_steps),
        b1=optim_cfg.b1,
        b2=optim_cfg.b2,
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
    )
    return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), adamw) if optim_cfg.grad_clip > 0 else adamw


# ------------------------------------------------------------------------------------------ the step


@flax.struct.dataclass
class PretrainState:
    step: jax.Array  # () int32: optimizer steps done
    params: Any  # float32 master weights
    ema: Any  # exponential moving average of params (what is exported); equal to params if ema_decay = 0
    opt_state: Any
    rng: jax.Array  # (2,) uint32 key data of the run's base key


def flow_loss(apply_fn: ApplyFn, params, occ, key, flow_cfg, latent_scale: float):
    """TRELLIS's flow-matching loss on a batch of occupancies; returns (loss, metrics)."""
    x0, cond = model_inputs(occ, latent_scale)  # (B, 8, 16³), (B, L, C)
    b = x0.shape[0]
    k_t, k_eps, k_drop = jax.random.split(key, 3)
    keep = jax.random.uniform(k_drop, (b,)) >= flow_cfg.p_uncond
    cond = jnp.where(keep[:, None, None], cond, 0.0)  # neg_cond = zeros, as TRELLIS
    t = flow.sample_t(k_t, (b,), flow_cfg.t_mu, flow_cfg.t_sigma)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    x_t = flow.noisy_latent(x0, eps, t, flow_cfg.sigma_min)
    pred = apply_fn(params, x_t, flow.TIME_SCALE * t, cond)
    per = flow.per_sample_mse(pred, flow.velocity_target(x0, eps, flow_cfg.sigma_min))  # (B,)
    lo = t < 0.5
    metrics = dict(
        loss=jnp.mean(per),
        loss_t_lo=jnp.sum(jnp.where(lo, per, 0.0)) / jnp.maximum(jnp.sum(lo), 1),  # t < 0.5: the details
        loss_t_hi=jnp.sum(jnp.where(lo, 0.0, per)) / jnp.maximum(jnp.sum(~lo), 1),
    )
    return jnp.mean(per), metrics


def make_train_step(apply_fn: ApplyFn, tx: optax.GradientTransformation, config) -> Callable:
    """The pure ``train_step(state, occ) -> (state, metrics)``; occ (B, 32, 32, 32) bool, the step's objects."""
    schedule = lr_schedule(config.optim, config.train.steps)
    decay = float(config.optim.ema_decay)

    def train_step(state: PretrainState, occ) -> tuple[PretrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grad_fn = jax.value_and_grad(
            lambda p: flow_loss(apply_fn, p, occ, key, config.flow, config.data.latent_scale), has_aux=True
        )
        (_, metrics), grads = grad_fn(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params) if decay > 0 else params
        metrics.update(grad_norm=optax.global_norm(grads), lr=schedule(state.step))
        return state.replace(step=state.step + 1, params=params, ema=ema, opt_state=opt_state), metrics

    return train_step


# ---------------------------------------------------------------------------------------- evaluation


def world_reference(objs: dict, samples_per_condition: int, seed: int) -> dict:
    """What the world itself gives on these conditions: hidden resamples of each conditioning object,
    their static stable rate and their IoU to the conditioning object (the ceiling a faithful model nears)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 11]))
    occ = np.stack([toy.completions(p, samples_per_condition, rng)["occ"] for p in objs["params"]])  # (n, S, 32³)
    st = toy.static_stability(occ)
    iou = np.asarray(toy_metrics.iou_3d(occ, objs["occ"][:, None]))
    return dict(occ=occ, static_stable=st["stable"], iou=iou)


def occupancy_metrics(gen, ref) -> dict:
    """Per-object metrics of generations gen (n, S, 32³) against their conditioning objects ref (n, 32³):
    iou, front_iou, static stable / tilt, voxel count ratio; numpy arrays of shape (n, S)."""
    gen = np.asarray(gen, dtype=bool)
    ref = np.asarray(ref, dtype=bool)[:, None]
    st = toy.static_stability(gen)
    count = gen.sum(axis=(-3, -2, -1))
    return dict(
        iou=np.asarray(toy_metrics.iou_3d(gen, ref)),
        front_iou=np.asarray(toy_metrics.front_iou(gen, ref)),
        static_stable=st["stable"] & (count > 0),
        static_tilt=st["tilt"],
        voxel_ratio=count / np.maximum(ref.sum(axis=(-3, -2, -1)), 1),
    )
