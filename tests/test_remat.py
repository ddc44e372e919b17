"""Remat policies: 'attention' keeps exactly the attention outputs, 'nothing' keeps none, a typo is refused."""

import jax
import jax.numpy as jnp
import pytest
from jax._src.ad_checkpoint import saved_residuals

from dso_jax.models import SparseStructureFlowModel
from dso_jax.models.remat import ATTENTION_NAME, block_class
from tests.helpers_trellis import TINY_FLOW_ARGS


def _model_and_inputs():
    """A one-block tiny model, abstract params (tracing needs no values) and inputs."""
    model = SparseStructureFlowModel(**dict(TINY_FLOW_ARGS, num_blocks=1))
    r, c = model.resolution, model.in_channels
    x, t, cond = jnp.zeros((2, c, r, r, r)), jnp.array([300.0, 800.0]), jnp.zeros((2, 5, model.cond_channels))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, cond)["params"]
    return model, params, (x, t, cond)


def _loss(model, inputs):
    return lambda p: jnp.mean(model.apply({"params": p}, *inputs) ** 2)


def test_attention_policy_keeps_the_attention_outputs_and_nothing_keeps_none():
    # traces the rematerialised backward pass with each policy (no compile: gradients under a policy are jax's own)
    model, params, inputs = _model_and_inputs()

    def named(policy):
        f = _loss(model.clone(use_checkpoint=True, remat_policy=policy), inputs)
        return [d for _, d in saved_residuals(f, params) if ATTENTION_NAME in d]

    assert len(named("attention")) == 2  # the block's self- and cross-attention outputs
    assert named("nothing") == []
    f = _loss(model.clone(use_checkpoint=True, remat_policy="dots_attention"), inputs)
    kept = [d for _, d in saved_residuals(f, params)]
    assert sum(ATTENTION_NAME in d for d in kept) == 2 and len(kept) > len(named("attention"))


def test_unknown_policy_is_refused_even_without_remat():
    with pytest.raises(ValueError, match="remat_policy must be one of"):
        block_class(SparseStructureFlowModel, False, "everything")
