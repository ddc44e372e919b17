"""Stability evaluation of meshes under DSO's protocol (dso.md §5.1), batch-safe.

  python scripts/evaluate_stability.py --mesh_paths "out/*.glb" [--up_dir y|z|x] [--no_rescale]
      [--threshold 20] [--backend mjx|mujoco] [--out results.json]

Writes a JSON object keyed by file name ({angle, tilt, stable, ...} or {error: one-line reason}), prints the
mean rotation angle and the stable percentage over the meshes that simulated, and draws a histogram PNG next
to the JSON. Defaults follow DSO's evaluation script: GLB is y-up (swap y/z), rescale into [-0.5, 0.5]³.
`--backend mujoco` is the CPU reference (10 s at 1 ms, process pool); `mjx` batches the meshes on the
accelerator (hull support spheres, MuJoCo's legacy mass properties).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

from dso_jax.physics.metrics import STABLE_THRESHOLD_DEG


def _keys(paths: list[str]) -> list[str]:
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) == len(names):
        return names
    root = os.path.commonpath([os.path.abspath(p) for p in paths])
    return [os.path.relpath(os.path.abspath(p), root) for p in paths]


def histogram_png(angles: np.ndarray, threshold: float, path: str, title: str) -> None:
    """Angle histogram (5° bins over [0, 180], last bin open) with the threshold marked; PIL only."""
    from PIL import Image, ImageDraw

    edges = np.arange(0, 185, 5.0)
    counts, _ = np.histogram(np.clip(angles, 0, 179.999), edges)
    w, h, pad = 760, 420, 50
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    top = max(int(counts.max()) if len(counts) else 1, 1)
    bw = (w - 2 * pad) / len(counts)
    for i, c in enumerate(counts):
        x0 = pad + i * bw
        y0 = h - pad - (h - 2 * pad) * c / top
        color = (70, 130, 180) if edges[i] < threshold else (205, 92, 92)
        draw.rectangle([x0 + 1, y0, x0 + bw - 1, h - pad], fill=color)
    xt = pad + (w - 2 * pad) * threshold / 180.0
    draw.line([xt, pad - 10, xt, h - pad], fill="black", width=2)
    draw.line([pad, h - pad, w - pad, h - pad], fill="black")
    draw.line([pad, pad - 10, pad, h - pad], fill="black")
    for deg in range(0, 181, 30):
        x = pad + (w - 2 * pad) * deg / 180.0
        draw.text((x - 8, h - pad + 6), f"{deg}", fill="black")
    draw.text((pad, 10), f"{title}   (count max {top}; threshold {threshold:g} deg)", fill="black")
    draw.text((w // 2 - 60, h - 20), "rotation angle (deg)", fill="black")
    img.save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mesh_paths", required=True, help="glob of mesh files (quote it)")
    parser.add_argument("--up_dir", default="y", choices=["x", "y", "z"])
    parser.add_argument(
        "--rescale",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="centre and scale into [-0.5, 0.5]^3 (DSO's evaluation; --no-rescale for labels)",
    )
    parser.add_argument("--threshold", type=float, default=STABLE_THRESHOLD_DEG)
    parser.add_argument("--backend", default="mjx", choices=["mjx", "mujoco"])
    parser.add_argument("--out", default="results.json")
    parser.add_argument("--workers", type=int, default=None, help="mujoco backend: processes (default: all cores)")
    parser.add_argument("--timeout", type=float, default=None, help="mujoco backend: wall-clock seconds per mesh")
    parser.add_argument("--max_faces", type=int, default=None, help="refuse larger meshes (default: mesh_io's)")
    args = parser.parse_args()

    from dso_jax.physics import mesh_io, reference, rollout

    paths = sorted(glob.glob(args.mesh_paths))
    if not paths:
        raise SystemExit(f"no files match {args.mesh_paths!r}")
    max_faces = args.max_faces or mesh_io.DEFAULT_MAX_FACES
    if args.backend == "mujoco":
        results = reference.evaluate_files(
            paths,
            up_dir=args.up_dir,
            rescale=args.rescale,
            max_faces=max_faces,
            timeout_s=args.timeout,
            workers=args.workers,
        )
    else:
        cfg = rollout.mesh_sim_config()
        cfg.threshold_deg = args.threshold
        results = rollout.evaluate_files(paths, cfg, up_dir=args.up_dir, rescale=args.rescale, max_faces=max_faces)
    for r in results:
        if "angle" in r:
            r["stable"] = bool(r["angle"] < args.threshold)
    table = dict(zip(_keys(paths), results))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(table, fh, indent=1)

    angles = np.array([r["angle"] for r in results if "angle" in r])
    failed = {k: r["error"] for k, r in table.items() if "error" in r}
    print(f"Successfully processed {len(angles)} of {len(paths)} meshes ({len(failed)} failed)")
    for k, reason in failed.items():
        print(f"  failed {k}: {reason}")
    if len(angles):
        print(f"Average Rotation Angle at Equilibrium: {angles.mean():.4f}")
        print(f"Percentage Stable (angle < {args.threshold:g}): {100 * np.mean(angles < args.threshold):.2f}%")
        png = os.path.splitext(args.out)[0] + "_hist.png"
        histogram_png(angles, args.threshold, png, f"{args.backend}: {len(angles)} meshes")
        print(f"wrote {args.out} and {png}")
    else:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
