"""Stage-1 speed on one GPU: Flax SS-flow forward and 12-step CFG sampling + decode, side by side with
TRELLIS's own PyTorch models (fp16, sdpa attention) in the same run.

    python bench/ssflow.py --trellis_src .ext/trellis [--batches 1,8,16] [--out results.json]

``--trellis_src`` is a checkout of github:microsoft/TRELLIS (only ``trellis/models`` and
``trellis/modules`` are needed), brought along at run time and never committed. Both sides use random
weights of the released architectures (``ss_flow_img_dit_L_16l8_fp16``, ``ss_dec_conv3d_16l8_fp16``),
all parameters randomised (no zero-initialised layers). Prints one table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types

import numpy as np

from dso_jax.convert.trellis import RELEASED_DECODER_ARGS as DEC_ARGS
from dso_jax.convert.trellis import RELEASED_FLOW_ARGS as FLOW_ARGS

SAMPLER = dict(steps=12, rescale_t=3.0, cfg_strength=7.5, cfg_interval=(0.5, 1.0))
COND_LEN = 1374
FLOP_PER_SAMPLE = 5.23e12  # one SS-flow forward (issue 2)


def _median_time(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------- JAX
def bench_jax(batches, reps, attn_impl):
    import jax
    import jax.numpy as jnp

    from dso_jax.models import SparseStructureDecoder, SparseStructureFlowModel
    from dso_jax.sampling import sample

    flow = SparseStructureFlowModel(**FLOW_ARGS, dtype=jnp.bfloat16, attn_impl=attn_impl)
    dec = SparseStructureDecoder(**DEC_ARGS, dtype=jnp.bfloat16)
    key = jax.random.PRNGKey(0)
    x1 = jnp.zeros((1, 8, 16, 16, 16), jnp.float32)
    fparams = jax.jit(flow.init)(key, x1, jnp.zeros((1,)), jnp.zeros((1, COND_LEN, 1024)))["params"]
    dparams = jax.jit(dec.init)(key, x1)["params"]
    apply_flow = lambda p, x, t, c: flow.apply({"params": p}, x, t, c)
    fwd = jax.jit(apply_flow)
    rows = {}
    for b in batches:
        k1, k2 = jax.random.split(jax.random.PRNGKey(b))
        x = jax.random.normal(k1, (b, 8, 16, 16, 16))
        c = jax.random.normal(k2, (b, COND_LEN, 1024))
        t = jnp.full((b,), 500.0)
        t0 = time.perf_counter()
        fwd(fparams, x, t, c).block_until_ready()
        compile_s = time.perf_counter() - t0
        s = _median_time(lambda: fwd(fparams, x, t, c).block_until_ready(), reps)
        rows[f"forward_B{b}"] = dict(seconds=s, compile_s=compile_s, tflops=FLOP_PER_SAMPLE * b / s / 1e12)

    b = 8

    @jax.jit
    def sample_decode(fp, dp, noise, cond):
        z = sample(apply_flow, fp, noise, cond, **SAMPLER)
        return dec.apply({"params": dp}, z)

    noise = jax.random.normal(jax.random.PRNGKey(1), (b, 8, 16, 16, 16))
    cond = jax.random.normal(jax.random.PRNGKey(2), (b, COND_LEN, 1024))
    t0 = time.perf_counter()
    sample_decode(fparams, dparams, noise, cond).block_until_ready()
    compile_s = time.perf_counter() - t0
    s = _median_time(lambda: sample_decode(fparams, dparams, noise, cond).block_until_ready(), max(3, reps // 3), 1)
    rows["sample12_cfg_decode_B8"] = dict(seconds=s, per_object=s / b, compile_s=compile_s)
    jdec = jax.jit(lambda dp, z: dec.apply({"params": dp}, z))
    jdec(dparams, noise).block_until_ready()
    s = _median_time(lambda: jdec(dparams, noise).block_until_ready(), reps)
    rows["decode_B8"] = dict(seconds=s, per_object=s / b)
    return rows


# ------------------------------------------------------------------------------------- PyTorch
def _import_trellis(src):
    os.environ.setdefault("ATTN_BACKEND", "sdpa")
    root = os.path.join(os.path.abspath(src), "trellis")
    pkg = types.ModuleType("trellis")
    pkg.__path__ = [root]
    sys.modules["trellis"] = pkg
    from trellis.models.sparse_structure_flow import SparseStructureFlowModel
    from trellis.models.sparse_structure_vae import SparseStructureDecoder

    return SparseStructureFlowModel, SparseStructureDecoder


def bench_torch(batches, reps, src):
    import torch

    Flow, Dec = _import_trellis(src)
    torch.manual_seed(0)
    dev = "cuda"
    flow = Flow(**FLOW_ARGS).to(dev).eval()
    dec = Dec(**DEC_ARGS).to(dev).eval()
    with torch.no_grad():
        for m in (flow, dec):
            for p in m.parameters():
                p.normal_(0, 0.02)

    def sync_time(fn, n, warmup=2):
        return _median_time(lambda: (fn(), torch.cuda.synchronize()), n, warmup)

    rows = {}
    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, 8, 16, 16, 16, device=dev)
            c = torch.randn(b, COND_LEN, 1024, device=dev)
            t = torch.full((b,), 500.0, device=dev)
            s = sync_time(lambda: flow(x, t, c), reps)
            rows[f"forward_B{b}"] = dict(seconds=s, tflops=FLOP_PER_SAMPLE * b / s / 1e12)

        b = 8
        noise = torch.randn(b, 8, 16, 16, 16, device=dev)
        cond = torch.randn(b, COND_LEN, 1024, device=dev)
        neg = torch.zeros_like(cond)
        ts = np.linspace(1, 0, SAMPLER["steps"] + 1)
        r = SAMPLER["rescale_t"]
        ts = r * ts / (1 + (r - 1) * ts)
        w, (lo, hi) = SAMPLER["cfg_strength"], SAMPLER["cfg_interval"]

        def run():  # TRELLIS's FlowEulerGuidanceIntervalSampler loop: two forwards per guided step
            xt = noise
            for i in range(SAMPLER["steps"]):
                t, tp = ts[i], ts[i + 1]
                tv = torch.full((b,), 1000 * t, device=dev, dtype=torch.float32)
                v = flow(xt, tv, cond)
                if lo <= t <= hi:
                    v = (1 + w) * v - w * flow(xt, tv, neg)
                xt = xt - (t - tp) * v
            return dec(xt)

        s = sync_time(run, max(3, reps // 3), 1)
        rows["sample12_cfg_decode_B8"] = dict(seconds=s, per_object=s / b)
        s = sync_time(lambda: dec(noise), reps)
        rows["decode_B8"] = dict(seconds=s, per_object=s / b)
    flow = dec = None  # free the GPU memory before the JAX rows
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trellis_src", default="", help="TRELLIS checkout for the PyTorch baseline ('' skips it)")
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--attn_impls", default="cudnn,xla")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    results = {}
    if args.trellis_src:
        results["pytorch_fp16_sdpa"] = bench_torch(batches, args.reps, args.trellis_src)
        print("torch done", flush=True)
    for impl in args.attn_impls.split(","):
        try:
            results[f"jax_bf16_{impl}"] = bench_jax(batches, args.reps, impl)
        except Exception as e:  # keep the table even if one variant fails
            results[f"jax_bf16_{impl}"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"jax {impl} done", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(f"\n{'variant':24s} {'measure':26s} {'seconds':>10s} {'per obj':>9s} {'TFLOP/s':>8s} {'compile':>8s}")
    for name, rows in results.items():
        if "error" in rows:
            print(f"{name:24s} ERROR {rows['error']}")
            continue
        for k, v in rows.items():
            print(
                f"{name:24s} {k:26s} {v['seconds']:10.4f} {v.get('per_object', float('nan')):9.4f} "
                f"{v.get('tflops', float('nan')):8.1f} {v.get('compile_s', float('nan')):8.1f}"
            )


if __name__ == "__main__":
    main()
