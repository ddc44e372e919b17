"""DSO's fine-tuning objectives (``dso.md`` §3) as pure functions of (apply_fn, base, overlay, batch, rng, cfg).

Per pair b with shared time t_b and independent noises for winner and loser, the per-sample
flow-matching loss is ``L(x0) = mean_elements (v_theta(x_t, 1000 t, c) - (eps - x0))^2`` with
``x_t = (1 - t) x0 + t eps``. Then, over pairs,
  DRO: ``L_w - L_l``;
  DPO: ``-log sigmoid(-beta/2 [(L_w - L_l) - (L_w^ref - L_l^ref)])``, the reference being the base
       params without the overlay, evaluated on the same t and eps, with no gradient;
  SFT: ``L_w``.
The batch mean is ``sum(w l) / max(sum(w), 1)`` when ``batch['weight']`` (B,) masks pairs, else the
plain mean. Loss math is float32 whatever the model's compute dtype.

batch: ``cond`` (B, S, Cc), ``x0_win`` / ``x0_lose`` (B, C, D, H, W), optional ``weight`` (B,).
cfg: ``cfg.flow.t_mu``, ``cfg.flow.t_sigma``, and for DPO ``cfg.dpo.beta``.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp

from dso_jax import lora
from dso_jax.flow import TIME_SCALE, noisy_latent, normal, per_sample_mse, sample_t, velocity_target

ApplyFn = Callable[..., jax.Array]  # apply_fn(params, x (B,C,D,H,W), t (B,) in [0, 1000], cond (B,S,Cc)) -> v
Metrics = Dict[str, jax.Array]


def flow_losses(apply_fn: ApplyFn, params, x0, cond, t, eps, sigma_min: float = 0.0) -> jax.Array:
    """Per-sample flow-matching MSE; x0/eps (N, ...), t (N,), cond (N, S, Cc) -> (N,).

    DSO's convention with ``sigma_min = 0``; TRELLIS's pre-training (the toy model's) passes its 1e-5.
    """
    x0, eps, t = x0.astype(jnp.float32), eps.astype(jnp.float32), t.astype(jnp.float32)
    pred = apply_fn(params, noisy_latent(x0, eps, t, sigma_min), TIME_SCALE * t, cond)
    return per_sample_mse(pred, velocity_target(x0, eps, sigma_min))


def _mean(x, weight):
    if weight is None:
        return jnp.mean(x)
    weight = weight.astype(jnp.float32)
    return jnp.sum(weight * x) / jnp.maximum(jnp.sum(weight), 1.0)


def draw_noise(rng, batch, cfg, *, pairs: bool = True) -> Tuple[jax.Array, jax.Array]:
    """What the losses draw from ``rng``: t (B,), one per pair, and eps, one per element of the
    concatenated [win; lose] batch (2B, C, D, H, W), or of the winners only (B, ...) with ``pairs=False``."""
    x0_w = batch["x0_win"]
    b = x0_w.shape[0]
    k_t, k_eps = jax.random.split(rng)
    t = sample_t(k_t, (b,), cfg.flow.t_mu, cfg.flow.t_sigma)
    eps = normal(k_eps, ((2 if pairs else 1) * b,) + tuple(x0_w.shape[1:]))
    return t, eps


def _pair_inputs(batch, rng, cfg):
    """[win; lose] stacked to 2B with shared t and cond and independent eps (DSO's batch construction)."""
    x0_w, x0_l = batch["x0_win"], batch["x0_lose"]
    if x0_w.shape != x0_l.shape:
        raise ValueError(f"x0_win {x0_w.shape} and x0_lose {x0_l.shape} must have the same shape")
    t, eps = draw_noise(rng, batch, cfg)
    x0 = jnp.concatenate([x0_w, x0_l]).astype(jnp.float32)  # (2B, C, D, H, W)
    cond = jnp.concatenate([batch["cond"], batch["cond"]])  # (2B, S, Cc)
    return x0, jnp.concatenate([t, t]), cond, eps, t


def _pair_losses(apply_fn, params, x0, t2, cond, eps):
    losses = flow_losses(apply_fn, params, x0, cond, t2, eps)  # (2B,)
    b = x0.shape[0] // 2
    return losses[:b], losses[b:]


def _common_metrics(loss, l_w, l_l, t, w) -> Metrics:
    return {"loss": loss, "loss_win": _mean(l_w, w), "loss_lose": _mean(l_l, w), "t_mean": jnp.mean(t)}


def dro_loss(apply_fn: ApplyFn, base, overlay: lora.Overlay, batch, rng, cfg) -> Tuple[jax.Array, Metrics]:
    """DRO: mean over pairs of ``L_w - L_l`` (no reference, no beta)."""
    w = batch.get("weight")
    x0, t2, cond, eps, t = _pair_inputs(batch, rng, cfg)
    l_w, l_l = _pair_losses(apply_fn, lora.merge(base, overlay), x0, t2, cond, eps)
    loss = _mean(l_w - l_l, w)
    return loss, _common_metrics(loss, l_w, l_l, t, w)


def dpo_loss(apply_fn: ApplyFn, base, overlay: lora.Overlay, batch, rng, cfg) -> Tuple[jax.Array, Metrics]:
    """Diffusion-DPO as in DSO: ``softplus(beta/2 [(L_w - L_l) - (L_w^ref - L_l^ref)])`` averaged over pairs.

    The reference is ``base`` without the overlay on the same t and eps, under ``stop_gradient``.
    Metrics add the implicit-reward accuracy (fraction of pairs with positive reward margin) and margin.
    """
    beta = cfg.dpo.beta
    w = batch.get("weight")
    x0, t2, cond, eps, t = _pair_inputs(batch, rng, cfg)
    l_w, l_l = _pair_losses(apply_fn, lora.merge(base, overlay), x0, t2, cond, eps)
    r_w, r_l = _pair_losses(apply_fn, jax.lax.stop_gradient(base), x0, t2, cond, eps)
    r_w, r_l = jax.lax.stop_gradient(r_w), jax.lax.stop_gradient(r_l)
    margin = -0.5 * beta * ((l_w - l_l) - (r_w - r_l))  # DSO's inside_term, (B,)
    loss = _mean(-jax.nn.log_sigmoid(margin), w)
    metrics = _common_metrics(loss, l_w, l_l, t, w)
    metrics.update(
        ref_loss_win=_mean(r_w, w),
        ref_loss_lose=_mean(r_l, w),
        reward_accuracy=_mean((margin > 0).astype(jnp.float32), w),
        reward_margin=_mean(margin, w),
    )
    return loss, metrics


def sft_loss(apply_fn: ApplyFn, base, overlay: lora.Overlay, batch, rng, cfg) -> Tuple[jax.Array, Metrics]:
    """SFT baseline: plain flow matching on the winners only, ``mean_b L_w``."""
    w = batch.get("weight")
    x0 = batch["x0_win"].astype(jnp.float32)
    t, eps = draw_noise(rng, batch, cfg, pairs=False)
    l_w = flow_losses(apply_fn, lora.merge(base, overlay), x0, batch["cond"], t, eps)
    loss = _mean(l_w, w)
    return loss, {"loss": loss, "loss_win": loss, "t_mean": jnp.mean(t)}


LOSSES = {"dro": dro_loss, "dpo": dpo_loss, "sft": sft_loss}  # the offline trainer's, on labelled pairs
# The online trainer's, on labelled candidates (dso_jax.online_losses): DSO's three and DiffusionNFT's, whose
# train state carries an old-policy overlay (OLD_POLICY_LOSSES).
ONLINE_LOSSES = ("dro", "dpo", "sft", "nft")
OLD_POLICY_LOSSES = ("nft",)
