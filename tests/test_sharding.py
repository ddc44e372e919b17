"""The sharded step equals the one-device step (8 fake CPU devices, in a subprocess)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, sys.argv[1])
    import jax, jax.numpy as jnp, numpy as np
    import ml_collections
    from configs import dro
    from dso_jax import lora, losses, optim, sharding, train
    from dso_jax.train_state import new_state
    from dso_jax.models import pretrained

    assert jax.device_count() == 8
    config = dro.get_config("tiny")
    config.optim.warmup_steps = 0
    # Adam's first step is lr * g / (|g| + eps): with eps ~ |g| it is smooth in g, so the update
    # difference measures the gradient difference (with eps = 1e-8 it is ~sign(g), and tiny
    # gradients flip sign under any change of summation order).
    config.optim.eps = 1.0
    args = dict(config.model.args.to_dict(), num_blocks=1, resolution=4)
    module = pretrained.model_from_config(config.model.name, args)
    apply_fn = pretrained.make_apply_fn(module)
    base = jax.jit(module.init)(jax.random.PRNGKey(0), *pretrained.example_inputs(module, cond_len=1))["params"]
    overlay = lora.init_overlay(jax.random.PRNGKey(1), base, rank=4, alpha=8.0)
    overlay = overlay.replace(factors=jax.tree.map(lambda x: x + 0.01, overlay.factors))
    tx = optim.make_optimizer(config.optim, config.train.steps)
    rng = np.random.default_rng(0)
    a, b = 2, 8  # 2 micro-batches of 8 pairs
    batch = {
        "cond": rng.standard_normal((a, b, 8, 16)).astype(np.float32),
        "x0_win": rng.standard_normal((a, b, 8, 4, 4, 4)).astype(np.float32),
        "x0_lose": rng.standard_normal((a, b, 8, 4, 4, 4)).astype(np.float32),
    }
    step_fn = train.make_train_step(apply_fn, losses.LOSSES["dro"], tx, config)

    def run(data, fsdp):
        mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, distributed=False)),
                                  devices=jax.devices()[: data * fsdp])
        state = new_state(overlay, tx, jax.random.key(0))
        s_sh = sharding.param_shardings(state, mesh, min_size=1)  # shard even tiny arrays over fsdp
        b_sh = sharding.param_shardings(base, mesh, min_size=1)
        fn = jax.jit(step_fn, in_shardings=(s_sh, sharding.batch_sharding(mesh, 1), b_sh),
                     out_shardings=(s_sh, sharding.replicated(mesh)))
        gbatch = sharding.host_to_global(batch, mesh, batch_axis=1)
        new, m = fn(jax.device_put(state, s_sh), gbatch, jax.device_put(base, b_sh))
        n_sharded = sum(1 for x in jax.tree.leaves(new.overlay) if not x.sharding.is_fully_replicated)
        m = {k: float(v) for k, v in m.items()}
        return m, [np.asarray(x) for x in jax.tree.leaves(new.overlay)], n_sharded

    ref_m, ref_ov, _ = run(1, 1)
    old = [np.asarray(x) for x in jax.tree.leaves(overlay)]
    ref_upd = [y - z for y, z in zip(ref_ov, old)]
    out = {}
    for data, fsdp in ((8, 1), (4, 2)):
        m, ov, n_sharded = run(data, fsdp)
        out[f"{data}x{fsdp}"] = dict(
            metrics=m, ref_metrics=ref_m, n_sharded=n_sharded,
            update=max(float(np.max(np.abs(u))) for u in ref_upd),
            overlay_rel=max(float(np.max(np.abs(x - y)) / np.max(np.abs(y))) for x, y in zip(ov, ref_ov)),
        )
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT, REPO], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT") :])


@pytest.mark.parametrize("mesh", ["8x1", "4x2"])
def test_sharded_step_matches_one_device(results, mesh):
    r = results[mesh]
    m, ref = r["metrics"], r["ref_metrics"]
    assert r["update"] > 1e-5  # the step really moved the overlay
    for k in ("loss_win", "loss_lose", "grad_norm"):
        assert abs(m[k] - ref[k]) <= 1e-6 * abs(ref[k]), k
    # DRO's loss is a difference of two ~3.0 terms: compare it on their scale
    assert abs(m["loss"] - ref["loss"]) <= 1e-6 * ref["loss_win"]
    assert r["overlay_rel"] < 1e-6
    if mesh == "4x2":
        assert r["n_sharded"] > 0  # the fsdp axis really splits arrays


def test_mesh_shapes():
    import jax
    import ml_collections

    from dso_jax import sharding

    cfg = lambda d, f: ml_collections.ConfigDict(dict(data=d, fsdp=f, distributed=False))
    devs = jax.devices()[:1] * 1
    assert dict(sharding.make_mesh(cfg(-1, 1), devs).shape) == {"data": 1, "fsdp": 1}
    with pytest.raises(ValueError, match="does not tile"):
        sharding.make_mesh(cfg(2, 1), devs)
    assert sharding.fsdp_spec((1024, 3072), 2) == jax.sharding.PartitionSpec(None, "fsdp")
    assert sharding.fsdp_spec((64,), 2) == jax.sharding.PartitionSpec()
