"""Data-generation throughput on one GPU: DINOv2 + 12-step CFG stage-1 sampling + decode + MJX simulation.

    python bench/generate.py [--batches 8,16] [--num_samples 4] [--reps 3] [--out bench/generate.json]
    python bench/generate.py --preset tiny --batches 1 --reps 1 --sim horizon_s=0.1   # CPU plumbing check

Full-size random-weight models of the released architectures (DINOv2 ViT-L/14 reg4, ss_flow_img_dit_L_16l8,
ss_dec_conv3d_16l8; bf16 compute where TRELLIS uses fp16), DSO's settings (K = 4 samples per image, SS 12
steps, CFG 7.5 on [0.5, 1], rescale_t 3), `default_sim_config()` physics. Per batch of I images (I*K objects)
it times `dso_jax.pipeline.Generator` as `generate_data.py` runs it: the sampling program (DINOv2 + sampler
+ decoder + occupancy), the stability program on that occupancy, and both together including the copy of
cond / latents / angles to the host. Image decoding and npz writes overlap device work in the real run and
are not timed. Each batch size compiles anew. Prints one table; objects/min = I*K / end-to-end seconds * 60.
No torch, no tensorflow-datasets needed.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from ssflow import _median_time  # bench/ is on the path when run as a script

from dso_jax.sampling import DSO_STAGE1


def bench_batch(models, images_per_batch, args, physics):
    import dataclasses

    import jax

    from dso_jax import pipeline, sampling

    sampler = dataclasses.replace(sampling.DSO_STAGE1, steps=args.steps)
    gen = pipeline.Generator(models, sampler, images_per_batch=images_per_batch, physics=physics)
    rng = np.random.default_rng(images_per_batch)
    images = rng.integers(0, 256, (images_per_batch, 518, 518, 3), dtype=np.uint8)
    noise = pipeline.noise_for_seeds(range(args.num_samples), models.latent_shape)
    stability = pipeline.stability_fn(physics.to_json())  # the program generate_dataset runs

    t0 = time.perf_counter()
    out = jax.block_until_ready(gen(images, noise, simulate=True))
    compile_s = time.perf_counter() - t0
    occ = out["occupancy"]
    sample_s = _median_time(lambda: jax.block_until_ready(gen(images, noise)), args.reps, 0)
    sim_s = _median_time(lambda: jax.block_until_ready(stability(occ)), args.reps, 0)

    def end_to_end():
        res = gen(images, noise, simulate=True)
        return jax.device_get({k: v for k, v in res.items() if k != "occupancy"})

    total_s = _median_time(end_to_end, args.reps, 0)
    objects = images_per_batch * args.num_samples
    mem = jax.devices()[0].memory_stats() or {}
    return dict(
        images=images_per_batch,
        objects=objects,
        compile_s=compile_s,
        sample_decode_s=sample_s,
        simulate_s=sim_s,
        total_s=total_s,
        objects_per_min=objects / total_s * 60,
        images_per_min=images_per_batch / total_s * 60,
        stable_frac=float(np.mean(np.asarray(out["stable"]))),
        occupancy_frac=float(np.mean(np.asarray(occ))),
        peak_gib=mem.get("peak_bytes_in_use", 0) / 2**30,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="released", choices=["released", "tiny"])
    ap.add_argument("--batches", default="8,16", help="images per device batch (x num_samples objects)")
    ap.add_argument("--num_samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=DSO_STAGE1.steps)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sim", action="append", default=[], metavar="KEY=VALUE", help="physics config override")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    import jax

    from dso_jax.models import pretrained
    from dso_jax.physics import rollout

    physics = rollout.with_overrides(rollout.default_sim_config(), args.sim, flag="--sim")
    t0 = time.perf_counter()
    models = pretrained.load_models(random_weights=args.preset)
    load_s = time.perf_counter() - t0
    print(
        f"{jax.devices()[0].device_kind}: random {args.preset} models in {load_s:.1f} s; flow dtype "
        f"{models.flow.module.dtype}, decoder {models.decoder.module.dtype}",
        flush=True,
    )
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        try:
            rows.append(bench_batch(models, b, args, physics))
        except Exception as e:  # e.g. out of memory: keep the other rows
            rows.append(dict(images=b, objects=b * args.num_samples, error=f"{type(e).__name__}: {str(e)[:300]}"))
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(
                    dict(
                        device=jax.devices()[0].device_kind,
                        preset=args.preset,
                        jax=jax.__version__,
                        sim=physics.to_dict(),
                        rows=rows,
                    ),
                    f,
                    indent=1,
                )

    print(
        f"\n{'images':>6s} {'objects':>7s} {'compile s':>9s} {'sample+dec s':>12s} {'sim s':>7s} {'total s':>8s} "
        f"{'obj/min':>8s} {'img/min':>8s} {'stable':>6s} {'peak GiB':>8s}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['images']:6d} {r['objects']:7d} ERROR {r['error']}")
            continue
        print(
            f"{r['images']:6d} {r['objects']:7d} {r['compile_s']:9.1f} {r['sample_decode_s']:12.3f} "
            f"{r['simulate_s']:7.3f} {r['total_s']:8.3f} {r['objects_per_min']:8.1f} {r['images_per_min']:8.1f} "
            f"{r['stable_frac']:6.2f} {r['peak_gib']:8.1f}"
        )


if __name__ == "__main__":
    main()
