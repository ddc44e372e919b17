"""Online DSO: sample -> decode -> simulate -> label -> update, all inside one jitted step.

Per step, for B conditions the current policy (base ⊕ overlay, no gradient) draws K candidates each
with the jitted Euler sampler; they are decoded to occupancy and simulated (the physics issue's
occupancy -> verdict function); the verdicts label the candidates, and the DRO / DPO / SFT update
follows on those very latents (DSO trains on the model's own samples ``z_s``). Shapes are static:
conditions without a usable label set are masked, never dropped.

Labels -> losses:
  DRO  every candidate, balanced per condition: stable ones weigh +1/n_stable, unstable ones
       -1/n_unstable, so each usable condition contributes ``mean L_stable - mean L_unstable``
       (DSO's ``mean(L_w - L_l)`` with all candidates instead of one pair); one t per condition.
  DPO  one (stable, unstable) pair per condition (the first of each), masked where none exists,
       through :func:`dso_jax.losses.dpo_loss`.
  SFT  stable candidates only, weight 1/n_stable per condition.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from dso_jax import lora, losses
from dso_jax.flow import sample_t
from dso_jax.models.layers import cast_block_weights
from dso_jax.models.ss_decoder import occupancy_from_logits
from dso_jax.sampling import sample_from_config

ApplyFn = Callable[..., jax.Array]
DecodeFn = Callable[..., jax.Array]  # decode_fn(dec_params, z (N, C, R, R, R)) -> logits (N, 1, D, D, D)
StabilityFn = Callable[[jax.Array], dict]  # occ (N, D, D, D) -> {'stable', 'angle', 'valid', ...} of (N,)


def policy_params(base, overlay, dtype):
    """base ⊕ overlay (``overlay=None``: the base alone) without gradient, block weights pre-cast to ``dtype``."""
    params = jax.lax.stop_gradient(base if overlay is None else lora.merge(base, overlay))
    return cast_block_weights(params, dtype)


def make_rollout_fn(
    apply_fn: ApplyFn, decode_fn: DecodeFn, stability_fn: StabilityFn, sampler_cfg, latent_shape, num_candidates: int
):
    """rollout(params, dec_params, cond (B, S, Cc), key) -> dict with z (B, K, ...), occ (B, K, D, D, D),
    stable / angle / valid (B, K); K = ``num_candidates``, params already merged."""
    k = num_candidates

    def rollout(params, dec_params, cond, key):
        b = cond.shape[0]
        cond_k = jnp.repeat(cond, k, axis=0)  # (B K, S, Cc), candidates of a condition adjacent
        noise = jax.random.normal(key, (b * k,) + tuple(latent_shape), jnp.float32)
        z = sample_from_config(apply_fn, params, noise, cond_k, sampler_cfg)  # (B K, C, R, R, R)
        occ = occupancy_from_logits(decode_fn(dec_params, z))  # (B K, D, D, D)
        verdict = stability_fn(occ)
        out = {
            "z": z.reshape((b, k) + z.shape[1:]),
            "occ": occ.reshape((b, k) + occ.shape[1:]),
            "stable": (verdict["stable"] & verdict["valid"]).reshape(b, k),
            "angle": verdict["angle"].reshape(b, k),
            "valid": verdict["valid"].reshape(b, k),
        }
        return out

    return rollout


def candidate_weights(stable):
    """(B, K) bool -> signed weights (B, K) and usable (B,): +1/n_s on stable, -1/n_u on unstable."""
    stable = stable.astype(bool)
    k = stable.shape[1]
    n_s = jnp.sum(stable, axis=1, keepdims=True).astype(jnp.float32)
    n_u = k - n_s
    usable = (n_s[:, 0] > 0) & (n_u[:, 0] > 0)
    w = jnp.where(stable, 1.0 / jnp.maximum(n_s, 1.0), -1.0 / jnp.maximum(n_u, 1.0))
    return w * usable[:, None], usable


def first_pair(z, stable):
    """One (winner, loser) per condition: the first stable and first unstable candidate; weight = usable."""
    stable = stable.astype(bool)
    b = z.shape[0]
    iw, il = jnp.argmax(stable, axis=1), jnp.argmax(~stable, axis=1)
    usable = jnp.any(stable, axis=1) & jnp.any(~stable, axis=1)
    rows = jnp.arange(b)
    return z[rows, iw], z[rows, il], usable.astype(jnp.float32)


def candidate_loss(apply_fn, base, overlay, batch, rng, cfg, *, kind: str):
    """DRO ('dro') or SFT ('sft') over all K candidates of each condition (see module docstring).

    batch: cond (B, S, Cc), z (B, K, C, R, R, R), stable (B, K).
    """
    z, cond, stable = batch["z"], batch["cond"], batch["stable"]
    b, k = stable.shape
    w, usable = candidate_weights(stable)
    if kind == "sft":
        w, usable = jnp.maximum(w, 0.0), jnp.any(stable, axis=1)
    k_t, k_eps = jax.random.split(rng)
    t = jnp.repeat(sample_t(k_t, (b,), cfg.flow.t_mu, cfg.flow.t_sigma), k)  # one t per condition
    x0 = z.reshape((b * k,) + z.shape[2:]).astype(jnp.float32)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    l = losses.flow_losses(apply_fn, lora.merge(base, overlay), x0, jnp.repeat(cond, k, axis=0), t, eps).reshape(b, k)
    n = jnp.maximum(jnp.sum(usable), 1.0)
    loss = jnp.sum(w * l) / n
    stable_f = stable.astype(jnp.float32)
    metrics = {
        "loss": loss,
        "loss_win": jnp.sum(stable_f * l) / jnp.maximum(jnp.sum(stable_f), 1.0),
        "loss_lose": jnp.sum((1 - stable_f) * l) / jnp.maximum(jnp.sum(1 - stable_f), 1.0),
        "t_mean": jnp.mean(t),
    }
    return loss, metrics


def online_loss(name: str):
    """The loss of ``config.loss`` on a labelled candidate batch."""
    if name in ("dro", "sft"):
        return lambda *a: candidate_loss(*a, kind=name)
    if name == "dpo":

        def dpo(apply_fn, base, overlay, batch, rng, cfg):
            x0_w, x0_l, weight = first_pair(batch["z"], batch["stable"])
            pairs = {"cond": batch["cond"], "x0_win": x0_w, "x0_lose": x0_l, "weight": weight}
            return losses.dpo_loss(apply_fn, base, overlay, pairs, rng, cfg)

        return dpo
    raise ValueError(f"config.loss must be 'dro', 'dpo' or 'sft', got {name!r}")


def make_online_step(
    apply_fn, decode_fn, stability_fn, tx: optax.GradientTransformation, config, *, latent_shape, dtype, schedule
):
    """The pure step ``online_step(state, batch, base, dec_params) -> (state, metrics)``.

    ``batch['cond']`` (B, S, Cc) holds this step's conditions. ``state`` is :class:`dso_jax.train.TrainState`.
    The sampled latents are reused for ``config.online.updates_per_sample`` optimizer updates
    (each with fresh t and noise); ``state.step`` counts optimizer updates.
    """
    rollout = make_rollout_fn(
        apply_fn, decode_fn, stability_fn, config.sampler, latent_shape, config.online.num_candidates
    )
    loss_fn = online_loss(config.loss)
    updates = config.online.updates_per_sample

    def online_step(state, batch, base, dec_params):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        k_roll, k_upd = jax.random.split(key)
        ro = rollout(policy_params(base, state.overlay, dtype), dec_params, batch["cond"], k_roll)
        labelled = {"cond": batch["cond"], "z": jax.lax.stop_gradient(ro["z"]), "stable": ro["stable"]}
        grad_fn = jax.value_and_grad(lambda ov, r: loss_fn(apply_fn, base, ov, labelled, r, config), has_aux=True)

        def update(st, u):
            (_, m), g = grad_fn(st.overlay, jax.random.fold_in(k_upd, u))
            upd, opt_state = tx.update(g, st.opt_state, st.overlay)
            m.update(grad_norm=optax.global_norm(g), lr=schedule(st.step))
            return st.replace(step=st.step + 1, overlay=optax.apply_updates(st.overlay, upd), opt_state=opt_state), m

        state, m = jax.lax.scan(update, state, jnp.arange(updates))
        m = jax.tree.map(jnp.mean, m)
        _, usable = candidate_weights(ro["stable"])
        m.update(
            stable_rate=jnp.mean(ro["stable"].astype(jnp.float32)),
            mean_angle=jnp.mean(ro["angle"]),
            usable_frac=jnp.mean(usable.astype(jnp.float32)),
            valid_frac=jnp.mean(ro["valid"].astype(jnp.float32)),
        )
        return state, m

    return online_step
