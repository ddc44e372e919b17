"""The online trainer: DSO with the simulator inside the step (sample -> decode -> simulate -> label -> update).

Per step, for B conditions the current policy (base ⊕ overlay, no gradient) draws K candidates each
with the jitted Euler sampler; they are decoded to occupancy and simulated (``dso_jax.candidates``); the
verdicts label the candidates, and the DRO / DPO / SFT update follows on those very latents (DSO trains on
the model's own samples ``z_s``). Shapes are static: conditions without a usable label set are masked,
never dropped. ``train_and_evaluate`` is the trainer around that step (``dso_jax.train_loop``'s run and loop,
conditions from the toy world's pool) with the toy held-out protocol before, during (``eval.every``) and
after training, ``summary.json`` and the figures.

Labels -> losses:
  DRO  every candidate, balanced per condition: stable ones weigh +1/n_stable, unstable ones
       -1/n_unstable, so each usable condition contributes ``mean L_stable - mean L_unstable``
       (DSO's ``mean(L_w - L_l)`` with all candidates instead of one pair); one t per condition.
  DPO  one (stable, unstable) pair per condition (the first of each), masked where none exists,
       through :func:`dso_jax.losses.dpo_loss`.
  SFT  stable candidates only, weight 1/n_stable per condition.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dso_jax import lora, losses, optim, sharding, summary, train_loop
from dso_jax.candidates import make_candidates_fn, policy_params
from dso_jax.flow import sample_t
from dso_jax.metrics_writer import read_rows
from dso_jax.models import pretrained
from dso_jax.toy import heldout, objects, render
from dso_jax.toy.pool import ConditionPool
from dso_jax.train_state import latent_shape

ONLINE_LOSSES = ("dro", "dpo", "sft")
FIGURES = ("stable_rate", "mean_angle", "iou")  # the held-out figures of summary.json and metrics.jsonl

# ------------------------------------------------------------------------------------------------
# The online objective on labelled candidates
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# The in-step loop
# ------------------------------------------------------------------------------------------------


def make_online_step(
    apply_fn, decode_fn, stability_fn, tx: optax.GradientTransformation, config, *, latent_shape, dtype, schedule
):
    """The pure step ``online_step(state, batch, base, dec_params) -> (state, metrics)``.

    ``batch['cond']`` (B, S, Cc) holds this step's conditions. ``state`` is a :class:`dso_jax.train_state.TrainState`.
    The sampled latents are reused for ``config.online.updates_per_sample`` optimizer updates
    (each with fresh t and noise); ``state.step`` counts optimizer updates.
    """
    candidates = make_candidates_fn(
        apply_fn, decode_fn, stability_fn, config.sampler, latent_shape, config.online.num_candidates
    )
    loss_fn = online_loss(config.loss)
    updates = config.online.updates_per_sample

    def online_step(state, batch, base, dec_params):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        k_roll, k_upd = jax.random.split(key)
        ro = candidates(policy_params(base, state.overlay, dtype), dec_params, batch["cond"], k_roll)
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


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------


def validate(config) -> None:
    """The online run's own checks, before anything is written."""
    if config.mode != "online":
        raise ValueError(f"dso_jax.online trains config.mode='online', got {config.mode!r} (scripts/train.py picks)")
    if config.data.kind != "toy":
        raise ValueError(f"mode='online' takes conditions from data.kind='toy', got {config.data.kind!r}")
    if config.loss not in ONLINE_LOSSES:
        raise ValueError(f"config.loss must be one of {list(ONLINE_LOSSES)}, got {config.loss!r}")
    if config.decoder.kind not in ("trellis", "toy_codec"):
        raise ValueError(f"decoder.kind must be 'trellis' or 'toy_codec', got {config.decoder.kind!r}")
    if config.decoder.kind == "trellis" and config.decoder.path and not os.path.exists(config.decoder.path):
        raise FileNotFoundError(f"decoder.path {config.decoder.path}: no such file or directory")
    per_round = config.online.updates_per_sample
    if per_round < 1 or config.train.steps % per_round:
        raise ValueError(
            f"train.steps {config.train.steps} must be a multiple of online.updates_per_sample {per_round} (>= 1)"
        )
    for key in ("online.num_candidates", "eval.num_conditions", "eval.num_candidates", "eval.batch"):
        section, name = key.split(".")
        if config[section][name] < 1:
            raise ValueError(f"{key} must be >= 1, got {config[section][name]}")
    if config.eval.every < 0:
        raise ValueError(f"eval.every must be >= 0 (0: never), got {config.eval.every}")


def make_decoder(dec_cfg, dtype, seed: int):
    """``(decode_fn(dec_params, z) -> logits (N, 1, D, D, D), dec_params)`` for ``decoder.kind``."""
    if dec_cfg.kind == "toy_codec":
        from dso_jax.toy import codec

        return codec.decoder_fn, {}
    if dec_cfg.kind != "trellis":
        raise ValueError(f"decoder.kind must be 'trellis' or 'toy_codec', got {dec_cfg.kind!r}")
    if dec_cfg.path:
        apply_dec, params = pretrained.load_pretrained(dec_cfg.path, dtype=dtype)
        return apply_dec, params
    module = pretrained.model_from_config("SparseStructureDecoder", dec_cfg.args.to_dict(), dtype=dtype)
    params = jax.jit(module.init)(jax.random.key(seed), *pretrained.example_inputs(module))["params"]
    return pretrained.make_apply_fn(module), params


def _protocol(config) -> dict:
    """What fixes a held-out evaluation (a cached "before" is reused only under the same protocol)."""
    keys = {k: config.eval[k] for k in ("seed", "num_conditions", "num_candidates", "batch")}
    return json.loads(
        json.dumps(
            {
                "eval": keys,
                "sampler": config.sampler.to_dict(),
                "physics": config.physics.to_dict(),
                "model": config.model.path,
                "decoder": config.decoder.to_dict(),
            },
            default=str,
        )
    )


def _save_figure(workdir: str, tag: str, held: dict, res: dict, title: str) -> None:
    """``generations_{tag}.png``: the first conditions, each with its conditioning view and its candidates."""
    rows = []
    for i in range(min(6, len(held["occ"]))):
        cells = [
            (
                res["occ"][i, j],
                f"candidate {j}: {render.angle_caption(res['angle'][i, j], res['stable'][i, j])}",
                bool(res["stable"][i, j]),
            )
            for j in range(res["occ"].shape[1])
        ]
        rows.append((held["occ"][i], f"condition {i} ({objects.KINDS[held['kind'][i]]})", cells))
    render.save_rows(os.path.join(workdir, f"generations_{tag}.png"), rows, title=title)


def _title(label: str, res: dict) -> str:
    s = res["summary"]
    n, k = res["stable"].shape
    return (
        f"{label}\nheld-out stable rate {s['stable_rate']:.3f}, IoU to the condition {s['iou']:.3f} "
        f"({n} conditions x {k} candidates; the first {min(6, n)} conditions shown)"
    )


def _finish(config, run, before: dict, after: dict) -> dict:
    """``summary.json``, the final table and ``stable_rate.png`` (process 0)."""
    rows = read_rows(run.workdir)
    train_rows = [r for r in rows if "stable_rate" in r]
    extra = {
        "loss": config.loss,
        "steps": config.train.steps,
        "eval_conditions": config.eval.num_conditions,
        "eval_candidates": config.eval.num_candidates,
    }
    curve = [r for r in rows if "heldout_stable_rate" in r]  # eval.every: the held-out trajectory
    if curve:
        extra["heldout_curve"] = curve
    out = summary.write_summary(run.workdir, before, after, run.seconds(), extra)
    summary.print_summary(out)
    if train_rows:
        summary.plot_curve(
            os.path.join(run.workdir, "stable_rate.png"),
            [r["step"] for r in train_rows],
            [r["stable_rate"] for r in train_rows],
            "stable rate of fresh samples",
            f"online {config.loss.upper()} (toy world)",
        )
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train online (resuming from ``workdir``), evaluate held out before and after; returns the summary.

    A finished job (every step checkpointed and ``summary.json`` written) is not evaluated again: its summary
    is printed and returned unchanged (remove ``summary.json`` to evaluate again).
    """
    validate(config)
    with train_loop.open_run(config, workdir) as run:
        summary_path = os.path.join(run.workdir, summary.SUMMARY_FILE)
        if run.start >= config.train.steps and os.path.exists(summary_path):
            with open(summary_path) as f:
                done = json.load(f)
            logging.info("%s: the job is finished (step %d); its summary stays as written", run.workdir, run.start)
            summary.print_summary(done)
            return done

        decode_fn, dec_params = make_decoder(config.decoder, run.dtype, config.seed)
        dec_params = jax.device_put(dec_params, sharding.replicated(run.mesh))
        from dso_jax.physics import rollout as physics

        stability_fn = physics.make_stability_fn(config.physics)
        shape = latent_shape(config.model.args)
        step = make_online_step(
            run.apply_fn,
            decode_fn,
            stability_fn,
            run.tx,
            config,
            latent_shape=shape,
            dtype=run.dtype,
            schedule=optim.lr_schedule(config.optim, config.train.steps),
        )
        run_step = train_loop.jit_step(run, step, batch_axis=0, extra=(dec_params,))

        # The held-out protocol (dso_jax.toy.heldout) before, every eval.every steps and after training.
        candidates = jax.jit(
            make_candidates_fn(run.apply_fn, decode_fn, stability_fn, config.sampler, shape, config.eval.num_candidates)
        )
        held = heldout.heldout_set(config.eval.seed, config.eval.num_conditions)

        def evaluate(overlay):
            params = policy_params(run.base, overlay, run.dtype)
            return heldout.evaluate(
                candidates, params, dec_params, held, seed=config.eval.seed, batch=config.eval.batch
            )

        before = _before(config, run, held, evaluate)
        logging.info("held-out before training: %s", before)

        source = ConditionPool(
            config.seed, run.global_batch, config.data.toy_pool_size, jax.process_index(), jax.process_count()
        )

        def on_every(done, state, writer):
            mid = evaluate(state.overlay)["summary"]
            writer.add_heldout(done, {k: mid[k] for k in FIGURES})

        train_loop.loop(
            run,
            source,
            run_step,
            batch_axis=0,
            per_round=config.online.updates_per_sample,
            every=config.eval.every,
            on_every=on_every,
        )
        res = evaluate(run.state.overlay)
        after = {k: res["summary"][k] for k in FIGURES}
        if not run.is_main:
            return after
        label = f"after {config.train.steps} steps of online {config.loss.upper()}"
        _save_figure(run.workdir, "after", held, res, _title(label, res))
        return _finish(config, run, before, after)


def _before(config, run, held, evaluate) -> dict:
    """The pretrained model's held-out figures: ``eval_before.json`` when made under the same protocol."""
    path = os.path.join(run.workdir, "eval_before.json")
    protocol = _protocol(config)
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("protocol") == protocol:
            return {k: cached[k] for k in FIGURES}
    res = evaluate(None)
    before = {k: res["summary"][k] for k in FIGURES}
    if run.is_main:
        _save_figure(run.workdir, "before", held, res, _title("before training (the pretrained model)", res))
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(before, protocol=protocol), f)
        os.replace(tmp, path)
    return before
