"""Metrics: DSO's rotation angle (jnp, jittable) and its geometry metrics (numpy/scipy).

`rotation_angle_deg` is DSO's score: the total rotation of the final orientation from the identity start,
2·arccos(w) of the normalised quaternion (w, x, y, z), in degrees, with w clipped to [-1, 1]. Like DSO there
is no q/−q canonicalisation, so the range is [0, 360].

`chamfer_fscore` reproduces DSO's evaluate_geometry (dso.md §5.2): each mesh normalised to unit max extent
about its bbox centre, 10k area-weighted surface samples (seeded here), rigid point-to-point ICP of the
generated points onto the ground truth (max correspondence 0.02, 50 iterations, relative fitness 1e-6,
identity start), then Chamfer = mean of the two mean nearest-neighbour distances and F-score at τ = 0.05.
"""

from __future__ import annotations

import glob
import os

import jax.numpy as jnp
import numpy as np

# DSO's verdict: an object is stable iff its final tilt is below this many degrees (dso.md §5), defined once.
STABLE_THRESHOLD_DEG = 20.0


def rotation_angle_deg(quat):
    """(..., 4) quaternions (w, x, y, z) -> (...,) total rotation angle 2·arccos(w) in degrees."""
    quat = jnp.asarray(quat)
    norm = jnp.linalg.norm(quat, axis=-1)
    w = quat[..., 0] / jnp.maximum(norm, 1e-12)
    return jnp.degrees(2.0 * jnp.arccos(jnp.clip(w, -1.0, 1.0)))


# ------------------------------------------------------------------------------------------- geometry


def normalize_unit_extent(vertices: np.ndarray) -> np.ndarray:
    """DSO's geometry normalisation: translate by the bbox centre, scale by 1 / max extent."""
    v = np.asarray(vertices, np.float64)
    lo, hi = v.min(0), v.max(0)
    extent = (hi - lo).max()
    if not extent > 0:
        raise ValueError("degenerate mesh: zero extent")
    return (v - (lo + hi) / 2) / extent


def icp_point_to_point(
    source: np.ndarray,
    target: np.ndarray,
    max_distance: float = 0.02,
    max_iterations: int = 50,
    relative_fitness: float = 1e-6,
    relative_rmse: float = 1e-6,
) -> np.ndarray:
    """Rigid point-to-point ICP (Open3D's registration_icp semantics); returns the aligned source (N, 3)."""
    from scipy.spatial import cKDTree

    tree = cKDTree(target)
    cur = np.array(source, np.float64)
    prev_fit, prev_rmse = None, None
    for _ in range(max_iterations + 1):
        dist, idx = tree.query(cur, distance_upper_bound=max_distance)
        ok = np.isfinite(dist)
        fit = ok.mean()
        rmse = float(np.sqrt(np.mean(dist[ok] ** 2))) if ok.any() else 0.0
        if prev_fit is not None and abs(fit - prev_fit) < relative_fitness and abs(rmse - prev_rmse) < relative_rmse:
            break
        prev_fit, prev_rmse = fit, rmse
        if ok.sum() < 3:
            break
        p, q = cur[ok], target[idx[ok]]
        pm, qm = p.mean(0), q.mean(0)
        u, _, vt = np.linalg.svd((p - pm).T @ (q - qm))
        s = np.diag([1.0, 1.0, np.sign(np.linalg.det(vt.T @ u.T))])
        rot = vt.T @ s @ u.T
        cur = (cur - pm) @ rot.T + qm
    return cur


def chamfer_fscore(
    gen_vertices,
    gen_faces,
    gt_vertices,
    gt_faces,
    *,
    n_points: int = 10_000,
    tau: float = 0.05,
    seed: int = 0,
    align: bool = True,
) -> dict:
    """DSO's geometry metrics for one (generated, ground-truth) mesh pair -> {chamfer, fscore, precision, recall}."""
    import trimesh
    from scipy.spatial import cKDTree

    gen = trimesh.Trimesh(normalize_unit_extent(gen_vertices), np.asarray(gen_faces), process=False)
    gt = trimesh.Trimesh(normalize_unit_extent(gt_vertices), np.asarray(gt_faces), process=False)
    if not gen.area > 0 or not gt.area > 0:
        raise ValueError("degenerate mesh: zero surface area")
    gen_pts, _ = trimesh.sample.sample_surface(gen, n_points, seed=seed)
    gt_pts, _ = trimesh.sample.sample_surface(gt, n_points, seed=seed + 1)
    if align:
        gen_pts = icp_point_to_point(gen_pts, gt_pts)
    d_gen, _ = cKDTree(gt_pts).query(gen_pts)
    d_gt, _ = cKDTree(gen_pts).query(gt_pts)
    precision = float(np.mean(d_gen < tau))
    recall = float(np.mean(d_gt < tau))
    fscore = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    chamfer = float((d_gen.mean() + d_gt.mean()) / 2)
    return dict(chamfer=chamfer, fscore=fscore, precision=precision, recall=recall)


MESH_EXTENSIONS = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")


def find_ground_truth(mesh_path: str, ground_truth_dir: str) -> str:
    """DSO's lookup: object id = file name up to the first '-'; GT at DIR/*/{id}.glb (also DIR/{id}.<ext>)."""
    object_id = os.path.basename(mesh_path).split("-")[0].split(".")[0]
    hits = []
    for ext in MESH_EXTENSIONS:
        hits += glob.glob(os.path.join(glob.escape(ground_truth_dir), "*", object_id + ext))
        hits += glob.glob(os.path.join(glob.escape(ground_truth_dir), object_id + ext))
    hits = sorted(set(hits))
    if len(hits) != 1:
        raise FileNotFoundError(f"ground truth for {object_id!r}: {len(hits)} matches under {ground_truth_dir}")
    return hits[0]


def evaluate_geometry_files(
    paths: list[str],
    ground_truth_dir: str,
    *,
    up_dir: str = "y",
    n_points: int = 10_000,
    tau: float = 0.05,
    seed: int = 0,
) -> list[dict]:
    """Geometry metrics per generated mesh file -> {chamfer, fscore, precision, recall, ground_truth} or {error}.

    up_dir follows DSO's geometry script: the ground truth is y-up; 'y' keeps the generated mesh as is and 'z'
    swaps its y and z first.
    """
    from dso_jax.physics import mesh_io

    if up_dir not in ("y", "z"):
        raise ValueError(f"up_dir must be y or z for geometry, got {up_dir!r}")
    if not os.path.isdir(ground_truth_dir):  # else every mesh would fail alike, one row at a time
        raise FileNotFoundError(f"ground truth folder {ground_truth_dir}: no such directory")
    results = []
    for path in paths:
        try:
            gen_v, gen_f = mesh_io.load_mesh(path)
            if len(gen_f) == 0:
                raise mesh_io.MeshError("empty mesh: no faces")
            if up_dir == "z":
                gen_v = gen_v[:, [0, 2, 1]]
            gt_path = find_ground_truth(path, ground_truth_dir)
            gt_v, gt_f = mesh_io.load_mesh(gt_path)
            if len(gt_f) == 0:
                raise mesh_io.MeshError(f"empty ground truth mesh: {gt_path}")
            res = chamfer_fscore(gen_v, gen_f, gt_v, gt_f, n_points=n_points, tau=tau, seed=seed)
            res["ground_truth"] = gt_path
            results.append(res)
        except Exception as err:
            results.append(dict(error=mesh_io.error_reason(err)))
    return results
