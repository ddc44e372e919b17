"""Plain-MuJoCo CPU implementation of DSO's stability protocol (dso.md §5.1); ground truth for MJX.

Protocol, as DSO runs it: one body with a free joint and one mesh geom (MuJoCo collides it through its convex
hull; mass and inertia are MuJoCo's defaults: density 1000, legacy mesh inertia), an infinite floor plane,
all MuJoCo defaults except timestep 1 ms, 10 s of simulated time from rest with the lowest point at z = 0,
score 2·arccos(w) of the final free-joint quaternion in degrees. The MJCF text is written the same way
(vertices with 6 decimals).

Differences from DSO's script, on purpose: a failure raises a one-line error (DSO returns None and then its
mean crashes); the wall-clock timeout is optional (DSO: 5 s SIGALRM, which makes results machine-dependent).
"""

from __future__ import annotations

import multiprocessing
import os
import time

import numpy as np

from dso_jax.physics import mesh_io

DURATION_S = 10.0
TIMESTEP = 0.001


def protocol_xml(vertices: np.ndarray, faces: np.ndarray) -> str:
    """DSO's MJCF for one mesh: mesh asset (6-decimal vertices), free body at the origin, plane floor."""
    v = np.asarray(vertices, np.float64)
    f = np.asarray(faces, np.int64)
    vert = "  ".join(f"{x:.6f} {y:.6f} {z:.6f}" for x, y, z in v.tolist())
    face = "  ".join(f"{a:d} {b:d} {c:d}" for a, b, c in f.tolist())
    return f"""<mujoco model="mesh_simulation">
  <asset>
    <mesh name="mesh_0" scale="1 1 1" vertex="{vert}" face="{face}"/>
  </asset>
  <worldbody>
    <geom name="ground_plane" type="plane" pos="0 0 0" size="0 0 1"/>
    <body name="mesh_body_0" pos="0 0 0">
      <joint name="free_joint_0" type="free"/>
      <geom name="mesh_geom_0" type="mesh" mesh="mesh_0"/>
    </body>
  </worldbody>
</mujoco>"""


def build_model(vertices: np.ndarray, faces: np.ndarray):
    """Compiles DSO's model; MuJoCo's compile errors become one-line MeshErrors."""
    import mujoco

    try:
        model = mujoco.MjModel.from_xml_string(protocol_xml(vertices, faces))
    except Exception as err:
        raise mesh_io.MeshError(f"MuJoCo rejected the mesh: {err}") from None
    model.opt.timestep = TIMESTEP
    return model


def run_protocol(
    vertices: np.ndarray,
    faces: np.ndarray,
    *,
    duration: float = DURATION_S,
    timestep: float = TIMESTEP,
    timeout_s: float | None = None,
) -> dict:
    """Simulates one prepared mesh (z-up, min z = 0) -> {angle, tilt, quat, mass, com, seconds}."""
    import mujoco

    model = build_model(vertices, faces)
    model.opt.timestep = timestep
    data = mujoco.MjData(model)
    start = time.perf_counter()
    chunk = 500
    while data.time < duration:  # DSO's loop; whole chunks while far from the end (same step count)
        n = chunk if duration - data.time > (chunk + 2) * timestep else 1
        mujoco.mj_step(model, data, nstep=n)
        if timeout_s is not None and time.perf_counter() - start > timeout_s:
            raise TimeoutError(f"timeout: simulation took more than {timeout_s:g} s of wall clock")
    quat = np.array(data.qpos[3:7], np.float64)
    if not np.all(np.isfinite(quat)):
        raise FloatingPointError("simulation diverged (non-finite state)")
    w = quat[0] / np.linalg.norm(quat)
    angle = float(np.degrees(2 * np.arccos(np.clip(w, -1.0, 1.0))))
    tilt = float(np.degrees(np.arccos(np.clip(data.xmat[1][8], -1.0, 1.0))))
    return dict(
        angle=angle,
        tilt=tilt,
        quat=quat,
        mass=float(model.body_mass[1]),
        com=np.array(model.body_ipos[1]),
        seconds=time.perf_counter() - start,
    )


def _evaluate_one(args) -> dict:
    path, up_dir, rescale, max_faces, timeout_s = args
    try:
        mesh = mesh_io.load_and_prepare(path, up_dir=up_dir, rescale=rescale, max_faces=max_faces)
        out = run_protocol(mesh.vertices, mesh.faces, timeout_s=timeout_s)
        res = dict(angle=out["angle"], tilt=out["tilt"], seconds=out["seconds"])
        if mesh.warnings:
            res["warning"] = "; ".join(mesh.warnings)
        return res
    except Exception as err:  # a bad mesh never stops the batch
        return dict(error=mesh_io.error_reason(err))


def evaluate_files(
    paths: list[str],
    *,
    up_dir: str = "y",
    rescale: bool = True,
    max_faces: int = mesh_io.DEFAULT_MAX_FACES,
    timeout_s: float | None = None,
    workers: int | None = None,
) -> list[dict]:
    """Runs the protocol on many files over a process pool -> one dict per path: {angle, tilt, ...} or {error}."""
    jobs = [(p, up_dir, rescale, max_faces, timeout_s) for p in paths]
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or len(jobs) <= 1:
        return [_evaluate_one(j) for j in jobs]
    ctx = multiprocessing.get_context("spawn")  # no fork after JAX threads exist
    with ctx.Pool(processes=min(workers, len(jobs))) as pool:
        return list(pool.imap(_evaluate_one, jobs, chunksize=1))


def _simulate_arrays(args) -> dict:
    vertices, faces, duration, timestep = args
    try:
        out = run_protocol(vertices, faces, duration=duration, timestep=timestep)
        return dict(angle=out["angle"], tilt=out["tilt"], seconds=out["seconds"])
    except Exception as err:
        return dict(error=mesh_io.error_reason(err))


def simulate_many(
    meshes: list[tuple[np.ndarray, np.ndarray]],
    *,
    workers: int | None = None,
    duration: float = DURATION_S,
    timestep: float = TIMESTEP,
) -> list[dict]:
    """Protocol on many prepared (vertices, faces) pairs over a process pool -> list of {angle, tilt} or {error}."""
    jobs = [(v, f, duration, timestep) for v, f in meshes]
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or len(jobs) <= 1:
        return [_simulate_arrays(j) for j in jobs]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes=min(workers, len(jobs))) as pool:
        return list(pool.imap(_simulate_arrays, jobs, chunksize=4))
