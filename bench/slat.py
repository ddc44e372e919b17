"""Stage-2 speed on one GPU: the Flax SLat flow forward, 12-step CFG stage-2 sampling and the mesh decoder's forward,
then a PyTorch reference of each.

    python bench/slat.py                         # the lent H200: every row, one JSON line per result
    python bench/slat.py --smoke                 # tiny configs on the CPU, 2 objects, 2 sampler steps (checks that it runs)
    python bench/slat.py --voxels 24000 --batches 4 --rows forward --torch none
    python bench/slat.py --voxels 16000 --rows decode   # the mesh decoder alone (its own process peak)

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

``decode``: the mesh decoder (``slat_dec_mesh_swin8_B_64l8m256c_fp16``, one random state dict of the released
layout and dtypes) from SLat feats (N, 8) on the same objects' 64³ voxels to the ``out_layer`` features (101) on
the 64 N subdivided 256³ voxels: what TRELLIS's ``SLatMeshDecoder.forward`` computes before FlexiCubes. JAX as
``Stage2.decode_mesh`` runs it (bf16 torso, block weights pre-cast, float32 masters and out_layer); its host
tables (``decoder_input``: swin partitions, the subdivided levels and their neighbour tables, once per batch in
the pipeline) are timed apart as ``tables_s`` and added in ``per_object_with_tables``. The twin
(``tests/twins/slat_decoder_twin.py``, fp16 torso) builds the subdivided levels' neighbour tables on the device
inside each forward (spconv builds their rulebooks per forward too) and runs swin attention bucketed (one SDPA
call per power-of-two bucket of window sizes, its partition cached per coords; TRELLIS makes one varlen flash
call per block). One ``decode_parity`` line checks that both sides saw the same input: max |JAX - twin| /
max |twin| of the outputs for the first (voxels, batch), and that the output voxels are the same, in order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the GPU to torch after the JAX rows

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the PyTorch twin and the random-checkpoint helper

from helpers_trellis import (  # noqa: E402
    RELEASED_MESH_DECODER_ARGS,
    RELEASED_SLAT_ARGS,
    TINY_MESH_DECODER_ARGS,
    TINY_SLAT_ARGS,
    random_state_dict,
)
from ssflow import _median_time as median_time  # noqa: E402  (bench/ is on the path when run as a script)

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


def scene(voxels: int, batch: int, args: dict, seed: int):
    """TRELLIS-layout coords (M, 4), noise (M, 8) and cond (B, S, Cc) for ``batch`` objects of ``voxels`` voxels."""
    from dso_jax import sparse

    coords = sparse.example_coords([voxels] * batch, args["resolution"], seed=seed)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((len(coords), args["in_channels"])).astype(np.float32)
    cond = rng.standard_normal((batch, COND_LEN if args is RELEASED_SLAT_ARGS else 8, args["cond_channels"]))
    return coords, noise, cond.astype(np.float32)


def decode_scene(voxels: int, batch: int, args: dict, seed: int):
    """The mesh decoder's input: the flow rows' objects (same coords for the same seed), random SLat feats (M, 8)."""
    from dso_jax import sparse

    coords = sparse.example_coords([voxels] * batch, args["resolution"], seed=seed)
    feats = np.random.default_rng(seed).standard_normal((len(coords), args["latent_channels"]))
    return coords, feats.astype(np.float32)


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
                s = median_time(lambda: fwd(params, x, t, cond).block_until_ready(), reps, 1)
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


def bench_jax_decode(sd, args, voxels, batches, reps, quantum, keep):
    """The mesh decoder's forward as the pipeline runs it (``Stage2.decode_mesh``: torso weights pre-cast); the
    host tables (``decoder_input``, once per batch) are timed apart. ``keep``: (voxels, batch) -> its output."""
    import jax
    import jax.numpy as jnp

    from dso_jax import sparse
    from dso_jax.models.layers import cast_block_weights
    from dso_jax.models.pretrained import make_apply_fn, model_from_config
    from dso_jax.models.slat_decoders import decoder_input

    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    module = model_from_config(trellis_slat.SLAT_MESH_DECODER, args, dtype=dtype)
    params = trellis.convert_state_dict(sd, {"name": trellis_slat.SLAT_MESH_DECODER, "args": args})
    params = jax.device_put(cast_block_weights(params, dtype))
    apply_fn = make_apply_fn(module)
    dev = jax.devices()[0]
    peak = lambda: (dev.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30
    dec = jax.jit(lambda p, x: apply_fn(p, x).feats)
    for n in voxels:
        for b in batches:
            if out_of_time(row="decode", side="jax", voxels=n, batch=b):
                continue
            coords, feats = decode_scene(n, b, args, seed=n + b)
            t0 = time.perf_counter()
            x = decoder_input(coords, feats, quantum=quantum, **module.input_kwargs)
            tables_s = time.perf_counter() - t0
            x = jax.device_put(x)
            t0 = time.perf_counter()
            out = dec(params, x).block_until_ready()
            compile_s = time.perf_counter() - t0
            s = median_time(lambda: dec(params, x).block_until_ready(), reps, 1)
            out_rows = int(np.asarray(x.levels[-1].mask).sum())
            emit(
                row="decode",
                side="jax",
                dtype=str(module.dtype),
                voxels=n,
                batch=b,
                bucket=x.levels[0].size,
                out_rows=out_rows,
                seconds=s,
                per_object=s / b,
                compile_s=compile_s,
                tables_s=tables_s,
                per_object_with_tables=(s + tables_s) / b,
                peak_gib=peak(),
            )
            if (n, b) in keep:
                keep[(n, b)] = sparse.to_trellis(sparse.SparseBatch(feats=out, levels=x.levels[-1:]))
            out = None  # free its device buffer before the next compile
    jax.clear_caches()


# ------------------------------------------------------------------------------------- PyTorch
class _Twin:
    """A twin module loaded from ``sd`` on the GPU (fp16 torso as released) or the CPU (float32: fp16 kernels are
    not worth timing there), with the device's sync and peak-memory counters."""

    def __init__(self, cls, args, sd):
        import torch

        self.torch = torch
        self.dev = "cuda" if torch.cuda.is_available() else "cpu"
        model = cls(**args)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
        self.model = model.to(self.dev).eval()
        if self.dev == "cpu":
            self.model.to_fp32()

    def sync(self):
        if self.dev == "cuda":
            self.torch.cuda.synchronize()

    def reset_peak(self):
        if self.dev == "cuda":
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        return self.torch.cuda.max_memory_allocated() / 2**30 if self.dev == "cuda" else 0.0


def bench_torch(sd, args, voxels, batches, rows, reps, modes, sampler):
    import torch
    from twins import slat_twin as st

    tw = _Twin(st.SLatFlowModel, args, sd)
    twin, dev, sync = tw.model, tw.dev, tw.sync

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
                            tw.reset_peak()
                            t0 = time.perf_counter()
                            model(x, t, cond)
                            sync()
                            first_s = time.perf_counter() - t0
                            s = median_time(lambda: (model(x, t, cond), sync()), reps, 1)
                            mem = tw.peak_gib()
                            emit(row="forward", seconds=s, per_object=s / b, compile_s=first_s, peak_gib=mem, **common)
                        if "sample" in rows:
                            tw.reset_peak()
                            run = lambda: (
                                st.sample_slat(
                                    model, x, cond, torch.zeros_like(cond), SLAT_NORMALIZATION, **sampler.to_dict()
                                ),
                                sync(),
                            )
                            s = median_time(run, max(1, reps // 5), 0)
                            mem = tw.peak_gib()
                            emit(row=sample_row(sampler), seconds=s, per_object=s / b, peak_gib=mem, **common)
        except Exception as e:  # keep the rows measured so far; say why this mode stopped
            emit(side=f"torch_{mode}", error=f"{type(e).__name__}: {str(e)[:400]}")


def bench_torch_decode(sd, args, voxels, batches, reps, modes, keep):
    """The twin's mesh decoder (fp16 torso as released; float32 on a CPU), swin by bucketed SDPA; its subdivided
    levels' neighbour tables are built inside each forward (as spconv builds their rulebooks). On the first mode,
    one ``decode_parity`` line per entry of ``keep`` (JAX's output of that input)."""
    import torch
    from twins import slat_decoder_twin as dt
    from twins import slat_twin as st

    dt.SparseMultiHeadAttention.window_impl = "bucketed"
    tw = _Twin(dt.SLatMeshDecoder, args, sd)
    twin, dev, sync = tw.model, tw.dev, tw.sync

    for mode in modes:
        try:
            model = torch.compile(twin, dynamic=True) if mode == "compile" else twin
            for n in voxels:
                for b in batches:
                    if out_of_time(row="decode", side=f"torch_{mode}", voxels=n, batch=b):
                        continue
                    coords, feats = decode_scene(n, b, args, seed=n + b)
                    x = st.from_numpy(coords, feats, device=dev)
                    tw.reset_peak()
                    with torch.no_grad():
                        t0 = time.perf_counter()
                        out = model(x)
                        sync()
                        first_s = time.perf_counter() - t0
                        ref = keep.pop((n, b), None)
                        if ref is not None:
                            got = out.feats.float().cpu().numpy()
                            emit(
                                row="decode_parity",
                                voxels=n,
                                batch=b,
                                jax_dtype=str(ref[1].dtype),
                                torch=f"{mode} {twin.dtype}",
                                coords_equal=bool(np.array_equal(ref[0], out.coords.cpu().numpy())),
                                max_rel_err=float(np.max(np.abs(ref[1] - got)) / np.max(np.abs(got))),
                            )
                        del out
                        s = median_time(lambda: (model(x), sync()), reps, 1)
                    mem = tw.peak_gib()
                    emit(
                        row="decode",
                        side=f"torch_{mode}",
                        dtype=str(twin.dtype),
                        voxels=n,
                        batch=b,
                        out_rows=len(coords) * 64,
                        seconds=s,
                        per_object=s / b,
                        compile_s=first_s,
                        peak_gib=mem,
                    )
        except Exception as e:  # keep the rows measured so far; say why this mode stopped
            emit(row="decode", side=f"torch_{mode}", error=f"{type(e).__name__}: {str(e)[:400]}")


ROWS = ("forward", "sample", "decode")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny config, CPU, a few hundred voxels")
    ap.add_argument("--voxels", default="8000,16000,24000", help="active voxels per object")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--rows", default=",".join(ROWS), help="forward, sample and/or decode")
    ap.add_argument("--torch", default="eager,compile", help="PyTorch rows: eager, compile, or none")
    ap.add_argument("--no_jax", action="store_true")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument(
        "--budget_s", type=float, default=540.0, help="start no new (voxels, batch) after this many seconds"
    )
    args = ap.parse_args(argv)
    rows = set(args.rows.split(","))
    if not rows <= set(ROWS):
        ap.error(f"--rows: unknown {sorted(rows - set(ROWS))}; choose from {','.join(ROWS)}")
    _DEADLINE[0] = time.perf_counter() + args.budget_s
    if args.smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
        model_args, dec_args, voxels, batches, quanta, reps = (
            TINY_SLAT_ARGS,
            TINY_MESH_DECODER_ARGS,
            [300],
            [2],
            (256, 64),
            1,
        )
        sampler = SamplerSettings(steps=2, cfg_strength=DSO_STAGE2.cfg_strength)  # the same code, fewer steps
    else:
        model_args, dec_args, reps = RELEASED_SLAT_ARGS, RELEASED_MESH_DECODER_ARGS, args.reps
        voxels, batches = [int(v) for v in args.voxels.split(",")], [int(b) for b in args.batches.split(",")]
        quanta, sampler = (4096, 1024), DSO_STAGE2
    modes = [m for m in args.torch.split(",") if m in ("eager", "compile")]
    if args.smoke:
        modes = modes[:1]
    if rows & {"forward", "sample"}:
        t0 = time.perf_counter()
        sd = random_state_dict({"name": trellis_slat.SLAT_FLOW, "args": model_args}, seed=0)
        emit(
            row="setup", model="slat_flow", weights_s=time.perf_counter() - t0, params=sum(v.size for v in sd.values())
        )
        if not args.no_jax:
            bench_jax(sd, model_args, voxels, batches, rows, reps, quanta, sampler)
        if modes:
            bench_torch(sd, model_args, voxels, batches, rows, reps, modes, sampler)
        del sd
    if "decode" in rows:
        t0 = time.perf_counter()
        sd = random_state_dict({"name": trellis_slat.SLAT_MESH_DECODER, "args": dec_args}, seed=1)
        emit(
            row="setup",
            model="mesh_decoder",
            weights_s=time.perf_counter() - t0,
            params=sum(v.size for v in sd.values()),
        )
        keep = {(voxels[0], batches[0]): None} if modes else {}  # the parity line's input
        if not args.no_jax:
            bench_jax_decode(sd, dec_args, voxels, batches, reps, quanta[0], keep)
        keep = {key: v for key, v in keep.items() if v is not None}
        if modes:
            bench_torch_decode(sd, dec_args, voxels, batches, reps, modes, keep)


if __name__ == "__main__":
    main()
