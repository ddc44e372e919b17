"""Rigid bodies for the stability check: mass properties and a fixed-size contact proxy.

Two sources, one output layout (a dict of arrays):
  * `occupancy_body(occ, cfg)`: a (D, D, D) occupancy over TRELLIS's unit cube, axes (x, y, z), +z up,
    voxel centres (i + 0.5)/D − 0.5. Pure jnp, jittable, static shapes; mass properties of the voxels.
  * `mesh_body(vertices, faces, cfg)`: a prepared mesh (z-up, min z = 0); numpy; MuJoCo's *legacy* mesh
    mass properties (density 1000), i.e. exactly what DSO's MuJoCo model uses.

Contact proxy: K = cfg.num_points support points of the convex hull (the support of an object on a plane is
its convex hull): first the extreme points of the lowest contact layer in `num_base` horizontal azimuths (the
initial support polygon), then, greedily, the hull's support point in the direction (within `max_tilt_deg`
of straight down) where the proxy's support height falls furthest short of the hull's (`greedy_support`):
the points that touch while the object tips. Unneeded slots are parked at the COM, never doubled.
Inertia is per unit mass: the rollout simulates a 1 kg body, which gives the same motion as the true mass
under gravity and contact (MuJoCo's soft contacts scale with the body's inverse mass) and keeps the template's
`body_invweight0` exact (mjx.md §3.2).

Output keys: com (3,), inertia (3,) principal moments per kg, iquat (4,) principal frame (w, x, y, z),
points (K, 3) support points in the body frame (= world frame at t = 0), zmin (), margin () static support
margin in metres (COM projection to the support polygon boundary; > 0 inside), mass () kg at density 1000,
valid () bool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DENSITY = 1000.0  # MuJoCo's default geom density, as in DSO.


# ------------------------------------------------------------------------------------------- directions


def base_directions(num_base: int) -> np.ndarray:
    """(num_base, 3) horizontal unit vectors at azimuths 2π(j + ½)/num_base: off the grid axes, so the extreme
    of a voxel footprint is a corner, not a tie along an edge."""
    a = 2 * np.pi * (np.arange(num_base) + 0.5) / num_base
    return np.stack([np.cos(a), np.sin(a), np.zeros_like(a)], axis=1)


def cap_directions(num: int, max_tilt_deg: float) -> np.ndarray:
    """(num, 3) unit vectors spread evenly (Fibonacci lattice) over the cap within max_tilt_deg of −z."""
    i = np.arange(num) + 0.5
    cos_max = np.cos(np.deg2rad(float(max_tilt_deg)))
    ct = 1.0 - (1.0 - cos_max) * i / num
    phi = np.pi * (1.0 + 5.0**0.5) * i
    st = np.sqrt(np.maximum(1.0 - ct**2, 0.0))
    return np.stack([st * np.cos(phi), st * np.sin(phi), -ct], axis=1)


def num_points(cfg) -> int:
    return int(cfg.num_points)


def margin_directions(num: int) -> np.ndarray:
    a = 2 * np.pi * np.arange(num) / num  # includes the grid axes, along which voxel footprints have edges
    return np.stack([np.cos(a), np.sin(a)], axis=1)


# ------------------------------------------------------------------------------------------- rotations


def _quat_from_matrix(r):
    """Rotation matrix (3, 3) -> unit quaternion (w, x, y, z) with w >= 0; jit-safe branch on the largest term."""
    t = jnp.trace(r)
    cands = jnp.stack([t, r[0, 0], r[1, 1], r[2, 2]])
    k = jnp.argmax(cands)

    def qw(_):
        s = 2.0 * jnp.sqrt(jnp.maximum(1.0 + t, 1e-12))
        return jnp.stack([0.25 * s, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s])

    def qx(_):
        s = 2.0 * jnp.sqrt(jnp.maximum(1.0 + r[0, 0] - r[1, 1] - r[2, 2], 1e-12))
        return jnp.stack([(r[2, 1] - r[1, 2]) / s, 0.25 * s, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s])

    def qy(_):
        s = 2.0 * jnp.sqrt(jnp.maximum(1.0 + r[1, 1] - r[0, 0] - r[2, 2], 1e-12))
        return jnp.stack([(r[0, 2] - r[2, 0]) / s, (r[0, 1] + r[1, 0]) / s, 0.25 * s, (r[1, 2] + r[2, 1]) / s])

    def qz(_):
        s = 2.0 * jnp.sqrt(jnp.maximum(1.0 + r[2, 2] - r[0, 0] - r[1, 1], 1e-12))
        return jnp.stack([(r[1, 0] - r[0, 1]) / s, (r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, 0.25 * s])

    q = jax.lax.switch(k, (qw, qx, qy, qz), None)
    q = jnp.where(q[0] < 0, -q, q)
    return q / jnp.linalg.norm(q)


def principal_frame(inertia):
    """Full inertia (3, 3) -> (principal moments (3,), quaternion (4,) of a right-handed principal frame)."""
    evals, evecs = jnp.linalg.eigh(inertia)
    evecs = evecs * jnp.sign(jnp.linalg.det(evecs))  # right-handed (det = +1)
    return evals, _quat_from_matrix(evecs)


# ------------------------------------------------------------------------------------------- proxy


def greedy_support(base, sup, dirs, k: int, park, tol: float = 1e-6):
    """Picks k contact points: the distinct base points, then greedily the support point of the worst-fit direction.

    `sup[j]` is the hull's support point in direction `dirs[j]`. With the points chosen so far, the proxy's
    support height in direction d falls short of the hull's by e(d) = h(d) − max_p p·d: the distance by which
    the proxy's lowest point would float above the floor when d points down. Each step adds sup[argmax e],
    so the proxy fits the hull first where it is worst, over all tilts up to the cap. Slots left once the fit
    is exact (e < tol), and repeated base points, are parked at `park` (the COM, inside the hull), so no
    contact point is doubled (a doubled sphere is a stiffer contact). jnp, jittable.
    """
    nb = base.shape[0]
    same = jnp.all(jnp.abs(base[:, None, :] - base[None, :, :]) < tol, axis=-1)  # (Nb, Nb)
    repeated = jnp.any(jnp.tril(same, -1), axis=1)
    base = jnp.where(repeated[:, None], park, base)
    h_full = jnp.sum(sup * dirs, axis=1)  # (N,)
    cross = sup @ dirs.T  # (N, N): support point i measured along direction j
    h_sel = jnp.max(jnp.where(repeated[:, None], -jnp.inf, base @ dirs.T), axis=0)  # (N,)
    points = jnp.concatenate([base, jnp.broadcast_to(park, (k - nb, 3))], axis=0)

    def add(i, carry):
        points, h_sel = carry
        err = h_full - h_sel
        j = jnp.argmax(err)
        p = jnp.where(err[j] > tol, sup[j], park)
        return points.at[nb + i].set(p), jnp.maximum(h_sel, cross[j])

    points, _ = jax.lax.fori_loop(0, k - nb, add, (points, h_sel))
    return points


def greedy_support_np(
    base: np.ndarray, sup: np.ndarray, dirs: np.ndarray, k: int, park: np.ndarray, tol: float = 1e-6
) -> np.ndarray:
    """numpy twin of `greedy_support` for the mesh path (same choices, float64)."""
    points, kept = [], []
    for p in base:
        dup = any(np.all(np.abs(p - q) < tol) for q in kept)
        points.append(park if dup else p)
        if not dup:
            kept.append(p)
    h_full = np.sum(sup * dirs, axis=1)
    cross = sup @ dirs.T
    h_sel = np.max(np.asarray(kept) @ dirs.T, axis=0)
    while len(points) < k:
        err = h_full - h_sel
        j = int(np.argmax(err))
        points.append(sup[j] if err[j] > tol else park)
        h_sel = np.maximum(h_sel, cross[j])
    return np.array(points)


# ------------------------------------------------------------------------------------------- occupancy


def fill_enclosed(occ):
    """Fills voxels enclosed along all three axes (occupied voxels on both sides in x, y and z).

    TRELLIS's sparse structure marks the voxels that the surface crosses, a shell; DSO's mass model is the
    solid the surface encloses. This cheap fill is exact for shapes whose interior sees the shell in all six
    axis directions (boxes, blobs, legs, posts) and keeps open cavities (cups, table undersides) empty.
    """
    occ = occ.astype(bool)
    d = occ.shape[0]
    idx = jnp.arange(d)
    enclosed = jnp.ones_like(occ)
    for axis in range(3):
        # Between the first and the last occupied voxel along this axis (two reductions, no scans).
        hit = jnp.expand_dims(occ.any(axis=axis), axis)
        first = jnp.expand_dims(jnp.argmax(occ, axis=axis), axis)
        last = d - 1 - jnp.expand_dims(jnp.argmax(jnp.flip(occ, axis=axis), axis=axis), axis)
        shape = [1, 1, 1]
        shape[axis] = d
        pos = idx.reshape(shape)
        enclosed = enclosed & hit & (pos >= first) & (pos <= last)
    return occ | enclosed


def occupancy_body(occ, cfg):
    """Body of one occupancy grid (D, D, D) -> dict (see module docstring). Pure and jittable.

    Mass properties use the voxels (each a solid cube of edge h = 1/D, density 1000); support points use the
    voxel corners. Directions with d_z <= 0 reach their extreme in the lowest voxel of some (x, y) column, so
    the search runs over the D² bottom height map instead of all D³ voxels.
    """
    d = occ.shape[-1]
    if occ.shape != (d, d, d):
        raise ValueError(f"occupancy must be cubic (D, D, D), got {occ.shape}")
    dtype = jnp.float32 if not jax.config.jax_enable_x64 else jnp.float64
    occ = occ > 0.5 if jnp.issubdtype(occ.dtype, jnp.floating) else occ.astype(bool)
    if cfg.fill_interior:
        occ = fill_enclosed(occ)
    h = 1.0 / d
    c = (jnp.arange(d, dtype=dtype) + 0.5) * h - 0.5  # (D,) voxel centres per axis
    w = occ.astype(dtype)
    if cfg.boundary_weight != 1.0:
        # The surface crosses the boundary voxels, on average through their centres: count them partly.
        p = jnp.pad(occ, 1)
        interior = (
            p[2:, 1:-1, 1:-1]
            & p[:-2, 1:-1, 1:-1]
            & p[1:-1, 2:, 1:-1]
            & p[1:-1, :-2, 1:-1]
            & p[1:-1, 1:-1, 2:]
            & p[1:-1, 1:-1, :-2]
        )
        w = jnp.where(occ & ~interior, jnp.asarray(cfg.boundary_weight, dtype), w)
    n = w.sum()
    valid = n > 0
    ns = jnp.maximum(n, 1.0)

    # Mass properties from marginals: O(D³) sums, no (D³, 3) coordinate arrays.
    wxy, wxz, wyz = w.sum(2), w.sum(1), w.sum(0)  # (D, D)
    mx, my, mz = wxy.sum(1), wxy.sum(0), wxz.sum(0)  # (D,)
    com = jnp.stack([mx @ c, my @ c, mz @ c]) / ns
    sxx, syy, szz = (mx @ c**2) / ns, (my @ c**2) / ns, (mz @ c**2) / ns
    sxy, sxz, syz = (c @ wxy @ c) / ns, (c @ wxz @ c) / ns, (c @ wyz @ c) / ns
    second = jnp.array([[sxx, sxy, sxz], [sxy, syy, syz], [sxz, syz, szz]])
    cov = second - jnp.outer(com, com)
    eye = jnp.eye(3, dtype=dtype)
    inertia_full = jnp.trace(cov) * eye - cov + (h * h / 6.0) * eye
    inertia, iquat = principal_frame(inertia_full)

    # Bottom height map: lowest occupied voxel per (x, y) column.
    col_any = occ.any(axis=2)  # (D, D)
    k_low = jnp.argmax(occ, axis=2)  # (D, D) first occupied index along z
    z_low = c[k_low]  # (D, D) bottom voxel centre per column
    if cfg.height_smoothing > 0:
        # Sub-voxel bottom: average the height map over the occupied columns of a (2r+1)² window, so that a
        # curved or gently sloped bottom stays curved instead of becoming a one-voxel-thick flat layer.
        win = 2 * int(cfg.height_smoothing) + 1
        box = lambda x: jax.lax.reduce_window(x, 0.0, jax.lax.add, (win, win), (1, 1), "SAME")  # noqa: E731
        m = col_any.astype(dtype)
        z_low = jnp.where(col_any, box(z_low * m) / jnp.maximum(box(m), 1.0), z_low)
    z_bot = jnp.min(jnp.where(col_any, z_low, 1.0))
    z_bot = jnp.where(valid, z_bot, c[0])
    gx, gy = jnp.meshgrid(c, c, indexing="ij")
    cand = jnp.stack([gx, gy, z_low], axis=-1).reshape(-1, 3)  # (D², 3) column-bottom voxel centres
    col_any = col_any.reshape(-1)
    base = col_any & (z_low.reshape(-1) <= z_bot + cfg.base_tol * h)  # the lowest layer

    neg = jnp.asarray(-1e9, dtype)
    off = 0.5 * h * cfg.voxel_offset  # support points at voxel corners (1) or centres (0)
    zmin = z_bot - off
    ub = jnp.asarray(base_directions(cfg.num_base), dtype)  # (Nb, 3)
    pb = cand[jnp.argmax(jnp.where(base[:, None], cand @ ub.T, neg), axis=0)]  # (Nb, 3)
    pb = jnp.concatenate([pb[:, :2] + off * jnp.where(ub[:, :2] >= 0, 1.0, -1.0), pb[:, 2:] - off], 1)
    dirs = jnp.asarray(cap_directions(cfg.num_dirs, cfg.max_tilt_deg), dtype)  # (N, 3)
    sup = cand[jnp.argmax(jnp.where(col_any[:, None], cand @ dirs.T, neg), axis=0)]  # (N, 3)
    sup = sup + off * jnp.where(dirs >= 0, 1.0, -1.0)  # voxel corner extreme in each direction
    points = greedy_support(pb, sup, dirs, num_points(cfg), park=com)  # (K, 3)

    um = jnp.asarray(margin_directions(cfg.margin_dirs), dtype)  # (M, 2)
    reach = jnp.where(base[:, None], cand[:, :2] @ um.T, neg).max(axis=0)  # (M,)
    reach = reach + off * jnp.abs(um).sum(axis=1)
    margin = jnp.min(reach - um @ com[:2])
    margin = jnp.where(valid, margin, -1.0)
    mass = DENSITY * n * h**3  # weighted voxel count
    return dict(com=com, inertia=inertia, iquat=iquat, points=points, zmin=zmin, margin=margin, mass=mass, valid=valid)


# ------------------------------------------------------------------------------------------- meshes


def legacy_mass_properties(vertices: np.ndarray, faces: np.ndarray):
    """MuJoCo's legacy mesh volume, COM and inertia (about the COM, per unit density), in float64.

    Reproduces the compiler (dso.md §5.1 step 8): vertices stored as float32; COM from pyramids with apex at the
    area-weighted face centre; volume and inertia from tetrahedra with apex at the COM; |volume| per face
    (legacy), so open or inconsistently wound meshes still get a positive volume.
    Returns (volume, com (3,), inertia (3, 3)).
    """
    v = np.asarray(vertices, dtype=np.float32).astype(np.float64)
    f = np.asarray(faces, dtype=np.int64)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    cr = np.cross(b - a, c - a)
    ln = np.linalg.norm(cr, axis=1)
    ok = ln >= 1e-15  # MuJoCo ignores faces with |cross| < mjMINVAL
    area = np.where(ok, ln / 2, 0.0)
    nrm = cr / np.where(ok, ln, 1.0)[:, None]
    cen = (a + b + c) / 3
    total_area = area.sum()
    if not total_area > 1e-15:
        raise ValueError("mesh surface area is too small")
    facecen = (area[:, None] * cen).sum(0) / total_area
    pyr = np.abs(((cen - facecen) * nrm).sum(1)) * area / 3
    if not pyr.sum() > 1e-15:
        raise ValueError("mesh volume is too small")
    com = (pyr[:, None] * (0.75 * cen + 0.25 * facecen)).sum(0) / pyr.sum()
    a, b, c, cen = a - com, b - com, c - com, cen - com
    vol = np.abs((cen * nrm).sum(1)) * area / 3
    s = a + b + c
    outer = lambda x: x[:, :, None] * x[:, None, :]  # noqa: E731
    second = np.einsum("f,fij->ij", vol / 20, outer(a) + outer(b) + outer(c) + outer(s))
    volume = vol.sum()
    if not volume > 1e-15:
        raise ValueError("mesh volume is too small")
    inertia = np.trace(second) * np.eye(3) - second
    return float(volume), com, inertia


def _np_quat_from_matrix(r: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    x, y, z, w = Rotation.from_matrix(np.asarray(r, np.float64)).as_quat()
    q = np.array([w, x, y, z])
    return -q if q[0] < 0 else q


def hull_vertices(vertices: np.ndarray) -> np.ndarray:
    """Vertices of the convex hull (qhull); raises ValueError for flat or degenerate sets."""
    from scipy.spatial import ConvexHull

    pts = np.unique(np.asarray(vertices, np.float64), axis=0)
    try:
        hull = ConvexHull(pts)
    except Exception as err:
        raise ValueError(f"convex hull failed ({' '.join(str(err).split()[:6])})") from None
    return pts[hull.vertices]


def mesh_body(vertices: np.ndarray, faces: np.ndarray, cfg) -> dict:
    """Body of one prepared mesh (z-up; body frame = the mesh frame) with MuJoCo-legacy mass properties.

    Returns the occupancy_body layout as numpy float64 arrays; raises ValueError for meshes MuJoCo rejects
    (zero area or volume, degenerate hull).
    """
    volume, com, inertia_full = legacy_mass_properties(vertices, faces)
    evals, evecs = np.linalg.eigh(inertia_full / volume)
    if evals[0] + evals[1] < evals[2] * (1 - 1e-9) or evals[0] <= 0:
        raise ValueError("mesh inertia violates A + B >= C")
    if np.linalg.det(evecs) < 0:
        evecs = -evecs
    hull = hull_vertices(np.asarray(vertices, np.float32).astype(np.float64))
    zmin = hull[:, 2].min()
    base = hull[hull[:, 2] <= zmin + cfg.mesh_base_tol]
    ub = base_directions(cfg.num_base)
    pb = base[np.argmax(base @ ub.T, axis=0)]
    dirs = cap_directions(cfg.num_dirs, cfg.max_tilt_deg)
    sup = hull[np.argmax(hull @ dirs.T, axis=0)]
    points = greedy_support_np(pb, sup, dirs, num_points(cfg), park=com)
    um = margin_directions(cfg.margin_dirs)
    reach = (base[:, :2] @ um.T).max(axis=0)
    margin = float(np.min(reach - um @ com[:2]))
    return dict(
        com=com,
        inertia=evals,
        iquat=_np_quat_from_matrix(evecs),
        points=points,
        zmin=np.float64(zmin),
        margin=np.float64(margin),
        mass=np.float64(DENSITY * volume),
        valid=np.bool_(True),
    )


def stack_bodies(bodies: list[dict]) -> dict:
    """List of per-object body dicts -> dict of (B, ...) numpy arrays."""
    return {k: np.stack([np.asarray(b[k]) for b in bodies]) for k in bodies[0]}


# ------------------------------------------------------------------------------------------- voxelisation


def voxelize_mesh(vertices: np.ndarray, faces: np.ndarray, resolution: int = 64, *, seed: int = 0) -> np.ndarray:
    """Voxelises a mesh in the grid frame ([-0.5, 0.5]³, axes x, y, z) -> bool (D, D, D): the voxels the surface
    crosses (TRELLIS's sparse-structure convention, a shell), by dense seeded surface sampling. The occupancy
    path fills the interior itself (`fill_interior`)."""
    import trimesh

    d = int(resolution)
    h = 1.0 / d
    mesh = trimesh.Trimesh(np.asarray(vertices, np.float64), np.asarray(faces), process=False)
    occ = np.zeros((d, d, d), bool)
    count = int(min(4_000_000, max(20_000, 12 * mesh.area / (h * h))))
    pts, _ = trimesh.sample.sample_surface(mesh, count, seed=seed)
    pts = np.concatenate([pts, mesh.vertices], 0)
    idx = np.clip(np.floor((pts + 0.5) * d).astype(np.int64), 0, d - 1)
    occ[idx[:, 0], idx[:, 1], idx[:, 2]] = True
    return occ


def mesh_to_grid_frame(vertices: np.ndarray) -> np.ndarray:
    """Prepared mesh (rescaled, min z = 0) -> grid frame: centre z on the cube, as TRELLIS's grid is."""
    v = np.array(vertices, np.float64)
    v[:, 2] -= 0.5 * (v[:, 2].min() + v[:, 2].max())
    return v


__all__ = [
    "DENSITY",
    "base_directions",
    "cap_directions",
    "num_points",
    "greedy_support",
    "fill_enclosed",
    "occupancy_body",
    "legacy_mass_properties",
    "hull_vertices",
    "mesh_body",
    "stack_bodies",
    "voxelize_mesh",
    "mesh_to_grid_frame",
    "principal_frame",
]
