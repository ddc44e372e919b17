"""What both LoRA trainers share around their step: the run's setup, the jitted step's wiring and the loop.

``open_run(config, workdir)`` validates the config and the workdir before anything is written (the resume
check of ``dso_jax.workdir``), takes the workdir lock, writes ``config.json``, builds the mesh, the frozen
base and the optimizer, and initialises the :class:`~dso_jax.train_state.TrainState` or restores the newest
intact checkpoint. ``jit_step`` compiles a trainer's pure step with explicit shardings and the state donated.
``loop`` feeds it the label source's batches, checks and logs the metrics one step late (the host never
stalls the device), and checkpoints (never a state whose metrics were not checked).

A trainer is then: ``open_run`` -> its own step and label source -> ``loop`` -> its own report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Any, Callable, Iterator, Optional, Protocol

import jax
import tqdm

from dso_jax import checkpoint, lora, losses, optim, sharding
from dso_jax import workdir as workdir_lib
from dso_jax.metrics_writer import MetricWriter
from dso_jax.train_state import TrainState, compute_dtype, frozen_base, state_initializer


class LabelSource(Protocol):
    """Where a trainer's batches come from: (cond, winner, loser) pairs offline, conditions online."""

    def iterate(self, start: int, stop: int, prefetch: int) -> Iterator[tuple[int, dict]]:
        """``(round, host batch)`` for each round in [start, stop)."""

    def close(self) -> None: ...


@dataclasses.dataclass
class Run:
    """A started run: everything a trainer's step and loop need."""

    config: Any
    workdir: str
    is_main: bool
    mesh: jax.sharding.Mesh
    global_batch: int  # train.batch_size x batch shards: pairs (offline) or conditions (online) per micro-batch
    dtype: Any
    module: Any
    apply_fn: Callable
    base: Any
    base_shardings: Any
    tx: Any
    state: TrainState
    state_shardings: Any
    start: int  # the step the run starts at (0, or the restored checkpoint's)
    ckpt: checkpoint.Checkpointer
    seconds_before: float  # wall time of earlier processes of this job (from the checkpoint's meta)
    t_start: float

    def seconds(self) -> float:
        """Wall time of the job so far: earlier processes plus this one."""
        return self.seconds_before + time.perf_counter() - self.t_start


def validate(config) -> None:
    """The checks of keys every LoRA run reads, before anything is written."""
    known = losses.ONLINE_LOSSES if config.mode == "online" else losses.LOSSES
    if config.loss not in known:
        raise ValueError(f"config.loss must be one of {sorted(known)}, got {config.loss!r}")
    compute_dtype(config.model.compute_dtype)
    if config.train.peft_export not in checkpoint.PEFT_EXPORTS:
        raise ValueError(f"train.peft_export must be 'full', 'lora' or 'none', got {config.train.peft_export!r}")
    if config.optim.schedule not in optim.SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {list(optim.SCHEDULES)}, got {config.optim.schedule!r}")
    for key, n in (("train.steps", config.train.steps), ("train.batch_size", config.train.batch_size)):
        if n < 1:
            raise ValueError(f"{key} must be >= 1, got {n}")
    for key, n in (("train.log_every", config.train.log_every), ("train.ckpt_every", config.train.ckpt_every)):
        if n < 1:
            raise ValueError(f"{key} must be >= 1, got {n}")
    if config.model.path and not os.path.exists(config.model.path):
        raise FileNotFoundError(f"model.path {config.model.path}: no such file or directory")


@contextlib.contextmanager
def open_run(config, workdir: str):
    """``with open_run(config, workdir) as run:`` (see the module docstring); the lock is held inside."""
    t_start = time.perf_counter()
    sharding.maybe_initialize_distributed(config.mesh)
    is_main = jax.process_index() == 0
    workdir = workdir_lib.prepare(workdir)
    validate(config)
    workdir_lib.check_resume(config, workdir)  # before anything is written
    if is_main:
        os.makedirs(workdir, exist_ok=True)
    with workdir_lib.WorkdirLock(workdir, enabled=is_main):
        if is_main:
            workdir_lib.write_config(config, workdir)
        run = _build(config, workdir, is_main, t_start)
        try:
            yield run
        finally:
            run.ckpt.close()


def _build(config, workdir: str, is_main: bool, t_start: float) -> Run:
    mesh = sharding.make_mesh(config.mesh)
    shards = sharding.num_batch_shards(mesh)
    global_batch = config.train.batch_size * shards
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
    root_key = jax.random.key(config.seed)
    module, apply_fn, abstract_base, base, base_shardings = frozen_base(config, mesh, dtype, root_key)

    # --- Optimizer and state: init or restore ----------------------------------------------------
    tx = optim.make_optimizer(config.optim, config.train.steps)
    init_state = state_initializer(config, abstract_base, tx, root_key)
    abstract_state = jax.eval_shape(init_state, jax.random.fold_in(root_key, 1))
    state_shardings = sharding.param_shardings(abstract_state, mesh)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_ckpts, peft_export=config.train.peft_export)
    restored = ckpt.restore_latest(sharding.with_shardings(abstract_state, state_shardings))
    seconds_before = 0.0
    if restored is not None:
        state, meta = restored
        if int(meta["data_position"]) != int(state.step):
            raise ValueError(f"{ckpt.directory}: data position {meta['data_position']} != step {int(state.step)}")
        seconds_before = float(meta.get("seconds", 0.0))
        logging.info("resumed from %s at step %d", ckpt.directory, int(state.step))
        if not os.path.exists(ckpt.peft_path(int(state.step))):  # killed between the commit and the export
            ckpt.export_peft(int(state.step), base, state.overlay, module)
    else:
        state = jax.jit(init_state, out_shardings=state_shardings)(jax.random.fold_in(root_key, 1))
    logging.info("LoRA overlay: %d trainable parameters", lora.count(abstract_state.overlay))
    return Run(
        config=config,
        workdir=workdir,
        is_main=is_main,
        mesh=mesh,
        global_batch=global_batch,
        dtype=dtype,
        module=module,
        apply_fn=apply_fn,
        base=base,
        base_shardings=base_shardings,
        tx=tx,
        state=state,
        state_shardings=state_shardings,
        start=int(state.step),
        ckpt=ckpt,
        seconds_before=seconds_before,
        t_start=t_start,
    )


def jit_step(run: Run, step: Callable, *, batch_axis: int, extra: tuple = ()) -> Callable:
    """``run_step(state, batch) = step(state, batch, base, *extra)`` jitted: state and base sharded by the
    fsdp rule, the batch split along ``batch_axis``, ``extra`` (e.g. decoder weights) replicated, state donated."""
    rep = sharding.replicated(run.mesh)
    extra = jax.device_put(extra, rep)
    fn = jax.jit(
        step,
        in_shardings=(run.state_shardings, sharding.batch_sharding(run.mesh, batch_axis), run.base_shardings)
        + (rep,) * len(extra),
        out_shardings=(run.state_shardings, rep),
        donate_argnums=(0,),
    )
    return lambda state, batch: fn(state, batch, run.base, *extra)


def loop(
    run: Run,
    source: LabelSource,
    run_step: Callable,
    *,
    batch_axis: int,
    per_round: int = 1,
    every: int = 0,
    on_every: Optional[Callable[[int, TrainState, MetricWriter], None]] = None,
) -> dict:
    """Train from ``run.start`` to ``train.steps``; ``run.state`` ends as the last state. Returns the last
    logged row (metric means over the last ``train.log_every`` interval).

    One round of the source is one call of ``run_step`` and ``per_round`` optimizer steps. ``on_every(done,
    state, writer)`` runs after the rounds that reach a multiple of ``every`` steps (not the last one).
    """
    config, ckpt = run.config, run.ckpt
    total = config.train.steps
    if total % per_round or run.start % per_round:
        raise ValueError(f"train.steps {total} and the resume step {run.start} must be multiples of {per_round}")
    writer = MetricWriter(run.workdir, enabled=run.is_main, start=run.start)
    pbar = tqdm.tqdm(total=total, initial=run.start, unit="step", disable=not run.is_main, dynamic_ncols=True)
    pending: list = []  # (step, device metrics): read one step late so the host never stalls the device
    summary: dict = {}
    t_log, steps_since_log = time.perf_counter(), 0
    pairs_per_step = run.global_batch * config.train.grad_accum

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
                rate = steps_since_log / max(time.perf_counter() - t_log, 1e-9)
                summary = writer.flush(done, {"steps_per_sec": rate, "pairs_per_sec": rate * pairs_per_step})
                t_log, steps_since_log = time.perf_counter(), 0

    state = run.state
    try:
        for rnd, host_batch in source.iterate(run.start // per_round, total // per_round, config.data.prefetch):
            batch = sharding.host_to_global(host_batch, run.mesh, batch_axis=batch_axis)
            state, metrics = run_step(state, batch)
            done = (rnd + 1) * per_round
            pending.append((done, metrics))
            if every and on_every is not None and done % every < per_round and done < total:
                drain(keep=0)
                on_every(done, state, writer)
            if done % config.train.ckpt_every < per_round or done == total:
                drain(keep=0)  # never checkpoint a state whose metrics were not checked
                meta = {"step": done, "data_position": done, "loss": config.loss, "seed": config.seed}
                ckpt.save(done, state, dict(meta, seconds=run.seconds()))
                ckpt.export_peft(done, run.base, state.overlay, run.module)
            else:
                drain(keep=1)
        drain(keep=0)
    finally:
        run.state = state
        pbar.close()
        writer.close()
        source.close()
    if run.is_main and summary:
        print("\nfinal metrics (mean over the last log interval):")
        for k in sorted(summary):
            print(f"  {k:18s} {summary[k]:.6g}")
    return summary
