"""Loading and preparing meshes for the stability protocol, with one-line errors.

Every failure raises `MeshError` whose message is a single line naming the reason, so a batch evaluation can
record it and move on (DSO's own script aborts on the first bad file).

`prepare_mesh` reproduces DSO's evaluation preprocessing (dso.md §5.1 steps 2–5): concatenate the scene,
drop repeated faces, merge vertices, optionally centre at the vertex mean and scale so that max|coord| = 0.5,
swap the up axis into z, and put the lowest vertex at z = 0.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

# Faces above this are refused by default: hull + inertia still work, but the reference would take seconds.
DEFAULT_MAX_FACES = 500_000


class MeshError(ValueError):
    """A mesh that cannot be simulated; `str(err)` is a one-line reason."""

    def __init__(self, reason: str):
        super().__init__(" ".join(str(reason).split()))


@dataclasses.dataclass(frozen=True)
class PreparedMesh:
    vertices: np.ndarray  # (N, 3) float64, z-up, min z = 0
    faces: np.ndarray  # (F, 3) int32
    watertight: bool
    warnings: tuple[str, ...] = ()


def result_keys(paths: list[str]) -> list[str]:
    """Keys of a per-file result table: file names when they are unique, else paths relative to the files'
    common folder (two generations with the same name in different folders stay two rows)."""
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) == len(names):
        return names
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    return [os.path.relpath(os.path.abspath(p), root) for p in paths]


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_mesh(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Loads a mesh file (GLB/OBJ/PLY/STL/OFF...) into (vertices (N, 3) f64, faces (F, 3) i64); raises MeshError."""
    import trimesh  # local: keeps `import dso_jax.physics` light

    if not os.path.exists(path):
        raise MeshError(f"missing file: {path}")
    if os.path.isdir(path):
        raise MeshError(f"not a file: {path}")
    if os.path.getsize(path) == 0:
        raise MeshError("corrupt file: 0 bytes")
    try:
        loaded = trimesh.load(path, process=False)
    except Exception as err:  # trimesh raises many types for unreadable data
        raise MeshError(f"corrupt file: {_one_line(err)}") from None
    geoms = list(loaded.geometry.values()) if isinstance(loaded, trimesh.Scene) else [loaded]
    if isinstance(loaded, trimesh.Scene):
        try:  # apply the scene graph transforms, like trimesh.util.concatenate(trimesh.load(...)) via dump
            geoms = list(loaded.dump())
        except Exception:
            pass
    meshes = [g for g in geoms if isinstance(g, trimesh.Trimesh)]
    if not meshes:
        if any(isinstance(g, trimesh.PointCloud) for g in geoms):
            raise MeshError("point cloud: no faces")
        if geoms:
            raise MeshError(f"no triangle mesh in file (found {type(geoms[0]).__name__})")
        raise MeshError("empty mesh: no geometry")
    mesh = trimesh.util.concatenate(meshes) if len(meshes) > 1 else meshes[0]
    vertices = np.asarray(mesh.vertices, dtype=np.float64).reshape(-1, 3)
    faces = np.asarray(mesh.faces, dtype=np.int64).reshape(-1, 3)
    return vertices, faces


def prepare_mesh(
    vertices: np.ndarray,
    faces: np.ndarray,
    *,
    up_dir: str = "y",
    rescale: bool = True,
    max_faces: int = DEFAULT_MAX_FACES,
    decimals: int | None = 6,
) -> PreparedMesh:
    """DSO's preprocessing of one mesh, plus validation; raises MeshError with a one-line reason.

    Args:
      vertices: (N, 3) vertex positions.
      faces: (F, 3) triangle indices.
      up_dir: the input's up axis; 'y' swaps y and z (GLB is y-up), 'x' swaps x and z, 'z' keeps the axes.
      rescale: centre at the vertex mean and scale so that max|coord| = 0.5 (DSO's evaluation; off for labels).
      max_faces: refuse larger meshes with a reason instead of spending seconds on them.
      decimals: round vertices like DSO's MJCF text (6 decimals); None keeps full precision.
    """
    import trimesh

    if up_dir not in ("x", "y", "z"):
        raise MeshError(f"bad up_dir {up_dir!r}: expected x, y or z")
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces)
    if vertices.size == 0 or faces.size == 0:
        raise MeshError(f"empty mesh: {len(vertices)} vertices, {len(faces)} faces")
    if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
        raise MeshError(
            f"bad arrays: vertices {vertices.shape}, faces {faces.shape} (need (N, 3) and (F, 3) triangles)"
        )
    if not np.all(np.isfinite(vertices)):
        raise MeshError("non-finite vertex coordinates (NaN or Inf)")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise MeshError(f"face index out of range [0, {len(vertices)})")
    if len(faces) > max_faces:
        raise MeshError(f"too many faces: {len(faces)} > {max_faces} (simplify the mesh first)")

    mesh = trimesh.Trimesh(vertices, faces, process=False)
    mesh.update_faces(mesh.unique_faces())
    mesh.merge_vertices()
    v = np.array(mesh.vertices, dtype=np.float64)
    f = np.asarray(mesh.faces, dtype=np.int32)
    if len(f) == 0:
        raise MeshError("empty mesh: no faces after cleaning")
    if rescale:
        v = v - v.mean(axis=0)
        max_dim = np.abs(v).max()
        if max_dim > 0:
            v = v * (0.5 / max_dim)
    if up_dir == "y":
        v[:, [1, 2]] = v[:, [2, 1]]
    elif up_dir == "x":
        v[:, [0, 2]] = v[:, [2, 0]]
    v[:, 2] -= v[:, 2].min()
    if decimals is not None:
        v = np.round(v, decimals)
    _check_solid(v, f)
    watertight = bool(mesh.is_watertight)
    warnings = () if watertight else ("non-watertight: legacy volume (MuJoCo/DSO) is used as is",)
    return PreparedMesh(vertices=v, faces=f, watertight=watertight, warnings=warnings)


def _check_solid(v: np.ndarray, f: np.ndarray) -> None:
    """Rejects meshes with no volume: too few vertices, zero area, or a flat/collinear vertex set."""
    used = np.unique(f)
    if len(used) < 4:
        raise MeshError(f"degenerate: {len(used)} distinct vertices (need at least 4)")
    p = v[used]
    extent = np.ptp(p, axis=0).max()
    if extent <= 0:
        raise MeshError("degenerate: all vertices coincide")
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1).sum()
    if area <= 1e-12 * extent**2:
        raise MeshError("degenerate: zero surface area")
    centred = (p - p.mean(axis=0)) / extent
    sv = np.linalg.svd(centred, compute_uv=False)
    if sv[-1] <= 1e-6 * sv[0]:
        raise MeshError("degenerate: zero volume (vertices are coplanar or collinear)")


def load_and_prepare(path: str, **kwargs) -> PreparedMesh:
    """`load_mesh` then `prepare_mesh`; every failure is a MeshError with a one-line reason."""
    vertices, faces = load_mesh(path)
    return prepare_mesh(vertices, faces, **kwargs)


def error_reason(err: BaseException) -> str:
    """One-line reason for any exception raised while evaluating one mesh."""
    if isinstance(err, MeshError):
        return str(err)
    return _one_line(err)
