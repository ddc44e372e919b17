"""Final-mesh post-processing for DSO's protocol: TRELLIS's ``postprocess_mesh`` without CUDA extensions.

DSO labels and evaluates the GLB of TRELLIS's ``to_glb(simplify=0.95, fill_holes=True, with_texture=False)``
(``dso.md`` §2.2). TRELLIS (``utils/postprocessing_utils.py``) then

1. decimates with pyvista (VTK quadric decimation, ``target_reduction = simplify``);
2. rasterises the mesh from 1000 cameras (Hammersley sphere, radius 2, fov 40°, 1024², nvdiffrast): a face's
   visibility is the fraction of views in which it owns a pixel; per connected component the faces above
   ``min(max(q75, 0.25), 0.5)`` are *outer*, faces never seen are *inner*; a min cut on the face graph (edge
   weight = shared edge length) separates inner from outer; each cut piece whose median visibility is ≤ 0.25
   and whose new boundary loops each span an area ≤ ``max_hole_size`` is removed (FlexiCubes' inner shells);
3. closes boundary loops of at most ``int(250 sqrt(1 - simplify))`` edges with MeshFix (pymeshfix).

Here, with the same cameras, thresholds and cut rule:

1. decimation by ``fast-simplification`` (the pyvista team's wrapper of Fast-Quadric-Mesh-Simplification; a
   different quadric implementation, so other triangles); vertex colours follow each new vertex's nearest old one;
2. visibility by a JAX z-buffer of surface samples (every face sampled finer than a pixel, so each pixel its
   front surface covers holds a front sample): a face is seen when one of its samples is nearest in its pixel.
   Default ``resolution`` 512 (TRELLIS 1024) for cost; faces below a pixel are missed in both;
3. the min cut by ``scipy.sparse.csgraph.maximum_flow`` (integer capacities x1e6; igraph's float x1000);
4. holes closed by a fan around each small loop's centroid (MeshFix also refines and smooths the patch).

Host numpy except the visibility (jitted; on the accelerator when there is one). Meshes in TRELLIS's z-up frame.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import breadth_first_order, connected_components, maximum_flow


@dataclasses.dataclass(frozen=True)
class PostprocessSettings:
    """``to_glb``'s post-processing (its defaults: DSO's data and eval), plus this port's visibility budget."""

    simplify: float = 0.95  # fraction of faces removed (0: keep all)
    fill_holes: bool = True  # remove invisible inner surfaces, then close small holes
    max_hole_size: float = 0.04  # largest loop area (unit-cube frame) a removed piece may leave
    num_views: int = 1000
    resolution: int = 512  # visibility raster (TRELLIS 1024)
    views_per_batch: int = 8  # views rasterised at once

    @property
    def max_hole_edges(self) -> int:
        return int(250 * np.sqrt(1 - self.simplify))  # to_glb's fill_holes_max_hole_nbe


class MeshArrays(NamedTuple):
    vertices: np.ndarray  # (V, 3) float32, z-up
    faces: np.ndarray  # (F, 3) int64
    vertex_colors: np.ndarray  # (V, 3) float32 in [0, 1]


# ---------------------------------------------------------------------------------------------- simplification


def require_simplifier():
    """The ``fast_simplification`` module, or a ValueError (one line in the CLIs) saying how to get it."""
    try:
        import fast_simplification
    except ImportError:
        raise ValueError(
            "mesh simplification needs the fast-simplification package (pip install fast-simplification), "
            "or pass --simplify 0"
        ) from None
    return fast_simplification


def simplify(mesh: MeshArrays, ratio: float) -> MeshArrays:
    """Quadric decimation removing ``ratio`` of the faces; colours from each new vertex's nearest old vertex."""
    if ratio <= 0 or len(mesh.faces) < 8:
        return mesh
    fast_simplification = require_simplifier()
    from scipy.spatial import cKDTree

    v, f = fast_simplification.simplify(np.asarray(mesh.vertices, np.float32), np.asarray(mesh.faces), ratio)
    _, nearest = cKDTree(mesh.vertices).query(v)
    return MeshArrays(np.asarray(v, np.float32), np.asarray(f, np.int64), mesh.vertex_colors[nearest])


# ---------------------------------------------------------------------------------------------- visibility


def cameras(num_views: int, radius: float = 2.0) -> np.ndarray:
    """(num_views, 3, 4) float64 [right; up; forward | eye] of TRELLIS's ``_fill_holes`` cameras (look at 0, up +z)."""
    i = np.arange(num_views)
    u = i / num_views
    v = np.array([_radical_inverse_2(k) for k in i])
    pitch, yaw = np.arccos(1 - 2 * u) - np.pi / 2, v * 2 * np.pi  # sphere_hammersley_sequence
    eye = radius * np.stack([np.sin(yaw) * np.cos(pitch), np.cos(yaw) * np.cos(pitch), np.sin(pitch)], -1)
    fwd = -eye / np.linalg.norm(eye, axis=-1, keepdims=True)
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    flat = np.linalg.norm(right, axis=-1) < 1e-6  # looking straight up or down: any right vector
    right[flat] = np.cross(fwd[flat], [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right, axis=-1, keepdims=True)
    up = np.cross(right, fwd)
    return np.concatenate([np.stack([right, up, fwd], 1), eye[:, :, None]], axis=2)


def _radical_inverse_2(n: int) -> float:
    out, f = 0.0, 0.5
    while n:
        n, d = divmod(n, 2)
        out, f = out + d * f, f / 2
    return out


def surface_samples(vertices, faces, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Points on every face on a barycentric lattice no coarser than ``spacing``: (points (S, 3), face (S,))."""
    tri = np.asarray(vertices, np.float64)[np.asarray(faces)]  # (F, 3, 3)
    edge = np.linalg.norm(tri - np.roll(tri, 1, axis=1), axis=-1).max(1)
    k = np.clip(np.ceil(edge / spacing), 1, 512).astype(np.int64)  # lattice subdivisions per face
    pts, ids = [], []
    for kk in np.unique(k):
        sel = np.flatnonzero(k == kk)
        a, b = np.meshgrid(np.arange(kk + 1), np.arange(kk + 1), indexing="ij")
        keep = a + b <= kk
        bary = np.stack([a[keep], b[keep], kk - a[keep] - b[keep]], -1) / kk  # (P, 3)
        pts.append(np.einsum("pk,fkd->fpd", bary, tri[sel]).reshape(-1, 3))
        ids.append(np.repeat(sel, len(bary)))
    return np.concatenate(pts).astype(np.float32), np.concatenate(ids)


@functools.partial(jax.jit, static_argnames=("num_faces", "resolution", "fov_deg"))
def _visible_counts(points, face_ids, cams, view_ok, *, num_faces: int, resolution: int, fov_deg: float = 40.0):
    """points (S, 3), face_ids (S,) (num_faces for padding), cams (Vb, b, 3, 4) [right; up; forward | eye], view_ok
    (Vb, b) -> (F,) int32: in how many views each face is the nearest surface of some pixel."""
    tan = jnp.tan(jnp.deg2rad(fov_deg) / 2)

    def one(cam):  # (3, 4) -> (F,) bool
        rel = points - cam[:, 3]
        x, y, z = rel @ cam[0, :3], rel @ cam[1, :3], rel @ cam[2, :3]
        px = jnp.floor((x / (z * tan) + 1) / 2 * resolution).astype(jnp.int32)
        py = jnp.floor((y / (z * tan) + 1) / 2 * resolution).astype(jnp.int32)
        inside = (px >= 0) & (px < resolution) & (py >= 0) & (py < resolution) & (z > 0) & (face_ids < num_faces)
        pix = jnp.where(inside, py * resolution + px, resolution * resolution)
        zbuf = jnp.full(resolution * resolution + 1, jnp.inf).at[pix].min(z)
        wins = inside & (z <= zbuf[pix])
        return jnp.zeros(num_faces + 1, bool).at[face_ids].max(wins)[:num_faces]

    seen = jax.lax.map(lambda c: jax.vmap(one)(c[0]) & c[1][:, None], (cams, view_ok))  # (Vb, b, F)
    return jnp.sum(seen, axis=(0, 1), dtype=jnp.int32)


def face_visibility(mesh: MeshArrays, settings: PostprocessSettings = PostprocessSettings()) -> np.ndarray:
    """(F,) float32: the fraction of TRELLIS's views in which each face is the nearest surface of some pixel."""
    cams = cameras(settings.num_views)
    reach = float(np.max(np.linalg.norm(mesh.vertices, axis=1)))
    near = max(2.0 - reach, 0.1)
    pitch = 2 * near * np.tan(np.deg2rad(20.0)) / settings.resolution  # a pixel at the nearest surface point
    pts, ids = surface_samples(mesh.vertices, mesh.faces, pitch / 1.5)
    size = -(-len(pts) // 65536) * 65536  # padded to a bucket: few compiles across meshes
    pts = np.concatenate([pts, np.zeros((size - len(pts), 3), np.float32)])
    ids = np.concatenate([ids, np.full(size - len(ids), len(mesh.faces))]).astype(np.int32)
    vb, pad = settings.views_per_batch, -len(cams) % settings.views_per_batch
    ok = np.arange(len(cams) + pad) < len(cams)
    cams = np.concatenate([cams, np.repeat(cams[-1:], pad, 0)]).reshape(-1, vb, 3, 4).astype(np.float32)
    counts = _visible_counts(
        pts, ids, cams, ok.reshape(-1, vb), num_faces=len(mesh.faces), resolution=settings.resolution
    )
    return (np.asarray(counts) / settings.num_views).astype(np.float32)


# ---------------------------------------------------------------------------------------------- topology helpers


def _edges(faces):
    """Unique undirected edges (E, 2), face -> its 3 edges (F, 3), edge degrees (E,)."""
    e = np.sort(np.stack([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], 1).reshape(-1, 2), axis=1)
    edges, inv, deg = np.unique(e, axis=0, return_inverse=True, return_counts=True)
    return edges, inv.reshape(-1, 3), deg


def _dual_graph(face2edge, num_edges):
    """Pairs of faces sharing an edge (consecutive faces around each edge) and that edge's index."""
    fe = face2edge.ravel()
    order = np.argsort(fe, kind="stable")
    se, sf = fe[order], order // 3
    same = se[1:] == se[:-1]
    return np.stack([sf[:-1][same], sf[1:][same]], 1), se[1:][same]


def _face_components(pairs, n):
    if n == 0:
        return 0, np.zeros(0, np.int64)
    g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(g, directed=False)


# ---------------------------------------------------------------------------------------------- inner surfaces


def remove_invisible(mesh: MeshArrays, vis: np.ndarray, max_hole_size: float) -> MeshArrays:
    """TRELLIS's min-cut removal of low-visibility pieces (module docstring, step 2)."""
    faces, verts = np.asarray(mesh.faces), np.asarray(mesh.vertices, np.float64)
    nf = len(faces)
    edges, face2edge, deg = _edges(faces)
    pairs, pair_edge = _dual_graph(face2edge, len(edges))
    ncomp, comp = _face_components(pairs, nf)
    outer = np.zeros(nf, bool)
    for c in range(ncomp):
        sel = comp == c
        outer[sel] = vis[sel] > min(max(float(np.quantile(vis[sel], 0.75)), 0.25), 0.5)
    inner = vis == 0
    if not inner.any():
        return mesh
    s, t = nf, nf + 1
    w = np.linalg.norm(verts[edges[pair_edge, 0]] - verts[edges[pair_edge, 1]], axis=1)
    cap = np.maximum(np.round(w * 1e6), 1).astype(np.int64)
    rows = np.concatenate([pairs[:, 0], pairs[:, 1], np.full(inner.sum(), s), np.flatnonzero(outer)])
    cols = np.concatenate([pairs[:, 1], pairs[:, 0], np.flatnonzero(inner), np.full(outer.sum(), t)])
    caps = np.concatenate([cap, cap, np.full(inner.sum() + outer.sum(), 1_000_000)])
    graph = csr_matrix((caps.astype(np.int32), (rows, cols)), shape=(nf + 2, nf + 2))
    graph.sum_duplicates()
    flow = maximum_flow(graph, s, t).flow
    residual = (graph - flow.tocsr()).tocsr()  # antisymmetric flow: reverse arcs gain capacity
    residual.data = np.where(residual.data > 0, residual.data, 0)
    residual.eliminate_zeros()
    reach = breadth_first_order(residual, s, directed=True, return_predecessors=False)
    removed = reach[reach < nf]
    if not len(removed):
        return mesh
    sub_pairs = pairs[np.isin(pairs[:, 0], removed) & np.isin(pairs[:, 1], removed)]
    local = np.full(nf, -1)
    local[removed] = np.arange(len(removed))
    _, cc = _face_components(local[sub_pairs], len(removed))
    drop = np.zeros(nf, bool)
    for c in np.unique(cc):
        piece = removed[cc == c]
        if np.median(vis[piece]) > 0.25:
            continue
        e, n = np.unique(face2edge[piece], return_counts=True)
        new_boundary = e[(n == 1) & (deg[e] > 1)]
        if len(new_boundary) and max(_loop_areas(verts, edges[new_boundary])) > max_hole_size:
            continue
        drop[piece] = True
    if not drop.any():
        return mesh
    return _compact(MeshArrays(mesh.vertices, faces[~drop], mesh.vertex_colors))


def _loop_areas(verts, loop_edges):
    """Per edge-connected group of boundary edges: sum of 0.5 |(a - c) x (b - c)| around its centroid c."""
    ids, inv = np.unique(loop_edges, return_inverse=True)
    inv = inv.reshape(-1, 2)
    g = coo_matrix((np.ones(len(inv)), (inv[:, 0], inv[:, 1])), shape=(len(ids), len(ids)))
    _, lab = connected_components(g, directed=False)
    areas = []
    for c in np.unique(lab):
        sel = lab[inv[:, 0]] == c
        a, b = verts[loop_edges[sel, 0]], verts[loop_edges[sel, 1]]
        centre = np.concatenate([a, b]).mean(0)
        areas.append(0.5 * np.linalg.norm(np.cross(a - centre, b - centre), axis=1).sum())
    return areas


def _compact(mesh: MeshArrays) -> MeshArrays:
    used, faces = np.unique(mesh.faces, return_inverse=True)
    return MeshArrays(mesh.vertices[used], faces.reshape(-1, 3), mesh.vertex_colors[used])


# ---------------------------------------------------------------------------------------------- holes


def fill_small_holes(mesh: MeshArrays, max_edges: int) -> MeshArrays:
    """Close every simple boundary loop of at most ``max_edges`` edges with a fan around its centroid, wound
    like the faces beside it. Loops through a vertex with more than two boundary edges are left open."""
    faces = np.asarray(mesh.faces)
    if not len(faces):
        return mesh
    directed = np.stack([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], 1).reshape(-1, 2)
    _, face2edge, deg = _edges(faces)
    boundary = directed[deg[face2edge.ravel()] == 1]  # (a -> b) in its face's winding
    if not len(boundary):
        return mesh
    nxt = {}
    bad = set()
    for a, b in boundary:  # the hole runs b -> a; follow each boundary edge backwards
        if int(b) in nxt:
            bad.add(int(b))
        nxt[int(b)] = int(a)
    verts, cols, new_faces, seen = list(mesh.vertices), list(mesh.vertex_colors), [], set()
    for start in list(nxt):
        if start in seen:
            continue
        loop, v = [], start
        while v not in seen and v in nxt:
            seen.add(v)
            loop.append(v)
            v = nxt[v]
        if v != start or len(loop) < 3 or len(loop) > max_edges or bad.intersection(loop):
            continue
        c = len(verts)
        verts.append(np.mean(mesh.vertices[loop], 0))
        cols.append(np.mean(mesh.vertex_colors[loop], 0))
        new_faces += [[loop[i], loop[(i + 1) % len(loop)], c] for i in range(len(loop))]
    if not new_faces:
        return mesh
    return MeshArrays(
        np.asarray(verts, np.float32),
        np.concatenate([faces, np.asarray(new_faces, np.int64)]),
        np.asarray(cols, np.float32),
    )


# ---------------------------------------------------------------------------------------------- all of it


def postprocess(
    mesh, settings: PostprocessSettings = PostprocessSettings(), stats: Optional[dict] = None
) -> MeshArrays:
    """``to_glb``'s mesh post-processing (module docstring) on one mesh (anything with vertices, faces and
    vertex_colors, e.g. ``mesh_extract.Mesh``). ``stats`` (a dict) receives face counts after each step."""
    m = MeshArrays(
        np.asarray(mesh.vertices, np.float32),
        np.asarray(mesh.faces, np.int64),
        np.asarray(mesh.vertex_colors, np.float32),
    )
    stats = {} if stats is None else stats
    stats["faces_raw"] = len(m.faces)
    if len(m.faces) == 0:
        return m
    m = simplify(m, settings.simplify)
    stats["faces_simplified"] = len(m.faces)
    if settings.fill_holes:
        vis = face_visibility(m, settings)
        stats["faces_invisible"] = int(np.sum(vis == 0))
        m = remove_invisible(m, vis, settings.max_hole_size)
        stats["faces_after_removal"] = len(m.faces)
        m = fill_small_holes(m, settings.max_hole_edges)
    stats["faces_final"] = len(m.faces)
    return m
