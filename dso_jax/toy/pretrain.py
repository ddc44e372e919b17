"""Pre-train the toy world's stage-1 flow model, export it as a converted folder, evaluate it held out.

The world (`objects`) replaces TRELLIS's data: each training example is one object of the train split, its
latent `codec.encode(occ)` (±1) and its condition `condition.condition_tokens(occ)`. The objective is
TRELLIS's (``trellis.md`` §6) through the shared ``dso_jax.losses.flow_losses``: ``sigma_min`` 1e-5,
logit-normal t, the condition replaced by zeros with probability ``p_uncond`` (the unconditional input that
classifier-free guidance subtracts). The optimizer is the shared ``dso_jax.optim`` one (warmup then cosine),
the metrics go through the shared ``dso_jax.metrics_writer``.

``pretrain_and_evaluate(config, workdir, out)`` runs top to bottom: model and init, the jitted step, the
loop (batches of step s are a function of (seed, s); a host thread or worker processes build them ahead of
the accelerator), export of the EMA weights to ``out`` in the converted-folder format that
``dso_jax.models.load_pretrained`` reads (``params.safetensors`` + ``config.json`` + ``manifest.json``),
then the held-out evaluation (``dso_jax.toy.heldout``, the main job's protocol) written into the manifest
and ``workdir/eval.json``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dso_jax import flow, losses, optim
from dso_jax import workdir as workdir_lib
from dso_jax.candidates import make_candidates_fn
from dso_jax.convert import trellis
from dso_jax.metrics_writer import MetricWriter
from dso_jax.models import pretrained
from dso_jax.toy import codec, condition, heldout, objects, render

MANIFEST_FORMAT = "dso_jax.toy_pretrained.v1"
PHYSICS = ("mjx", "static")

# ------------------------------------------------------------------------------------------------ model


def model_config(config) -> dict:
    """The TRELLIS-style json of the model: ``{"name": ..., "args": {...}}``."""
    return {"name": config.model.name, "args": config.model.args.to_dict()}


def build(config):
    """(apply_fn, module) of the configured flow model, computing in float32."""
    cfg = model_config(config)
    module = pretrained.model_from_config(cfg["name"], cfg["args"], dtype=jnp.float32)
    return pretrained.make_apply_fn(module), module


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


def init_params(module, config) -> dict:
    """The model's params for ``config.seed`` (Flax's init, then ``trellis_init`` if ``model.init='trellis'``),
    as one jitted program: Flax's init op by op compiled every primitive separately (10 s on 2 CPU cores)."""
    x, t, cond = pretrained.example_inputs(module, cond_len=1)

    def init(key):
        params = module.init(key, x, t, cond)["params"]
        if config.model.init == "trellis":
            params = trellis_init(params, jax.random.fold_in(key, 1))
        return params

    return jax.jit(init)(jax.random.PRNGKey(config.seed))


def num_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def validate(config) -> None:
    """The checks of the keys the run reads late, before anything is written."""
    if config.model.init not in ("trellis", "flax"):
        raise ValueError(f"model.init must be 'trellis' or 'flax', got {config.model.init!r}")
    if config.eval.physics not in PHYSICS:
        raise ValueError(f"eval.physics must be 'mjx' or 'static', got {config.eval.physics!r}")
    if config.optim.schedule not in optim.SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {list(optim.SCHEDULES)}, got {config.optim.schedule!r}")
    for key in ("train.steps", "train.log_every", "data.batch_size", "eval.batch", "eval.num_candidates"):
        section, name = key.split(".")
        if config[section][name] < 1:
            raise ValueError(f"{key} must be >= 1, got {config[section][name]}")


# ---------------------------------------------------------------------------------------------- the step


@flax.struct.dataclass
class PretrainState:
    step: jax.Array  # () int32: optimizer steps done
    params: Any  # float32 master weights
    ema: Any  # exponential moving average of params (what is exported); equal to params if ema_decay = 0
    opt_state: Any
    rng: jax.Array  # (2,) uint32 key data of the run's base key


def flow_loss(apply_fn: Callable, params, occ, key, flow_cfg, latent_scale: float):
    """TRELLIS's flow-matching loss on a batch of (B, 32³) occupancies; returns (loss, metrics)."""
    x0, cond = codec.encode(occ, latent_scale), condition.condition_tokens(occ)  # (B, 8, 16³), (B, L, C)
    b = x0.shape[0]
    k_t, k_eps, k_drop = jax.random.split(key, 3)
    keep = jax.random.uniform(k_drop, (b,)) >= flow_cfg.p_uncond
    cond = jnp.where(keep[:, None, None], cond, 0.0)  # neg_cond = zeros, as TRELLIS
    t = flow.sample_t(k_t, (b,), flow_cfg.t_mu, flow_cfg.t_sigma)
    eps = flow.normal(k_eps, x0.shape, jnp.float32)  # jax.random.normal drawn flat (fast to compile)
    per = losses.flow_losses(apply_fn, params, x0, cond, t, eps, flow_cfg.sigma_min)  # (B,)
    lo = t < 0.5
    metrics = dict(
        loss=jnp.mean(per),
        loss_t_lo=jnp.sum(jnp.where(lo, per, 0.0)) / jnp.maximum(jnp.sum(lo), 1),  # t < 0.5: the details
        loss_t_hi=jnp.sum(jnp.where(lo, 0.0, per)) / jnp.maximum(jnp.sum(~lo), 1),
    )
    return jnp.mean(per), metrics


def make_train_step(apply_fn: Callable, tx: optax.GradientTransformation, config) -> Callable:
    """The pure ``train_step(state, occ) -> (state, metrics)``; occ (B, 32, 32, 32) bool, the step's objects."""
    schedule = optim.lr_schedule(config.optim, config.train.steps)
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


# ----------------------------------------------------------------------------------------------- train


def train_batches(seed: int, batch_size: int, steps: int, workers: int):
    """Yield the (B, 32³) bool objects of steps 0 .. steps-1 in order (``objects.train_batch``), built ahead of
    the accelerator: by one host thread (``workers = 0``) or by ``workers`` spawned processes, each step's
    batch a function of (seed, step) either way, at most ``2·workers`` batches in flight."""
    if workers <= 0:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            nxt = pool.submit(objects.train_batch, seed, 0, batch_size)
            for step in range(steps):
                occ = nxt.result()
                if step + 1 < steps:
                    nxt = pool.submit(objects.train_batch, seed, step + 1, batch_size)
                yield occ
        return
    ctx = multiprocessing.get_context("spawn")  # never fork a process that holds an XLA client
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx)
    try:
        queue = collections.deque()
        submitted = 0
        for _ in range(steps):
            while submitted < steps and len(queue) < 2 * workers:
                queue.append(pool.submit(objects.train_batch, seed, submitted, batch_size, True))
                submitted += 1
            yield objects.unpack_occ(queue.popleft().result())
    finally:  # also when the consumer stops early (train.max_seconds)
        pool.shutdown(wait=True, cancel_futures=True)


def train(config, workdir: str, log=logging.info) -> tuple[dict, dict]:
    """Run ``config.train.steps`` optimizer steps; returns (EMA params as numpy, training record)."""
    apply_fn, module = build(config)
    params = init_params(module, config)
    tx = optim.make_optimizer(config.optim, config.train.steps)
    rng = jax.random.key_data(jax.random.fold_in(jax.random.PRNGKey(config.seed), 2))
    state = PretrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        rng=rng,
    )
    step_fn = jax.jit(make_train_step(apply_fn, tx, config), donate_argnums=(0,))
    log(f"toy pretraining: {num_params(params):,} params, {config.train.steps} steps of {config.data.batch_size}")

    os.makedirs(workdir, exist_ok=True)
    writer = MetricWriter(workdir, enabled=True)
    steps, max_s = config.train.steps, float(config.train.max_seconds)
    history, pending, stopped = [], [], None
    quick = None  # the in-training evaluation's candidates function, compiled once
    t_start = t_last = time.time()
    try:
        for step, occ in enumerate(train_batches(config.seed, config.data.batch_size, steps, config.train.workers)):
            state, metrics = step_fn(state, occ)
            pending.append(metrics)  # fetched at the next log line, so the host never waits on a step
            done = step + 1
            if max_s > 0 and time.time() - t_start >= max_s and done < steps:
                stopped = done
            if done % config.train.log_every == 0 or done == steps or stopped:
                for i, m in enumerate(jax.device_get(pending)):
                    writer.add(done - len(pending) + i + 1, m)
                count, pending = len(pending), []
                now = time.time()
                extra = {"steps_per_s": count / max(now - t_last, 1e-9), "elapsed_s": now - t_start}
                if config.train.eval_every and (done % config.train.eval_every == 0 or done == steps):
                    quick = quick or make_candidates(apply_fn, config, "static")
                    res = evaluate(apply_fn, state.ema, config, num_conditions=config.eval.quick_conditions,
                                   candidates=quick)  # fmt: skip
                    s = res["summary"]
                    extra.update({f"eval_{k}": v for k, v in s.items() if isinstance(v, (int, float))})
                    t_now = time.time()
                    extra["eval_s"] = t_now - now
                    now = t_now
                rec = {"step": done, **writer.flush(done, extra)}
                history.append(rec)
                log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
                t_last = now
            if stopped:
                log(f"toy pretraining: train.max_seconds={max_s:g} reached after {done} of {steps} steps; stopping")
                break
    finally:
        writer.close()
    ema = jax.tree.map(np.asarray, jax.device_get(state.ema))
    return ema, {
        "wall_s": time.time() - t_start,
        "history": history,
        "final": history[-1] if history else {},
        "steps_done": stopped or steps,
    }


# -------------------------------------------------------------------------------------------- evaluate


def make_candidates(apply_fn, config, physics: str):
    """The jitted candidates function of the held-out protocol: ``eval.num_candidates`` samples per
    condition with ``config.sampler``, the toy codec as decoder, MJX (``config.physics``, on the toy world's
    physics grid ``codec.SIM_UPSAMPLE``) or no simulator."""
    stability_fn = None
    if physics == "mjx":
        from dso_jax.physics import rollout

        stability_fn = rollout.make_stability_fn(config.physics)
    elif physics != "static":
        raise ValueError(f"eval.physics must be 'mjx' or 'static', got {physics!r}")
    fn = make_candidates_fn(
        apply_fn,
        codec.decoder_fn,
        stability_fn,
        config.sampler,
        codec.LATENT_SHAPE,
        config.eval.num_candidates,
        sim_upsample=codec.SIM_UPSAMPLE,
    )
    return jax.jit(fn)


def evaluate(apply_fn, params, config, *, num_conditions=None, candidates=None, with_world: bool = False) -> dict:
    """``dso_jax.toy.heldout.evaluate`` of ``params`` on ``num_conditions`` (default ``eval.num_conditions``)
    conditions; ``candidates`` defaults to :func:`make_candidates` with ``eval.physics``. The summary also
    records the protocol (conditions, candidates, seed, sampler) and, ``with_world``, what the world gives."""
    ev = config.eval
    n = num_conditions or ev.num_conditions
    candidates = candidates or make_candidates(apply_fn, config, ev.physics)
    held = heldout.heldout_set(ev.seed, n)
    t0 = time.time()
    res = heldout.evaluate(candidates, params, {}, held, seed=ev.seed, batch=ev.batch)
    summary = {
        "conditions": n,
        "num_candidates": ev.num_candidates,
        "seed": ev.seed,
        "batch": ev.batch,
        "sampler": config.sampler.to_dict(),
        **res["summary"],
        "eval_s": round(time.time() - t0, 1),
    }
    if with_world:
        summary["world"] = heldout.world_reference(held, ev.num_candidates, ev.seed)
    res["summary"], res["held"] = summary, held
    return res


def render_samples(path: str, result: dict, num: int, samples: int) -> str:
    """PNG: per held-out condition, its conditioning view, then ``samples`` generations coloured by stability."""
    held, stable, rows = result["held"], result["stable"], []
    for i in range(min(num, len(held["occ"]))):
        cells = []
        for j in range(min(samples, result["occ"].shape[1])):
            verdict = (
                render.angle_caption(result["angle"][i, j], stable[i, j])
                if "angle" in result
                else ("stable" if stable[i, j] else "unstable")
            )
            cells.append(
                (result["occ"][i, j], f"sample {j}: IoU {result['iou'][i, j]:.2f}, {verdict}", bool(stable[i, j]))
            )
        rows.append((held["occ"][i], f"condition {i} ({objects.KINDS[held['kind'][i]]})", cells))
    s = result["summary"]
    title = (
        f"toy model on held-out conditions\nIoU to the condition {s['iou']:.3f}, stable rate {s['stable_rate']:.3f} "
        f"({s['stability']}; {s['conditions']} conditions x {s['num_candidates']} samples)"
    )
    legend = "simulated" if s["stability"] == "mjx" else "static check"
    return render.save_rows(path, rows, title=title, legend=legend)


# --------------------------------------------------------------------------------------------- export


def _git_commit() -> str:
    try:
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "dso_jax", "configs", "scripts"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def make_manifest(config, params, record: dict, evaluation: dict | None) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "name": "toy",
        "model": config.model.name,
        "description": "SparseStructureFlowModel pre-trained on the toy world (dso_jax.toy) with TRELLIS's "
        "flow-matching convention; weights are the EMA.",
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "config": config.to_dict(),
        "seed": config.seed,
        "steps": record.get("steps_done", config.train.steps),
        "wall_time_s": round(record["wall_s"], 1),
        "final_loss": record["final"].get("loss"),
        "git_commit": _git_commit(),
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "numpy": np.__version__,
        },
        "params": {"file": trellis.PARAMS_FILE, "dtype": "float32", "count": num_params(params)},
        "evaluation": evaluation,
        "history": record["history"],
    }


# ------------------------------------------------------------------------------------------------ main


def evaluate_folder(config, weights: str, workdir: str, log=logging.info) -> dict:
    """Held-out evaluation of a converted folder; writes ``workdir/eval.json`` (and the render); returns the summary."""
    validate(config)
    if not os.path.isdir(weights):
        raise FileNotFoundError(f"--weights {weights}: no such directory")
    workdir = workdir_lib.prepare(workdir)
    apply_fn, params = pretrained.load_pretrained(weights)
    os.makedirs(workdir, exist_ok=True)
    result = evaluate(apply_fn, params, config, with_world=True)
    evaluation = result["summary"]
    if config.eval.render:
        path = render_samples(
            os.path.join(workdir, "heldout_samples.png"), result, config.eval.render, min(4, config.eval.num_candidates)
        )
        log(f"held-out samples: {path}")
    trellis.write_json(os.path.join(workdir, "eval.json"), evaluation)
    log("held-out: " + json.dumps({k: v for k, v in evaluation.items() if k != "per_kind"}))
    return evaluation


def pretrain_and_evaluate(config: ml_collections.ConfigDict, workdir: str, out: str, log=logging.info) -> dict:
    """Train, export to ``out``, evaluate held out; returns the manifest (also written to ``out``)."""
    validate(config)
    workdir, out = workdir_lib.prepare(workdir), workdir_lib.prepare(out, flag="--out")  # before training
    os.makedirs(workdir, exist_ok=True)
    trellis.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    params, record = train(config, workdir, log=log)
    manifest = make_manifest(config, params, record, None)
    # the weights land before the (slow) evaluation; the converted-folder format of load_pretrained
    trellis.write_converted(out, model_config(config), params, manifest)

    if config.eval.num_conditions:
        evaluation = evaluate_folder(config, out, workdir, log=log)  # evaluate exactly what was written
        manifest = make_manifest(config, params, record, evaluation)
        trellis.write_json(os.path.join(out, trellis.MANIFEST_FILE), manifest)  # the weights stay as written
    return manifest
