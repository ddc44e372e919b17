"""The online DSO step at full size on one GPU: time of each stage and of the fused jitted step.

    python bench/online.py [--conditions 8] [--candidates 4] [--sampler_steps 12]

Full-size TRELLIS stage-1 flow model and decoder (random weights of the released architectures, bf16
compute, remat in the update), DINOv2-shaped conditions (1374 x 1024), MJX verdicts on the 64^3
occupancies, a DRO update of a rank-64 LoRA overlay. Stages are timed as separate jitted functions
(median of --reps after a warm-up), then the whole ``online.make_online_step`` as one program.
"""

from __future__ import annotations

import argparse
import statistics
import time

from ssflow import _median_time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--conditions", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--sampler_steps", type=int, default=12)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import optax

    from configs import dro
    from dso_jax import lora, online
    from dso_jax.candidates import policy_params
    from dso_jax.models import pretrained
    from dso_jax.physics import rollout as physics
    from dso_jax.train_state import new_state

    config = dro.get_config()
    config.unlock()
    config.sampler.steps = args.sampler_steps
    config.online.num_candidates = args.candidates
    dtype = jnp.bfloat16
    flow = pretrained.model_from_config(
        "SparseStructureFlowModel", dict(config.model.args.to_dict(), use_checkpoint=True), dtype=dtype
    )
    apply_fn = pretrained.make_apply_fn(flow)
    base = jax.jit(flow.init)(jax.random.key(0), *pretrained.example_inputs(flow))["params"]
    decode_fn, dec_params = online.make_decoder(config.decoder, dtype, 0)
    stability = physics.make_stability_fn(config.physics)
    tx = optax.adamw(5e-6, weight_decay=0.01)
    overlay = lora.init_overlay(jax.random.key(1), base, rank=64, alpha=128.0)
    state = new_state(overlay, tx, jax.random.key(2))
    b, k = args.conditions, args.candidates
    cond = jax.random.normal(jax.random.key(3), (b, 1374, 1024))
    latent = (8, 16, 16, 16)
    rows = []

    params = policy_params(base, overlay, dtype)
    from dso_jax.models.ss_decoder import occupancy_from_logits
    from dso_jax.sampling import sample_from_config

    sample = jax.jit(
        lambda p, c, key: sample_from_config(
            apply_fn, p, jax.random.normal(key, (b * k,) + latent), jnp.repeat(c, k, axis=0), config.sampler
        )
    )
    z = sample(params, cond, jax.random.key(4)).block_until_ready()
    rows.append(
        (
            "sample (12-step CFG)",
            _median_time(lambda: sample(params, cond, jax.random.key(4)).block_until_ready(), args.reps, 1),
        )
    )
    decode = jax.jit(lambda dp, z: occupancy_from_logits(decode_fn(dp, z)))
    occ = decode(dec_params, z).block_until_ready()
    rows.append(("decode 64^3", _median_time(lambda: decode(dec_params, z).block_until_ready(), args.reps, 1)))
    simulate = jax.jit(stability)
    verdict = simulate(occ)
    jax.block_until_ready(verdict)
    rows.append(("simulate (MJX)", _median_time(lambda: jax.block_until_ready(simulate(occ)), args.reps, 1)))
    labelled = {"cond": cond, "z": z.reshape((b, k) + latent), "stable": verdict["stable"].reshape(b, k)}
    loss_fn = online.online_loss("dro")

    @jax.jit
    def update(st, bp, lab):  # base and batch are arguments, never baked-in constants
        (_, m), g = jax.value_and_grad(
            lambda ov: loss_fn(apply_fn, bp, ov, lab, jax.random.key(5), config), has_aux=True
        )(st.overlay)
        upd, opt = tx.update(g, st.opt_state, st.overlay)
        return st.replace(overlay=optax.apply_updates(st.overlay, upd), opt_state=opt), m

    jax.block_until_ready(update(state, base, labelled))
    rows.append(
        (
            "update (DRO, all candidates)",
            _median_time(lambda: jax.block_until_ready(update(state, base, labelled)), args.reps, 1),
        )
    )

    step = jax.jit(
        online.make_online_step(
            apply_fn, decode_fn, stability, tx, config, latent_shape=latent, dtype=dtype, schedule=lambda s: 5e-6
        )
    )
    t0 = time.perf_counter()
    st, m = step(state, {"cond": cond}, base, dec_params)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    state = st
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        state, m = step(state, {"cond": cond}, base, dec_params)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    fused = statistics.median(times)
    peak = jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0) / 2**30
    print(
        f"\nonline DRO step, {b} conditions x {k} candidates = {b * k} samples, full-size model, {jax.devices()[0].device_kind}"
    )
    total = sum(s for _, s in rows)
    for name, s in rows:
        print(f"  {name:32s} {s:8.3f} s  {100 * s / total:5.1f}%")
    print(f"  {'sum of stages':32s} {total:8.3f} s")
    print(f"  {'fused online step (one jit)':32s} {fused:8.3f} s  (first call {compile_s:.1f} s)  peak {peak:.1f} GiB")
    print(f"  stable rate of the random model's samples: {float(m['stable_rate']):.3f}")


if __name__ == "__main__":
    main()
