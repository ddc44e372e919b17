"""The train step, optimizer and configs as specs (tiny model, CPU)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dpo, dro, pretrain_toy, sft
from dso_jax import lora, losses, online, optim, train
from dso_jax.metrics_writer import MetricWriter
from dso_jax.models import pretrained
from dso_jax.toy.pool import ConditionPool
from dso_jax.train_state import new_state


def test_configs_carry_dso_values():
    for mod, loss, steps in ((dro, "dro", 4000), (dpo, "dpo", 8000), (sft, "sft", 20000)):
        c = mod.get_config()
        assert (c.loss, c.train.steps, c.seed, c.mode) == (loss, steps, 0, "offline")
        assert (c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay, c.optim.grad_clip) == (5e-6, 2000, 0.01, 1.0)
        assert (c.lora.rank, c.lora.alpha, tuple(c.lora.targets)) == (64, 128.0, ("to_q", "to_kv", "to_out", "to_qkv"))
        assert (c.flow.t_mu, c.flow.t_sigma, c.dpo.beta) == (1.0, 1.0, 500.0)
        assert c.model.args.model_channels == 1024 and c.model.args.num_blocks == 24
    assert (dro.get_config().train.batch_size, dro.get_config().train.grad_accum) == (6, 2)
    assert dro.get_config("tiny").data.kind == "synthetic"


def test_configs_are_locked_and_variants_checked():
    c = dro.get_config("tiny")
    with pytest.raises(AttributeError):
        c.train.stepz = 3
    with pytest.raises(ValueError, match="unknown config variant 'huge'"):
        dro.get_config("huge")


def test_lr_is_linear_warmup_then_constant():
    c = dro.get_config().optim
    sched = optim.lr_schedule(c, 4000)
    for step in (0, 1, 1000, 1999, 2000, 2001, 7999):
        assert float(sched(step)) == pytest.approx(5e-6 * min(step / 2000, 1.0), rel=1e-6)


def test_pretraining_lr_is_warmup_then_cosine_to_its_floor():
    c = pretrain_toy.get_config().optim
    sched = optim.lr_schedule(c, 10500)
    assert float(sched(0)) == 0.0 and float(sched(250)) == pytest.approx(c.lr / 2, rel=1e-6)
    assert float(sched(500)) == pytest.approx(c.lr, rel=1e-6)
    assert float(sched(5500)) == pytest.approx(c.lr * (1 + c.final_lr_frac) / 2, rel=1e-5)  # half way down
    assert float(sched(10500)) == pytest.approx(c.lr * c.final_lr_frac, rel=1e-5)


def test_optimizer_matches_torch_adamw_with_grad_clipping():
    torch = pytest.importorskip("torch")
    c = dro.get_config("tiny").optim
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((5, 3)).astype(np.float32)
    grads = [rng.standard_normal((5, 3)).astype(np.float32) * s for s in (0.1, 3.0, 0.5, 2.0, 0.01, 1.0, 0.2, 4.0)]

    tx = optim.make_optimizer(c, 40)
    w, state = jnp.asarray(w0), tx.init(jnp.asarray(w0))
    for g in grads:
        upd, state = tx.update(jnp.asarray(g), state, w)
        w = w + upd

    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.AdamW([p], lr=c.lr, betas=(c.b1, c.b2), eps=c.eps, weight_decay=c.weight_decay)
    lam = lambda s: min(s / c.warmup_steps, 1.0)  # diffusers' constant_with_warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    for g in grads:
        p.grad = torch.from_numpy(g.copy())
        torch.nn.utils.clip_grad_norm_([p], c.grad_clip)
        opt.step()
        sched.step()
    np.testing.assert_allclose(np.asarray(w), p.detach().numpy(), rtol=2e-5, atol=1e-7)


@pytest.fixture(scope="module")
def tiny():
    config = dro.get_config("tiny")
    args = dict(config.model.args.to_dict(), num_blocks=1, resolution=4)  # smaller than :tiny, to compile fast
    module = pretrained.model_from_config(config.model.name, args)
    base = jax.jit(module.init)(jax.random.PRNGKey(0), *pretrained.example_inputs(module, cond_len=1))["params"]
    overlay = lora.init_overlay(jax.random.PRNGKey(1), base, rank=4, alpha=8.0)
    # non-zero b so the gradient reaches both factors
    overlay = overlay.replace(factors=jax.tree.map(lambda x: x + 0.01, overlay.factors))
    return config, pretrained.make_apply_fn(module), base, overlay


def _batch(a, b, seed=0, s=8, c=16, res=4):
    rng = np.random.default_rng(seed)
    return {
        "cond": jnp.asarray(rng.standard_normal((a, b, s, c)), jnp.float32),
        "x0_win": jnp.asarray(rng.standard_normal((a, b, 8, res, res, res)), jnp.float32),
        "x0_lose": jnp.asarray(rng.standard_normal((a, b, 8, res, res, res)), jnp.float32),
    }


def _state(tx, overlay):
    return new_state(overlay, tx, jax.random.key(0))


def test_accumulated_gradient_is_the_mean_over_all_pairs(tiny):
    config, apply_fn, base, overlay = tiny

    def rng_free_loss(apply_fn, base, ov, batch, rng, cfg):  # same pairs -> same loss, whatever the key
        t = jnp.full((batch["x0_win"].shape[0],), 500.0)
        v = apply_fn(lora.merge(base, ov), batch["x0_win"], t, batch["cond"])
        loss = jnp.mean((v - batch["x0_lose"]) ** 2)
        return loss, {"loss": loss}

    tx = optim.make_optimizer(config.optim, config.train.steps)
    step = jax.jit(train.make_train_step(apply_fn, rng_free_loss, tx, config))
    batch = _batch(2, 2)
    as_one = jax.tree.map(lambda x: x.reshape((1, 4) + x.shape[2:]), batch)
    s2, m2 = step(_state(tx, overlay), batch, base)
    s1, m1 = step(_state(tx, overlay), as_one, base)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(s2.overlay), jax.tree.leaves(s1.overlay)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-8)


def test_step_updates_only_the_overlay_and_counts(tiny):
    _, apply_fn, base, overlay = tiny
    config = dpo.get_config("tiny")
    config.optim.warmup_steps = 0  # lr > 0 from the first step
    tx = optim.make_optimizer(config.optim, config.train.steps)
    step = jax.jit(train.make_train_step(apply_fn, losses.LOSSES["dpo"], tx, config), donate_argnums=(0,))
    state = _state(tx, jax.tree.map(jnp.copy, overlay))  # donated: keep the fixture's buffers alive
    before = jax.tree.map(np.array, overlay)
    base_before = jax.tree.map(np.array, base)
    new, metrics = step(state, _batch(2, 3), base)
    assert int(new.step) == 1
    assert {"loss", "grad_norm", "update_norm", "lr", "reward_accuracy"} <= set(metrics)
    assert float(metrics["lr"]) == pytest.approx(config.optim.lr)
    assert float(metrics["loss"]) == pytest.approx(np.log(2.0), abs=0.2)  # policy near the reference
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(new.overlay))]
    assert all(changed)
    assert jax.tree.all(jax.tree.map(np.array_equal, base_before, jax.tree.map(np.asarray, base)))
    # the optimizer state mirrors the overlay only: no base weight has moments
    assert sum(x.size for x in jax.tree.leaves(new.opt_state)) < 3 * lora.count(overlay) + 16


def test_nan_guard_names_the_step(tmp_path):
    writer = MetricWriter(str(tmp_path), enabled=False)
    writer.add(3, {"loss": 1.0})
    with pytest.raises(FloatingPointError, match="step 4: non-finite loss=nan"):
        writer.add(4, {"loss": float("nan"), "lr": 1.0})


def test_online_mode_takes_conditions_from_the_toy_world():
    config = dro.get_config("toy")
    config.data.kind = "tfds"
    with pytest.raises(ValueError, match="data.kind='toy'"):
        online.validate(config)
    pool = ConditionPool(0, 4, 16)
    (s0, b0), (s1, b1) = list(pool.iterate(0, 2))
    assert (s0, s1) == (0, 1) and b0["cond"].shape == (4, 64, 64)
    assert not np.array_equal(b0["cond"], b1["cond"])
    again = dict(pool.iterate(1, 2))[1]  # a resumed run sees the same conditions at the same step
    np.testing.assert_array_equal(again["cond"], b1["cond"])


def test_each_trainer_refuses_the_other_mode():
    with pytest.raises(ValueError, match="config.mode='offline', got 'online'"):
        train.validate(dro.get_config("toy"))
    with pytest.raises(ValueError, match="config.mode='online', got 'offline'"):
        online.validate(dro.get_config("tiny"))


def test_sft_tiny_runs_in_process(tmp_path):
    config = sft.get_config("tiny")
    config.train.steps, config.train.ckpt_every, config.train.log_every = 2, 2, 1
    config.train.peft_export = "lora"
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert {"loss", "loss_win", "grad_norm", "lr", "pairs_per_sec"} <= set(summary)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    assert os.listdir(tmp_path / "peft") == ["step_0000002.safetensors"]
