"""Stage-2 speed on one GPU: the Flax SLat flow forward and 12-step CFG stage-2 sampling, then a PyTorch reference.

    python bench/slat.py                         # the lent H200: every row, one JSON line per result
    python bench/slat.py --smoke                 # tiny config on the CPU, 2 objects, 2 sampler steps (checks that it runs)
    python bench/slat.py --voxels 24000 --batches 4 --rows forward --torch none

Both sides load one random state dict of the released architecture (``slat_flow_img_dit_L_64l8p2_fp16``,
all layers random, stored at the released dtypes). JAX: float32 masters, bf16 torso (``dtype=bfloat16``),
cuDNN attention with per-object sequence lengths. Objects are random ellipsoidal shells of exactly
``--voxels`` voxels on the 64³ grid, padded to the 4096-row bucket; cond is (B, 1374, 1024).

PyTorch reference: TRELLIS's own model needs spconv and flash-attn/xformers, which have no wheels for
the device image (CUDA 13, torch 2.11, Python 3.12), so this runs the PyTorch twin of
``tests/twins/slat_twin.py`` with the same math: TRELLIS's fp16 torso (``use_fp16``: torso parameters
and activations fp16), gather-based submanifold conv (neighbours from a dense index grid, built once per
level and cached like spconv's rulebook, one gather + matmul per offset, fp32 accumulation),
``F.scaled_dot_product_attention`` per object (flash on GPU), TRELLIS's sampler loop (two forwards per
guided step). ``eager`` and ``compile`` (``torch.compile(dynamic=True)``, where it compiles) rows.

Rows: ``forward`` (median seconds, B = 1 and 4), ``sample`` (12-step CFG 3 sampling, DSO's stage-2
preset, seconds per object), each with compile seconds and peak device memory (JAX:
``memory_stats()['peak_bytes_in_use']``, the process peak so far; torch: ``max_memory_allocated``
since the row began). Every line is printed as soon as it is measured, so a killed run keeps its rows.
Each (voxels, batch) compiles twice on the JAX side (forward; sampler, whose guided steps run a 2B
batch); ``--budget_s`` (default 540, for a 10-minute call) stops starting new ones and prints a
``skipped`` line for each, so split a full grid over calls with ``--voxels``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the GPU to torch after the JAX rows

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the PyTorch twin and the random-checkpoint helper

from helpers_trellis import RELEASED_SLAT_ARGS, TINY_SLAT_ARGS, random_state_dict  # noqa: E402

from dso_jax.convert import trellis, trellis_slat  # noqa: E402
from dso_jax.sampling import DSO_STAGE2, SLAT_NORMALIZATION, SamplerSettings  # noqa: E402

COND_LEN = 1374


_DEADLINE = [float("inf")]  # --budget_s: no new row starts after this (time.perf_counter)


def emit(**row):
    print(json.dumps(row), flush=True)


def out_of_time(**row) -> bool:
    """True (and a ``skipped`` line) once the run's time budget is spent."""
    if time.perf_counter() < _DEADLINE[0]:
        return False
    emit(skipped="time budget spent", **row)
    return True


def sample_row(sampler) -> str:
    return f"sample{sampler.steps}_cfg{sampler.cfg_strength:g}"


def median_time(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def scene(voxels: int, batch: int, args: dict, seed: int):
    """TRELLIS-layout coords (M, 4), noise (M, 8) and cond (B, S, Cc) for ``batch`` objects of ``voxels`` voxels."""
    from dso_jax import sparse

    coords = sparse.example_coords([voxels] * batch, args["resolution"], seed=seed)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((len(coords), args["in_channels"])).astype(np.float32)
    cond = rng.standard_normal((batch, COND_LEN if args is RELEASED_SLAT_ARGS else 8, args["cond_channels"]))
    return coords, noise, cond.astype(np.float32)


# ----------------------------------------------------------------------------------------- JAX
def bench_jax(sd, args, voxels, batches, rows, reps, quanta, sampler):
    import jax
    import jax.numpy as jnp

    from dso_jax import sparse
    from dso_jax.models.pretrained import model_from_config
    from dso_jax.sampling import sample_slat

    on_gpu = jax.default_backend() == "gpu"
    config = {"name": trellis_slat.SLAT_FLOW, "args": args}
    params = jax.device_put(trellis.convert_state_dict(sd, config))
    module = model_from_config(trellis_slat.SLAT_FLOW, args, dtype=jnp.bfloat16 if on_gpu else jnp.float32)
    apply_fn = lambda p, x, t, c: module.apply({"params": p}, x, t, c)
    dev = jax.devices()[0]
    peak = lambda: (dev.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30
    fwd = jax.jit(lambda p, x, t, c: apply_fn(p, x, t, c).feats)
    samp = jax.jit(lambda p, x, c: sample_slat(apply_fn, p, x, c, **sampler.to_dict()).feats)
    for n in voxels:
        for b in batches:
            if out_of_time(side="jax", voxels=n, batch=b):
                continue
            coords, noise, cond = scene(n, b, args, seed=n + b)
            q, cq = quanta
            x = sparse.from_trellis(
                coords, noise, resolution=args["resolution"], downsamples=1, quantum=q, coarse_quantum=cq
            )
            x = jax.device_put(x)
            cond, t = jax.device_put(cond), jnp.full((b,), 500.0)
            common = dict(
                side="jax",
                dtype=str(module.dtype),
                voxels=n,
                batch=b,
                bucket=x.feats.shape[1],
                coarse_bucket=x.levels[1].size,
            )
            common["coarse_voxels_mean"] = float(np.mean(np.asarray(x.levels[1].lengths)))
            if "forward" in rows:
                t0 = time.perf_counter()
                fwd(params, x, t, cond).block_until_ready()
                compile_s = time.perf_counter() - t0
                s = median_time(lambda: fwd(params, x, t, cond).block_until_ready(), reps)
                emit(row="forward", seconds=s, per_object=s / b, compile_s=compile_s, peak_gib=peak(), **common)
            if "sample" in rows:
                t0 = time.perf_counter()
                samp(params, x, cond).block_until_ready()
                compile_s = time.perf_counter() - t0
                s = median_time(lambda: samp(params, x, cond).block_until_ready(), max(1, reps // 5), 0)
                emit(
                    row=sample_row(sampler), seconds=s, per_object=s / b, compile_s=compile_s, peak_gib=peak(), **common
                )
    jax.clear_caches()  # the compiled programs; the parameters go with this frame


# ------------------------------------------------------------------------------------- PyTorch
def bench_torch(sd, args, voxels, batches, rows, reps, modes, sampler):
    import torch
    from twins import slat_twin as st

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    twin = st.SLatFlowModel(**args)  # use_fp16 as released: fp16 torso parameters and compute
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    twin = twin.to(dev).eval()
    if dev == "cpu":
        twin.to_fp32()  # fp16 kernels are not worth timing on a CPU

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    for mode in modes:
        try:
            model = torch.compile(twin, dynamic=True) if mode == "compile" else twin
            for n in voxels:
                for b in batches:
                    if out_of_time(side=f"torch_{mode}", voxels=n, batch=b):
                        continue
                    coords, noise, cond = scene(n, b, args, seed=n + b)
                    x = st.from_numpy(coords, noise, device=dev)
                    cond = torch.from_numpy(cond).to(dev)
                    t = torch.full((b,), 500.0, device=dev)
                    common = dict(side=f"torch_{mode}", dtype=str(twin.dtype), voxels=n, batch=b)
                    with torch.no_grad():
                        if "forward" in rows:
                            if dev == "cuda":
                                torch.cuda.reset_peak_memory_stats()
                            t0 = time.perf_counter()
                            model(x, t, cond)
                            sync()
                            first_s = time.perf_counter() - t0
                            s = median_time(lambda: (model(x, t, cond), sync()), reps)
                            mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0
                            emit(row="forward", seconds=s, per_object=s / b, compile_s=first_s, peak_gib=mem, **common)
                        if "sample" in rows:
                            if dev == "cuda":
                                torch.cuda.reset_peak_memory_stats()
                            run = lambda: (
                                st.sample_slat(
                                    model, x, cond, torch.zeros_like(cond), SLAT_NORMALIZATION, **sampler.to_dict()
                                ),
                                sync(),
                            )
                            s = median_time(run, max(1, reps // 5), 0)
                            mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0
                            emit(row=sample_row(sampler), seconds=s, per_object=s / b, peak_gib=mem, **common)
        except Exception as e:  # keep the rows measured so far; say why this mode stopped
            emit(side=f"torch_{mode}", error=f"{type(e).__name__}: {str(e)[:400]}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny config, CPU, a few hundred voxels")
    ap.add_argument("--voxels", default="8000,16000,24000", help="active voxels per object")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--rows", default="forward,sample", help="forward and/or sample")
    ap.add_argument("--torch", default="eager,compile", help="PyTorch rows: eager, compile, or none")
    ap.add_argument("--no_jax", action="store_true")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument(
        "--budget_s", type=float, default=540.0, help="start no new (voxels, batch) after this many seconds"
    )
    args = ap.parse_args(argv)
    _DEADLINE[0] = time.perf_counter() + args.budget_s
    if args.smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
        model_args, voxels, batches, quanta, reps = TINY_SLAT_ARGS, [300], [2], (256, 64), 1
        sampler = SamplerSettings(steps=2, cfg_strength=DSO_STAGE2.cfg_strength)  # the same code, fewer steps
    else:
        model_args, voxels, reps = RELEASED_SLAT_ARGS, [int(v) for v in args.voxels.split(",")], args.reps
        batches, quanta, sampler = [int(b) for b in args.batches.split(",")], (4096, 1024), DSO_STAGE2
    rows = set(args.rows.split(","))
    t0 = time.perf_counter()
    sd = random_state_dict({"name": trellis_slat.SLAT_FLOW, "args": model_args}, seed=0)
    emit(row="setup", weights_s=time.perf_counter() - t0, params=sum(v.size for v in sd.values()))
    if not args.no_jax:
        bench_jax(sd, model_args, voxels, batches, rows, reps, quanta, sampler)
    modes = [m for m in args.torch.split(",") if m in ("eager", "compile")]
    if args.smoke:
        modes = modes[:1]
    if modes:
        bench_torch(sd, model_args, voxels, batches, rows, reps, modes, sampler)


if __name__ == "__main__":
    main()
