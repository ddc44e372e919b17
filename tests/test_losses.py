"""DSO's losses (dso.md §3): our JAX functions against PyTorch twins of DSO's formulas on shared inputs.

The twins below are written from dso.md §3 (x_t = (1 - t) x0 + t eps, target eps - x0, model fed
1000 t, per-sample mean; DRO mean(L_w - L_l); DPO -logsigmoid(-beta/2 [(L_w - L_l) - (L_w,ref - L_l,ref)]);
SFT mean L_w). They are fed the t and eps our losses draw (``draw_noise``) and a model whose outputs
are the tiny Flax DiT's (policy: base + overlay, reference: base), bridged through numpy.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dso_jax import lora, losses
from dso_jax.convert import peft as peft_io
from dso_jax.flow import normal
from dso_jax.models import SparseStructureFlowModel

torch = pytest.importorskip("torch")
F = torch.nn.functional

B, S, CC, R = 3, 8, 32, 4
BETA = 500.0


# ------------------------------------------------------------------ PyTorch twins of DSO's formulas


def twin_fm_loss(model, x0, t, cond, eps):
    tb = t.view(t.shape + (1,) * (x0.ndim - 1))
    xt = (1 - tb) * x0 + tb * eps
    pred = model(xt, t * 1000, cond)
    return (pred - (eps - x0)).pow(2).mean(dim=tuple(range(1, x0.ndim)))


def twin_pair(model, x0_w, x0_l, t, cond, eps):
    x0, t2, c2 = torch.cat([x0_w, x0_l]), torch.cat([t, t]), torch.cat([cond, cond])
    return twin_fm_loss(model, x0, t2, c2, eps).chunk(2)


def twin_dro(model, x0_w, x0_l, t, cond, eps):
    l_w, l_l = twin_pair(model, x0_w, x0_l, t, cond, eps)
    return (l_w - l_l).mean()


def twin_dpo(model, ref, x0_w, x0_l, t, cond, eps, beta):
    l_w, l_l = twin_pair(model, x0_w, x0_l, t, cond, eps)
    with torch.no_grad():
        r_w, r_l = twin_pair(ref, x0_w, x0_l, t, cond, eps)
    inside = -0.5 * beta * ((l_w - l_l) - (r_w - r_l))
    return -F.logsigmoid(inside).mean()


def twin_sft(model, x0, t, cond, eps):
    return twin_fm_loss(model, x0, t, cond, eps).mean()


# ------------------------------------------------------------------ fixtures


def random_params(shapes, seed):
    """Random float32 params for an abstract tree (no compile): kernels ~ N(0, 1/fan_in), others ~ 1 + N(0, 0.1)
    for scales/gammas and N(0, 0.1) for biases."""
    rs = np.random.RandomState(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(rs.randn(*s.shape) / math.sqrt(s.shape[0]), jnp.float32)
        base = 1.0 if name in ("scale", "gamma") else 0.0
        return jnp.asarray(base + 0.1 * rs.randn(*s.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def with_random_b(overlay, key, std=0.05):
    """The overlay with b ~ N(0, std^2), so base + overlay differs from the base."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(overlay.factors)
    keys = jax.random.split(key, len(leaves))
    new = [std * normal(k, x.shape) if p[-1].key == "b" else x for k, (p, x) in zip(keys, leaves)]
    return overlay.replace(factors=jax.tree_util.tree_unflatten(tree, new))


@pytest.fixture(scope="module")
def setup():
    model = SparseStructureFlowModel(
        resolution=R,
        in_channels=8,
        model_channels=64,
        cond_channels=CC,
        out_channels=8,
        num_blocks=2,
        num_heads=4,
        patch_size=1,
        qk_rms_norm=True,
    )
    shapes = jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, R, R, R)), jnp.zeros((1,)), jnp.zeros((1, S, CC))
    )
    params = random_params(shapes["params"], seed=0)
    overlay = with_random_b(lora.init_overlay(jax.random.PRNGKey(1), params, rank=4, alpha=8.0), jax.random.PRNGKey(2))
    ks = jax.random.split(jax.random.PRNGKey(3), 3)
    batch = {
        "cond": normal(ks[0], (B, S, CC)),
        "x0_win": normal(ks[1], (B, 8, R, R, R)),
        "x0_lose": normal(ks[2], (B, 8, R, R, R)),
    }
    cfg = ml_collections.ConfigDict({"flow": {"t_mu": 1.0, "t_sigma": 1.0}, "dpo": {"beta": BETA}})
    apply_fn = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
    return apply_fn, params, overlay, batch, cfg


def toy_apply(params, x, t, cond):
    """A cheap stand-in with the model's interface and two targeted Dense layers (fast to compile)."""
    b, c = x.shape[:2]
    h = x.reshape(b, c, -1).transpose(0, 2, 1)  # (B, L, C)
    p = params["blocks_0"]
    h = jnp.tanh(h @ p["self_attn"]["to_qkv"]["kernel"] + p["self_attn"]["to_qkv"]["bias"])
    ctx = jnp.mean(cond @ p["cross_attn"]["to_kv"]["kernel"] + p["cross_attn"]["to_kv"]["bias"], axis=1)  # (B, C)
    h = h + ctx[:, None] + 1e-3 * t[:, None, None]
    return h.transpose(0, 2, 1).reshape(x.shape)


@pytest.fixture(scope="module")
def toy(setup):
    *_, batch, cfg = setup
    rs = np.random.RandomState(1)
    dense = lambda i, o: {"kernel": jnp.asarray(rs.randn(i, o) / math.sqrt(i), jnp.float32), "bias": jnp.zeros((o,))}
    params = {"blocks_0": {"self_attn": {"to_qkv": dense(8, 8)}, "cross_attn": {"to_kv": dense(CC, 8)}}}
    overlay = with_random_b(
        lora.init_overlay(jax.random.PRNGKey(1), params, rank=2, alpha=4.0), jax.random.PRNGKey(2), 0.3
    )
    return jax.jit(toy_apply), params, overlay, batch, cfg


def bridge(apply_fn, params):
    """A torch callable whose outputs are the Flax model's at ``params``."""

    def f(x, t, c):
        out = apply_fn(
            params, jnp.asarray(x.detach().numpy()), jnp.asarray(t.detach().numpy()), jnp.asarray(c.detach().numpy())
        )
        return torch.from_numpy(np.array(out))

    return f


def tt(x):
    return torch.from_numpy(np.array(x, np.float32))


def _shared(setup, pairs=True):
    apply_fn, params, overlay, batch, cfg = setup
    rng = jax.random.PRNGKey(7)
    t, eps = losses.draw_noise(rng, batch, cfg, pairs=pairs)
    policy = bridge(apply_fn, lora.merge(params, overlay))
    ref = bridge(apply_fn, params)
    return rng, t, eps, policy, ref


# ------------------------------------------------------------------ parity with DSO's formulas


def test_flow_losses_match_dso_formula(setup):
    apply_fn, params, overlay, batch, cfg = setup
    _, t, eps, policy, _ = _shared(setup, pairs=False)
    merged = lora.merge(params, overlay)
    ours = losses.flow_losses(apply_fn, merged, batch["x0_win"], batch["cond"], t, eps)
    want = twin_fm_loss(policy, tt(batch["x0_win"]), tt(t), tt(batch["cond"]), tt(eps))
    assert ours.shape == (B,)
    np.testing.assert_allclose(np.asarray(ours), want.numpy(), rtol=1e-6)


def test_dro_matches_dso(setup):
    apply_fn, params, overlay, batch, cfg = setup
    rng, t, eps, policy, _ = _shared(setup)
    loss, m = losses.dro_loss(apply_fn, params, overlay, batch, rng, cfg)
    want = twin_dro(policy, tt(batch["x0_win"]), tt(batch["x0_lose"]), tt(t), tt(batch["cond"]), tt(eps))
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(m["loss_win"] - m["loss_lose"]), float(want), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("beta,atol", [(1.0, 1e-6), (BETA, 1e-4)])
def test_dpo_matches_dso(setup, beta, atol):
    # beta/2 multiplies the float32 rounding of the per-sample losses (~3e-7 at L ~ 1): 1e-4 at beta 500
    apply_fn, params, overlay, batch, cfg = setup
    cfg = ml_collections.ConfigDict({**cfg.to_dict(), "dpo": {"beta": beta}})
    rng, t, eps, policy, ref = _shared(setup)
    loss, m = losses.dpo_loss(apply_fn, params, overlay, batch, rng, cfg)
    want = twin_dpo(policy, ref, tt(batch["x0_win"]), tt(batch["x0_lose"]), tt(t), tt(batch["cond"]), tt(eps), beta)
    if beta == BETA:
        assert abs(float(want) - math.log(2)) > 1e-2, "the overlay must move the policy away from the reference"
    np.testing.assert_allclose(float(loss), float(want), rtol=0, atol=atol)
    assert 0.0 <= float(m["reward_accuracy"]) <= 1.0


def test_sft_matches_dso(setup):
    apply_fn, params, overlay, batch, cfg = setup
    rng, t, eps, policy, _ = _shared(setup, pairs=False)
    loss, _ = losses.sft_loss(apply_fn, params, overlay, batch, rng, cfg)
    want = twin_sft(policy, tt(batch["x0_win"]), tt(t), tt(batch["cond"]), tt(eps))
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)


# ------------------------------------------------------------------ behaviour


def test_dpo_starts_at_log2_with_identity_overlay(toy):
    apply_fn, params, _, batch, cfg = toy
    fresh = lora.init_overlay(jax.random.PRNGKey(4), params, rank=2, alpha=4.0)
    loss, m = losses.dpo_loss(apply_fn, params, fresh, batch, jax.random.PRNGKey(0), cfg)
    np.testing.assert_allclose(float(loss), math.log(2), atol=1e-3)


class Recorder:
    """apply_fn stand-in that records its inputs; v = w x + 1e-3 t mean(cond)."""

    def __init__(self):
        self.calls = []

    def __call__(self, params, x, t, cond):
        self.calls.append((x, t, cond))
        return x * params["w"] + 1e-3 * t[:, None, None, None, None] * jnp.mean(cond)


def test_one_t_per_pair_independent_eps_one_2b_forward(setup):
    *_, batch, cfg = setup
    base = {"w": jnp.ones(())}
    rec = Recorder()
    losses.dpo_loss(rec, base, lora.Overlay(factors={}, scale=1.0), batch, jax.random.PRNGKey(0), cfg)
    assert len(rec.calls) == 2  # policy and reference, each one batch of 2B
    (x_p, t_p, c_p), (x_r, t_r, c_r) = rec.calls
    assert x_p.shape[0] == 2 * B and t_p.shape == (2 * B,) and c_p.shape[0] == 2 * B
    np.testing.assert_array_equal(t_p[:B], t_p[B:])  # shared by winner and loser
    np.testing.assert_array_equal(t_p, t_r)  # and by the reference
    np.testing.assert_array_equal(x_p, x_r)  # same eps for the reference
    np.testing.assert_array_equal(c_p[:B], c_p[B:])
    t, eps = losses.draw_noise(jax.random.PRNGKey(0), batch, cfg)
    assert not np.allclose(eps[:B], eps[B:])  # independent noise for winner and loser
    np.testing.assert_allclose(np.asarray(t_p), 1000.0 * np.concatenate([t, t]), rtol=1e-6)
    tb = t[:, None, None, None, None]
    np.testing.assert_allclose(x_p[:B], (1 - tb) * batch["x0_win"] + tb * eps[:B], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(x_p[B:], (1 - tb) * batch["x0_lose"] + tb * eps[B:], rtol=1e-6, atol=1e-6)
    rec = Recorder()
    losses.dro_loss(rec, base, lora.Overlay(factors={}, scale=1.0), batch, jax.random.PRNGKey(0), cfg)
    assert len(rec.calls) == 1 and rec.calls[0][0].shape[0] == 2 * B


def test_t_is_logit_normal_from_cfg():
    cfg = ml_collections.ConfigDict({"flow": {"t_mu": 1.0, "t_sigma": 1.0}})
    batch = {"x0_win": jnp.zeros((20000, 1))}
    t, _ = losses.draw_noise(jax.random.PRNGKey(0), batch, cfg)
    np.testing.assert_allclose(np.median(np.asarray(t)), 1 / (1 + math.exp(-1.0)), atol=5e-3)  # sigmoid(mu)


@pytest.mark.parametrize("name", ["dro", "dpo", "sft"])
def test_weight_masks_pairs(toy, name):
    apply_fn, params, overlay, batch, cfg = toy
    fn, rng = losses.LOSSES[name], jax.random.PRNGKey(5)
    w = jnp.array([1.0, 0.0, 1.0])
    masked, _ = fn(apply_fn, params, overlay, {**batch, "weight": w}, rng, cfg)
    # per-pair values from one-hot weights (same rng, so the same t and eps for every call)
    per_pair = [float(fn(apply_fn, params, overlay, {**batch, "weight": jnp.eye(B)[i]}, rng, cfg)[0]) for i in range(B)]
    np.testing.assert_allclose(float(masked), (per_pair[0] + per_pair[2]) / 2, rtol=1e-5)
    plain, _ = fn(apply_fn, params, overlay, batch, rng, cfg)
    np.testing.assert_allclose(float(plain), np.mean(per_pair), rtol=1e-5)
    zero, _ = fn(apply_fn, params, overlay, {**batch, "weight": jnp.zeros(B)}, rng, cfg)
    assert float(zero) == 0.0


@pytest.mark.parametrize("name", ["dro", "dpo", "sft"])
def test_gradients_flow_to_the_overlay_only(toy, name):
    apply_fn, params, overlay, batch, cfg = toy
    fn = losses.LOSSES[name]
    grad_fn = jax.jit(jax.grad(lambda o, p: fn(apply_fn, p, o, batch, jax.random.PRNGKey(0), cfg)[0]))
    g = grad_fn(overlay, params)
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(overlay)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(g))
    assert sum(float(jnp.abs(x).sum()) for x in jax.tree_util.tree_leaves(g)) > 0


def test_dpo_reference_carries_no_gradient(toy):
    # With an overlay, d loss / d base goes through the policy only: it equals the gradient of
    # the same loss where the reference losses are fed in as constants.
    apply_fn, params, overlay, batch, cfg = toy
    rng = jax.random.PRNGKey(0)
    x0, t2, cond, eps, _ = losses._pair_inputs(batch, rng, cfg)
    r_w, r_l = losses._pair_losses(apply_fn, params, x0, t2, cond, eps)

    def constant_ref(p):
        l_w, l_l = losses._pair_losses(apply_fn, lora.merge(p, overlay), x0, t2, cond, eps)
        return jnp.mean(-jax.nn.log_sigmoid(-0.5 * BETA * ((l_w - l_l) - (r_w - r_l))))

    g = jax.grad(lambda p: losses.dpo_loss(apply_fn, p, overlay, batch, rng, cfg)[0])(params)
    want = jax.grad(constant_ref)(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, want)


def test_losses_compute_in_float32_for_bf16_model(toy):
    apply_fn, params, overlay, batch, cfg = toy
    bf16_fn = lambda p, x, t, c: apply_fn(p, x, t, c).astype(jnp.bfloat16)
    half = {k: v.astype(jnp.bfloat16) if k != "weight" else v for k, v in batch.items()}
    for fn in losses.LOSSES.values():
        loss, m = fn(bf16_fn, params, overlay, half, jax.random.PRNGKey(0), cfg)
        assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in m.values())


# ------------------------------------------------------------------ gradients vs peft on the PyTorch twin


@pytest.mark.parametrize("name", ["dro", "dpo"])
def test_overlay_gradients_match_peft_twin(name):
    # DRO / DPO through DSO's formulas on the peft-wrapped twin (reference: adapter disabled) and through
    # ours: loss and d loss / d lora_B agree (b = lora_B.T); measured 2.4e-6 relative.
    peft = pytest.importorskip("peft")
    from helpers_trellis import TINY_FLOW_ARGS, flow_pair

    args = {**TINY_FLOW_ARGS, "use_fp16": False}
    apply_fn, params, twin = flow_pair(args, seed=0)
    model = peft.get_peft_model(
        twin, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["to_q", "to_kv", "to_out", "to_qkv"])
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    overlay = peft_io.load_peft(model.state_dict(), params, alpha=8.0)

    r, c = args["resolution"], args["in_channels"]
    rs = np.random.RandomState(0)
    batch = {
        "cond": jnp.asarray(rs.randn(2, 6, args["cond_channels"]), jnp.float32),
        "x0_win": jnp.asarray(rs.randn(2, c, r, r, r), jnp.float32),
        "x0_lose": jnp.asarray(rs.randn(2, c, r, r, r), jnp.float32),
    }
    cfg = ml_collections.ConfigDict({"flow": {"t_mu": 1.0, "t_sigma": 1.0}, "dpo": {"beta": BETA}})
    rng = jax.random.PRNGKey(3)
    loss, grads = jax.jit(jax.value_and_grad(lambda o: losses.LOSSES[name](apply_fn, params, o, batch, rng, cfg)[0]))(
        overlay
    )

    t, eps = losses.draw_noise(rng, batch, cfg)
    inputs = (tt(batch["x0_win"]), tt(batch["x0_lose"]), tt(t), tt(batch["cond"]), tt(eps))

    def reference(x, tm, cd):
        with model.disable_adapter():
            return model(x, tm, cd)

    want = twin_dpo(model, reference, *inputs, BETA) if name == "dpo" else twin_dro(model, *inputs)
    want.backward()
    np.testing.assert_allclose(float(loss), want.item(), rtol=1e-4, atol=1e-6)
    worst = 0.0
    for pname, p in model.named_parameters():
        if "lora_B" not in pname:
            continue
        path = lora.target_paths(params)[
            [lora.torch_name(q) for q in lora.target_paths(params)].index(
                pname.replace("base_model.model.", "").rsplit(".lora_B", 1)[0]
            )
        ]
        ours = np.asarray(lora.get_path(grads.factors, path)["b"]).T
        ref = p.grad.numpy()
        worst = max(worst, np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
    assert worst <= 1e-4, f"max relative gradient error {worst:.3g}"


def test_flow_normal_is_jax_random_normal_drawn_flat():
    """The losses' and samplers' noise: the same numbers as ``jax.random.normal(key, shape)`` (a flat draw
    compiles in a fraction of a 5-D one's time on XLA's CPU backend)."""
    key = jax.random.PRNGKey(4)
    shape = (2, 3, 2, 2, 2)
    got = normal(key, shape)
    assert got.shape == shape and got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.random.normal(key, shape)))
