"""One DSO training step on one GPU: our JAX step vs DSO's PyTorch step, side by side in one run.

    python bench/train_step.py --trellis_src .ext/trellis [--variants torch:dro,jax:dro,...] [--out r.json]

Both sides use the full-size SS flow model (``ss_flow_img_dit_L_16l8_fp16`` args) with random
weights, LoRA r 64 / alpha 128 on to_q/to_kv/to_out/to_qkv, AdamW (lr 5e-6, wd 0.01), grad clip 1.0,
``--batch`` pairs (DSO: 6) per micro-batch and ``--grad_accum`` micro-batches per optimizer step.

* ``torch:<loss>``: DSO's step as ``finetune.py`` runs it (``dso.md`` §3-4): TRELLIS's own model
  (fp16 blocks, ``ATTN_BACKEND=sdpa``) from ``--trellis_src`` (a checkout of github:microsoft/TRELLIS,
  never committed), wrapped by peft ``get_peft_model``, forward under bf16 autocast, inputs, t and
  noise in bf16, DPO reference a frozen deep copy of the wrapped model.
* ``torch:<loss>:compile``: the same step with the model (and DPO's reference) wrapped in ``torch.compile``
  (inductor, default mode): the strongest PyTorch a DSO user can run.
* ``jax:<loss>[:remat|:noremat][:policy=P][:attn=IMPL][:xla][:base_bf16][:trace]``: ``dso_jax.train.make_train_step`` with
  the trainer's default configuration (``configs/<loss>.py``: bf16 compute, fp32 master base weights, its
  ``model.remat`` / ``model.remat_policy``); ``remat`` / ``noremat`` force rematerialisation on / off,
  ``policy=P`` sets what a rematerialised block keeps (``dso_jax.models.remat.POLICIES``), ``attn=IMPL`` sets
  ``model.attn_impl`` (``attn=mgpu[:BQxBKVxSTEPS]``: the Mosaic-GPU kernel), ``xla`` uses XLA attention
  instead of cuDNN, ``base_bf16`` passes the frozen base already cast to bf16, ``trace`` adds the step's GPU
  kernel time by category (``bench/profile_ssflow.py``'s trace of 3 steps) to the result.

Each variant runs in its own process, so peak memory is per variant (JAX: ``peak_bytes_in_use``
without preallocation; PyTorch: ``max_memory_allocated``). Prints one table; ``--tiny`` runs a
small model (also on the CPU) to check the plumbing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

from ssflow import COND_LEN as FULL_COND_LEN  # bench/ is on the path when run as a script
from ssflow import FLOP_PER_SAMPLE, _import_trellis
from ssflow import FLOW_ARGS as FULL_ARGS

from dso_jax.lora import DEFAULT_TARGETS  # bench/ is on the path when run as a script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARGS = dict(FULL_ARGS, resolution=8, model_channels=64, cond_channels=32, num_blocks=2, num_heads=2)
TINY_COND_LEN = 8
TARGETS = list(DEFAULT_TARGETS)
DEFAULT_VARIANTS = "torch:dro,torch:dro:compile,torch:dpo,torch:dpo:compile,jax:dro,jax:dpo,jax:dro:policy=attention"


def _median_step(step, sync, reps: int, warmup: int) -> tuple[float, float]:
    """(first call incl. compile, median step) in seconds."""
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


# ------------------------------------------------------------------------------------------------ JAX
def run_jax(loss: str, flags: set, a) -> dict:
    import jax
    import jax.numpy as jnp

    from configs import dpo, dro
    from dso_jax import lora, losses, optim, train
    from dso_jax.models import pretrained
    from dso_jax.train_state import new_state

    config = {"dro": dro, "dpo": dpo}[loss].get_config()
    args = TINY_ARGS if a.tiny else FULL_ARGS
    cond_len = TINY_COND_LEN if a.tiny else FULL_COND_LEN
    config.model.args = dict(args)
    remat = config.model.remat if not flags & {"remat", "noremat"} else "remat" in flags
    policy = next((f.split("=", 1)[1] for f in flags if f.startswith("policy=")), config.model.remat_policy)
    dtype = jnp.bfloat16
    module = pretrained.model_from_config("SparseStructureFlowModel", dict(args, use_checkpoint=remat), dtype=dtype)
    attn = next((f.split("=", 1)[1] for f in flags if f.startswith("attn=")), config.model.attn_impl)
    module = module.clone(attn_impl="xla" if "xla" in flags else attn, remat_policy=policy)
    apply_fn = pretrained.make_apply_fn(module)
    # drawn on the host from the shapes alone (the released model's jitted Flax init is slow)
    base = jax.tree.map(jnp.asarray, pretrained.random_params(pretrained.abstract_params(module), seed=0))
    if "base_bf16" in flags:
        base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    overlay = lora.init_overlay(jax.random.PRNGKey(1), base, rank=64, alpha=128.0, targets=TARGETS)
    tx = optim.make_optimizer(config.optim, config.train.steps)
    state = new_state(overlay, tx, jax.random.key(0))
    step_fn = jax.jit(train.make_train_step(apply_fn, losses.LOSSES[loss], tx, config), donate_argnums=(0,))
    r, A, B = args["resolution"], a.grad_accum, a.batch
    ks = jax.random.split(jax.random.PRNGKey(2), 3)
    batch = {
        "cond": jax.random.normal(ks[0], (A, B, cond_len, args["cond_channels"]), jnp.bfloat16),
        "x0_win": jax.random.normal(ks[1], (A, B, 8, r, r, r), jnp.bfloat16),
        "x0_lose": jax.random.normal(ks[2], (A, B, 8, r, r, r), jnp.bfloat16),
    }
    holder = {"state": state, "metrics": None}

    def step():
        holder["state"], holder["metrics"] = step_fn(holder["state"], batch, base)

    sync = lambda: holder["metrics"]["loss"].block_until_ready()
    first, sec = _median_step(step, sync, a.reps, a.warmup)
    stats = jax.local_devices()[0].memory_stats() or {}
    extra = {}
    if "trace" in flags:
        from profile_ssflow import categories, trace_kernels

        totals = trace_kernels(lambda: (step(), sync()))
        extra = dict(
            kernel_ms=round(sum(totals.values()), 2),
            kernel_categories=[(c, round(ms, 2)) for c, ms in categories(totals)],
            top_kernels=[(k, round(ms, 2)) for k, ms in totals.most_common(12)],
        )
    return dict(
        **extra,
        remat=bool(remat),
        remat_policy=policy if remat else "",
        seconds=sec,
        first_s=first,
        peak_gib=stats.get("peak_bytes_in_use", float("nan")) / 2**30,
        loss=float(holder["metrics"]["loss"]),
        device=jax.devices()[0].device_kind,
    )


# -------------------------------------------------------------------------------------------- PyTorch
def run_torch(loss: str, flags: set, a) -> dict:
    import copy

    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    if not a.trellis_src:
        raise SystemExit("torch variants need --trellis_src (a checkout of github:microsoft/TRELLIS)")
    Flow, _ = _import_trellis(a.trellis_src)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    args = TINY_ARGS if a.tiny else FULL_ARGS
    cond_len = TINY_COND_LEN if a.tiny else FULL_COND_LEN
    torch.manual_seed(0)
    torch.autograd.set_detect_anomaly("anomaly" in flags)  # DSO turns it on globally; off by default here
    model = Flow(**args).to(dev)
    if dev == "cpu":  # fp16 blocks are not supported by CPU autocast matmuls; keep the step's shape
        model.convert_to_fp32()
        model.dtype = torch.float32
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=128, lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    ref = None
    if loss == "dpo":
        ref = copy.deepcopy(model)
        ref.requires_grad_(False)
    if "compile" in flags:
        model = torch.compile(model)
        ref = torch.compile(ref) if ref is not None else None
    opt = torch.optim.AdamW(model.parameters(), lr=5e-6, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8)
    trainable = [p for p in model.parameters() if p.requires_grad]
    A, B, r = a.grad_accum, a.batch, args["resolution"]
    bf16 = torch.bfloat16
    batches = [
        dict(
            cond=torch.randn(B, cond_len, args["cond_channels"], device=dev, dtype=bf16),
            win=torch.randn(B, 8, r, r, r, device=dev, dtype=bf16),
            lose=torch.randn(B, 8, r, r, r, device=dev, dtype=bf16),
        )
        for _ in range(A)
    ]
    beta = 500.0

    def per_sample(net, xt, tt, c, target):
        with torch.autocast(dev, dtype=bf16):
            pred = net(xt, tt * 1000, c)
        return ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3, 4))

    def micro(mb):
        x0 = torch.cat([mb["win"], mb["lose"]])  # (2B, 8, r, r, r) bf16, DSO's concatenation
        t = torch.sigmoid(1.0 + 1.0 * torch.randn(B)).to(mb["cond"])  # one t per pair, bf16
        tt = torch.cat([t, t])
        c = torch.cat([mb["cond"], mb["cond"]])
        eps = torch.randn_like(x0)  # independent noise for winner and loser
        tb = tt.view(-1, 1, 1, 1, 1)
        xt = (1 - tb) * x0 + tb * eps
        target = eps - x0
        lw, ll = per_sample(model, xt, tt, c, target).chunk(2)
        if loss == "dro":
            out = (lw - ll).mean()
        else:
            with torch.no_grad():
                rw, rl = per_sample(ref, xt, tt, c, target).chunk(2)
            out = -F.logsigmoid(-0.5 * beta * ((lw - ll) - (rw - rl))).mean()
        (out / A).backward()
        return out

    holder = {}

    def step():
        for mb in batches:
            holder["loss"] = micro(mb)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    first, sec = _median_step(step, sync, a.reps, a.warmup)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    return dict(seconds=sec, first_s=first, peak_gib=peak, loss=float(holder["loss"]), device=name)


# ------------------------------------------------------------------------------------------- driver
def _child(variant: str, a) -> dict:
    side, loss, *flags = re.split(r":(?!\d)", variant)  # 'attn=mgpu:64x128x2' stays one flag
    if loss not in ("dro", "dpo"):
        raise SystemExit(f"variant {variant!r}: loss must be dro or dpo")
    out = (run_jax if side == "jax" else run_torch)(loss, set(flags), a)
    pairs = a.batch * a.grad_accum
    samples = 2 * pairs  # winner + loser latents through the trained model
    flop = samples * 3 * FLOP_PER_SAMPLE + (samples * FLOP_PER_SAMPLE if loss == "dpo" else 0.0)
    out.update(
        pairs_per_s=pairs / out["seconds"], model_tflops=flop / out["seconds"] / 1e12 if not a.tiny else float("nan")
    )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trellis_src", default="", help="TRELLIS checkout for the torch:* variants")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--batch", type=int, default=6, help="pairs per micro-batch (DSO: 6)")
    ap.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step (DSO: 2)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="small model: a CPU smoke test of the plumbing")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per variant")
    ap.add_argument("--out", default="")
    ap.add_argument("--_one", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a._one:
        print("RESULT " + json.dumps(_child(a._one, a)), flush=True)
        return

    results = {}
    passthrough = [
        f"--trellis_src={a.trellis_src}",
        f"--batch={a.batch}",
        f"--grad_accum={a.grad_accum}",
        f"--reps={a.reps}",
        f"--warmup={a.warmup}",
    ] + (["--tiny"] if a.tiny else [])
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", ATTN_BACKEND="sdpa")
    for variant in a.variants.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), f"--_one={variant}", *passthrough]
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
            lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
            if p.returncode != 0 or not lines:
                tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
                results[variant] = {"error": f"rc {p.returncode}: {tail[:300]}"}
            else:
                results[variant] = json.loads(lines[-1][len("RESULT ") :])
        except subprocess.TimeoutExpired:
            results[variant] = {"error": f"timed out after {a.timeout} s"}
        print(f"{variant}: {results[variant]}", file=sys.stderr, flush=True)
        if a.out:  # one JSON line per variant as it is measured: a killed run keeps what it printed
            with open(a.out + "l", "a") as f:
                f.write(json.dumps(dict(variant=variant, **results[variant])) + "\n")

    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(batch=a.batch, grad_accum=a.grad_accum, results=results), f, indent=1)
    print(f"\n{a.batch} pairs x {a.grad_accum} micro-batches per step; median of {a.reps} steps")
    print(f"{'method':24s} {'s/step':>8s} {'pairs/s':>8s} {'peak GiB':>9s} {'TFLOP/s':>8s} {'1st call s':>10s}  device")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:24s} ERROR {r['error']}")
            continue
        print(
            f"{name:24s} {r['seconds']:8.4f} {r['pairs_per_s']:8.2f} {r['peak_gib']:9.2f} {r['model_tflops']:8.1f} "
            f"{r['first_s']:10.1f}  {r['device']}"
        )
        for cat, ms in r.get("kernel_categories", ()):
            print(f"    {ms:8.2f} ms  {100 * ms / r['kernel_ms']:5.1f}%  [{cat}]")


if __name__ == "__main__":
    main()
