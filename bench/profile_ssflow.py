"""Where does the SS-flow forward spend its time on the GPU? Kernel trace + ablations, one table.

    python bench/profile_ssflow.py [--batch 8] [--variants base,no_attn,no_norm] [--trace]

Ablations replace one ingredient with a cheap stand-in of the same shapes (attention -> its value
input; norms -> identity) and time the forward again: the difference places that ingredient's cost.
``--trace`` records a jax.profiler trace of three forwards and sums GPU kernel time by kernel name.
Numbers from ablated variants are for attribution only; the model they run is not the real one.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

from ssflow import COND_LEN, FLOP_PER_SAMPLE, FLOW_ARGS, _median_time


def build(batch, attn_impl, patch=None):
    import jax
    import jax.numpy as jnp

    import dso_jax.models.attention as attention
    import dso_jax.models.layers as layers
    from dso_jax.models import SparseStructureFlowModel

    saved = (attention.dot_product_attention, layers.layer_norm_no_affine)
    if patch == "no_attn":
        attention.dot_product_attention = lambda q, k, v, impl="auto": v if v.shape == q.shape else q
    elif patch == "no_norm":
        layers.layer_norm_no_affine = lambda x, eps: x
    try:
        m = SparseStructureFlowModel(**FLOW_ARGS, dtype=jnp.bfloat16, attn_impl=attn_impl)
        k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
        x = jax.random.normal(k1, (batch, 8, 16, 16, 16))
        c = jax.random.normal(k2, (batch, COND_LEN, 1024))
        t = jnp.full((batch,), 500.0)
        params = jax.jit(m.init)(k3, x[:1], t[:1], c[:1])["params"]
        fwd = jax.jit(lambda p, x, t, c: m.apply({"params": p}, x, t, c)).lower(params, x, t, c).compile()
    finally:
        attention.dot_product_attention, layers.layer_norm_no_affine = saved
    return lambda: fwd(params, x, t, c).block_until_ready()


CATEGORIES = (  # kernel-name pattern -> what it is (first match wins)
    ("attention (cuDNN flash / fmha)", re.compile(r"flash|fmha|cudnn|sdpa|attention", re.I)),
    ("GEMM (cuBLAS nvjet / cutlass / triton gemm)", re.compile(r"nvjet|gemm|cutlass|sm90_xmma|triton_gemm", re.I)),
    ("convert (dtype casts)", re.compile(r"convert", re.I)),
    ("reduce / norm fusions", re.compile(r"reduce|norm", re.I)),
    ("copy / transpose", re.compile(r"copy|transpose|memcpy|memset", re.I)),
)


def trace_kernels(fn, n=3):
    """{kernel name: GPU ms per call of fn}, from a jax.profiler trace of n calls."""
    import jax

    d = tempfile.mkdtemp()
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(n):
            fn()
    path = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and "GPU" in str(e.get("args", {}).get("name", ""))}
    totals = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e:
            name = re.sub(r"[_.]\d+$", "", e["name"])[:70]
            totals[name] += e["dur"] / 1e3 / n  # ms per call
    return totals


def categories(totals):
    """[(category, ms)] largest first; kernels no pattern names count as 'other XLA fusions (elementwise)'."""
    out = collections.Counter()
    for name, ms in totals.items():
        cat = next((c for c, pat in CATEGORIES if pat.search(name)), "other XLA fusions (elementwise)")
        out[cat] += ms
    return out.most_common()


def kernel_table(fn, n=3, top=25, what="forward"):
    totals = trace_kernels(fn, n)
    total = sum(totals.values())
    print(f"\nGPU kernel time per {what}: {total:.2f} ms (sum over kernels)")
    for cat, ms in categories(totals):
        print(f"  {ms:8.3f} ms  {100 * ms / total:5.1f}%  [{cat}]")
    for name, ms in totals.most_common(top):
        print(f"  {ms:8.3f} ms  {100 * ms / total:5.1f}%  {name}")
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--attn_impl", default="cudnn")
    ap.add_argument("--variants", default="base,no_attn,no_norm")
    ap.add_argument("--trace", action="store_true")
    args = ap.parse_args()
    rows = []
    for v in args.variants.split(","):
        fn = build(args.batch, args.attn_impl, None if v == "base" else v)
        s = _median_time(fn, 10)
        rows.append((v, s))
        if args.trace and v == "base":
            kernel_table(fn)
    print(f"\nXLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}  batch={args.batch}")
    for v, s in rows:
        print(f"  {v:10s} {1e3 * s:8.2f} ms  {FLOP_PER_SAMPLE * args.batch / s / 1e12:6.1f} TFLOP/s (nominal)")


if __name__ == "__main__":
    main()
