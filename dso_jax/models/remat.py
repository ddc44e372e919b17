"""Which activations a rematerialised transformer block keeps for its backward pass.

TRELLIS's ``use_checkpoint`` recomputes the whole block in the backward pass (policy ``'nothing'``: the least
memory). The others keep some forward results instead of recomputing them:

* ``'attention'``: the attention outputs (tagged ``attention_out``) and cuDNN's forward primitive, meant to spare
  the backward pass the attention forward. Measured on an H200 for DSO's step (bench/RESULTS.md): +4.5 GiB (12
  latents x 4096 tokens x 1024 x bf16 x 48 attention calls) and no time saved, so it is not the default.
* ``'dots'``: every matmul without batch dimensions (the projections and the MLP), recomputing norms,
  modulation and attention.
* ``'dots_attention'``: both.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name

POLICIES = ("nothing", "attention", "dots", "dots_attention")
ATTENTION_NAME = "attention_out"
_CUDNN_FORWARD = "dot_product_attention_fwd"  # jax's cuDNN fused-attention forward primitive


def name_attention_output(h: jax.Array) -> jax.Array:
    """Tag an attention output so the ``'attention'`` policies can keep it."""
    return checkpoint_name(h, ATTENTION_NAME)


def _attention_saveable(prim, *_, **params) -> bool:
    if prim.name == _CUDNN_FORWARD:
        return True
    return prim.name == "name" and params.get("name") == ATTENTION_NAME


def checkpoint_policy(policy: str):
    """The ``jax.checkpoint`` policy of a name in ``POLICIES``."""
    cp = jax.checkpoint_policies
    table = {
        "nothing": cp.nothing_saveable,
        "attention": _attention_saveable,
        "dots": cp.dots_with_no_batch_dims_saveable,
        "dots_attention": cp.save_from_both_policies(cp.dots_with_no_batch_dims_saveable, _attention_saveable),
    }
    if policy not in table:
        raise ValueError(f"remat_policy must be one of {POLICIES}, got {policy!r}")
    return table[policy]


def block_class(cls: type[nn.Module], use_checkpoint: bool, policy: str = "nothing") -> type[nn.Module]:
    """``cls`` itself, or ``cls`` rematerialised under ``policy`` when ``use_checkpoint``."""
    if not use_checkpoint:
        checkpoint_policy(policy)  # a typo fails even when remat is off
        return cls
    return nn.remat(cls, policy=checkpoint_policy(policy))
