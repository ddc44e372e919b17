"""Stability evaluation of meshes under DSO's protocol (dso.md §5.1), batch-safe.

  python scripts/evaluate_stability.py --mesh_paths "out/*.glb" [--up_dir y|z|x] [--no_rescale]
      [--threshold 20] [--backend mjx|mujoco] [--sim_preset mesh|occupancy] [--sim KEY=VALUE] [--out results.json]

Prints the mean rotation angle and the stable percentage over the meshes that simulated, and one line per
mesh that failed. With --out it also writes a JSON object keyed by file name (by relative path where names
repeat): {angle, tilt, stable, ...} or {error: one-line reason}, and a histogram PNG beside it; without --out
nothing is written. Exits non-zero when every mesh failed. Defaults follow DSO's evaluation script: GLB is
y-up (swap y/z), rescale into [-0.5, 0.5]³, stable iff angle < 20°. `--backend mujoco` is the CPU reference
(10 s at 1 ms, process pool); `mjx` batches the meshes on the accelerator (hull support spheres, MuJoCo's
legacy mass properties) with dso_jax.physics.rollout's `mesh` settings unless --sim_preset / --sim say otherwise.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys

import numpy as np

from dso_jax import cli
from dso_jax.physics.metrics import STABLE_THRESHOLD_DEG


def _threshold(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 0.0 < value <= 180.0):
        raise ValueError
    return value


_threshold.__name__ = "threshold in (0, 180] degrees"


def histogram_png(angles: np.ndarray, threshold: float, path: str, title: str) -> None:
    """Angle histogram (5° bins over [0, 180], the last bin open) with the threshold marked."""
    from matplotlib.figure import Figure

    edges = np.arange(0, 185, 5.0)
    fig = Figure(figsize=(7.6, 4.2), dpi=100)
    ax = fig.subplots()
    clipped = np.clip(angles, 0, 179.999)
    ax.hist(clipped[clipped < threshold], edges, color="steelblue", label=f"stable (< {threshold:g}°)")
    ax.hist(clipped[clipped >= threshold], edges, color="indianred", label="unstable")
    ax.axvline(threshold, color="black", linewidth=1.5)
    ax.set(xlim=(0, 180), xticks=range(0, 181, 30), xlabel="rotation angle at equilibrium (deg)", ylabel="meshes")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    from dso_jax.physics import rollout

    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--mesh_paths", required=True, help="glob of mesh files (quote it)")
    parser.add_argument("--up_dir", default="y", choices=["x", "y", "z"])
    parser.add_argument(
        "--rescale", dest="rescale", action="store_true", default=True, help="rescale into [-0.5, 0.5]^3 (default)"
    )
    parser.add_argument(
        "--no_rescale",
        "--no-rescale",
        dest="rescale",
        action="store_false",
        help="keep the meshes' own scale and position (labels); DSO's evaluation rescales",
    )
    parser.add_argument(
        "--threshold", type=_threshold, default=None, help=f"stable iff angle < this (default {STABLE_THRESHOLD_DEG:g})"
    )
    parser.add_argument("--backend", default="mjx", choices=["mjx", "mujoco"])
    rollout.add_sim_args(parser, default_preset="mesh")
    parser.add_argument("--out", default=None, help="results JSON (and _hist.png beside it); default: write nothing")
    parser.add_argument("--workers", type=cli.positive_int, default=None, help="mujoco backend: processes")
    parser.add_argument("--timeout", type=cli.positive_float, default=None, help="mujoco backend: s per mesh")
    parser.add_argument("--max_faces", type=cli.positive_int, default=None, help="refuse larger meshes")
    args = parser.parse_args(argv)

    from dso_jax.physics import mesh_io, reference

    cfg = rollout.sim_config_from_args(args)
    if args.backend == "mujoco" and args.sim:
        raise ValueError("--sim applies to --backend mjx; the mujoco backend runs DSO's protocol as is")
    threshold = float(cfg.threshold_deg) if args.threshold is None else args.threshold
    cfg.threshold_deg = threshold
    paths = sorted(p for p in glob.glob(args.mesh_paths) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"no files match {args.mesh_paths!r}")
    out = cli.check_writable_file(args.out) if args.out else None
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
        results = rollout.evaluate_files(paths, cfg, up_dir=args.up_dir, rescale=args.rescale, max_faces=max_faces)
    for r in results:
        if "angle" in r:
            r["stable"] = bool(r["angle"] < threshold)
    table = dict(zip(mesh_io.result_keys(paths), results))

    angles = np.array([r["angle"] for r in results if "angle" in r])
    failed = {k: r["error"] for k, r in table.items() if "error" in r}
    print(f"Successfully processed {len(angles)} of {len(paths)} meshes ({len(failed)} failed)")
    for k, reason in failed.items():
        print(f"  failed {k}: {reason}")
    if len(angles):
        print(f"Average Rotation Angle at Equilibrium: {angles.mean():.4f}")
        print(f"Percentage Stable (angle < {threshold:g}): {100 * np.mean(angles < threshold):.2f}%")
    if out:
        with open(out, "w") as fh:
            json.dump(table, fh, indent=1)
        written = [out]
        if len(angles):
            png = os.path.splitext(out)[0] + "_hist.png"
            histogram_png(angles, threshold, png, f"{args.backend}: {len(angles)} meshes")
            written.append(png)
        print(f"wrote {' and '.join(written)}")
    if not len(angles):
        raise cli.UserError(f"all {len(paths)} meshes failed; see the reasons above")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
