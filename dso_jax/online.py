"""The online trainer: DSO with the simulator inside the step (sample -> decode -> simulate -> label -> update).

Per step, for B conditions the sampling policy (base ⊕ overlay, no gradient; DiffusionNFT samples with its
old policy) draws K candidates each with the jitted Euler sampler; they are decoded to occupancy and
simulated (``dso_jax.candidates``); the verdicts label the candidates, and the update of ``config.loss``
(``dso_jax.online_losses``: DRO, DPO, SFT or NFT) follows on those very latents (DSO trains on the model's
own samples ``z_s``), ``online.updates_per_sample`` optimizer steps per round. Dynamic sampling with static
shapes: a condition whose candidates all agree is masked, and with ``online.update_conditions`` the update
keeps only that many of the sampled conditions, usable ones first. NFT's old policy then moves towards the
overlay (an EMA, ``nft.old_decay``), inside the same step. ``train_and_evaluate`` is the trainer around that
step (``dso_jax.train_loop``'s run and loop, conditions from the toy world's pool) with the toy held-out
protocol before, during (``eval.every``) and after training, ``summary.json`` and the figures.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dso_jax import losses, online_losses, optim, sharding, summary, train_loop
from dso_jax.candidates import make_candidates_fn, policy_params
from dso_jax.metrics_writer import read_rows
from dso_jax.models import pretrained
from dso_jax.toy import heldout, objects, render
from dso_jax.toy.pool import ConditionPool
from dso_jax.train_state import latent_shape

FIGURES = ("stable_rate", "mean_angle", "iou")  # the held-out figures of summary.json and metrics.jsonl

# ------------------------------------------------------------------------------------------------
# The in-step loop
# ------------------------------------------------------------------------------------------------


def old_decay(nft_cfg, step):
    """The old policy's EMA decay after ``step`` optimizer steps: linear from 0 to ``nft.old_decay`` over
    ``nft.old_decay_ramp`` steps, then constant (DiffusionNFT's ``return_decay`` without its flat phase)."""
    cap = jnp.float32(nft_cfg.old_decay)
    if nft_cfg.old_decay_ramp <= 0:
        return cap
    return jnp.minimum(cap, cap * jnp.asarray(step, jnp.float32) / nft_cfg.old_decay_ramp)


def train_sampler(config) -> ml_collections.ConfigDict:
    """The sampler of the training candidates: ``config.sampler`` with ``online.sampler_steps`` steps (0: its own)."""
    cfg = ml_collections.ConfigDict(config.sampler.to_dict())
    if config.online.sampler_steps:
        cfg.steps = config.online.sampler_steps
    return cfg


def keep_usable(batch: dict, n: int, key) -> dict:
    """The ``n`` conditions (rows of every (B, ...) array of ``batch``) an update keeps: the usable ones first
    (both labels among their candidates), in random order, then the others (static shapes)."""
    ok = online_losses.usable(batch["stable"]).astype(jnp.float32)
    idx = jnp.argsort(-(ok + 0.5 * jax.random.uniform(key, ok.shape)))[:n]
    return jax.tree.map(lambda x: x[idx], batch)


def make_online_step(
    apply_fn, decode_fn, stability_fn, tx: optax.GradientTransformation, config, *, latent_shape, dtype, schedule
):
    """The pure step ``online_step(state, batch, base, dec_params) -> (state, metrics)``.

    ``batch['cond']`` (B, S, Cc) holds this step's conditions. ``state`` is a :class:`dso_jax.train_state.TrainState`
    (with ``state.old`` for ``losses.OLD_POLICY_LOSSES``). The sampled latents are reused for
    ``config.online.updates_per_sample`` optimizer updates (each with fresh t and noise); ``state.step``
    counts optimizer updates.
    """
    candidates = make_candidates_fn(
        apply_fn,
        decode_fn,
        stability_fn,
        train_sampler(config),
        latent_shape,
        config.online.num_candidates,
        sim_upsample=config.decoder.sim_upsample,
        rows=config.online.sample_rows,
    )
    loss_fn = online_losses.online_loss(config.loss)
    updates = config.online.updates_per_sample
    with_old = config.loss in losses.OLD_POLICY_LOSSES
    keep_per_device, per_device = config.online.update_conditions, config.train.batch_size

    def online_step(state, batch, base, dec_params):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        k_roll, k_upd = jax.random.split(key)
        sampler = state.old if with_old else state.overlay
        ro = candidates(policy_params(base, sampler, dtype), dec_params, batch["cond"], k_roll)
        labelled = {"cond": batch["cond"], "z": jax.lax.stop_gradient(ro["z"]), "stable": ro["stable"]}
        b = labelled["stable"].shape[0]
        if 0 < keep_per_device < per_device:  # dynamic sampling: train on the usable conditions
            labelled = keep_usable(labelled, b * keep_per_device // per_device, jax.random.fold_in(k_roll, 1))
        old = state.old

        def loss(ov, r):
            return loss_fn(apply_fn, base, ov, old, labelled, r, config)

        grad_fn = jax.value_and_grad(loss, has_aux=True)

        def update(st, u):
            (_, m), g = grad_fn(st.overlay, jax.random.fold_in(k_upd, u))
            upd, opt_state = tx.update(g, st.opt_state, st.overlay)
            m.update(grad_norm=optax.global_norm(g), lr=schedule(st.step))
            return st.replace(step=st.step + 1, overlay=optax.apply_updates(st.overlay, upd), opt_state=opt_state), m

        state, m = jax.lax.scan(update, state, jnp.arange(updates))
        m = jax.tree.map(jnp.mean, m)
        if with_old:  # the old policy moves towards the overlay once per round
            d = old_decay(config.nft, state.step)
            state = state.replace(old=jax.tree.map(lambda o, n: d * o + (1.0 - d) * n, old, state.overlay))
            m["old_decay"] = d
        m.update(
            stable_rate=jnp.mean(ro["stable"].astype(jnp.float32)),
            mean_angle=jnp.mean(ro["angle"]),
            usable_frac=jnp.mean(online_losses.usable(ro["stable"]).astype(jnp.float32)),
            update_usable_frac=jnp.mean(online_losses.usable(labelled["stable"]).astype(jnp.float32)),
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
    if config.loss not in losses.ONLINE_LOSSES:
        raise ValueError(f"config.loss must be one of {list(losses.ONLINE_LOSSES)}, got {config.loss!r}")
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
    if not 0 <= config.online.update_conditions <= config.train.batch_size:
        raise ValueError(
            f"online.update_conditions must be in [0, train.batch_size = {config.train.batch_size}] (0: all), "
            f"got {config.online.update_conditions}"
        )
    if config.online.sample_rows < 0:
        raise ValueError(f"online.sample_rows must be >= 0 (0: all at once), got {config.online.sample_rows}")
    if config.online.sampler_steps < 0:
        raise ValueError(f"online.sampler_steps must be >= 0 (0: sampler.steps), got {config.online.sampler_steps}")
    if config.decoder.sim_upsample < 1:
        raise ValueError(f"decoder.sim_upsample must be >= 1, got {config.decoder.sim_upsample}")
    if config.loss == "nft":
        if config.nft.beta <= 0 or config.nft.adv_clip <= 0:
            raise ValueError(f"nft.beta and nft.adv_clip must be > 0, got {config.nft.beta}, {config.nft.adv_clip}")
        if not 0 <= config.nft.old_decay < 1:
            raise ValueError(f"nft.old_decay must be in [0, 1), got {config.nft.old_decay}")


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
                "sample_rows": config.online.sample_rows,
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
        held_steps = [0] + [r["step"] for r in curve] + [config.train.steps]
        held_rates = [before["stable_rate"]] + [r["heldout_stable_rate"] for r in curve] + [after["stable_rate"]]
        summary.plot_curve(
            os.path.join(run.workdir, "stable_rate.png"),
            [r["step"] for r in train_rows],
            [r["stable_rate"] for r in train_rows],
            "stable rate",
            f"online {config.loss.upper()} (toy world)",
            label="fresh samples (training conditions, the sampling policy)",
            more=[(held_steps, held_rates, f"held out ({config.eval.num_conditions} conditions, fixed noise)")],
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
            make_candidates_fn(
                run.apply_fn,
                decode_fn,
                stability_fn,
                config.sampler,
                shape,
                config.eval.num_candidates,
                sim_upsample=config.decoder.sim_upsample,
                rows=config.online.sample_rows,
            )
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
