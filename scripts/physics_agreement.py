"""Agreement of the MJX verdicts with DSO's CPU protocol on a mesh set (see scripts/make_mesh_set.py).

Runs three answers per mesh and prints confusion matrices against the reference:
  reference   plain MuJoCo, DSO's protocol (hull mesh geom, legacy inertia, 10 s at 1 ms);
  mjx_mesh    MJX rollout of `body.mesh_body` (same legacy mass properties, hull support spheres), with
              `rollout.mesh_sim_config()` (5 ms steps, the evaluation settings);
  mjx_occ     the occupancy path: the mesh voxelised to D³ (surface shell, like TRELLIS), then
              `rollout.make_stability_fn` (voxel mass properties, interior fill).

  python scripts/physics_agreement.py --mesh_dir runs/mesh_set/meshes --up_dir z --out runs/agreement.json
  (--set horizon_s=3.0 --set num_points=32 ... override sim config keys; --x64 runs MJX in float64)
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

import numpy as np

from dso_jax import cli


def _confusion(ref_stable: np.ndarray, stable: np.ndarray) -> dict:
    return dict(
        agree=float(np.mean(ref_stable == stable)),
        ref_stable_pred_stable=int(np.sum(ref_stable & stable)),
        ref_stable_pred_unstable=int(np.sum(ref_stable & ~stable)),
        ref_unstable_pred_stable=int(np.sum(~ref_stable & stable)),
        ref_unstable_pred_unstable=int(np.sum(~ref_stable & ~stable)),
    )


def _print_confusion(name: str, c: dict, n: int) -> None:
    print(f"\n{name}: agreement {100 * c['agree']:.2f}% of {n}")
    print("                 pred stable  pred unstable")
    print(f"  ref stable     {c['ref_stable_pred_stable']:11d}  {c['ref_stable_pred_unstable']:13d}")
    print(f"  ref unstable   {c['ref_unstable_pred_stable']:11d}  {c['ref_unstable_pred_unstable']:13d}")


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--mesh_dir", default="runs/mesh_set/meshes")
    parser.add_argument("--up_dir", default="z", choices=["x", "y", "z"])
    parser.add_argument("--no_rescale", action="store_true")
    parser.add_argument("--resolution", type=cli.positive_int, default=64)
    parser.add_argument("--set", action="append", default=[], help="sim config override key=value")
    parser.add_argument("--x64", action="store_true")
    parser.add_argument("--batch", type=cli.positive_int, default=200)
    parser.add_argument("--workers", type=cli.positive_int, default=None)
    parser.add_argument("--reference_json", default=None, help="reuse reference results from an earlier --out")
    parser.add_argument("--skip", default="", help="comma list of paths to skip: mesh,occ")
    parser.add_argument("--limit", type=cli.non_negative_int, default=0)
    parser.add_argument("--out", default="runs/agreement.json")
    args = parser.parse_args(argv)

    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    from dso_jax.batching import map_in_chunks
    from dso_jax.physics import body as body_lib
    from dso_jax.physics import mesh_io, reference, rollout

    cfg = rollout.with_overrides(rollout.default_sim_config(), args.set)
    # the mesh path evaluates with finer steps (rollout.mesh_sim_config); the overrides apply to both
    mesh_cfg = rollout.with_overrides(rollout.mesh_sim_config(), args.set)
    skip = set(args.skip.split(",")) - {""}
    if skip - {"mesh", "occ"}:
        raise ValueError(f"--skip {args.skip!r}: expected a comma list of mesh, occ")
    if not os.path.isdir(args.mesh_dir):
        raise FileNotFoundError(f"--mesh_dir {args.mesh_dir}: no such directory (see scripts/make_mesh_set.py)")
    cli.check_writable_file(args.out)
    print("occupancy sim config:", {k: cfg[k] for k in cfg})
    print("mesh sim config differs in:", {k: mesh_cfg[k] for k in mesh_cfg if mesh_cfg[k] != cfg[k]})

    paths = sorted(glob.glob(os.path.join(args.mesh_dir, "*")))
    if args.limit:
        paths = paths[: args.limit]
    if not paths:
        raise FileNotFoundError(f"--mesh_dir {args.mesh_dir}: no mesh files")
    names = [os.path.basename(p) for p in paths]
    meshes, errors = {}, {}
    for p, name in zip(paths, names):
        try:
            meshes[name] = mesh_io.load_and_prepare(p, up_dir=args.up_dir, rescale=not args.no_rescale)
        except Exception as err:
            errors[name] = mesh_io.error_reason(err)
    print(f"{len(meshes)} meshes prepared, {len(errors)} failed to load")

    # Reference (cached).
    ref = {}
    if args.reference_json and os.path.exists(args.reference_json):
        with open(args.reference_json) as f:
            cached = json.load(f)
        if not isinstance(cached, dict) or not isinstance(cached.get("reference"), dict):
            raise ValueError(f"--reference_json {args.reference_json}: no 'reference' table (an earlier --out?)")
        ref = cached["reference"]
    todo = [n for n in meshes if n not in ref]
    if todo:
        t = time.time()
        res = reference.simulate_many([(meshes[n].vertices, meshes[n].faces) for n in todo], workers=args.workers)
        ref.update(dict(zip(todo, res)))
        print(f"reference: {len(todo)} meshes in {time.time() - t:.1f} s")
    ok = [n for n in meshes if "angle" in ref.get(n, {})]
    for n in meshes:
        if n not in ok:
            errors[n] = ref.get(n, {}).get("error", "reference failed")
    if not ok:
        raise cli.UserError(f"none of the {len(paths)} meshes simulated under the reference; nothing to compare")
    ref_angle = np.array([ref[n]["angle"] for n in ok])
    ref_stable = ref_angle < cfg.threshold_deg
    print(f"reference: {ref_stable.sum()} stable / {len(ok)}")
    results = dict(
        config={k: cfg[k] for k in cfg},
        mesh_config={k: mesh_cfg[k] for k in mesh_cfg},
        x64=args.x64,
        names=ok,
        reference=ref,
        errors=errors,
        confusion={},
    )

    if "mesh" not in skip:
        bodies, keep = [], []
        for n in ok:
            try:
                bodies.append(body_lib.mesh_body(meshes[n].vertices, meshes[n].faces, mesh_cfg))
                keep.append(n)
            except Exception as err:
                errors[n] = f"mesh_body: {mesh_io.error_reason(err)}"
        t = time.time()
        out = rollout.simulate_mesh_bodies(mesh_cfg, bodies, batch_size=min(args.batch, len(bodies)))
        print(f"mjx_mesh: {len(bodies)} in {time.time() - t:.1f} s (incl. compile)")
        idx = [ok.index(n) for n in keep]
        c = _confusion(ref_stable[idx], out["stable"])
        _print_confusion("mjx_mesh vs reference", c, len(keep))
        results["confusion"]["mjx_mesh"] = c
        results["mjx_mesh"] = {
            n: dict(angle=float(a), tilt=float(tl), margin=float(m))
            for n, a, tl, m in zip(keep, out["angle"], out["tilt"], out["margin"])
        }

    if "occ" not in skip:
        t = time.time()
        occ = np.stack(
            [
                body_lib.voxelize_mesh(
                    body_lib.mesh_to_grid_frame(meshes[n].vertices), meshes[n].faces, args.resolution
                )
                for n in ok
            ]
        )
        print(f"voxelised {len(ok)} meshes at {args.resolution}^3 in {time.time() - t:.1f} s")
        fn = jax.jit(rollout.make_stability_fn(cfg))
        t = time.time()
        out = map_in_chunks(fn, occ, min(args.batch, len(ok)))
        print(f"mjx_occ: {len(ok)} in {time.time() - t:.1f} s (incl. compile)")
        c = _confusion(ref_stable, out["stable"])
        _print_confusion("mjx_occ vs reference", c, len(ok))
        results["confusion"]["mjx_occ"] = c
        results["mjx_occ"] = {
            n: dict(angle=float(a), tilt=float(tl), margin=float(m))
            for n, a, tl, m in zip(ok, out["angle"], out["tilt"], out["margin"])
        }

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1, default=float)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
