"""The offline trainer: LoRA fine-tuning of TRELLIS's stage-1 flow model on DSO's labelled pairs (DRO / DPO / SFT).

``train_and_evaluate(config, workdir)`` runs top to bottom: the run (``train_loop.open_run``: checks, lock,
model, optimizer, state restored from the workdir when a checkpoint exists), the pair source, the jitted
step, the loop.

One optimizer step = ``train.grad_accum`` micro-batches of ``train.batch_size`` pairs per device,
split over every device of the ('data', 'fsdp') mesh; the gradient is the mean over all pairs.
The only trainable (and optimizer) pytree is the LoRA overlay; the frozen base weights are an
argument of the step. Randomness is ``fold_in(key, step)`` and the pairs of step ``s`` depend only
on ``(seed, s)``, so a resumed run replays an uninterrupted one bit for bit.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dso_jax import losses, optim, train_loop
from dso_jax.train_state import TrainState, latent_shape


def make_train_step(apply_fn: Callable, loss_fn: Callable, tx: optax.GradientTransformation, config) -> Callable:
    """The pure step ``train_step(state, batch, base) -> (state, metrics)``.

    ``batch`` arrays are (A, B, ...): A micro-batches accumulated in a ``lax.scan``. ``base`` is the
    frozen parameter tree (an argument, never optimizer state). Metrics are means over the step.
    """
    schedule = optim.lr_schedule(config.optim, config.train.steps)

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


def validate(config) -> None:
    """The offline run's own checks, before anything is written."""
    if config.mode != "offline":
        raise ValueError(f"dso_jax.train trains config.mode='offline', got {config.mode!r} (scripts/train.py picks)")
    if config.data.kind not in ("tfds", "synthetic"):
        raise ValueError(f"data.kind must be 'tfds' or 'synthetic', got {config.data.kind!r}")
    if config.data.kind == "tfds":
        if not config.data.path:
            raise ValueError("data.path is empty; set --config.data.path=<dataset dir> or data.kind='synthetic'")
        from dso_jax.data import tfds_dso  # lazily: the train step itself needs no TFDS

        tfds_dso.find_dataset_dir(config.data.path)  # FileNotFoundError naming the path


def make_pair_source(config, workdir: str, global_batch: int):
    """(cond, winner, loser) batches of DSO's pair rules (a ``dso_pairs.PairSource``); ``data.kind='synthetic'``
    writes its data first."""
    from dso_jax.data import dso_pairs, synthetic, tfds_dso  # lazily: the train step itself needs no TFDS

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
    return dso_pairs.PairSource(
        path,
        threshold=config.data.stable_threshold,
        seed=config.seed,
        global_batch=global_batch,
        grad_accum=config.train.grad_accum,
        cond_channels=args.cond_channels,
        latent_shape=latent_shape(args),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        workers=config.data.workers,
    )


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (resuming from ``workdir`` when it holds a checkpoint); returns the last logged metrics."""
    validate(config)
    with train_loop.open_run(config, workdir) as run:
        source = make_pair_source(config, run.workdir, run.global_batch)
        step = make_train_step(run.apply_fn, losses.LOSSES[config.loss], run.tx, config)
        return train_loop.loop(run, source, train_loop.jit_step(run, step, batch_axis=1), batch_axis=1)
