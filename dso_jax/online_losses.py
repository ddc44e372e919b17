"""The online trainer's objectives on labelled candidates: DRO, DPO, SFT and DiffusionNFT's ('nft').

Each is ``loss(apply_fn, base, overlay, old, batch, rng, cfg) -> (loss, metrics)``, pure and jittable, on
``batch``: cond (B, S, Cc), z (B, K, C, R, R, R) (the K candidates of each condition, the model's own
samples ``z_s``) and stable (B, K) bool. ``old`` is the old-policy overlay of the train state (``'nft'``;
None otherwise). A condition whose K candidates all agree carries no preference signal; every objective
masks it (dynamic sampling; ``dso_jax.online`` may also keep only the usable conditions for the update).

  DRO  every candidate, balanced per condition: stable ones weigh +1/n_stable, unstable ones
       -1/n_unstable, so each usable condition contributes ``mean L_stable - mean L_unstable``
       (DSO's ``mean(L_w - L_l)`` with all candidates instead of one pair); one t per condition.
  DPO  one (stable, unstable) pair per condition (the first of each) through :func:`dso_jax.losses.dpo_loss`.
  SFT  stable candidates only, weight 1/n_stable per condition.
  NFT  DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117), a forward-process objective that needs only the
       final samples: with one t per condition, x_t = (1 - t) z + t eps, target u = eps - z and
         v = v_theta(x_t) (gradient), v_old = v_old(x_t) and v_ref = v_base(x_t) (both stop-gradient),
         v+ = v_old + beta (v - v_old),  v- = v_old - beta (v - v_old)   (the implicit positive / negative policies),
         L± = mean (t (v± - u))^2 / sg(max(mean |t (v± - u)|, 1e-5))   (the x0-space error, adaptive weighting),
         r  = 1/2 + clip(A, ±c) / (2c), A = (R - mean_K R) / (std_K R + 1e-4) per condition (R = stable; Flow-GRPO's
              group-normalised advantage), c = ``nft.adv_clip``,
         loss = mean_usable [c / beta (r L+ + (1 - r) L-)] + kl_weight mean ||v - v_ref||^2.
       Expanding the squares, ``r L+ + (1 - r) L-`` (unit weights) is ``||v_old - u||^2 + beta^2 ||v - v_old||^2 +
       2 beta (2r - 1) <v - v_old, v_old - u>``: a balanced push of the stable candidates' velocity towards their
       target and of the unstable ones' away (sum_K A = 0, like DRO), plus a trust region to the old policy that
       bounds the objective below (DRO's is unbounded); the last term anchors to the frozen base.
"""

from __future__ import annotations

from typing import Callable, Dict

import jax
import jax.numpy as jnp

from dso_jax import lora, losses
from dso_jax.flow import TIME_SCALE, noisy_latent, normal, sample_t, velocity_target

ApplyFn = Callable[..., jax.Array]
Metrics = Dict[str, jax.Array]
ADV_EPS = 1e-4  # Flow-GRPO's per-prompt std floor: A = (R - mean) / (std + 1e-4)
WEIGHT_FLOOR = 1e-5  # DiffusionNFT's floor of the adaptive weight


# ------------------------------------------------------------------------------------------------
# Labels -> weights
# ------------------------------------------------------------------------------------------------


def usable(stable) -> jax.Array:
    """(B, K) bool -> (B,) bool: the condition has both a stable and an unstable candidate."""
    stable = stable.astype(bool)
    return jnp.any(stable, axis=1) & jnp.any(~stable, axis=1)


def candidate_weights(stable):
    """(B, K) bool -> signed weights (B, K) and usable (B,): +1/n_s on stable, -1/n_u on unstable."""
    stable = stable.astype(bool)
    k = stable.shape[1]
    n_s = jnp.sum(stable, axis=1, keepdims=True).astype(jnp.float32)
    n_u = k - n_s
    ok = usable(stable)
    w = jnp.where(stable, 1.0 / jnp.maximum(n_s, 1.0), -1.0 / jnp.maximum(n_u, 1.0))
    return w * ok[:, None], ok


def group_advantages(stable):
    """(B, K) bool -> advantages (B, K) float32 and usable (B,): ``(R - mean_K R) / (std_K R + 1e-4)`` with
    R = 1 for stable, 0 for unstable and the population std over each condition's K candidates (Flow-GRPO's
    per-prompt normalisation). A condition whose candidates all agree gets A = 0."""
    reward = stable.astype(jnp.float32)
    mean = jnp.mean(reward, axis=1, keepdims=True)
    std = jnp.std(reward, axis=1, keepdims=True)
    return (reward - mean) / (std + ADV_EPS), usable(stable)


def first_pair(z, stable):
    """One (winner, loser) per condition: the first stable and first unstable candidate; weight = usable."""
    stable = stable.astype(bool)
    b = z.shape[0]
    iw, il = jnp.argmax(stable, axis=1), jnp.argmax(~stable, axis=1)
    rows = jnp.arange(b)
    return z[rows, iw], z[rows, il], usable(stable).astype(jnp.float32)


def _flat_inputs(batch, rng, cfg):
    """One t per condition (shared by its K candidates), fresh eps per candidate: x0, cond, t, eps of B K rows."""
    z, cond = batch["z"], batch["cond"]
    b, k = batch["stable"].shape
    k_t, k_eps = jax.random.split(rng)
    t = jnp.repeat(sample_t(k_t, (b,), cfg.flow.t_mu, cfg.flow.t_sigma), k)  # (B K,)
    x0 = z.reshape((b * k,) + z.shape[2:]).astype(jnp.float32)  # (B K, C, R, R, R)
    eps = normal(k_eps, x0.shape)
    return x0, jnp.repeat(cond, k, axis=0), t, eps


# ------------------------------------------------------------------------------------------------
# DSO's objectives on candidates
# ------------------------------------------------------------------------------------------------


def candidate_loss(apply_fn, base, overlay, old, batch, rng, cfg, *, kind: str):
    """DRO ('dro') or SFT ('sft') over all K candidates of each condition (see the module docstring)."""
    del old
    stable = batch["stable"]
    b, k = stable.shape
    w, ok = candidate_weights(stable)
    if kind == "sft":
        w, ok = jnp.maximum(w, 0.0), jnp.any(stable, axis=1)
    x0, cond, t, eps = _flat_inputs(batch, rng, cfg)
    l = losses.flow_losses(apply_fn, lora.merge(base, overlay), x0, cond, t, eps).reshape(b, k)
    loss = jnp.sum(w * l) / jnp.maximum(jnp.sum(ok), 1.0)
    stable_f = stable.astype(jnp.float32)
    metrics = {
        "loss": loss,
        "loss_win": jnp.sum(stable_f * l) / jnp.maximum(jnp.sum(stable_f), 1.0),
        "loss_lose": jnp.sum((1 - stable_f) * l) / jnp.maximum(jnp.sum(1 - stable_f), 1.0),
        "t_mean": jnp.mean(t),
    }
    return loss, metrics


def pair_dpo_loss(apply_fn, base, overlay, old, batch, rng, cfg):
    """DSO's Diffusion-DPO on the first (stable, unstable) pair of each condition, uniform conditions masked."""
    del old
    x0_w, x0_l, weight = first_pair(batch["z"], batch["stable"])
    pairs = {"cond": batch["cond"], "x0_win": x0_w, "x0_lose": x0_l, "weight": weight}
    return losses.dpo_loss(apply_fn, base, overlay, pairs, rng, cfg)


# ------------------------------------------------------------------------------------------------
# DiffusionNFT
# ------------------------------------------------------------------------------------------------


def nft_objective(v, v_old, v_ref, target, t, r, mask, nft_cfg):
    """The NFT loss of velocities (N, ...) at one x_t each: ``(loss, metrics)`` (formula in the module docstring).

    v: the trained policy's velocity; v_old / v_ref: the old policy's and the frozen base's (stop-gradient
    here, so a caller cannot leak gradient into them); target (N, ...): eps - x0; t, r, mask: (N,).
    """
    beta, clip = nft_cfg.beta, nft_cfg.adv_clip
    v = v.astype(jnp.float32)
    v_old = jax.lax.stop_gradient(v_old.astype(jnp.float32))
    v_ref = jax.lax.stop_gradient(v_ref.astype(jnp.float32))
    axes = tuple(range(1, v.ndim))
    tb = t.reshape((-1,) + (1,) * (v.ndim - 1))
    delta = v - v_old

    def x0_loss(v_pm):  # (N,): the x0-space error of x0_pred = x_t - t v_pm, adaptively weighted
        err = tb * (v_pm - target)  # = x0 - x0_pred
        sq = jnp.mean(jnp.square(err), axis=axes)
        if not nft_cfg.adaptive_weight:
            return sq
        return sq / jax.lax.stop_gradient(jnp.maximum(jnp.mean(jnp.abs(err), axis=axes), WEIGHT_FLOOR))

    l_pos, l_neg = x0_loss(v_old + beta * delta), x0_loss(v_old - beta * delta)
    per = (clip / beta) * (r * l_pos + (1.0 - r) * l_neg)  # (N,)
    mask = mask.astype(jnp.float32)
    policy = jnp.sum(mask * per) / jnp.maximum(jnp.sum(mask), 1.0)
    kl = jnp.mean(jnp.square(v - v_ref), axis=axes)  # (N,)
    loss = policy + nft_cfg.kl_weight * jnp.mean(kl)
    metrics = {
        "loss": loss,
        "policy_loss": policy,
        "kl": jnp.mean(kl),  # ||v - v_base||^2: the drift from the frozen base
        "old_kl": jnp.mean(jnp.square(v_old - v_ref)),
        "old_deviate": jnp.mean(jnp.square(delta)),  # ||v - v_old||^2: the move within this round
    }
    return loss, metrics


def nft_rewards(stable, adv_clip: float):
    """(B, K) bool -> r (B, K) in [0, 1] (``1/2 + clip(A, ±c) / (2c)``) and usable (B,)."""
    adv, ok = group_advantages(stable)
    return 0.5 + jnp.clip(adv, -adv_clip, adv_clip) / (2.0 * adv_clip), ok


def nft_loss(apply_fn, base, overlay, old, batch, rng, cfg):
    """DiffusionNFT on the candidates (module docstring); ``old`` is the old-policy overlay (stop-gradient)."""
    stable = batch["stable"]
    b, k = stable.shape
    r, ok = nft_rewards(stable, cfg.nft.adv_clip)
    x0, cond, t, eps = _flat_inputs(batch, rng, cfg)
    x_t, target, tt = noisy_latent(x0, eps, t), velocity_target(x0, eps), TIME_SCALE * t
    v = apply_fn(lora.merge(base, overlay), x_t, tt, cond)
    v_old = apply_fn(lora.merge(base, jax.lax.stop_gradient(old)), x_t, tt, cond)
    v_ref = apply_fn(base, x_t, tt, cond) if cfg.nft.kl_weight else v  # no anchor: the base pass is skipped
    loss, metrics = nft_objective(v, v_old, v_ref, target, t, r.reshape(-1), jnp.repeat(ok, k), cfg.nft)
    metrics["t_mean"] = jnp.mean(t)
    return loss, metrics


def online_loss(name: str):
    """The objective of ``config.loss`` on a labelled candidate batch (signature in the module docstring)."""
    if name in ("dro", "sft"):
        return lambda *a: candidate_loss(*a, kind=name)
    fns = {"dpo": pair_dpo_loss, "nft": nft_loss}
    if name not in fns:
        raise ValueError(f"config.loss must be one of {list(losses.ONLINE_LOSSES)}, got {name!r}")
    return fns[name]
