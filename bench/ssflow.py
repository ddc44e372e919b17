"""Stage-1 speed on one GPU: SS-flow forward and 12-step CFG sampling + decode, dso_jax side by side with
TRELLIS's own PyTorch models, eager and under ``torch.compile``, in one run.

    python bench/ssflow.py --trellis_src .ext/trellis --rows torch:eager,torch:compile,jax:default,jax:no_triton_gemm

Every row runs in its own subprocess (XLA flags are read once per process; PyTorch and JAX do not share the
GPU's memory), prints one JSON line per measurement as it goes (a killed run keeps what it printed), and the
parent prints the table at the end. Rows:

* ``torch:eager`` / ``torch:compile``: TRELLIS's ``SparseStructureFlowModel``/``SparseStructureDecoder`` (fp16
  blocks as released, ``ATTN_BACKEND=sdpa``), random weights, from a checkout given by ``--trellis_src`` (never
  committed); ``compile`` wraps both models in ``torch.compile`` (inductor, default mode). The sampler is
  TRELLIS's guidance-interval loop: two forwards per guided step.
* ``jax:VARIANT``: dso_jax (bf16 compute, float32 masters, cuDNN attention) with the variant's XLA flags and
  options (``VARIANTS`` below). ``library`` is what a user gets: ``dso_jax.xla_flags.DEFAULTS`` and the
  sampler's exact zero-condition shortcut; ``default`` is XLA's own flags (``DSO_JAX_NO_XLA_DEFAULTS=1``).

Weights: random, every parameter N(0, 0.02) on both sides (same shapes: the released architecture).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types

import numpy as np

from dso_jax import xla_flags
from dso_jax.convert.trellis import RELEASED_DECODER_ARGS as DEC_ARGS
from dso_jax.convert.trellis import RELEASED_FLOW_ARGS as FLOW_ARGS
from dso_jax.sampling import DSO_STAGE1

SAMPLER = DSO_STAGE1.to_dict()
COND_LEN = 1374
FLOP_PER_SAMPLE = 5.23e12  # one SS-flow forward (issue 2)

# name -> (extra XLA_FLAGS, JAX options). Flags are appended to whatever XLA_FLAGS the environment holds.
VARIANTS = {
    "library": ("", {}),
    "default": ("", {"library_flags": False}),
    "no_triton_gemm": ("--xla_gpu_enable_triton_gemm=false", {"library_flags": False}),
    "autotune4": ("--xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=4", {"library_flags": False}),
    "lhs": (
        "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_latency_hiding_scheduler=true",
        {"library_flags": False},
    ),
    "no_cmd_buffer": ("--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_command_buffer=", {"library_flags": False}),
    "null_cond_off": ("", {"null_cond": False}),  # library flags, CFG as one 2B-row call with zeros
}


def _variant(name: str):
    """VARIANTS[name], or ``attn=IMPL`` (library flags, the flow's ``attn_impl``, e.g. ``attn=mgpu:64x128x2``)."""
    if name.startswith("attn="):
        return "", {"attn_impl": name[len("attn=") :]}
    return VARIANTS[name]


def _median_time(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _emit(row: str, measure: str, **values) -> None:
    print("ROW " + json.dumps(dict(row=row, measure=measure, **values)), flush=True)


# ----------------------------------------------------------------------------------------- JAX
# --tiny: a CPU-sized architecture with the released shapes' structure, to check the script runs (seconds).
TINY = (
    dict(FLOW_ARGS, model_channels=64, cond_channels=32, num_blocks=2, num_heads=2),
    dict(DEC_ARGS, channels=(16, 8, 8), num_res_blocks=1, num_res_blocks_middle=1),
    8,
)


def _sizes(tiny: bool):
    return TINY if tiny else (FLOW_ARGS, DEC_ARGS, COND_LEN)


def run_jax(variant: str, batches, reps: int, sample_batch: int, tiny: bool = False) -> None:
    _, opts = _variant(variant)  # the parent set this process's XLA_FLAGS (and the library-defaults switch)
    import jax
    import jax.numpy as jnp

    from dso_jax.models import SparseStructureDecoder, SparseStructureFlowModel
    from dso_jax.sampling import sample

    row = f"jax:{variant}"
    _emit(row, "env", xla_flags=os.environ.get("XLA_FLAGS", ""), device=jax.devices()[0].device_kind)
    flow_args, dec_args, cond_len = _sizes(tiny)
    cc = flow_args["cond_channels"]
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    flow = SparseStructureFlowModel(**flow_args, dtype=dtype, attn_impl=opts.get("attn_impl", "auto"))
    dec = SparseStructureDecoder(**dec_args, dtype=dtype)
    key = jax.random.PRNGKey(0)
    x1 = jnp.zeros((1, 8, 16, 16, 16), jnp.float32)
    # N(0, 0.02) like the torch rows, drawn on the host from the shapes alone: compiling the released model's
    # Flax init took longer than a row's 60 s limit on the H200
    rng = np.random.default_rng(0)
    draw = lambda tree: jax.tree.map(lambda a: jnp.asarray(0.02 * rng.standard_normal(a.shape, np.float32)), tree)
    fparams = draw(jax.eval_shape(flow.init, key, x1, jnp.zeros((1,)), jnp.zeros((1, cond_len, cc)))["params"])
    dparams = draw(jax.eval_shape(dec.init, key, x1)["params"])
    apply_flow = lambda p, x, t, c: flow.apply({"params": p}, x, t, c)
    fwd = jax.jit(apply_flow)
    for b in batches:
        k1, k2 = jax.random.split(jax.random.PRNGKey(b))
        x = jax.random.normal(k1, (b, 8, 16, 16, 16))
        c = jax.random.normal(k2, (b, cond_len, cc))
        t = jnp.full((b,), 500.0)
        t0 = time.perf_counter()
        fwd(fparams, x, t, c).block_until_ready()
        compile_s = time.perf_counter() - t0
        s = _median_time(lambda: fwd(fparams, x, t, c).block_until_ready(), reps)
        _emit(row, f"forward_B{b}", seconds=s, compile_s=compile_s, tflops=FLOP_PER_SAMPLE * b / s / 1e12)

    b = sample_batch
    if not b:  # --sample_batch 0: forwards only
        return _emit_jax_memory(row)
    kw = dict(SAMPLER)
    if "null_cond" in opts:
        kw["null_cond"] = opts["null_cond"]

    @jax.jit
    def sample_decode(fp, dp, noise, cond):
        z = sample(apply_flow, fp, noise, cond, **kw)
        return dec.apply({"params": dp}, z)

    noise = jax.random.normal(jax.random.PRNGKey(1), (b, 8, 16, 16, 16))
    cond = jax.random.normal(jax.random.PRNGKey(2), (b, cond_len, cc))
    t0 = time.perf_counter()
    sample_decode(fparams, dparams, noise, cond).block_until_ready()
    compile_s = time.perf_counter() - t0
    s = _median_time(lambda: sample_decode(fparams, dparams, noise, cond).block_until_ready(), max(3, reps // 3), 1)
    _emit(row, f"sample12_cfg_decode_B{b}", seconds=s, per_object=s / b, compile_s=compile_s)
    _emit_jax_memory(row)


def _emit_jax_memory(row):
    import jax

    mem = jax.devices()[0].memory_stats() or {}
    _emit(row, "peak_memory", gib=mem.get("peak_bytes_in_use", 0) / 2**30)


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


def run_torch(mode: str, batches, reps: int, sample_batch: int, src: str, tiny: bool = False) -> None:
    import torch

    Flow, Dec = _import_trellis(src)
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    flow_args, dec_args, cond_len = _sizes(tiny)
    cc = flow_args["cond_channels"]
    flow = Flow(**flow_args).to(dev).eval()
    dec = Dec(**dec_args).to(dev).eval()
    if dev == "cpu":
        flow.convert_to_fp32()
        flow.dtype = torch.float32  # trellis.md §2.7: convert_to_fp32 does not reset it
        dec.convert_to_fp32()
    with torch.no_grad():
        for m in (flow, dec):
            for p in m.parameters():
                p.normal_(0, 0.02)
    row = f"torch:{mode}"
    _emit(row, "env", torch=torch.__version__, device=torch.cuda.get_device_name() if dev == "cuda" else "cpu")
    if mode == "compile":
        flow, dec = torch.compile(flow), torch.compile(dec)

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def sync_time(fn, n, warmup=2):
        return _median_time(lambda: (fn(), sync()), n, warmup)

    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, 8, 16, 16, 16, device=dev)
            c = torch.randn(b, cond_len, cc, device=dev)
            t = torch.full((b,), 500.0, device=dev)
            t0 = time.perf_counter()
            flow(x, t, c)
            sync()
            compile_s = time.perf_counter() - t0
            s = sync_time(lambda: flow(x, t, c), reps)
            _emit(row, f"forward_B{b}", seconds=s, compile_s=compile_s, tflops=FLOP_PER_SAMPLE * b / s / 1e12)

    if sample_batch:  # 0: forwards only
        _torch_sampling(flow, dec, row, sample_batch, cond_len, cc, dev, sync_time, reps)
    _emit(row, "peak_memory", gib=torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0)


def _torch_sampling(flow, dec, row, b, cond_len, cc, dev, sync_time, reps):
    import torch

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    with torch.no_grad():
        noise = torch.randn(b, 8, 16, 16, 16, device=dev)
        cond = torch.randn(b, cond_len, cc, device=dev)
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

        t0 = time.perf_counter()
        run()
        sync()
        compile_s = time.perf_counter() - t0
        s = sync_time(run, max(3, reps // 3), 1)
        _emit(row, f"sample12_cfg_decode_B{b}", seconds=s, per_object=s / b, compile_s=compile_s)


# ------------------------------------------------------------------------------------------ driver
def _run_row(row: str, cmd, env, timeout: float, out_path: str) -> list:
    """Run one row's worker, echoing (and appending to ``out_path``) each ROW line the moment it is printed,
    so a row killed by its timeout, or a whole run killed from outside, keeps every figure it reached."""
    rows, t0 = [], time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            for line in proc.stdout:
                if line.startswith("ROW "):
                    print(line.rstrip(), flush=True)
                    rows.append(json.loads(line[4:]))
                    if out_path:
                        with open(out_path, "a") as f:
                            f.write(line[4:])
            rc = proc.wait()
        finally:
            timer.cancel()
        if rc != 0:
            err.seek(0)
            why = "killed (timeout)" if rc < 0 else f"rc={rc}"
            print(f"ROW-ERROR {row} {why} after {time.perf_counter() - t0:.0f}s: {err.read()[-800:]}", flush=True)
    return rows


def _user_xla_flags() -> str:
    """This process's XLA_FLAGS without what importing dso_jax added (each worker decides for itself)."""
    library = {f"{k}={v}" for k, v in xla_flags.DEFAULTS.items()}
    return " ".join(tok for tok in os.environ.get("XLA_FLAGS", "").split() if tok not in library)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trellis_src", default="", help="TRELLIS checkout for the torch rows")
    ap.add_argument("--rows", default="torch:eager,torch:compile,jax:library,jax:default")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--sample_batch", type=int, default=8, help="0: forwards only")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per row (its own process)")
    ap.add_argument("--out", default="", help="JSON-lines file, one row appended as each is measured")
    ap.add_argument("--tiny", action="store_true", help="a CPU-sized model (checks that the script runs)")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.worker:
        kind, name = args.worker.split(":", 1)
        if kind == "torch":
            run_torch(name, batches, args.reps, args.sample_batch, args.trellis_src, args.tiny)
        else:
            run_jax(name, batches, args.reps, args.sample_batch, args.tiny)
        sys.stdout.flush()
        os._exit(0)  # every figure is printed; skip interpreter teardown (it stalled a CPU worker for minutes)
    results = []
    for row in args.rows.split(","):
        env = dict(os.environ, XLA_FLAGS=_user_xla_flags())
        if row.startswith("jax:"):
            flags, opts = _variant(row[4:])
            if not opts.get("library_flags", True):  # read when the worker imports dso_jax
                env["DSO_JAX_NO_XLA_DEFAULTS"] = "1"
            env["XLA_FLAGS"] = (env["XLA_FLAGS"] + " " + flags).strip()
        cmd = [sys.executable, "-u", os.path.abspath(__file__), "--worker", row] + sys.argv[1:]
        results += _run_row(row, cmd, env, args.timeout, args.out)
    print(f"\n{'row':22s} {'measure':26s} {'seconds':>9s} {'per obj':>8s} {'TFLOP/s':>8s} {'compile':>8s}")
    for r in results:
        if "seconds" in r:
            print(
                f"{r['row']:22s} {r['measure']:26s} {r['seconds']:9.4f} {r.get('per_object', float('nan')):8.4f} "
                f"{r.get('tflops', float('nan')):8.1f} {r.get('compile_s', float('nan')):8.1f}"
            )


if __name__ == "__main__":
    main()
