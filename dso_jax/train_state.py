"""The state both LoRA trainers (offline ``train.py``, online ``online.py``) carry, and how it is made.

``TrainState`` is the only pytree a step updates and a checkpoint saves: the LoRA overlay, its optimizer
state, the step count, the run's RNG key data and, for the objectives that need one
(``losses.OLD_POLICY_LOSSES``), the old-policy overlay. The frozen base weights are never in it; they are an
argument of every step. Shapes come first (``jax.eval_shape``), shardings are derived from them, then the
arrays are materialised with those shardings (random init) or restored into them.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp

from dso_jax import lora, losses, sharding
from dso_jax.convert.verify import tree_diff
from dso_jax.models import pretrained


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # () int32: optimizer steps done
    overlay: lora.Overlay  # the trainable LoRA factors
    opt_state: Any
    rng: jax.Array  # (2,) uint32 raw key data of the run's base key
    # The old policy (DiffusionNFT's): an overlay of the same shapes, no gradient, moved towards ``overlay``
    # once per sampling round by the online step; None for the objectives without one.
    old: Any = None


def new_state(overlay: lora.Overlay, tx, key: jax.Array, *, with_old: bool = False) -> TrainState:
    """Step 0 of a run: ``overlay``, its fresh optimizer state, ``key``'s data as the run's key and, with
    ``with_old``, the old policy equal to ``overlay``."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        overlay=overlay,
        opt_state=tx.init(overlay),
        rng=jax.random.key_data(key),
        old=jax.tree.map(jnp.copy, overlay) if with_old else None,
    )


def compute_dtype(name: str):
    """'auto' -> bfloat16 on an accelerator, float32 on the CPU."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"model.compute_dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}")
    return jnp.dtype(name)


def latent_shape(model_args: dict) -> tuple:
    """(C, R, R, R) of the flow model's latent."""
    return (model_args["in_channels"],) + (model_args["resolution"],) * 3


def frozen_base(config, mesh, dtype, root_key):
    """The flow model and its frozen weights on ``mesh``: (module, apply_fn, abstract_base, base, base_shardings).

    ``model.path`` set: the converted folder, checked key by key against ``model.args``; else a random init
    from ``fold_in(root_key, 0)``.
    """
    args = dict(config.model.args.to_dict(), use_checkpoint=config.model.remat)
    module = pretrained.model_from_config(config.model.name, args, dtype=dtype).clone(
        attn_impl=config.model.attn_impl, remat_policy=config.model.remat_policy
    )
    abstract_base = pretrained.abstract_params(module)
    base_shardings = sharding.param_shardings(abstract_base, mesh)
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
    return module, pretrained.make_apply_fn(module), abstract_base, base, base_shardings


def state_initializer(config, abstract_base, tx, root_key) -> Callable[[jax.Array], TrainState]:
    """``init(key) -> TrainState`` at step 0: the overlay at identity, fresh optimizer state, the run's key
    (and the old policy at identity too, for ``losses.OLD_POLICY_LOSSES``)."""

    def init(key):
        overlay = lora.init_overlay(
            key, abstract_base, rank=config.lora.rank, alpha=config.lora.alpha, targets=tuple(config.lora.targets)
        )
        with_old = config.loss in losses.OLD_POLICY_LOSSES
        return new_state(overlay, tx, jax.random.fold_in(root_key, 2), with_old=with_old)

    return init
