"""LoRA fine-tuning of TRELLIS's stage-1 flow model with DSO's objectives (DRO / DPO / SFT).

``train_and_evaluate(config, workdir)`` runs top to bottom: setup, model, optimizer and state
(restored from the workdir when a checkpoint exists), label source, the jitted step, the loop.

One optimizer step = ``train.grad_accum`` micro-batches of ``train.batch_size`` pairs per device,
split over every device of the ('data', 'fsdp') mesh; the gradient is the mean over all pairs.
The only trainable (and optimizer) pytree is the LoRA overlay; the frozen base weights are an
argument of the step. Randomness is ``fold_in(key, step)`` and the pairs of step ``s`` depend only
on ``(seed, s)``, so a resumed run replays an uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Iterator, Protocol

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from dso_jax import checkpoint, evaluation, lora, losses, online, sharding
from dso_jax.convert.verify import tree_diff
from dso_jax.data import dso_pairs, synthetic, tfds_dso, toy_conditions
from dso_jax.models import pretrained

# ------------------------------------------------------------------------------------------------
# State and step
# ------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # () int32: optimizer steps done
    overlay: lora.Overlay  # the trainable LoRA factors
    opt_state: Any
    rng: jax.Array  # (2,) uint32 raw key data of the run's base key


def compute_dtype(name: str):
    """'auto' -> bfloat16 on an accelerator, float32 on the CPU."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"model.compute_dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}")
    return jnp.dtype(name)


def lr_schedule(optim_cfg) -> optax.Schedule:
    """Linear 0 -> lr over ``warmup_steps`` optimizer steps, then constant (diffusers constant_with_warmup)."""
    if optim_cfg.warmup_steps <= 0:
        return optax.constant_schedule(optim_cfg.lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, optim_cfg.lr, optim_cfg.warmup_steps), optax.constant_schedule(optim_cfg.lr)],
        [optim_cfg.warmup_steps],
    )


def make_optimizer(optim_cfg) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (decoupled decay, as torch.optim.AdamW) on the overlay."""
    adamw = optax.adamw(
        lr_schedule(optim_cfg), b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay
    )
    if optim_cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), adamw)
    return adamw


def make_train_step(apply_fn: Callable, loss_fn: Callable, tx: optax.GradientTransformation, config) -> Callable:
    """The pure step ``train_step(state, batch, base) -> (state, metrics)``.

    ``batch`` arrays are (A, B, ...): A micro-batches accumulated in a ``lax.scan``. ``base`` is the
    frozen parameter tree (an argument, never optimizer state). Metrics are means over the step.
    """
    schedule = lr_schedule(config.optim)

    def train_step(state: TrainState, batch: dict, base) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grad_fn = jax.value_and_grad(lambda ov, mb, key: loss_fn(apply_fn, base, ov, mb, key, config), has_aux=True)
        zeros = jax.tree.map(jnp.zeros_like, state.overlay)

        def micro(grads, xs):
            i, mb = xs
            (_, metrics), g = grad_fn(state.overlay, mb, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, grads, g), metrics

        n = jax.tree.leaves(batch)[0].shape[0]
        grads, metrics = jax.lax.scan(micro, zeros, (jnp.arange(n), batch))
        grads = jax.tree.map(lambda g: g / n, grads)
        metrics = jax.tree.map(jnp.mean, metrics)
        updates, opt_state = tx.update(grads, state.opt_state, state.overlay)
        overlay = optax.apply_updates(state.overlay, updates)
        metrics.update(grad_norm=_global_norm(grads), update_norm=_global_norm(updates), lr=schedule(state.step))
        return state.replace(step=state.step + 1, overlay=overlay, opt_state=opt_state), metrics

    return train_step


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


# ------------------------------------------------------------------------------------------------
# Label sources
# ------------------------------------------------------------------------------------------------


class LabelSource(Protocol):
    """Where (cond, winner, loser) come from: a dataset now, the in-step simulator later (issue 5)."""

    def iterate(self, start: int, stop: int, prefetch: int) -> Iterator[tuple[int, dict]]:
        """``(step, host batch)`` for each step in [start, stop); batches (A, B_local, ...)."""

    def close(self) -> None: ...


def make_label_source(config, workdir: str, global_batch: int) -> LabelSource:
    if config.mode == "online":  # conditions only: the labels come from the simulator inside the step
        if config.data.kind != "toy":
            raise ValueError(f"mode='online' takes conditions from data.kind='toy', got {config.data.kind!r}")
        return toy_conditions.ToyConditionSource(
            config.seed, global_batch, config.data.toy_pool_size, jax.process_index(), jax.process_count()
        )
    if config.mode != "offline":
        raise ValueError(f"config.mode must be 'offline' or 'online', got {config.mode!r}")
    args = config.model.args
    path = config.data.path
    if config.data.kind == "synthetic":
        path = path or os.path.join(workdir, "data")
        if jax.process_index() == 0:
            try:
                tfds_dso.find_dataset_dir(path)
            except FileNotFoundError:
                synthetic.write_tfds(path, synthetic.records_from_config(config.data, args, config.seed))
        _sync("synthetic_data")
    elif config.data.kind != "tfds":
        raise ValueError(f"data.kind must be 'tfds' or 'synthetic', got {config.data.kind!r}")
    elif not path:
        raise ValueError("data.path is empty; set --config.data.path=<dataset dir> or data.kind='synthetic'")
    return dso_pairs.PairSource(
        path,
        threshold=config.data.stable_threshold,
        seed=config.seed,
        global_batch=global_batch,
        grad_accum=config.train.grad_accum,
        cond_channels=args.cond_channels,
        latent_shape=(args.in_channels,) + (args.resolution,) * 3,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        workers=config.data.workers,
    )


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------------------------
# Host-side metrics
# ------------------------------------------------------------------------------------------------


class MetricWriter:
    """TensorBoard event files and ``metrics.jsonl`` (process 0), interval means, the NaN/Inf guard."""

    def __init__(self, workdir: str, enabled: bool):
        self.writer = self.jsonl = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(workdir, "tb"))
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self.sums: dict = {}
        self.count = 0
        self.last: dict = {}

    def add(self, step: int, metrics: dict) -> None:
        """Check and accumulate the metrics of the update that brought the run to ``step``."""
        metrics = {k: float(v) for k, v in metrics.items()}
        bad = [k for k, v in metrics.items() if not np.isfinite(v)]
        if bad:
            raise FloatingPointError(f"step {step}: non-finite {', '.join(f'{k}={metrics[k]}' for k in bad)}; stopping")
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        self.last = metrics

    def flush(self, step: int, extra: dict) -> dict:
        means = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        means.update(extra)
        if self.writer is not None:
            for k, v in means.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.flush()
            self.jsonl.write(json.dumps({"step": step, **means}) + "\n")
            self.jsonl.flush()
        self.sums, self.count = {}, 0
        return means

    def add_heldout(self, step: int, metrics: dict) -> None:
        """Record a held-out evaluation made during training (``eval.every``) as ``heldout_*`` keys."""
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"heldout/{k}", float(v), step)
            self.writer.flush()
            self.jsonl.write(
                json.dumps({"step": step, **{f"heldout_{k}": float(v) for k, v in metrics.items()}}) + "\n"
            )
            self.jsonl.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.jsonl.close()


# ------------------------------------------------------------------------------------------------
# Online mode: decoder, evaluation
# ------------------------------------------------------------------------------------------------


def make_decoder(dec_cfg, dtype, seed: int):
    """``(decode_fn(dec_params, z) -> logits (N, 1, D, D, D), dec_params)`` for ``decoder.kind``."""
    if dec_cfg.kind == "toy_codec":
        from dso_jax.data import toy_codec

        return (lambda dp, z: toy_codec.decode(z)[:, None]), {}
    if dec_cfg.kind != "trellis":
        raise ValueError(f"decoder.kind must be 'trellis' or 'toy_codec', got {dec_cfg.kind!r}")
    if dec_cfg.path:
        apply_dec, params = pretrained.load_pretrained(dec_cfg.path, dtype=dtype)
        return apply_dec, params
    module = pretrained.model_from_config("SparseStructureDecoder", dec_cfg.args.to_dict(), dtype=dtype)
    params = jax.jit(module.init)(jax.random.key(seed), *pretrained.example_inputs(module))["params"]
    return pretrained.make_apply_fn(module), params


def _evaluate_online(config, workdir, rollout, held, base, overlay, dec_params, dtype, tag: str | None) -> dict:
    """Held-out stable rate / angle / IoU of base ⊕ overlay (``overlay=None``: the pretrained model) on
    ``held`` (`toy_conditions.heldout`); ``tag`` names the render ``generations_{tag}.png`` (None: no render)."""
    params = online.policy_params(base, overlay, dtype)
    res = evaluation.evaluate(
        rollout,
        params,
        dec_params,
        held["cond"],
        jax.random.key(config.eval.seed),
        batch=config.eval.batch,
        reference=held["occ"],
    )
    if tag is not None and jax.process_index() == 0:
        from dso_jax.data import toy_render

        n = min(6, len(held["occ"]))
        toy_render.save_objects(
            os.path.join(workdir, f"generations_{tag}.png"),
            res["occ"][:n],
            [f"{tag} {a:.0f} deg" for a in res["angle"][:n, 0]],
            res["stable"][:n, 0],
        )
    return res


def _finish_online(config, workdir, before, after, seconds) -> dict:
    steps, rates, heldout = [], [], []
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if "stable_rate" in row:
                    steps.append(row["step"])
                    rates.append(row["stable_rate"])
                elif "heldout_stable_rate" in row:  # eval.every: the held-out trajectory
                    heldout.append(row)
    extra = {
        "loss": config.loss,
        "steps": config.train.steps,
        "eval_conditions": config.eval.num_conditions,
        "eval_candidates": config.eval.num_candidates,
    }
    if heldout:
        extra["heldout_curve"] = heldout
    summary = evaluation.write_summary(workdir, before, after, seconds, extra)
    evaluation.print_summary(summary)
    if steps:
        evaluation.plot_curve(
            os.path.join(workdir, "stable_rate.png"),
            steps,
            rates,
            "stable rate of fresh samples",
            f"online {config.loss.upper()} (toy world)",
        )
    return summary


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (resuming from ``workdir`` when it holds a checkpoint); returns the last logged metrics."""
    # --- Setup -----------------------------------------------------------------------------------
    t_start = time.perf_counter()
    sharding.maybe_initialize_distributed(config.mesh)
    is_main = jax.process_index() == 0
    workdir = os.path.abspath(workdir)
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        _save_config(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    shards = sharding.num_batch_shards(mesh)
    global_batch = config.train.batch_size * shards
    if config.loss not in losses.LOSSES:
        raise ValueError(f"config.loss must be one of {sorted(losses.LOSSES)}, got {config.loss!r}")
    logging.info(
        "mesh %s; %d pairs per step (%d per device x %d accumulation x %d devices)",
        dict(mesh.shape),
        global_batch * config.train.grad_accum,
        config.train.batch_size,
        config.train.grad_accum,
        shards,
    )

    # --- Model: shapes first, then materialise sharded -------------------------------------------
    dtype = compute_dtype(config.model.compute_dtype)
    args = dict(config.model.args.to_dict(), use_checkpoint=config.model.remat)
    module = pretrained.model_from_config(config.model.name, args, dtype=dtype).clone(attn_impl=config.model.attn_impl)
    apply_fn = pretrained.make_apply_fn(module)
    abstract_base = pretrained.abstract_params(module)
    base_shardings = sharding.param_shardings(abstract_base, mesh)
    root_key = jax.random.key(config.seed)
    if config.model.path:
        _, loaded = pretrained.load_pretrained(config.model.path, dtype=dtype)
        # names every key / shape / dtype where the checkpoint and config.model.args disagree
        tree_diff(loaded, abstract_base, source=config.model.path, what="pretrained params vs config.model.args")
        base = jax.device_put(loaded, base_shardings)
        del loaded
    else:
        inputs = pretrained.example_inputs(module, cond_len=1)
        init = lambda key: module.init(key, *inputs)["params"]
        base = jax.jit(init, out_shardings=base_shardings)(jax.random.fold_in(root_key, 0))

    # --- Optimizer and state: init or restore ----------------------------------------------------
    tx = make_optimizer(config.optim)

    def init_state(key):
        overlay = lora.init_overlay(
            key, abstract_base, rank=config.lora.rank, alpha=config.lora.alpha, targets=tuple(config.lora.targets)
        )
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            overlay=overlay,
            opt_state=tx.init(overlay),
            rng=jax.random.key_data(jax.random.fold_in(root_key, 2)),
        )

    abstract_state = jax.eval_shape(init_state, jax.random.fold_in(root_key, 1))
    state_shardings = sharding.param_shardings(abstract_state, mesh)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_ckpts, peft_export=config.train.peft_export)
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(sharding.with_shardings(abstract_state, state_shardings))
        if int(meta["data_position"]) != int(state.step):
            raise ValueError(f"{ckpt.directory}: data position {meta['data_position']} != step {int(state.step)}")
        logging.info("resumed from %s at step %d", ckpt.directory, int(state.step))
    else:
        state = jax.jit(init_state, out_shardings=state_shardings)(jax.random.fold_in(root_key, 1))
    start = int(state.step)
    total = config.train.steps
    logging.info("LoRA overlay: %d trainable parameters", lora.count(abstract_state.overlay))

    # --- Label source -----------------------------------------------------------------------------
    source = make_label_source(config, workdir, global_batch)

    # --- The jitted step ---------------------------------------------------------------------------
    online_mode = config.mode == "online"
    if online_mode:  # sample -> decode -> simulate -> label -> update, one compiled step
        from dso_jax.physics import rollout as physics

        decode_fn, dec_params = make_decoder(config.decoder, dtype, config.seed)
        dec_params = jax.device_put(dec_params, sharding.replicated(mesh))
        stability_fn = physics.make_stability_fn(config.physics)
        latent_shape = (args["in_channels"],) + (args["resolution"],) * 3
        step = online.make_online_step(
            apply_fn,
            decode_fn,
            stability_fn,
            tx,
            config,
            latent_shape=latent_shape,
            dtype=dtype,
            schedule=lr_schedule(config.optim),
        )
        step_fn = jax.jit(
            step,
            in_shardings=(
                state_shardings,
                sharding.batch_sharding(mesh, batch_axis=0),
                base_shardings,
                sharding.replicated(mesh),
            ),
            out_shardings=(state_shardings, sharding.replicated(mesh)),
            donate_argnums=(0,),
        )
        run_step = lambda st, b: step_fn(st, b, base, dec_params)
        per_round = config.online.updates_per_sample
        if total % per_round or start % per_round:
            raise ValueError(
                f"train.steps {total} and the resume step {start} must be multiples of online.updates_per_sample {per_round}"
            )
        rollout = jax.jit(
            online.make_rollout_fn(
                apply_fn, decode_fn, stability_fn, config.sampler, latent_shape, config.eval.num_candidates
            )
        )
        held = toy_conditions.heldout(config.eval.seed, config.eval.num_conditions)  # before, eval.every, after
        before_path = os.path.join(workdir, "eval_before.json")
        if os.path.exists(before_path):
            with open(before_path) as f:
                before = json.load(f)
        else:
            before = _evaluate_online(config, workdir, rollout, held, base, None, dec_params, dtype, "before")
            before = {k: before[k] for k in ("stable_rate", "mean_angle", "iou")}
            if is_main:
                with open(before_path, "w") as f:
                    json.dump(before, f)
        logging.info("held-out before training: %s", before)
    else:
        step_fn = jax.jit(
            make_train_step(apply_fn, losses.LOSSES[config.loss], tx, config),
            in_shardings=(state_shardings, sharding.batch_sharding(mesh, batch_axis=1), base_shardings),
            out_shardings=(state_shardings, sharding.replicated(mesh)),
            donate_argnums=(0,),
        )
        run_step = lambda st, b: step_fn(st, b, base)
        per_round = 1

    # --- Loop ----------------------------------------------------------------------------------------
    writer = MetricWriter(workdir, enabled=is_main)
    pbar = tqdm.tqdm(total=total, initial=start, unit="step", disable=not is_main, dynamic_ncols=True)
    pending: list = []  # (step, device metrics): read one step late so the host never stalls the device
    summary: dict = {}
    t_log, steps_since_log = time.perf_counter(), 0

    def drain(keep: int) -> None:
        nonlocal summary, t_log, steps_since_log
        while len(pending) > keep:
            done, m = pending.pop(0)
            writer.add(done, jax.device_get(m))
            pbar.update(per_round)
            steps_since_log += per_round
            post = dict(loss=f"{writer.last['loss']:.4g}", lr=f"{writer.last['lr']:.3g}")
            if "stable_rate" in writer.last:
                post["stable"] = f"{writer.last['stable_rate']:.2f}"
            pbar.set_postfix(**post, refresh=False)
            if done % config.train.log_every < per_round or done == total:
                dt = time.perf_counter() - t_log
                rate = steps_since_log / max(dt, 1e-9)
                summary = writer.flush(
                    done, {"steps_per_sec": rate, "pairs_per_sec": rate * global_batch * config.train.grad_accum}
                )
                t_log, steps_since_log = time.perf_counter(), 0

    try:
        for rnd, host_batch in source.iterate(start // per_round, total // per_round, config.data.prefetch):
            batch = sharding.host_to_global(host_batch, mesh, batch_axis=0 if online_mode else 1)
            state, metrics = run_step(state, batch)
            done = (rnd + 1) * per_round
            pending.append((done, metrics))
            if online_mode and config.eval.every and done % config.eval.every < per_round and done < total:
                drain(keep=0)
                mid = _evaluate_online(config, workdir, rollout, held, base, state.overlay, dec_params, dtype, None)
                writer.add_heldout(done, {k: mid[k] for k in ("stable_rate", "mean_angle", "iou")})
            if done % config.train.ckpt_every < per_round or done == total:
                drain(keep=0)  # never checkpoint a state whose metrics were not checked
                ckpt.save(done, state, {"step": done, "data_position": done, "loss": config.loss, "seed": config.seed})
                ckpt.export_peft(done, base, state.overlay, module)
            else:
                drain(keep=1)
        drain(keep=0)
    finally:
        pbar.close()
        ckpt.close()
        writer.close()
        source.close()

    if is_main and summary:
        print("\nfinal metrics (mean over the last log interval):")
        for k in sorted(summary):
            print(f"  {k:18s} {summary[k]:.6g}")
    if online_mode:  # held-out evaluation of the trained overlay, summary.json and plots
        after = _evaluate_online(config, workdir, rollout, held, base, state.overlay, dec_params, dtype, "after")
        if is_main:
            summary = _finish_online(config, workdir, before, after, time.perf_counter() - t_start)
    return summary


def _save_config(config, workdir: str) -> None:
    """``config.json`` in the workdir; a resumed run with a different config keeps the old one aside."""
    path = os.path.join(workdir, "config.json")
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if old != text:
            logging.warning("config differs from %s; the previous one is kept as config.previous.json", path)
            os.replace(path, os.path.join(workdir, "config.previous.json"))
    with open(path, "w") as f:
        f.write(text)
