"""Attention kernels at TRELLIS's shapes (head dim 64), one GPU: which kernel is fastest, forward and backward.

The SS-flow forward spends ~42% of its time in attention (bench/RESULTS.md, stage 1): self-attention over 4096
tokens and cross-attention to 1374 DINOv2 tokens, 16 heads of 64 at B = 8 (and 12 latents in a train step).
This bench times, in one process and on the same random bf16 inputs, every attention kernel JAX can reach without
a CUDA extension and checks each against XLA's float32 softmax attention:

* ``cudnn``: ``jax.nn.dot_product_attention(implementation='cudnn')`` (the library's default on GPU);
* ``xla``: the same call with XLA's own lowering;
* ``mgpu``: the Pallas Mosaic-GPU flash kernel for Hopper (``jax.experimental.pallas.ops.gpu.attention_mgpu``,
  wgmma + TMA), through the library's ``dot_product_attention(implementation='mgpu:BQxBKVxSTEPS')``, over a few
  tile configurations (only where the key tile divides the keys: elsewhere the library runs cuDNN);
* ``triton``: the Pallas Triton flash kernel (``jax.experimental.pallas.ops.gpu.attention.mha``).

One line per (shape, kernel, pass) as measured: median ms of ``--reps``, TFLOP/s (4 B H L S D for the forward,
3.5x that for forward + backward), max |error| against the float32 reference.

    python bench/attention.py                       # all kernels, self + cross, B = 8 and 12
    python bench/attention.py --kernels cudnn,mgpu --shapes self8
"""

from __future__ import annotations

import argparse
import functools
import json
import math

import jax
import jax.numpy as jnp
from ssflow import _median_time as median_time  # bench/ is on the path when run as a script

from dso_jax.models import attention

SHAPES = {  # name -> (B, L, S, H, D): queries L, keys S
    "self8": (8, 4096, 4096, 16, 64),
    "cross8": (8, 4096, 1374, 16, 64),
    "self12": (12, 4096, 4096, 16, 64),
    "cross12": (12, 4096, 1374, 16, 64),
}


def _median_ms(fn, args, reps):
    out = jax.block_until_ready(fn(*args))  # compile + warm-up
    return 1e3 * median_time(lambda: jax.block_until_ready(fn(*args)), reps, 0), out


def _reference(q, k, v):
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    s = jnp.einsum("blhd,bshd->bhls", q, k) / math.sqrt(q.shape[-1])
    return jnp.einsum("bhls,bshd->blhd", jax.nn.softmax(s, axis=-1), v)


def kernels(names):
    """name -> attention(q, k, v) with softmax scale 1/sqrt(D): the library's implementations and Pallas Triton."""

    out = {}
    for name in ("cudnn", "xla"):
        if name in names:
            out[name] = functools.partial(attention.dot_product_attention, implementation=name)
    if "mgpu" in names:  # (where a key tile does not divide the keys the library would run cuDNN: skipped)
        for tiles in ((64, 128, 2), (64, 64, 2), (64, 128, 3), (64, 256, 2)):
            name = "mgpu:" + "x".join(map(str, tiles))
            out[name] = functools.partial(attention.dot_product_attention, implementation=name)
    if "triton" in names:
        from jax.experimental.pallas.ops.gpu import attention as tr

        def run_triton(q, k, v):
            return tr.mha(q, k, v, segment_ids=None, sm_scale=1.0 / math.sqrt(q.shape[-1]))

        out["triton"] = run_triton
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernels", default="cudnn,xla,mgpu,triton")
    p.add_argument("--shapes", default="self8,cross8,self12")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no_backward", action="store_true")
    p.add_argument("--out", default="", help="append one JSON line per result to this file")
    a = p.parse_args()
    print("devices", jax.devices(), "jax", jax.__version__, flush=True)
    for shape in a.shapes.split(","):
        b, l, s, h, d = SHAPES[shape]
        kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(kq, (b, l, h, d), jnp.bfloat16)
        k = jax.random.normal(kk, (b, s, h, d), jnp.bfloat16)
        v = jax.random.normal(kv, (b, s, h, d), jnp.bfloat16)
        g = jax.random.normal(kg, (b, l, h, d), jnp.bfloat16)
        ref = jax.jit(_reference)(q, k, v)
        flops = 4.0 * b * h * l * s * d
        for name, fn in kernels(a.kernels.split(",")).items():
            if name.startswith("mgpu") and s % attention._mgpu_tiles(name)[1]:
                continue  # the library would run cuDNN here
            passes = [("fwd", jax.jit(fn), (q, k, v), flops)]
            if not a.no_backward:
                bwd = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32) * g), (0, 1, 2)))
                passes.append(("fwd+bwd", bwd, (q, k, v), 3.5 * flops))
            for pas, f, args, fl in passes:
                rec = dict(shape=shape, kernel=name, pass_=pas)
                try:
                    ms, out = _median_ms(f, args, a.reps)
                    rec.update(ms=round(ms, 3), tflops=round(fl / ms / 1e9, 1))
                    if pas == "fwd":
                        rec["max_err"] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
                except Exception as e:  # noqa: BLE001 - a kernel that cannot run here is a result too
                    rec["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
                print(json.dumps(rec), flush=True)
                if a.out:
                    with open(a.out, "a") as fh:
                        fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
