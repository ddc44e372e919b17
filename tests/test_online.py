"""Online mode: one compiled step runs sample -> decode -> simulate -> update on the overlay only."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import nft
from dso_jax import lora, online, online_losses
from dso_jax.candidates import make_candidates_fn
from dso_jax.flow import normal
from dso_jax.models import SparseStructureFlowModel
from dso_jax.physics.rollout import default_sim_config, make_stability_fn
from dso_jax.toy import codec as toy_codec
from dso_jax.train_state import new_state


@functools.cache
def _tiny_model():
    """The tiny DiT, its params, two conditions and a short-horizon MJX verdict, built once per module."""
    phys = default_sim_config()
    phys.horizon_s = 0.1
    model = SparseStructureFlowModel(
        resolution=16,
        in_channels=8,
        out_channels=8,
        model_channels=32,
        cond_channels=16,
        num_blocks=1,
        num_heads=2,
        patch_size=4,
        qk_rms_norm=True,
    )
    cond = normal(jax.random.PRNGKey(1), (2, 8, 16))
    base = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 16, 16, 16)), jnp.zeros((1,)), cond[:1])[
        "params"
    ]
    apply_fn = lambda p, x, t, c: model.apply({"params": p}, x, t, c)
    return apply_fn, base, cond, make_stability_fn(phys)


def _tiny_setup(loss="dro"):
    cfg = ml_collections.ConfigDict()
    cfg.loss = loss
    cfg.flow = ml_collections.ConfigDict(dict(t_mu=1.0, t_sigma=1.0))
    cfg.dpo = ml_collections.ConfigDict(dict(beta=500.0))
    cfg.sampler = ml_collections.ConfigDict(dict(steps=3, cfg_strength=2.0, cfg_interval=(0.5, 1.0), rescale_t=3.0))
    cfg.online = ml_collections.ConfigDict(
        dict(num_candidates=4, updates_per_sample=2, update_conditions=0, sampler_steps=0, sample_rows=2)
    )
    cfg.train = ml_collections.ConfigDict(dict(batch_size=2))
    cfg.decoder = ml_collections.ConfigDict(dict(sim_upsample=1))
    cfg.nft = ml_collections.ConfigDict(
        dict(beta=1.0, adv_clip=5.0, kl_weight=1e-4, adaptive_weight=True, old_decay=0.0, old_decay_ramp=0)
    )
    apply_fn, base, cond, stability_fn = _tiny_model()
    return cfg, apply_fn, toy_codec.decoder_fn, stability_fn, base, cond


def _alternating_verdicts(occ):
    """A stand-in simulator: candidates 0, 2, ... of every condition stable, 1, 3, ... not (all usable)."""
    n = occ.shape[0]
    stable = jnp.arange(n) % 2 == 0
    return {"stable": stable, "angle": jnp.where(stable, 1.0, 90.0), "valid": jnp.ones((n,), bool)}


def _state(tx, overlay, with_old=False):
    return new_state(overlay, tx, jax.random.PRNGKey(3), with_old=with_old)


def _step(cfg, apply_fn, decode_fn, stability_fn, tx):
    return online.make_online_step(
        apply_fn,
        decode_fn,
        stability_fn,
        tx,
        cfg,
        latent_shape=(8, 16, 16, 16),
        dtype=jnp.float32,
        schedule=lambda s: 1e-2,
    )


def test_one_compiled_step_samples_simulates_and_updates_only_the_overlay():
    cfg, apply_fn, decode_fn, stability_fn, base, cond = _tiny_setup()
    tx = optax.adam(1e-2)
    overlay = lora.init_overlay(jax.random.PRNGKey(2), base, rank=2, alpha=4.0)
    overlay = overlay.replace(factors=jax.tree.map(lambda x: x + 0.01, overlay.factors))  # B != 0: both move
    step = _step(cfg, apply_fn, decode_fn, stability_fn, tx)  # the MJX simulator inside the step
    base_before = jax.tree.map(np.asarray, base)
    compiled = jax.jit(step).lower(_state(tx, overlay), {"cond": cond}, base, {}).compile()
    updated, metrics = compiled(_state(tx, overlay), {"cond": cond}, base, {})
    assert int(updated.step) == 2  # two updates on one batch of samples
    for k in ("stable_rate", "mean_angle", "usable_frac", "valid_frac", "loss", "grad_norm"):
        assert np.isfinite(float(metrics[k])), k
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), base_before, base)


def test_dro_loss_moves_towards_stable_candidates():
    cfg, apply_fn, _, _, base, cond = _tiny_setup()
    overlay = lora.init_overlay(jax.random.PRNGKey(2), base, rank=2, alpha=4.0)
    z = normal(jax.random.PRNGKey(5), (2, 4, 8, 16, 16, 16))
    stable = jnp.array([[True, False, True, False], [False, False, True, False]])
    batch = {"cond": cond, "z": z, "stable": stable}
    loss_fn = online_losses.online_loss("dro")
    loss = jax.jit(lambda ov: loss_fn(apply_fn, base, ov, None, batch, jax.random.PRNGKey(6), cfg)[0])(overlay)
    # With the overlay at identity the loss is mean_c(mean L_stable - mean L_unstable): check it by hand.
    t_key, eps_key = jax.random.split(jax.random.PRNGKey(6))
    from dso_jax.flow import sample_t
    from dso_jax.losses import flow_losses

    t = jnp.repeat(sample_t(t_key, (2,), 1.0, 1.0), 4)
    x0 = z.reshape(8, 8, 16, 16, 16)
    eps = normal(eps_key, x0.shape)
    l = np.asarray(jax.jit(flow_losses, static_argnums=0)(apply_fn, base, x0, jnp.repeat(cond, 4, axis=0), t, eps))
    l = l.reshape(2, 4)
    s = np.asarray(stable)
    want = np.mean([l[c][s[c]].mean() - l[c][~s[c]].mean() for c in range(2)])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)


def test_labelled_candidates_move_the_overlay_and_the_old_policy_trails_it():
    """With both labels in every condition (a stand-in simulator), one round of two NFT updates moves every
    factor of the overlay, and then old <- d old + (1 - d) overlay with d = nft.old_decay ramped over
    nft.old_decay_ramp optimizer steps (here 2 of 8: d = 0.25 * 2 / 8). (DRO's step is compiled above.)"""
    cfg, apply_fn, decode_fn, _, base, cond = _tiny_setup("nft")
    cfg.nft.old_decay, cfg.nft.old_decay_ramp = 0.25, 8
    decay = 0.25 * 2 / 8
    tx = optax.adam(1e-2)
    overlay = lora.init_overlay(jax.random.PRNGKey(2), base, rank=2, alpha=4.0)
    overlay = overlay.replace(factors=jax.tree.map(lambda x: x + 0.01, overlay.factors))
    state = _state(tx, overlay, with_old=True)
    step = jax.jit(_step(cfg, apply_fn, decode_fn, _alternating_verdicts, tx))
    updated, metrics = step(state, {"cond": cond}, base, {})
    assert float(metrics["usable_frac"]) == 1.0 and float(metrics["stable_rate"]) == 0.5
    assert float(metrics["mean_angle"]) == pytest.approx(45.5)
    assert float(metrics["old_decay"]) == pytest.approx(decay)
    want = jax.tree.map(lambda o, n: decay * o + (1 - decay) * n, state.old.factors, updated.overlay.factors)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6), updated.old.factors, want
    )
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), updated.overlay.factors, overlay.factors)
    assert min(jax.tree.leaves(moved)) > 0
    lag = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), updated.old.factors, updated.overlay.factors)
    assert min(jax.tree.leaves(lag)) > 0  # d > 0: the old policy trails the overlay


def test_training_candidates_take_online_sampler_steps_and_the_protocol_keeps_its_sampler():
    config = nft.get_config("toy")
    assert online.train_sampler(config).to_dict() == config.sampler.to_dict()  # 0: the sampler's own steps
    config.online.sampler_steps = 4
    assert online.train_sampler(config).steps == 4 and config.sampler.steps == 10
    assert online._protocol(config)["sampler"]["steps"] == 10  # held out: always config.sampler


def test_candidates_sampled_in_chunks_are_the_same_samples():
    """``online.sample_rows``: the B·K latents drawn a few at a time (``batching.map_rows``) are the same."""
    cfg, apply_fn, decode_fn, _, base, cond = _tiny_setup()
    draw = lambda rows: jax.jit(  # noqa: E731
        make_candidates_fn(apply_fn, decode_fn, None, cfg.sampler, (8, 16, 16, 16), 4, rows=rows)
    )(base, {}, cond, jax.random.PRNGKey(9))
    whole, chunked = draw(0), draw(2)
    np.testing.assert_allclose(np.asarray(chunked["z"]), np.asarray(whole["z"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(chunked["occ"]), np.asarray(whole["occ"]))


def test_old_decay_ramps_linearly_to_its_cap():
    nft = ml_collections.ConfigDict(dict(old_decay=0.5, old_decay_ramp=500))
    assert [float(online.old_decay(nft, s)) for s in (0, 100, 500, 2000)] == pytest.approx([0.0, 0.1, 0.5, 0.5])
    nft.old_decay_ramp = 0
    assert float(online.old_decay(nft, 0)) == 0.5


def test_keep_usable_puts_the_conditions_with_both_labels_first():
    stable = jnp.array([[True, True], [True, False], [False, False], [False, True], [True, True]])
    batch = {"stable": stable, "id": jnp.arange(5)}
    for seed in range(4):
        kept = online.keep_usable(batch, 3, jax.random.PRNGKey(seed))
        ids = np.asarray(kept["id"]).tolist()
        assert sorted(ids[:2]) == [1, 3] and ids[2] in (0, 2, 4)  # both usable ones first, then one of the others
        np.testing.assert_array_equal(np.asarray(kept["stable"]), np.asarray(stable)[np.asarray(kept["id"])])
