"""Sweep the main job's settings (online DRO/DPO on the toy world) and tabulate the held-out trade-off.

    python bench/toy_sweep.py --variant "dro_lr5e-4 dro optim.lr=5e-4" --variant "dpo dpo" \\
        --eval_every 4 --parallel 4 --workdir /tmp/sweep --out bench/toy_sweep.json

Each variant is ``NAME CONFIG [KEY=VALUE ...]`` and runs
``scripts/train.py --config configs/CONFIG.py:toy --config.KEY=VALUE ...`` in its own process (``--parallel``
at a time; on a GPU they share it). With ``--eval_every N`` every run also evaluates held out every N steps,
so one run gives the whole stable-rate / IoU trajectory. Prints per variant: held-out stable rate and IoU
before and after, the relative IoU change, and the trajectory; the main-job claims themselves come from the
main-job command on the CPU (``README.md``), this only chooses its settings.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    parts = text.split()
    if len(parts) < 2:
        raise ValueError(f"--variant {text!r}: want 'NAME CONFIG [KEY=VALUE ...]'")
    name, config, overrides = parts[0], parts[1], parts[2:]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"--variant {text!r}: overrides must be KEY=VALUE, got {bad}")
    return name, config, overrides


def run_variant(name: str, config: str, overrides: list[str], args) -> dict:
    workdir = os.path.join(args.workdir, name)
    cmd = [
        sys.executable,
        os.path.join(REPO, "scripts", "train.py"),
        f"--config={os.path.join(REPO, 'configs', config)}.py:toy",
        f"--workdir={workdir}",
    ] + [f"--config.{o}" for o in overrides]
    if args.eval_every:
        cmd.append(f"--config.eval.every={args.eval_every}")
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / max(args.parallel, 1):.2f}")
    os.makedirs(args.workdir, exist_ok=True)
    t0 = time.time()
    with open(os.path.join(args.workdir, f"{name}.log"), "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    row = {"name": name, "config": config, "overrides": overrides, "rc": rc, "wall_s": round(time.time() - t0, 1)}
    path = os.path.join(workdir, "summary.json")
    if rc == 0 and os.path.exists(path):
        with open(path) as f:
            row["summary"] = json.load(f)
    return row


def table(rows: list[dict]) -> str:
    out = [
        f"{'variant':28s} {'stable b':>8s} {'stable a':>8s} {'d pp':>6s} {'IoU b':>6s} {'IoU a':>6s} {'IoU rel':>7s} "
        f"{'angle a':>7s} {'wall s':>7s}  trajectory step:stable/IoU"
    ]
    for r in rows:
        s = r.get("summary")
        if not s:
            out.append(f"{r['name']:28s} FAILED rc={r['rc']} (see its log)")
            continue
        rel = s["iou_after"] / s["iou_before"] - 1.0
        curve = " ".join(
            f"{c['step']}:{c['heldout_stable_rate']:.2f}/{c['heldout_iou']:.3f}" for c in s.get("heldout_curve", [])
        )
        out.append(
            f"{r['name']:28s} {s['stable_rate_before']:8.3f} {s['stable_rate_after']:8.3f} "
            f"{100 * (s['stable_rate_after'] - s['stable_rate_before']):6.1f} {s['iou_before']:6.3f} "
            f"{s['iou_after']:6.3f} {100 * rel:6.1f}% {s['mean_angle_after']:7.2f} {r['wall_s']:7.1f}  {curve}"
        )
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", required=True, help="'NAME CONFIG [KEY=VALUE ...]'")
    ap.add_argument("--eval_every", type=int, default=0)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    names = [v[0] for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique, got {names}")
    with concurrent.futures.ThreadPoolExecutor(max(args.parallel, 1)) as pool:
        rows = list(pool.map(lambda v: run_variant(*v, args), variants))
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
