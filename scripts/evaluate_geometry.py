"""Geometry evaluation as in DSO (dso.md §5.2): ICP-aligned Chamfer distance and F-score@0.05 on 10k points.

  python scripts/evaluate_geometry.py --mesh_paths "out/*.glb" --ground_truth_paths GT_DIR [--up_dir y|z]
      [--n_points 10000] [--seed 0] [--out geometry.json]

Ground truth for `{uid}-...glb` is GT_DIR/*/{uid}.glb (DSO's layout; GT_DIR/{uid}.<ext> also works). Both
meshes are normalised to unit max extent about the bbox centre; samples are seeded (DSO's are not). Results
are keyed by file name (by relative path where names repeat); --out writes them as JSON (default: nothing is
written). Exits non-zero when every mesh failed.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np

from dso_jax import cli


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--mesh_paths", required=True, help="glob of generated meshes (quote it)")
    parser.add_argument("--ground_truth_paths", required=True, help="directory with the ground-truth meshes")
    parser.add_argument("--up_dir", default="y", choices=["y", "z"])
    parser.add_argument("--n_points", type=cli.positive_int, default=10_000)
    parser.add_argument("--tau", type=cli.positive_float, default=0.05)
    parser.add_argument("--seed", type=cli.non_negative_int, default=0)
    parser.add_argument("--out", default=None, help="results JSON; default: write nothing")
    args = parser.parse_args(argv)

    from dso_jax.physics import mesh_io, metrics

    paths = sorted(p for p in glob.glob(args.mesh_paths) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"no files match {args.mesh_paths!r}")
    out = cli.check_writable_file(args.out) if args.out else None
    results = metrics.evaluate_geometry_files(
        paths, args.ground_truth_paths, up_dir=args.up_dir, n_points=args.n_points, tau=args.tau, seed=args.seed
    )
    table = dict(zip(mesh_io.result_keys(paths), results))
    ok = [r for r in results if "error" not in r]
    summary = dict(
        count=len(ok),
        failed=len(results) - len(ok),
        mean_fscore=float(np.mean([r["fscore"] for r in ok])) if ok else None,
        mean_chamfer=float(np.mean([r["chamfer"] for r in ok])) if ok else None,
    )
    for k, r in table.items():
        if "error" in r:
            print(f"  failed {k}: {r['error']}")
    print(f"Evaluated {summary['count']} of {len(paths)} meshes")
    if ok:
        print(f"Average F-Score: {summary['mean_fscore']:.4f}")
        print(f"Average Chamfer Distance: {summary['mean_chamfer']:.5f}")
    if out:
        with open(out, "w") as fh:
            json.dump(dict(meshes=table, summary=summary), fh, indent=1)
        print(f"wrote {out}")
    if not ok:
        raise cli.UserError(f"all {len(paths)} meshes failed; see the reasons above")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
