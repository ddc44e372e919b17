"""Pre-train the toy world's stage-1 flow model, export it as a converted folder, evaluate it held out.

``pretrain_and_evaluate(config, workdir, out)`` runs top to bottom: model and init, the jitted step, the
loop (batches of step s are a function of (seed, s); a host thread builds the next batch while XLA runs),
export of the EMA weights to ``out`` in the converted-folder format that
``dso_jax.models.load_pretrained`` reads (``params.safetensors`` + ``config.json`` + ``manifest.json``),
then the held-out evaluation written into the manifest and ``workdir/eval.json``.

``evaluate(apply_fn, params, config)`` is the held-out protocol on its own: fixed held-out conditions,
fixed noise, the Euler guidance-interval sampler, `toy_codec.occupancy`, then IoU to the conditioning object,
the static check and (``eval.physics = 'mjx'``) the MJX verdict of ``dso_jax.physics.rollout``.
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

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dso_jax import sampling
from dso_jax.convert import trellis
from dso_jax.data import toy, toy_codec, toy_conditions, toy_pretrain
from dso_jax.models import pretrained

MANIFEST_FORMAT = "dso_jax.toy_pretrained.v1"


# ------------------------------------------------------------------------------------------------ model


def model_config(config) -> dict:
    """The TRELLIS-style json of the model: ``{"name": ..., "args": {...}}``."""
    return {"name": config.model.name, "args": config.model.args.to_dict()}


def build(config):
    """(apply_fn, module) of the configured flow model, computing in float32."""
    cfg = model_config(config)
    module = pretrained.model_from_config(cfg["name"], cfg["args"], dtype=jnp.float32)
    return pretrained.make_apply_fn(module), module


def init_params(module, config) -> dict:
    key = jax.random.PRNGKey(config.seed)
    x, t, cond = pretrained.example_inputs(module, cond_len=1)
    params = module.init(key, x, t, cond)["params"]
    if config.model.init == "trellis":
        params = toy_pretrain.trellis_init(params, jax.random.fold_in(key, 1))
    elif config.model.init != "flax":
        raise ValueError(f"model.init must be 'trellis' or 'flax', got {config.model.init!r}")
    return params


def num_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------------------------- train


def train_batches(seed: int, batch_size: int, steps: int, workers: int):
    """Yield the (B, 32³) bool objects of steps 0 .. steps-1 in order (``toy.train_batch``), built ahead of the
    accelerator: by one host thread (``workers = 0``) or by ``workers`` spawned processes, each step's batch a
    function of (seed, step) either way, at most ``2·workers`` batches in flight."""
    if workers <= 0:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            nxt = pool.submit(toy.train_batch, seed, 0, batch_size)
            for step in range(steps):
                occ = nxt.result()
                if step + 1 < steps:
                    nxt = pool.submit(toy.train_batch, seed, step + 1, batch_size)
                yield occ
        return
    ctx = multiprocessing.get_context("spawn")  # never fork a process that holds an XLA client
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx)
    try:
        queue = collections.deque()
        submitted = 0
        for _ in range(steps):
            while submitted < steps and len(queue) < 2 * workers:
                queue.append(pool.submit(toy.train_batch, seed, submitted, batch_size, True))
                submitted += 1
            yield toy.unpack_occ(queue.popleft().result())
    finally:  # also when the consumer stops early (train.max_seconds)
        pool.shutdown(wait=True, cancel_futures=True)


def train(config, workdir: str, log=logging.info) -> tuple[dict, dict]:
    """Run ``config.train.steps`` optimizer steps; returns (EMA params as numpy, training record)."""
    apply_fn, module = build(config)
    params = init_params(module, config)
    tx = toy_pretrain.make_optimizer(config.optim, config.train.steps)
    rng = jax.random.key_data(jax.random.fold_in(jax.random.PRNGKey(config.seed), 2))
    state = toy_pretrain.PretrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        rng=rng,
    )
    step_fn = jax.jit(toy_pretrain.make_train_step(apply_fn, tx, config), donate_argnums=(0,))
    log(f"toy pretraining: {num_params(params):,} params, {config.train.steps} steps of {config.data.batch_size}")

    os.makedirs(workdir, exist_ok=True)
    jsonl = open(os.path.join(workdir, "metrics.jsonl"), "w")
    steps, max_s = config.train.steps, float(config.train.max_seconds)
    history, sums, pending, stopped = [], {}, [], None
    quick_sampler = None  # compiled at the first in-training evaluation, then reused
    t_start = t_last = time.time()
    for step, occ in enumerate(train_batches(config.seed, config.data.batch_size, steps, config.train.workers)):
        state, metrics = step_fn(state, occ)
        pending.append(metrics)  # fetched at the next log line, so the host never waits on a step
        done = step + 1
        if max_s > 0 and time.time() - t_start >= max_s and done < steps:
            stopped = done
        if done % config.train.log_every == 0 or done == steps or stopped:
            for i, m in enumerate(jax.device_get(pending)):
                bad = [k for k, v in m.items() if not np.isfinite(v)]
                if bad:
                    raise FloatingPointError(
                        f"toy pretraining step {done - len(pending) + i + 1}: non-finite {bad}; stopping"
                    )
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            count, pending = len(pending), []
            now = time.time()
            rec = {
                "step": done,
                **{k: v / count for k, v in sums.items()},
                "steps_per_s": count / max(now - t_last, 1e-9),
                "elapsed_s": now - t_start,
            }
            if config.train.eval_every and (done % config.train.eval_every == 0 or done == steps):
                quick_sampler = quick_sampler or make_sampler(apply_fn, config.sampler)
                quick = evaluate(
                    apply_fn,
                    state.ema,
                    config,
                    num_conditions=config.eval.quick_conditions,
                    physics="static",
                    sampler=quick_sampler,
                )
                rec.update({f"eval_{k}": v for k, v in quick["summary"].items() if np.isscalar(v)})
                t_now = time.time()
                rec["eval_s"] = t_now - now
                now = t_now
            jsonl.write(json.dumps(rec) + "\n")
            jsonl.flush()
            history.append(rec)
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
            sums, t_last = {}, now
        if stopped:
            log(f"toy pretraining: train.max_seconds={max_s:g} reached after {done} of {steps} steps; stopping")
            break
    jsonl.close()
    wall = time.time() - t_start
    ema = jax.tree.map(np.asarray, jax.device_get(state.ema))
    return ema, {
        "wall_s": wall,
        "history": history,
        "final": history[-1] if history else {},
        "steps_done": stopped or steps,
    }


# -------------------------------------------------------------------------------------------- evaluate


def make_sampler(apply_fn, sampler_cfg):
    """jit(noise, cond, params) -> latents with the configured Euler guidance-interval sampler."""
    return jax.jit(lambda params, noise, cond: sampling.sample_from_config(apply_fn, params, noise, cond, sampler_cfg))


def generate(
    apply_fn, params, cond, samples_per_condition: int, sampler_cfg, seed: int, batch: int, sampler=None
) -> np.ndarray:
    """Latents for every (condition, sample): (n, S, 8, 16, 16, 16) float32; noise fixed by ``seed``.

    The noise of (condition i, sample j) is ``normal(fold_in(fold_in(key(seed), i), j))``, so it does not depend
    on the batch size or on how many conditions are evaluated.
    """
    n = len(cond)
    key = jax.random.PRNGKey(seed)
    idx = [(i, j) for i in range(n) for j in range(samples_per_condition)]
    sampler = sampler or make_sampler(apply_fn, sampler_cfg)
    out = []
    for start in range(0, len(idx), batch):
        chunk = idx[start : start + batch]
        m = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch - m)  # one compiled shape
        noise = jnp.stack(
            [
                jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), j), toy_codec.LATENT_SHAPE)
                for i, j in chunk
            ]
        )
        c = jnp.asarray(np.stack([cond[i] for i, _ in chunk]))
        out.append(np.asarray(sampler(params, noise, c))[:m])
    return np.concatenate(out).reshape((n, samples_per_condition) + toy_codec.LATENT_SHAPE)


def mjx_verdict(occ32: np.ndarray, physics_cfg, batch: int) -> dict:
    """MJX stability of (N, 32³) occupancies on TRELLIS's 64³ grid: stable (N,) bool, angle (N,) degrees."""
    from dso_jax.physics import rollout

    fn = jax.jit(lambda o: rollout.make_stability_fn(physics_cfg)(toy_codec.upsample_64(o)))
    res = {"stable": [], "angle": []}
    for start in range(0, len(occ32), batch):
        chunk = occ32[start : start + batch]
        m = len(chunk)
        if m < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - m, 0)])
        r = jax.device_get(fn(jnp.asarray(chunk)))
        res["stable"].append(np.asarray(r["stable"])[:m] & np.asarray(r["valid"])[:m])
        res["angle"].append(np.asarray(r["angle"])[:m])
    return {k: np.concatenate(v) for k, v in res.items()}


def physics_config():
    from dso_jax.physics import rollout

    return rollout.default_sim_config()


def evaluate(
    apply_fn,
    params,
    config,
    *,
    num_conditions: int | None = None,
    physics: str | None = None,
    sampler_cfg=None,
    with_world: bool = False,
    sampler=None,
) -> dict:
    """The held-out protocol; returns {'summary': {...scalars}, 'occ': (n, S, 32³), 'ref': (n, 32³), ...}.
    ``sampler``: a ``make_sampler(apply_fn, sampler_cfg)`` to reuse (repeated evaluations compile once)."""
    ev = config.eval
    n = num_conditions or ev.num_conditions
    physics = physics or ev.physics
    sampler_cfg = sampler_cfg or config.sampler
    objs = toy_conditions.heldout(ev.seed, n)
    t0 = time.time()
    lat = generate(
        apply_fn, params, objs["cond"], ev.samples_per_condition, sampler_cfg, ev.seed, ev.batch, sampler=sampler
    )
    t_sample = time.time() - t0
    occ = np.asarray(toy_codec.occupancy(lat))  # (n, S, 32³)
    m = toy_pretrain.occupancy_metrics(occ, objs["occ"])
    summary = {
        "conditions": n,
        "samples_per_condition": ev.samples_per_condition,
        "seed": ev.seed,
        "sampler": sampler_cfg.to_dict() if hasattr(sampler_cfg, "to_dict") else dict(sampler_cfg),
        "iou": float(m["iou"].mean()),
        "front_iou": float(m["front_iou"].mean()),
        "static_stable_rate": float(m["static_stable"].mean()),
        "voxel_ratio": float(m["voxel_ratio"].mean()),
        "empty_rate": float((m["voxel_ratio"] == 0).mean()),
        "sample_s": t_sample,
    }
    out = {"summary": summary, "occ": occ, "ref": objs["occ"], "metrics": m, "kind": objs["kind"]}
    if physics == "mjx":
        t0 = time.time()
        v = mjx_verdict(occ.reshape((-1,) + occ.shape[2:]), physics_config(), ev.physics_batch)
        stable = v["stable"].reshape(occ.shape[:2])
        angle = v["angle"].reshape(occ.shape[:2])
        summary.update(
            stable_rate=float(stable.mean()),
            unstable_rate=float(1.0 - stable.mean()),
            mean_angle=float(angle.mean()),
            mjx_static_agreement=float((stable == m["static_stable"]).mean()),
            physics_s=time.time() - t0,
            stability="mjx",
        )
        out.update(stable=stable, angle=angle)
    elif physics == "static":
        summary.update(
            stable_rate=summary["static_stable_rate"],
            unstable_rate=1.0 - summary["static_stable_rate"],
            stability="static",
        )
        out.update(stable=m["static_stable"])
    else:
        raise ValueError(f"eval.physics must be 'mjx' or 'static', got {physics!r}")
    per_kind = {}
    for k, name in enumerate(toy.KINDS):
        sel = objs["kind"] == k
        if sel.any():
            per_kind[name] = {
                "conditions": int(sel.sum()),
                "iou": float(m["iou"][sel].mean()),
                "stable_rate": float(np.asarray(out["stable"])[sel].mean()),
            }
    summary["per_kind"] = per_kind
    if with_world:
        world = toy_pretrain.world_reference(objs, ev.samples_per_condition, ev.seed)
        summary["world"] = {
            "iou": float(world["iou"].mean()),
            "static_stable_rate": float(world["static_stable"].mean()),
            "conditioning_objects_static_stable_rate": float(objs["stable"].mean()),
        }
    return out


def render(path: str, result: dict, num: int, samples: int) -> str:
    """PNG: per condition, the conditioning object then ``samples`` generations (coloured by stability)."""
    from dso_jax.data import toy_render

    occs, captions, stable = [], [], []
    for i in range(min(num, len(result["ref"]))):
        occs.append(result["ref"][i])
        captions.append(f"cond {i}")
        stable.append(None)
        for j in range(min(samples, result["occ"].shape[1])):
            occs.append(result["occ"][i, j])
            captions.append(f"gen {j} IoU {result['metrics']['iou'][i, j]:.2f}")
            stable.append(bool(np.asarray(result["stable"])[i, j]))
    toy_render.save_objects(path, occs, captions=captions, stable=stable, ncols=1 + samples)
    return path


# --------------------------------------------------------------------------------------------- export


def _git_commit() -> str:
    try:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
        "description": "SparseStructureFlowModel pre-trained on the toy world (dso_jax.data.toy) with TRELLIS's "
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
    os.makedirs(workdir, exist_ok=True)
    apply_fn, params = pretrained.load_pretrained(weights)
    t0 = time.time()
    result = evaluate(apply_fn, params, config, with_world=True)
    evaluation = result["summary"]
    evaluation["eval_s"] = round(time.time() - t0, 1)
    if config.eval.render:
        path = render(
            os.path.join(workdir, "heldout_samples.png"),
            result,
            config.eval.render,
            min(4, config.eval.samples_per_condition),
        )
        log(f"held-out samples: {path}")
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(evaluation, f, indent=1)
    log("held-out: " + json.dumps({k: v for k, v in evaluation.items() if k != "per_kind"}))
    return evaluation


def pretrain_and_evaluate(config: ml_collections.ConfigDict, workdir: str, out: str, log=logging.info) -> dict:
    """Train, export to ``out``, evaluate held out; returns the manifest (also written to ``out``)."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=1)
    params, record = train(config, workdir, log=log)
    manifest = make_manifest(config, params, record, None)
    # the weights land before the (slow) evaluation; the converted-folder format of load_pretrained
    trellis.write_converted(out, model_config(config), params, manifest)

    if config.eval.num_conditions:
        evaluation = evaluate_folder(config, out, workdir, log=log)  # evaluate exactly what was written
        manifest = make_manifest(config, params, record, evaluation)
        trellis.write_json(os.path.join(out, trellis.MANIFEST_FILE), manifest)  # the weights stay as written
    return manifest
