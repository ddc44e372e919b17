"""FlexiCubes mesh extraction from the mesh decoder's 256³ output, with TRELLIS's ``SparseFeatures2Mesh`` semantics.

TRELLIS (``representations/mesh/cube2mesh.py`` + its FlexiCubes fork, ``trellis.md`` §4.6) turns 101 channels
per active 256³ voxel into a mesh. Channel layout per voxel (cube): 8 corner SDFs, 8×3 corner deformations,
21 FlexiCubes weights (12 β per edge, 8 α per corner, 1 γ), 8×6 corner colours (RGB + a normal map).
TRELLIS then (``training=False``):

1. adds the SDF bias −1/res and averages every corner attribute over the active cubes sharing that vertex;
2. scatters them into a dense (res+1)³ vertex grid whose untouched vertices keep SDF 1 (outside), deformation 0
   and colour 0, and the weights into a dense res³ cube grid whose untouched cubes keep weights 0;
3. places grid vertex v at ``v/res − 0.5 + tanh(deform)·(1 − 1e-8)/(2·res)`` and runs FlexiCubes on the dense
   grids: β = tanh·0.99 + 1, α = tanh·0.99 + 1, γ = sigmoid·0.99 + 0.005, colours through a sigmoid; one dual
   vertex per surface patch of a cube at the β-weighted mean of the α-weighted edge crossings (this fork does
   *not* call its QEF solver), colours interpolated the same way; one quad per sign-changing interior edge,
   wound towards the positive SDF and split along the diagonal with the larger γ product.

This port is sparse: only cubes with a negative corner can be surface cubes, and only active vertices can be
negative, so the surface cubes are found among the ≤ 8 cubes around each negative vertex — including cubes
outside the active set, whose weights are the zero init (β = α = 1, γ = 0.5) and whose other corners may be
untouched grid vertices. Vertex order (grouped by dual-vertex count, then cube, then patch) and face order
(edge order, flipped quads first) follow TRELLIS's, so the output matches it array for array.

Host-side numpy, float32 like TRELLIS: the output sizes are data dependent, nothing needs gradients, and it runs
once per object after sampling. The case tables are generated here from the dual-marching-cubes definition.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from scipy.special import expit

MESH_RES = 256  # the mesh decoder's output grid: 64³ SLat subdivided twice (TRELLIS's SparseFeatures2Mesh res)
SDF, DEFORM, WEIGHTS, COLOR = slice(0, 8), slice(8, 32), slice(32, 53), slice(53, 101)  # TRELLIS's layout order
FEAT_CHANNELS = 101
WEIGHT_SCALE = 0.99  # FlexiCubes' weight_scale default, as TRELLIS calls it

# Cube corner k sits at CORNERS[k] (x, y, z); edge e joins corners EDGES[e] (FlexiCubes' numbering and
# endpoint order, which every cube sharing an edge lists the same way).
CORNERS = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1]])
EDGES = np.array([[0, 1], [1, 5], [4, 5], [0, 4], [2, 3], [3, 7], [6, 7], [2, 6], [2, 0], [3, 1], [7, 5], [6, 4]])
_QUAD_SPLIT_1 = [0, 1, 2, 0, 2, 3]  # diagonal 0-2, chosen when γ0·γ2 > γ1·γ3
_QUAD_SPLIT_2 = [0, 1, 3, 3, 1, 2]


class Mesh(NamedTuple):
    """One extracted mesh in TRELLIS's z-up frame (vertices in about [-0.5, 0.5]³)."""

    vertices: np.ndarray  # (V, 3) float32
    faces: np.ndarray  # (F, 3) int64, wound so normals point to positive SDF (outside)
    vertex_colors: np.ndarray  # (V, 3) float32 in (0, 1): the RGB half of TRELLIS's 6 vertex attributes


def _components(corner_set: frozenset) -> list[set]:
    """Connected components of a set of cube corners, linked by cube edges (never by face diagonals)."""
    out, seen = [], set()
    for start in sorted(corner_set):
        if start in seen:
            continue
        comp, stack = set(), [start]
        while stack:
            c = stack.pop()
            if c in comp:
                continue
            comp.add(c)
            stack += [int(b) for a, b in EDGES if a == c and b in corner_set]
            stack += [int(a) for a, b in EDGES if b == c and a in corner_set]
        seen |= comp
        out.append(comp)
    return out


def _patches(case: int) -> list[list[int]]:
    """Dual-marching-cubes patches of a cube case (bit k set = corner k inside, SDF < 0): lists of edges.

    Each patch is the set of sign-changing edges around one connected component of inside corners, so an
    ambiguous face keeps its two inside corners apart. The one exception is the complement of MC's case 4
    (two outside corners on a body diagonal), which keeps the two outside corners apart instead. Patches are
    ordered by their component's lowest corner. This reproduces FlexiCubes' ``dmc_table`` (checked in the tests).
    """
    inside = frozenset(k for k in range(8) if case >> k & 1)
    outside = frozenset(range(8)) - inside
    if not inside or not outside:
        return []
    body_diagonal = len(outside) == 2 and bool(np.all(np.ptp(CORNERS[sorted(outside)], axis=0) == 1))
    comps = sorted(_components(outside if body_diagonal else inside), key=min)
    return [[e for e, (a, b) in enumerate(EDGES) if (a in comp) != (b in comp)] for comp in comps]


def _ambiguous_faces(case: int) -> list[np.ndarray]:
    """Outward normals of the cube faces whose inside corners are exactly one diagonal pair."""
    out = []
    for axis in range(3):
        for side in (0, 1):
            on_face = [k for k in range(8) if CORNERS[k, axis] == side and case >> k & 1]
            if len(on_face) == 2 and np.abs(CORNERS[on_face[0]] - CORNERS[on_face[1]]).sum() == 2:
                normal = np.zeros(3, np.int64)
                normal[axis] = 1 if side else -1
                out.append(normal)
    return out


@functools.lru_cache(maxsize=1)
def case_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(edge_patch (256, 12), num_vd (256,), check (256,), check_dir (256, 3)) built from the definitions.

    ``edge_patch[c, e]`` is the patch (dual vertex) of case c that edge e belongs to, −1 if e does not change sign.
    ``check[c]`` marks FlexiCubes' C16/C19 cases: one ambiguous face, one patch, while the complementary case
    has two. When two such cubes touch (``check_dir`` points across the ambiguous face), both use the
    complementary case (``255 − c``), so the shared face is resolved the same way on both sides.
    """
    edge_patch = np.full((256, 12), -1, np.int64)
    num_vd = np.zeros(256, np.int64)
    for case in range(256):
        patches = _patches(case)
        num_vd[case] = len(patches)
        for i, patch in enumerate(patches):
            edge_patch[case, patch] = i
    check = np.zeros(256, bool)
    check_dir = np.zeros((256, 3), np.int64)
    for case in range(256):
        faces = _ambiguous_faces(case)
        if len(faces) == 1 and num_vd[case] == 1 and num_vd[255 - case] == 2:
            check[case], check_dir[case] = True, faces[0]
    return edge_patch, num_vd, check, check_dir


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return expit(x).astype(np.float32)


def _grid_position(keys: np.ndarray, res: int) -> np.ndarray:
    """Vertex keys of the (res+1)³ grid -> undeformed positions (K, 3) float32, ``v/res − 0.5`` like TRELLIS."""
    rv = res + 1
    v = np.stack([keys // (rv * rv), keys // rv % rv, keys % rv], -1)
    return v.astype(np.float32) / np.float32(res) - np.float32(0.5)


def _validate(coords: np.ndarray, feats: np.ndarray, res: int, cols: int) -> None:
    if coords.ndim != 2 or coords.shape[1] != cols:
        raise ValueError(f"coords must be (M, {cols}) int rows, got shape {coords.shape}")
    if feats.ndim != 2 or feats.shape != (coords.shape[0], FEAT_CHANNELS):
        raise ValueError(f"feats must be (M, {FEAT_CHANNELS}) for coords {coords.shape}, got shape {feats.shape}")
    if coords.size and (coords.min() < 0 or coords[:, cols - 3 :].max() >= res):
        raise ValueError(f"coords must be >= 0 with x, y, z < {res}, got range [{coords.min()}, {coords.max()}]")


def extract_mesh(xyz, feats, res: int = MESH_RES) -> Mesh:
    """One object's mesh from active-cube coords ``xyz`` (M, 3) in [0, res) and decoder ``feats`` (M, 101).

    Grid vertices are keyed by their C-order index in the (res+1)³ vertex grid, and a cube by the key of its
    corner 0, so a cube's corners are its key plus 8 fixed offsets and key order is TRELLIS's cube order.
    """
    xyz = np.asarray(xyz).astype(np.int64)
    feats = np.asarray(feats, np.float32)
    _validate(xyz, feats, res, 3)
    empty = Mesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64), np.zeros((0, 3), np.float32))
    if not len(xyz):
        return empty
    m, rv = len(xyz), res + 1
    edge_patch, num_vd_table, check_table, check_dir = case_tables()
    step = np.array([rv * rv, rv, 1])
    offset = CORNERS @ step  # (8,) key offset of each cube corner

    cube_key = xyz @ step  # (M,)
    act = np.full(rv**3, -1, np.int32)  # cube key -> active row
    act[cube_key] = np.arange(m, dtype=np.int32)
    if not np.array_equal(act[cube_key], np.arange(m)):
        raise ValueError(f"coords has duplicate voxels ({m} rows, {len(np.unique(cube_key))} distinct)")

    # 1. Corner SDFs (+ bias) averaged over the active cubes sharing each vertex (TRELLIS's sparse_cube2verts).
    corner_keys = (cube_key[:, None] + offset).ravel()  # (M*8,) entry e = cube e // 8, corner e % 8
    vid = np.full(rv**3, -1, np.int32)  # vertex key -> touched-vertex id; -1: untouched (SDF 1, deform 0, colour 0)
    vid[corner_keys] = 0
    vkeys = np.flatnonzero(vid == 0)  # (V,) sorted
    vid[vkeys] = np.arange(len(vkeys), dtype=np.int32)
    inv = vid[corner_keys]  # (M*8,)
    count = np.bincount(inv, minlength=len(vkeys))
    sdf = feats[:, SDF] + np.float32(-1.0 / res)
    v_sdf = (np.bincount(inv, weights=sdf.ravel(), minlength=len(vkeys)) / count).astype(np.float32)

    # 2. Surface cubes (corners of both signs). Only touched vertices can be negative, so every surface cube
    #    is one of the 8 cubes around a negative vertex; that includes cubes outside the active set.
    cand = (vkeys[v_sdf < 0][:, None] - offset).ravel()
    mark = np.zeros(rv**3, bool)
    mark[cand[cand >= 0]] = True  # keys that wrap around a grid face name another, real cube: tested below
    ckeys = np.flatnonzero(mark)
    ckeys = ckeys[(ckeys // (rv * rv) < res) & (ckeys // rv % rv < res) & (ckeys % rv < res)]
    c_vid = vid[ckeys[:, None] + offset]  # (C, 8)
    c_sdf = np.where(c_vid >= 0, v_sdf[c_vid], np.float32(1.0))
    occ = c_sdf < 0
    surf = ~occ.all(1)
    ckeys, c_vid, c_sdf, occ = ckeys[surf], c_vid[surf], c_sdf[surf], occ[surf]
    s = len(ckeys)
    if s == 0:
        return empty

    # Weights of surface cubes: the decoder's for active cubes, the zero init otherwise.
    w_idx = act[ckeys]
    w = np.where((w_idx >= 0)[:, None], feats[np.maximum(w_idx, 0), WEIGHTS], np.float32(0.0))  # (S, 21)
    ws = np.float32(WEIGHT_SCALE)
    beta = np.tanh(w[:, :12]) * ws + np.float32(1.0)  # (S, 12)
    alpha = np.tanh(w[:, 12:20]) * ws + np.float32(1.0)  # (S, 8)
    gamma = _sigmoid(w[:, 20]) * ws + np.float32((1 - WEIGHT_SCALE) / 2)  # (S,)

    # 3. Case ids, with FlexiCubes' C16/C19 fix: two touching flagged cubes both take the complementary case.
    case = occ.astype(np.int64) @ (1 << np.arange(8))  # (S,)
    flagged = np.flatnonzero(check_table[case])
    c_xyz = np.stack([ckeys[flagged] // (rv * rv), ckeys[flagged] // rv % rv, ckeys[flagged] % rv], -1)
    adj = c_xyz + check_dir[case[flagged]]
    in_grid = np.all((adj >= 0) & (adj < res), axis=1)
    flagged, adj_key = flagged[in_grid], adj[in_grid] @ step
    pos = np.minimum(np.searchsorted(ckeys, adj_key), s - 1)
    invert = flagged[(ckeys[pos] == adj_key) & check_table[case[pos]]]
    case[invert] = 255 - case[invert]

    # 4. Dual vertices: one per patch, numbered by (patch count, cube, patch) like TRELLIS's batching loop.
    num_vd = num_vd_table[case]
    order = np.argsort(num_vd, kind="stable")
    first_vd = np.empty(s, np.int64)
    first_vd[order] = np.cumsum(num_vd[order]) - num_vd[order]
    cube_i, edge_i = np.nonzero(occ[:, EDGES[:, 0]] != occ[:, EDGES[:, 1]])  # (P,) sign-changing cube edges
    vd = first_vd[cube_i] + edge_patch[case[cube_i], edge_i]  # (P,)
    n_vd, p = int(num_vd.sum()), len(cube_i)
    c0, c1 = EDGES[edge_i, 0], EDGES[edge_i, 1]  # endpoint corners, in FlexiCubes' order

    # Endpoint table: touched endpoints keep their vertex id, untouched ones get ids V.. after them.
    ids = np.concatenate([c_vid[cube_i, c0], c_vid[cube_i, c1]]).astype(np.int64)  # (2P,)
    ends = np.concatenate([ckeys[cube_i] + offset[c0], ckeys[cube_i] + offset[c1]])  # (2P,) vertex keys
    untouched = ids < 0
    ukeys, uinv = np.unique(ends[untouched], return_inverse=True)
    ids[untouched] = len(vkeys) + uinv.ravel()
    need = np.zeros(len(vkeys), bool)
    need[ids[~untouched]] = True
    entries = np.flatnonzero(need[inv])  # the corner entries that feed a needed vertex
    e_vid, e_row, e_corner = inv[entries], (entries // 8) * FEAT_CHANNELS, entries % 8
    flat = feats.ravel()

    def need_mean(first_channel, stride):  # (V_need, 3) corner means of 3 channels per corner
        at = e_row + first_channel + stride * e_corner  # flat index of feats[cube, first + stride * corner]
        out = [np.bincount(e_vid, weights=flat[at + j], minlength=len(vkeys)) for j in range(3)]
        return (np.stack(out, -1)[need] / count[need, None]).astype(np.float32)

    pos_t = np.zeros((len(vkeys) + len(ukeys), 3), np.float32)
    col_t = np.full((len(vkeys) + len(ukeys), 3), 0.5, np.float32)  # sigmoid(0) for untouched vertices
    tanh_scale = np.float32((1 - 1e-8) / (res * 2))  # TRELLIS's get_defomed_verts
    pos_t[: len(vkeys)][need] = _grid_position(vkeys[need], res) + tanh_scale * np.tanh(need_mean(DEFORM.start, 3))
    pos_t[len(vkeys) :] = _grid_position(ukeys, res)
    col_t[: len(vkeys)][need] = _sigmoid(need_mean(COLOR.start, 6))  # RGB of the 6 colour channels

    s0, s1 = c_sdf[cube_i, c0], c_sdf[cube_i, c1]
    w0 = (s0 * alpha[cube_i, c0])[:, None]  # α-weighted SDFs at the two endpoints (P, 1)
    w1 = (s1 * alpha[cube_i, c1])[:, None]
    b = beta[cube_i, edge_i].astype(np.float64)
    b_sum = np.bincount(vd, weights=b, minlength=n_vd)

    def vd_mean(table):  # β-weighted mean over each patch of the α-weighted edge crossings -> (n_vd, 3)
        a0, a1 = table[ids[:p]], table[ids[p:]]
        ue = (a0 * w1 - a1 * w0) / (w1 - w0)
        return np.stack([np.bincount(vd, weights=ue[:, i] * b, minlength=n_vd) / b_sum for i in range(3)], -1)

    vertices = vd_mean(pos_t).astype(np.float32)
    colors = vd_mean(col_t).astype(np.float32)
    vd_gamma = np.empty(n_vd, np.float32)
    vd_gamma[vd] = gamma[cube_i]

    # 5. Quads around sign-changing edges shared by 4 cubes. Edges are keyed by (first endpoint, second) in
    #    lexicographic order (y edges list their upper vertex first): rank second = a − rv < a + 1 < a + rv².
    axis = np.argmax(np.abs(CORNERS[EDGES[:, 1]] - CORNERS[EDGES[:, 0]]), axis=1)  # (12,) 0 x, 1 y, 2 z
    ekey = ends[:p] * 3 + np.array([2, 0, 1])[axis][edge_i]
    srt = np.argsort(ekey, kind="stable")  # pairs are in (cube, edge) order, so each run is cube-ordered
    ks = ekey[srt]
    starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
    starts = starts[np.diff(np.r_[starts, p]) == 4]
    quads = vd[srt[starts[:, None] + np.arange(4)]]  # (Q, 4)
    flip = s0[srt[starts]] > 0
    quads = np.concatenate([quads[flip][:, [0, 1, 3, 2]], quads[~flip][:, [2, 3, 1, 0]]])
    g = vd_gamma[quads]
    split_02 = (g[:, 0] * g[:, 2] > g[:, 1] * g[:, 3])[:, None]
    faces = np.where(split_02, quads[:, _QUAD_SPLIT_1], quads[:, _QUAD_SPLIT_2]).reshape(-1, 3)
    return Mesh(vertices, faces.astype(np.int64), colors)


def flexicubes(coords, feats=None, res: int = MESH_RES, num_objects: int | None = None) -> list[Mesh]:
    """Meshes for a batch: the mesh decoder's output ``SparseBatch`` (``flexicubes(raw)``: its rows, grid resolution
    and object count), or TRELLIS's ``SparseTensor`` layout: ``coords`` (M, 4) int rows [batch, x, y, z], ``feats``
    (M, 101) mesh-decoder outputs. Returns one :class:`Mesh` per object (batch index 0..num_objects−1, default
    the largest index + 1); an object without voxels or without a surface gets an empty mesh.
    """
    from dso_jax.sparse.batch import SparseBatch, to_trellis

    if isinstance(coords, SparseBatch):
        if feats is not None:
            raise TypeError("flexicubes(raw: SparseBatch) takes no separate feats")
        raw = coords
        coords, feats = to_trellis(raw)  # the valid rows, object by object
        res, num_objects = raw.resolution, raw.batch_size
    elif feats is None:
        raise TypeError("flexicubes: pass a SparseBatch, or coords (M, 4) and feats (M, 101)")
    coords = np.asarray(coords)
    feats = np.asarray(feats)
    _validate(coords, feats, res, 4)
    if num_objects is None:
        num_objects = int(coords[:, 0].max()) + 1 if len(coords) else 0
    return [extract_mesh(coords[coords[:, 0] == i, 1:], feats[coords[:, 0] == i], res) for i in range(num_objects)]
