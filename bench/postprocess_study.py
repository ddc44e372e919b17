"""What TRELLIS-style post-processing does to the stability verdict: raw FlexiCubes meshes vs ``to_glb``'s (CPU).

    PYTHONPATH=$PWD python bench/postprocess_study.py                    # 7 shapes, one JSON line each (~10 min)
    PYTHONPATH=$PWD python bench/postprocess_study.py --views 200 --resolution 256 --shapes box,balance

Each shape is an analytic SDF on a TRELLIS-like active set (the 64³ voxels its surface can cross, subdivided twice
to 256³, as the mesh decoder's output is), turned into features whose corner SDFs are the shape's (zero
deformations and weights) and extracted with ``mesh_extract`` (TRELLIS's semantics: untouched grid vertices count
as outside, so every shell also gets an *inner* surface one band inside the outer one). Then the raw mesh and its
``mesh_postprocess.postprocess`` (simplify 0.95, invisible inner surfaces removed, small holes closed) go through
DSO's label preparation (y-up GLB frame, y <-> z swap, no rescale) into the CPU MuJoCo reference (``physics.reference``,
10 s at 1 ms) and MJX's mesh path (``SIM_PRESETS['mesh']``): mass (legacy volume x 1000), COM, angle, verdict.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from twins import trellis_flexicubes as tf  # noqa: E402

from dso_jax import mesh_export, mesh_extract, mesh_postprocess  # noqa: E402


def box(centre, half):
    c, b = np.asarray(centre, float), tf.box(half)
    return lambda p: b(p - c)


def union(*fns):
    return lambda p: np.min([f(p) for f in fns], axis=0)


SHAPES = {  # TRELLIS's native frame: z up, unit cube
    "box": box((0, 0, 0), (0.3, 0.25, 0.12)),
    "sphere": tf.sphere(0.3),
    "torus": tf.torus(0.25, 0.08),
    "tall_box": box((0, 0, 0), (0.07, 0.07, 0.4)),
    "overhang": union(box((0, 0, -0.3), (0.1, 0.1, 0.1)), box((0.2, 0, 0.05), (0.25, 0.1, 0.25))),
    "mushroom": union(
        box((0, 0, -0.2), (0.04, 0.04, 0.2)), lambda p: np.linalg.norm(p - [0.12, 0, 0.15], axis=-1) - 0.22
    ),
    # a thin wall standing on its 6 cm edge, a 2 cm plate across it and a solid block on the plate's short arm:
    # the solid's COM is 7 mm inside the wall's edge; the inner surfaces of the block, wall and plate shift the
    # raw mesh's (legacy |volume|) COM 11 mm beyond it
    "balance": union(
        box((0, 0, -0.3), (0.03, 0.15, 0.15)),
        box((0.06, 0, -0.14), (0.42, 0.2, 0.01)),
        box((-0.27, 0, -0.06), (0.07,) * 3),
    ),
}


def prepared(mesh):
    from dso_jax.physics import mesh_io

    v = np.asarray(mesh.vertices, np.float64) @ mesh_export.Z_UP_TO_Y_UP.T
    return mesh_io.prepare_mesh(v, mesh.faces, up_dir="y", rescale=False, max_faces=2_000_000)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--views", type=int, help="visibility views (default: PostprocessSettings')")
    ap.add_argument("--resolution", type=int, help="visibility raster (default: PostprocessSettings')")
    args = ap.parse_args(argv)
    import jax

    from dso_jax.final_mesh import mesh_verdicts
    from dso_jax.physics import reference, rollout

    physics = rollout.SIM_PRESETS["mesh"]()
    simulate = jax.jit(rollout.make_simulator(physics))
    post = mesh_postprocess.PostprocessSettings()
    post = dataclasses.replace(
        post, num_views=args.views or post.num_views, resolution=args.resolution or post.resolution
    )
    for name in args.shapes.split(","):
        sdf = SHAPES[name]
        xyz = tf.shell_coords(sdf)
        t = time.perf_counter()
        raw = mesh_extract.extract_mesh(xyz, tf.sdf_features(sdf, xyz, mesh_extract.MESH_RES, seed=None))
        t_extract = time.perf_counter() - t
        stats: dict = {}
        t = time.perf_counter()
        final = mesh_postprocess.postprocess(raw, post, stats)
        t_post = time.perf_counter() - t
        row = dict(
            shape=name, active_voxels=len(xyz), extract_s=round(t_extract, 2), postprocess_s=round(t_post, 2), **stats
        )
        verdicts = mesh_verdicts([raw, final], physics, simulate)
        for tag, mesh, j in (("raw", raw, 0), ("post", final, 1)):
            p = prepared(mesh)
            ref = reference.run_protocol(p.vertices, p.faces)
            row[tag] = dict(
                faces=len(mesh.faces),
                watertight=p.watertight,
                mass=round(ref["mass"], 2),
                com_x=round(float(ref["com"][0]), 4),
                com_z=round(float(ref["com"][2]), 4),
                angle_ref=round(ref["angle"], 2),
                angle_mjx=round(float(verdicts["angle"][j]), 2),
                stable_ref=ref["angle"] < 20,
                stable_mjx=bool(verdicts["stable"][j]),
            )
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
