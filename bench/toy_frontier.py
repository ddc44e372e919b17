"""The stable-vs-faithful frontier of the online objectives on the toy world (issue 15).

    python bench/toy_frontier.py --workdir /tmp/frontier --parallel 2 --eval_every 8 \\
        --variant "dro_5e-4 dro" --variant "dpo_1e-3 dpo optim.lr=1e-3" --variant "nft_5e-4 nft" \\
        --png bench/toy_frontier.png --out /tmp/frontier/frontier.json

Each variant (``NAME CONFIG [KEY=VALUE ...]``, as ``bench/toy_sweep.py``) is one main-job run with a held-out
evaluation every ``--eval_every`` steps, so one run gives a whole trajectory: (held-out stable rate, IoU to the
condition) at step 0 (the pretrained model), every eval step and the end. A finished run is not trained again
(its workdir's summary is reused), so the command resumes. The plot draws every trajectory, coloured by
objective (the variant's config), with the pretrained point, the world's ceiling (``dso_jax.toy.ceiling``:
the IoU of stable hidden-part resamples of each held-out condition) and the main job's target (stable >= 0.90
at IoU >= 0.97x the pretrained model's). Prints a markdown table of every trajectory point.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import toy_sweep  # noqa: E402  (bench/ is not a package)

COLORS = {"dro": "tab:blue", "dpo": "tab:orange", "nft": "tab:green", "sft": "tab:gray"}
STYLES = ("-o", "--s", ":^", "-.v")
TARGET_STABLE, TARGET_IOU_REL = 0.90, 0.97  # issue 15's bar for the main job


def trajectory(summary: dict) -> list[tuple[int, float, float]]:
    """(step, held-out stable rate, IoU) from step 0 to the end of one run's ``summary.json`` (a partial
    summary from :func:`partial_summary` has no "after")."""
    pts = [(0, summary["stable_rate_before"], summary["iou_before"])]
    pts += [(c["step"], c["heldout_stable_rate"], c["heldout_iou"]) for c in summary.get("heldout_curve", [])]
    if "stable_rate_after" in summary:
        pts.append((summary["steps"], summary["stable_rate_after"], summary["iou_after"]))
    return pts


def partial_summary(workdir: str) -> dict | None:
    """An unfinished run's trajectory so far (``eval_before.json`` and the held-out rows of ``metrics.jsonl``)."""
    try:
        with open(os.path.join(workdir, "eval_before.json")) as f:
            before = json.load(f)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            curve = [r for r in map(json.loads, f) if "heldout_stable_rate" in r]
    except FileNotFoundError:
        return None
    return {"stable_rate_before": before["stable_rate"], "iou_before": before["iou"], "heldout_curve": curve}


def collect(name: str, config: str, overrides: list[str], args) -> dict:
    """A variant's row from its workdir without running it (--no_run): the summary, else the partial one."""
    row = {"name": name, "config": config, "overrides": overrides, "rc": 0, "wall_s": float("nan")}
    path = os.path.join(args.workdir, name, "summary.json")
    if os.path.exists(path):
        with open(path) as f:
            row["summary"] = json.load(f)
    else:
        part = partial_summary(os.path.join(args.workdir, name))
        row.update({"summary": part, "partial": True} if part else {"rc": -1})
    return row


def markdown(rows: list[dict]) -> str:
    out = ["| variant | step | held-out stable | IoU | IoU rel. |", "|---|---|---|---|---|"]
    for r in rows:
        s = r.get("summary")
        if not s:
            out.append(f"| {r['name']} | failed (rc {r['rc']}) | | | |")
            continue
        name = r["name"] + (" (stopped early)" if r.get("partial") else "")
        for step, stable, iou in trajectory(s)[1:]:
            out.append(f"| {name} | {step} | {stable:.3f} | {iou:.3f} | {100 * (iou / s['iou_before'] - 1):+.1f}% |")
    return "\n".join(out)


def plot(path: str, rows: list[dict], ceiling: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    before, seen = None, {}
    for r in rows:
        s = r.get("summary")
        if not s:
            continue
        pts = trajectory(s)
        before = pts[0]
        color = COLORS.get(r["config"], "k")
        style = STYLES[seen.get(r["config"], 0) % len(STYLES)]  # the variants of one objective: one colour
        seen[r["config"]] = seen.get(r["config"], 0) + 1
        ax.plot([p[2] for p in pts], [p[1] for p in pts], style, ms=3, lw=1.2, color=color, label=r["name"], alpha=0.85)
        ax.annotate(str(pts[-1][0]), (pts[-1][2], pts[-1][1]), fontsize=7, color=color)
    if before is not None:
        ax.plot([before[2]], [before[1]], "k*", ms=12, label="pretrained")
        ax.axvline(TARGET_IOU_REL * before[2], color="k", ls=":", lw=0.8)
        ax.axhline(TARGET_STABLE, color="k", ls=":", lw=0.8, label="target (stable 0.90, IoU 0.97x)")
    if ceiling:
        ax.plot([ceiling["ceiling_iou"]], [1.0], "rP", ms=10, label=f"world ceiling (IoU {ceiling['ceiling_iou']:.3f})")
    ax.set_xlabel("IoU to the conditioning object (held out)")
    ax.set_ylabel("held-out stable rate")
    ax.set_title("online objectives on the toy world: stable vs faithful\n(numbers: the step of each run's last point)")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", required=True, help="'NAME CONFIG [KEY=VALUE ...]'")
    ap.add_argument("--eval_every", type=int, default=8)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--png", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--ceiling_k", type=int, default=16, help="hidden resamples per held-out condition (0: none)")
    ap.add_argument("--ceiling_physics", choices=("static", "mjx"), default="static")
    ap.add_argument("--no_run", action="store_true", help="tabulate and plot the workdirs as they are")
    args = ap.parse_args()
    variants = [toy_sweep.parse_variant(v) for v in args.variant]
    if args.no_run:
        rows = [collect(*v, args) for v in variants]
    else:
        with concurrent.futures.ThreadPoolExecutor(max(args.parallel, 1)) as pool:
            rows = list(pool.map(lambda v: toy_sweep.run_variant(*v, args), variants))
    ceiling = None
    if args.ceiling_k:
        sys.path.insert(0, toy_sweep.REPO)
        from configs import common
        from dso_jax.toy import ceiling as world

        config = common.apply_toy(common.get_config())
        stability_fn = None
        if args.ceiling_physics == "mjx":
            import jax

            from dso_jax.candidates import upsample
            from dso_jax.physics import rollout

            sim = rollout.make_stability_fn(config.physics)
            stability_fn = jax.jit(lambda occ: sim(upsample(occ, config.decoder.sim_upsample)))
        ceiling = world.world_ceiling(config.eval.seed, config.eval.num_conditions, args.ceiling_k, stability_fn)
        print("world ceiling:", json.dumps(ceiling))
    print(toy_sweep.table([r for r in rows if not r.get("partial")]))
    print(markdown(rows))
    if args.png:
        plot(args.png, rows, ceiling)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "ceiling": ceiling}, f, indent=1)


if __name__ == "__main__":
    main()
