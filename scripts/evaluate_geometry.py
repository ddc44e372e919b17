"""Geometry evaluation as in DSO (dso.md §5.2): ICP-aligned Chamfer distance and F-score@0.05 on 10k points.

  python scripts/evaluate_geometry.py --mesh_paths "out/*.glb" --ground_truth_paths GT_DIR [--up_dir y|z]
      [--n_points 10000] [--seed 0] [--out geometry.json]

Ground truth for `{uid}-...glb` is GT_DIR/*/{uid}.glb (DSO's layout; GT_DIR/{uid}.<ext> also works). Both
meshes are normalised to unit max extent about the bbox centre; samples are seeded (DSO's are not).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mesh_paths", required=True)
    parser.add_argument("--ground_truth_paths", required=True, help="directory with the ground-truth meshes")
    parser.add_argument("--up_dir", default="y", choices=["y", "z"])
    parser.add_argument("--n_points", type=int, default=10_000)
    parser.add_argument("--tau", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="geometry.json")
    args = parser.parse_args()

    from dso_jax.physics import metrics

    paths = sorted(glob.glob(args.mesh_paths))
    if not paths:
        raise SystemExit(f"no files match {args.mesh_paths!r}")
    results = metrics.evaluate_geometry_files(
        paths, args.ground_truth_paths, up_dir=args.up_dir, n_points=args.n_points, tau=args.tau, seed=args.seed
    )
    table = {os.path.basename(p): r for p, r in zip(paths, results)}
    ok = [r for r in results if "error" not in r]
    summary = dict(
        count=len(ok),
        failed=len(results) - len(ok),
        mean_fscore=float(np.mean([r["fscore"] for r in ok])) if ok else None,
        mean_chamfer=float(np.mean([r["chamfer"] for r in ok])) if ok else None,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(dict(meshes=table, summary=summary), fh, indent=1)
    for k, r in table.items():
        if "error" in r:
            print(f"  failed {k}: {r['error']}")
    print(f"Evaluated {summary['count']} of {len(paths)} meshes")
    if ok:
        print(f"Average F-Score: {summary['mean_fscore']:.4f}")
        print(f"Average Chamfer Distance: {summary['mean_chamfer']:.5f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
