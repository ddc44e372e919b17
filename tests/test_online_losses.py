"""The online objectives (dso_jax.online_losses): labels -> weights, and DiffusionNFT against a PyTorch twin.

The twin is written from DiffusionNFT's own description (arXiv 2509.16117; NVlabs/DiffusionNFT
``scripts/train_nft_sd3.py``, read, not copied): v+ = beta v + (1 - beta) v_old, v- = (1 + beta) v_old - beta v,
x0± = x_t - t v±, each squared x0 error divided by its detached mean absolute error, r-weighted, times
adv_clip / beta, plus kl_weight ||v - v_ref||^2; r from Flow-GRPO's per-prompt normalised advantage.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dso_jax import lora, online_losses
from dso_jax.flow import TIME_SCALE, noisy_latent, normal, sample_t, velocity_target
from dso_jax.models import SparseStructureFlowModel

torch = pytest.importorskip("torch")


def _nft_cfg(**kw):
    return ml_collections.ConfigDict(
        dict(dict(beta=1.0, adv_clip=5.0, kl_weight=1e-4, adaptive_weight=True, old_decay=0.0, old_decay_ramp=0), **kw)
    )


# ------------------------------------------------------------------ labels


def test_candidate_weights_balance_each_usable_condition():
    stable = jnp.array([[True, False, False, False], [True, True, True, True], [False, True, True, False]])
    w, usable = online_losses.candidate_weights(stable)
    np.testing.assert_array_equal(np.asarray(usable), [True, False, True])
    np.testing.assert_allclose(np.asarray(w.sum(axis=1)), 0.0, atol=1e-7)  # +mean(stable) - mean(unstable)
    np.testing.assert_allclose(np.asarray(w[0]), [1.0, -1 / 3, -1 / 3, -1 / 3])
    np.testing.assert_array_equal(np.asarray(w[1]), 0.0)


def test_first_pair_picks_stable_winner_and_masks_uniform_conditions():
    z = jnp.arange(2 * 3, dtype=jnp.float32).reshape(2, 3, 1)
    win, lose, weight = online_losses.first_pair(z, jnp.array([[False, True, False], [True, True, True]]))
    np.testing.assert_array_equal(np.asarray(win[:, 0]), [1.0, 3.0])
    np.testing.assert_array_equal(np.asarray(lose[:, 0]), [0.0, 3.0])
    np.testing.assert_array_equal(np.asarray(weight), [1.0, 0.0])


def test_group_advantages_are_flow_grpos_per_prompt_normalisation():
    stable = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0], [0, 0, 0, 0]], bool)
    adv, usable = online_losses.group_advantages(jnp.asarray(stable))
    r = stable.astype(np.float64)
    want = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-4)  # NumPy's population std
    np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(usable), [True, False, True, False])
    assert float(adv[0, 0]) == pytest.approx(np.sqrt(3.0), rel=1e-3)  # one stable of four: A = sqrt((1-p)/p)
    np.testing.assert_array_equal(np.asarray(adv)[[1, 3]], 0.0)  # all agree: no signal


def test_nft_rewards_are_clipped_advantages_mapped_to_the_unit_interval():
    stable = jnp.array([[True] + [False] * 99])  # A = sqrt(99) ~ 9.9 for the one stable candidate: clipped to 5
    r, _ = online_losses.nft_rewards(stable, adv_clip=5.0)
    assert float(r[0, 0]) == pytest.approx(1.0)
    assert float(r[0, 1]) == pytest.approx(0.5 - (1 / np.sqrt(99)) / 10, rel=1e-3)


# ------------------------------------------------------------------ the NFT objective vs a PyTorch twin


def twin_nft(v, v_old, v_ref, x0, eps, t, r, mask, beta, clip, kl_weight):
    """DiffusionNFT's loss from its description, on torch tensors (v requires grad)."""
    tb = t.view(-1, *([1] * (x0.ndim - 1)))
    xt = (1 - tb) * x0 + tb * eps
    v_old, v_ref = v_old.detach(), v_ref.detach()
    pos = beta * v + (1 - beta) * v_old
    neg = (1 + beta) * v_old - beta * v
    dims = tuple(range(1, x0.ndim))

    def weighted(pred_v):
        x0_pred = xt - tb * pred_v
        with torch.no_grad():
            w = (x0_pred - x0).abs().mean(dim=dims, keepdim=True).clamp(min=1e-5)
        return ((x0_pred - x0) ** 2 / w).mean(dim=dims)

    per = (r * weighted(pos) / beta + (1 - r) * weighted(neg) / beta) * clip
    policy = (mask * per).sum() / mask.sum().clamp(min=1)
    return policy + kl_weight * ((v - v_ref) ** 2).mean(dim=dims).mean()


def _velocities(seed=0, n=6, shape=(2, 3, 3, 3)):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    x0, eps, v_old, v_ref = (normal(k, (n,) + shape) for k in ks[:4])
    v = v_old + 0.3 * normal(ks[4], (n,) + shape)
    t = jax.random.uniform(ks[5], (n,), minval=0.05, maxval=0.95)
    r = jnp.array([0.9, 0.2, 0.5, 0.7, 0.1, 0.6])
    mask = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    return v, v_old, v_ref, x0, eps, t, r, mask


@pytest.mark.parametrize(
    "cfg", [_nft_cfg(), _nft_cfg(beta=0.1, adv_clip=2.0, kl_weight=0.5)], ids=["diffusionnft", "beta0.1_kl0.5"]
)
def test_nft_objective_matches_the_twin_value_and_gradient(cfg):
    v, v_old, v_ref, x0, eps, t, r, mask = _velocities()
    target = velocity_target(x0, eps)

    def ours(v_):
        return online_losses.nft_objective(v_, v_old, v_ref, target, t, r, mask, cfg)[0]

    loss, grad = jax.value_and_grad(ours)(v)
    tv = torch.tensor(np.asarray(v), dtype=torch.float64, requires_grad=True)
    to = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
    want = twin_nft(
        tv, to(v_old), to(v_ref), to(x0), to(eps), to(t), to(r), to(mask), cfg.beta, cfg.adv_clip, cfg.kl_weight
    )
    want.backward()
    np.testing.assert_allclose(float(loss), want.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), tv.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_nft_objective_sends_no_gradient_into_the_old_policy_or_the_base():
    v, v_old, v_ref, x0, eps, t, r, mask = _velocities()
    target = velocity_target(x0, eps)
    g_old, g_ref = jax.grad(
        lambda a, b: online_losses.nft_objective(v, a, b, target, t, r, mask, _nft_cfg(kl_weight=1.0))[0],
        argnums=(0, 1),
    )(v_old, v_ref)
    assert float(jnp.max(jnp.abs(g_old))) == 0.0 and float(jnp.max(jnp.abs(g_ref))) == 0.0


def test_nft_pushes_stable_candidates_towards_their_target_and_unstable_ones_away():
    """At v = v_old the gradient is (2r - 1) times the (weighted) flow-matching gradient: a swapped v± or a sign
    error flips it."""
    v, v_old, v_ref, x0, eps, t, r, mask = _velocities()
    target = velocity_target(x0, eps)
    g = jax.grad(lambda a: online_losses.nft_objective(a, v_old, v_ref, target, t, r, mask, _nft_cfg(kl_weight=0))[0])(
        v_old
    )
    fm = v_old - target  # the direction in which the flow-matching loss grows
    along = np.asarray(jnp.sum((g * fm).reshape(6, -1), axis=1))
    sign = np.sign(np.asarray(r) - 0.5) * np.asarray(mask)
    np.testing.assert_array_equal(np.sign(along), sign)  # r > 1/2: descent lowers the error; r < 1/2: raises it


# ------------------------------------------------------------------ nft_loss on a model: which policy is which


@pytest.fixture(scope="module")
def tiny():
    model = SparseStructureFlowModel(
        resolution=4,
        in_channels=2,
        out_channels=2,
        model_channels=16,
        cond_channels=8,
        num_blocks=1,
        num_heads=2,
        patch_size=1,
        qk_rms_norm=True,
    )
    cond = normal(jax.random.PRNGKey(1), (2, 5, 8))
    base = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 2, 4, 4, 4)), jnp.zeros((1,)), cond[:1])["params"]
    apply_fn = lambda p, x, t, c: model.apply({"params": p}, x, t, c)  # noqa: E731

    def overlay(seed, scale):
        ov = lora.init_overlay(jax.random.PRNGKey(seed), base, rank=2, alpha=4.0)
        noise = lambda x: x + scale * normal(jax.random.PRNGKey(seed + 100), x.shape)  # noqa: E731
        return ov.replace(factors=jax.tree.map(noise, ov.factors))

    z = normal(jax.random.PRNGKey(5), (2, 3, 2, 4, 4, 4))
    stable = jnp.array([[True, False, False], [False, True, True]])
    batch = {"cond": cond, "z": z, "stable": stable}
    cfg = ml_collections.ConfigDict(dict(flow=dict(t_mu=1.0, t_sigma=1.0), nft=_nft_cfg(kl_weight=0.5).to_dict()))
    return apply_fn, base, overlay(2, 0.05), overlay(3, 0.05), batch, cfg


def test_nft_loss_reads_the_overlay_the_old_policy_and_the_base(tiny):
    """The model-level loss equals the twin on v = base⊕overlay, v_old = base⊕old, v_ref = base at the t and eps
    it draws (one t per condition): using the current policy as the old one or as the reference fails this."""
    apply_fn, base, overlay, old, batch, cfg = tiny
    rng = jax.random.PRNGKey(7)
    loss = jax.jit(lambda ov, o: online_losses.nft_loss(apply_fn, base, ov, o, batch, rng, cfg)[0])(overlay, old)
    k_t, k_eps = jax.random.split(rng)
    t = jnp.repeat(sample_t(k_t, (2,), 1.0, 1.0), 3)
    x0 = batch["z"].reshape((6,) + batch["z"].shape[2:])
    eps = normal(k_eps, x0.shape)
    cond = jnp.repeat(batch["cond"], 3, axis=0)
    x_t = noisy_latent(x0, eps, t)
    apply = jax.jit(lambda p: apply_fn(p, x_t, TIME_SCALE * t, cond))
    vel = lambda p: np.asarray(apply(p), np.float64)  # noqa: E731
    v, v_old, v_ref = vel(lora.merge(base, overlay)), vel(lora.merge(base, old)), vel(base)
    r, ok = online_losses.nft_rewards(batch["stable"], 5.0)
    to = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
    mask = np.repeat(np.asarray(ok), 3).astype(np.float64)
    want = twin_nft(to(v), to(v_old), to(v_ref), to(x0), to(eps), to(t), to(r.reshape(-1)), to(mask), 1.0, 5.0, 0.5)
    np.testing.assert_allclose(float(loss), want.item(), rtol=2e-5)


def test_nft_loss_gradient_does_not_flow_through_the_old_policy(tiny):
    """Passing the trained overlay itself as the old policy gives the gradient of a detached copy."""
    apply_fn, base, overlay, _, batch, cfg = tiny
    rng = jax.random.PRNGKey(8)
    frozen = jax.tree.map(jnp.copy, overlay)
    same = jax.jit(jax.grad(lambda ov: online_losses.nft_loss(apply_fn, base, ov, ov, batch, rng, cfg)[0]))(overlay)
    copy = jax.jit(jax.grad(lambda ov: online_losses.nft_loss(apply_fn, base, ov, frozen, batch, rng, cfg)[0]))(overlay)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7), same, copy
    )
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(same)) > 0


def test_online_loss_names():
    for name in ("dro", "dpo", "sft", "nft"):
        assert callable(online_losses.online_loss(name))
    with pytest.raises(ValueError, match="config.loss must be one of \\['dro', 'dpo', 'sft', 'nft'\\], got 'grpo'"):
        online_losses.online_loss("grpo")
