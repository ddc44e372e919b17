"""FlexiCubes parity and speed: ``dso_jax.mesh_extract`` vs TRELLIS's own ``SparseFeatures2Mesh`` on the CPU.

    PYTHONPATH=$PWD python bench/flexicubes_parity.py --trellis_src /work/ext/TRELLIS \
        --flexicubes_src /work/ext/FlexiCubes [--res 64,256] [--shape torus] [--out parity.json]

Both run on the same synthetic mesh-decoder output: an analytic SDF (``--shape``) written into the 101-channel
layout on a TRELLIS-like active set (the res/4 voxels the surface can cross, subdivided twice), plus random
normal deformations, FlexiCubes weights and colours (``--noise``). ``--trellis_src`` is a checkout of
github:microsoft/TRELLIS, ``--flexicubes_src`` one of github:MaxtirError/FlexiCubes (TRELLIS's submodule); with
``--trellis_src ''`` only our timing runs. TRELLIS's extractor is dense over (res+1)³ (several GB at 256).
Prints one JSON line per resolution: voxel count, seconds per object (ours: median of ``--reps``), and the
agreement (vertex/face counts, max vertex and colour error after nearest-neighbour matching, faces as sets).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from twins import trellis_flexicubes as tf  # noqa: E402  (test-side helpers: inputs, TRELLIS loader, compare)

from dso_jax import mesh_extract as mx  # noqa: E402

SHAPES = {"torus": tf.torus(), "sphere": tf.sphere()}


def run(res: int, shape: str, noise: float, seed: int, reps: int, trellis_src: str, flexicubes_src: str) -> dict:
    sdf_fn = SHAPES[shape]
    xyz = tf.shell_coords(sdf_fn, res, coarse=max(res // 4, 1))
    feats = tf.sdf_features(sdf_fn, xyz, res, seed=seed, noise=noise)
    row = dict(res=res, shape=shape, noise=noise, active_voxels=len(xyz))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        ours = mx.extract_mesh(xyz, feats, res)
        times.append(time.perf_counter() - t)
    row.update(ours_s=round(statistics.median(times), 3), ours_s_all=[round(x, 3) for x in times])
    if trellis_src:
        mesher = tf.trellis_mesher(trellis_src, flexicubes_src, res)
        t = time.perf_counter()
        theirs = mesher(xyz, feats)
        row["trellis_s"] = round(time.perf_counter() - t, 3)
        row.update(tf.compare_meshes(ours, theirs))
    else:
        row.update(vertices=len(ours.vertices), faces=len(ours.faces))
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trellis_src", default="", help="TRELLIS checkout ('' times ours only)")
    ap.add_argument("--flexicubes_src", default="", help="FlexiCubes checkout (TRELLIS's submodule)")
    ap.add_argument("--res", default="64,256", help="comma-separated grid resolutions")
    ap.add_argument("--shape", default="torus", choices=sorted(SHAPES))
    ap.add_argument("--noise", type=float, default=1.0, help="std of the random deformations/weights/colours")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=3, help="timed runs of ours per resolution (median reported)")
    ap.add_argument("--out", default="", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if args.trellis_src and not args.flexicubes_src:
        ap.error("--trellis_src needs --flexicubes_src (TRELLIS's flexicubes/ submodule folder is empty)")
    rows = []
    for res in (int(r) for r in args.res.split(",")):
        rows.append(run(res, args.shape, args.noise, args.seed, args.reps, args.trellis_src, args.flexicubes_src))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
