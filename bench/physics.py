"""Benchmark of the occupancy -> verdict path (MJX) and of the CPU reference of DSO's protocol.

  python bench/physics.py                       # JAX backend, B = 1k..16k, 64^3 occupancies
  python bench/physics.py --impl warp           # MJX-Warp backend (needs warp-lang on an NVIDIA GPU)
  python bench/physics.py --triton_gemm_any     # XLA_FLAGS=--xla_gpu_triton_gemm_any=true

Prints one table: batch, compile seconds, seconds per call, objects/s (preprocessing of the 64^3 grids
included), and the CPU reference (plain MuJoCo, 10 s at 1 ms) in objects/s over all cores of this machine.
Objects are random unions of boxes (tables, posts with arms, stacks), generated on the device.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1024,2048,4096,8192,16384")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--impl", default="auto", choices=["auto", "jax", "warp"], help="MJX backend (auto: the library's)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--triton_gemm_any", action="store_true")
    p.add_argument("--set", action="append", default=[], help="sim config override key=value")
    p.add_argument("--reference_meshes", type=int, default=512, help="meshes for the CPU reference rate (0: skip)")
    p.add_argument("--mesh_dir", default="runs/mesh_set/meshes", help="reference meshes if present, else random hulls")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument(
        "--agree_with", default="", choices=["", "jax", "warp"], help="also run this backend on the same objects and "
        "print the fraction of equal verdicts"
    )  # fmt: skip
    return p.parse_args()


def random_objects(key, batch: int, d: int):
    """(batch, d, d, d) bool: each object is 1-4 random boxes resting on a common base (device-side)."""
    import jax
    import jax.numpy as jnp

    c = (jnp.arange(d) + 0.5) / d - 0.5
    k1, k2, k3 = jax.random.split(key, 3)
    centre = jax.random.uniform(k1, (batch, 4, 3), minval=-0.3, maxval=0.3)
    half = jax.random.uniform(k2, (batch, 4, 3), minval=0.03, maxval=0.25)
    used = jax.random.uniform(k3, (batch, 4)) < jnp.array([1.0, 0.7, 0.5, 0.3])

    def one(cen, hal, use):
        x, y, z = jnp.meshgrid(c, c, c, indexing="ij")
        p = jnp.stack([x, y, z], -1)[None]  # (1, d, d, d, 3)
        inside = jnp.all(jnp.abs(p - cen[:, None, None, None]) <= hal[:, None, None, None], -1)  # (4, d, d, d)
        return jnp.any(inside & use[:, None, None, None], 0)

    return jax.lax.map(lambda a: one(*a), (centre, half, used), batch_size=256)


def reference_rate(n: int, mesh_dir: str, workers: int | None) -> tuple[float, int, str]:
    import glob

    import numpy as np

    from dso_jax.physics import mesh_io, reference

    paths = sorted(glob.glob(os.path.join(mesh_dir, "*")))[:n]
    meshes, source = [], f"{mesh_dir}"
    for p in paths:
        try:
            m = mesh_io.load_and_prepare(p, up_dir="z")
            meshes.append((m.vertices, m.faces))
        except mesh_io.MeshError:
            pass
    if len(meshes) < n:
        import trimesh

        rng = np.random.default_rng(0)
        source = "random convex hulls (80 points)" if not meshes else source + " + random hulls"
        while len(meshes) < n:
            hull = trimesh.convex.convex_hull(rng.normal(size=(80, 3)) * rng.uniform(0.2, 1.0, 3))
            m = mesh_io.prepare_mesh(hull.vertices, hull.faces, up_dir="z")
            meshes.append((m.vertices, m.faces))
    workers = workers or os.cpu_count() or 1
    jobs = [(v, f, reference.DURATION_S, reference.TIMESTEP) for v, f in meshes]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(
            reference._simulate_arrays, [(v, f, 0.01, reference.TIMESTEP) for v, f in meshes[:workers]], chunksize=1
        )  # start the workers before timing
        t = time.perf_counter()
        res = pool.map(reference._simulate_arrays, jobs, chunksize=1)
        dt = time.perf_counter() - t
    ok = sum("angle" in r for r in res)
    return ok / dt, workers, source


def main():
    args = _parse()
    if args.triton_gemm_any:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_triton_gemm_any=true").strip()

    import jax
    import numpy as np

    from dso_jax.physics import rollout

    cfg = rollout.with_overrides(rollout.default_sim_config(), args.set)
    cfg.impl = rollout.resolve_impl(args.impl)
    dev = jax.devices()[0]
    print(
        f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}"
    )
    print(
        f"config: K={cfg.num_points} horizon={cfg.horizon_s}s dt={cfg.timestep} steps={rollout.num_steps(cfg)} "
        f"iterations={cfg.iterations} ls={cfg.ls_iterations} impl={cfg.impl} D={args.resolution}"
    )
    fn = jax.jit(rollout.make_stability_fn(cfg))
    other = None
    if args.agree_with:
        other_cfg = rollout.with_overrides(rollout.default_sim_config(), args.set)
        other_cfg.impl = args.agree_with
        other = jax.jit(rollout.make_stability_fn(other_cfg))
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        occ = jax.block_until_ready(random_objects(jax.random.PRNGKey(b), b, args.resolution))
        t = time.perf_counter()
        compiled = fn.lower(occ).compile()
        compile_s = time.perf_counter() - t
        out = jax.block_until_ready(compiled(occ))  # warm-up
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            out = jax.block_until_ready(compiled(occ))
            times.append(time.perf_counter() - t)
        sec = float(np.median(times))
        stable = float(np.mean(np.asarray(out["stable"])))
        rows.append((b, compile_s, sec, b / sec, stable))
        print(f"  B={b}: {b / sec:,.0f} objects/s", flush=True)
        if other is not None:
            theirs = np.asarray(jax.block_until_ready(other(occ))["stable"])
            agree = float(np.mean(theirs == np.asarray(out["stable"])))
            print(f"  B={b}: verdicts equal to MJX-{args.agree_with}'s on {agree:.4f} of objects", flush=True)

    ref = None
    if args.reference_meshes > 0:
        ref = reference_rate(args.reference_meshes, args.mesh_dir, args.workers)

    print("\n| backend | B | compile s | s / call | objects/s | stable frac |")
    print("|---|---|---|---|---|---|")
    for b, cs, sec, rate, st in rows:
        print(f"| MJX-{cfg.impl} | {b} | {cs:.1f} | {sec:.3f} | {rate:,.0f} | {st:.2f} |")
    if ref:
        rate, workers, source = ref
        print(
            f"| CPU reference (MuJoCo, 10 s @ 1 ms), {workers} processes | {args.reference_meshes} | - | - | "
            f"{rate:,.1f} | - |"
        )
        print(f"\nreference: {workers / rate:.3f} s per object per core")
        print(f"\nreference meshes: {source}")


if __name__ == "__main__":
    main()
