"""TRELLIS's own mesh extraction (``SparseFeatures2Mesh`` + its FlexiCubes fork) run from fetched sources, and
synthetic mesh-decoder outputs to feed both it and :mod:`dso_jax.mesh_extract`.

Test/bench-only. ``trellis_mesher(trellis_src, flexicubes_src, res)`` imports ``trellis/representations/mesh/
{cube2mesh,utils_cube}.py`` from a TRELLIS checkout and ``flexicubes.py``/``tables.py`` from a FlexiCubes
checkout (TRELLIS's submodule folder is empty in an archive) through :mod:`twins.trellis_import`, and builds
``SparseFeatures2Mesh`` on the CPU.
"""

from __future__ import annotations

import os
import types

import numpy as np

from dso_jax import mesh_extract as mx

from .trellis_import import trellis_modules


def trellis_mesher(trellis_src: str, flexicubes_src: str, res: int):
    """A function ``(xyz (M, 3) int, feats (M, 101)) -> (vertices, faces, colors (V, 3))`` running TRELLIS's code."""
    import torch

    if not os.path.isfile(os.path.join(flexicubes_src, "flexicubes.py")):
        raise FileNotFoundError(f"{flexicubes_src}/flexicubes.py not found (pass a FlexiCubes checkout)")
    with trellis_modules(trellis_src, flexicubes_src):
        from trellis.representations.mesh.cube2mesh import SparseFeatures2Mesh

        extractor = SparseFeatures2Mesh(device="cpu", res=res, use_color=True)

    def run(xyz, feats):
        st = types.SimpleNamespace(
            coords=torch.from_numpy(np.concatenate([np.zeros((len(xyz), 1), np.int64), xyz], 1).astype(np.int64)),
            feats=torch.from_numpy(np.asarray(feats, np.float32).copy()),
        )
        with torch.no_grad():
            mesh = extractor(st, training=False)
        colors = mesh.vertex_attrs[:, :3] if mesh.vertex_attrs is not None else torch.zeros(0, 3)
        return mesh.vertices.numpy(), mesh.faces.numpy(), colors.numpy()

    return run


def band_coords(sdf_fn, res: int, band: float, solid: bool = False) -> np.ndarray:
    """Active cubes (M, 3) int64 of a res³ grid whose centres lie within ``band`` cells of ``sdf_fn``'s zero set
    (``solid``: also every cube inside it).

    ``sdf_fn`` maps (N, 3) points in [-0.5, 0.5]³ to signed distances (negative inside). A shell leaves the
    inside untouched, where TRELLIS's grid default (SDF 1, outside) adds an inner surface; a solid set does not.
    """
    g = (np.arange(res) + 0.5) / res - 0.5
    centres = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    d = sdf_fn(centres) * res
    keep = d < band if solid else np.abs(d) < band
    return np.argwhere(keep.reshape(res, res, res)).astype(np.int64)


def shell_coords(sdf_fn, res: int = mx.MESH_RES, coarse: int = 64) -> np.ndarray:
    """TRELLIS-like active set (M, 3): the coarse voxels the surface can cross (centre within half a voxel
    diagonal), each subdivided into (res/coarse)³ cubes, as the mesh decoder's two 2× subdivisions do."""
    f = res // coarse
    sub = np.stack(np.meshgrid(*[np.arange(f)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return (band_coords(sdf_fn, coarse, np.sqrt(3) / 2)[:, None] * f + sub[None]).reshape(-1, 3)


def sdf_features(sdf_fn, xyz: np.ndarray, res: int, seed: int | None = 0, noise: float = 1.0) -> np.ndarray:
    """Synthetic mesh-decoder output (M, 101) float32 for active cubes ``xyz`` (M, 3) of a res³ grid.

    Each cube's 8 corner SDFs are ``sdf_fn`` at the corners plus 1/res, so that after TRELLIS's −1/res bias the
    SDF is the true distance (in the unit-cube frame). With ``seed`` set, deformations, weights and colours are
    random normals times ``noise``; with ``seed=None`` they are zero.
    """
    corners = (xyz[:, None, :] + mx.CORNERS[None]).astype(np.float64) / res - 0.5  # (M, 8, 3)
    feats = np.zeros((len(xyz), mx.FEAT_CHANNELS), np.float32)
    feats[:, mx.SDF] = sdf_fn(corners.reshape(-1, 3)).reshape(-1, 8) + 1.0 / res
    if seed is not None:
        rng = np.random.default_rng(seed)
        for part in (mx.DEFORM, mx.WEIGHTS, mx.COLOR):
            feats[:, part] = rng.normal(size=(len(xyz), part.stop - part.start)) * noise
    return feats


def sphere(radius: float = 0.35):
    return lambda p: np.linalg.norm(p, axis=-1) - radius


def torus(major: float = 0.25, minor: float = 0.1):
    return lambda p: np.hypot(np.hypot(p[..., 0], p[..., 1]) - major, p[..., 2]) - minor


def box(half):
    """Exact SDF of an axis-aligned box centred at the origin with half-extents ``half`` (3,)."""
    half = np.asarray(half, np.float64)

    def sdf(p):
        q = np.abs(p) - half
        return np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(-1), 0.0)

    return sdf


def _canonical_faces(faces: np.ndarray) -> np.ndarray:
    """Each triangle rotated so its smallest index comes first (winding kept), rows sorted."""
    r = np.argmin(faces, axis=1)
    rolled = np.stack([faces[np.arange(len(faces)), (r + k) % 3] for k in range(3)], 1)
    return rolled[np.lexsort(rolled.T[::-1])]


def compare_meshes(ours: mx.Mesh, theirs) -> dict:
    """Agreement of our mesh with TRELLIS's ``(vertices, faces, colors)``, independent of vertex/face order.

    Our vertices are matched to theirs by nearest neighbour (the match must be one-to-one); faces are compared
    as sets of oriented triangles through that match. ``same_arrays`` says whether the raw arrays also agree
    in order (vertex order and face order are TRELLIS's by construction).
    """
    from scipy.spatial import cKDTree

    tv, tf, tc = (np.asarray(a) for a in theirs)
    out = dict(vertices=(len(ours.vertices), len(tv)), faces=(len(ours.faces), len(tf)))
    if len(tv) == 0 or len(ours.vertices) == 0:
        out.update(max_vertex_err=0.0, max_color_err=0.0, one_to_one=len(tv) == len(ours.vertices))
        out.update(faces_equal_as_sets=len(tf) == len(ours.faces) == 0, same_arrays=out["one_to_one"])
        return out
    dist, idx = cKDTree(tv).query(ours.vertices)
    one_to_one = len(tv) == len(ours.vertices) and len(np.unique(idx)) == len(idx)
    out.update(max_vertex_err=float(dist.max()), max_color_err=float(np.abs(ours.vertex_colors - tc[idx]).max()))
    out["one_to_one"] = bool(one_to_one)
    mapped = _canonical_faces(idx[ours.faces])
    out["faces_equal_as_sets"] = bool(
        one_to_one and mapped.shape == tf.shape and (mapped == _canonical_faces(tf)).all()
    )
    same = ours.vertices.shape == tv.shape and ours.faces.shape == tf.shape and np.array_equal(ours.faces, tf)
    out["same_arrays"] = bool(same)
    if same:
        out["max_vertex_err_same_order"] = float(np.abs(ours.vertices - tv).max())
        out["max_color_err_same_order"] = float(np.abs(ours.vertex_colors - tc).max())
    return out
