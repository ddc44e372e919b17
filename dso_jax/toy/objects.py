"""Toy world: furniture-like voxel objects on the stage-1 grid whose backs the front view cannot see.

Frame (TRELLIS native): occupancy is indexed ``occ[x, y, z]`` on an R³ grid over [-0.5, 0.5]³, +z up, voxel
centre ``(i + 0.5)/R - 0.5``; every object rests on the floor layer z = 0. The condition's camera looks along +y
from the front (small y, TRELLIS's front after ``to_glb``), so it sees only the first surface hit along each
(x, z) ray (`condition.front_depth`).

Every family splits its parameters into *visible* ones (they fix the front depth image) and *hidden* ones
(everything they change lies behind a visible surface): back legs, the depth of a table top, of a lamp base
or head, the depth profile of a shelf, a figure's heels and backpack. The hidden parameters decide static
stability, so one condition has stable and unstable completions and a generator trained on this world
tips over about half the time; DRO can move its hidden choices towards stable ones without touching what
the condition shows. Sizes are integers in units of the 32³ grid and are rasterised at any R.

Parameters of one object: ``{'kind': int, 'vis': {name: int}, 'hid': {name: int}}``.
"""

from __future__ import annotations

import zlib

import numpy as np
from scipy.spatial import ConvexHull

from dso_jax.toy import condition

KINDS = ("table", "stool", "lamp", "shelf", "figure")
RES = 32  # default grid resolution; the codec's 2x2x2 space-to-depth maps 32³ to the (8, 16, 16, 16) latent
HELDOUT_MOD = 8  # an object is held out iff crc32(kind, visible parameters) % HELDOUT_MOD == 0
MIN_MARGIN = 1.0 / 32  # hidden draws are redone until |static margin| >= one toy voxel (clear labels) ...
MIN_TILT_DEG = 25.0  # ... and an unstable draw falls by more than this (DSO's threshold is 20°)
_HIDDEN_TRIES = 16


# ----------------------------------------------------------------------------------------------- raster


class _Canvas:
    """An R³ boolean grid drawn in units of the 32³ grid (a voxel is drawn if its centre is inside)."""

    def __init__(self, res: int):
        self.res = res
        self.s = res / 32.0
        self.occ = np.zeros((res, res, res), dtype=bool)
        self.clipped = False  # set if a part reached outside the grid (a generator bug; tests check it)
        self._c = (np.arange(res) + 0.5) / self.s  # voxel centres in 32-units

    def _span(self, lo, hi):
        a = int(np.ceil(lo * self.s - 0.5))
        b = int(np.ceil(hi * self.s - 0.5))
        self.clipped |= a < 0 or b > self.res
        return max(a, 0), min(b, self.res)

    def box(self, x0, x1, y0, y1, z0, z1):
        (a, b), (c, d), (e, f) = self._span(x0, x1), self._span(y0, y1), self._span(z0, z1)
        self.occ[a:b, c:d, e:f] = True

    def cylinder(self, axis: str, u, v, r, lo, hi):
        """Cylinder of radius r along `axis`, centred at (u, v) in the other two axes (in x, y, z order)."""
        c = self._c
        self._span(u - r, u + r), self._span(v - r, v + r)  # bounds check only
        disk = (c[:, None] - u) ** 2 + (c[None, :] - v) ** 2 <= r * r  # (R, R)
        a, b = self._span(lo, hi)
        if axis == "z":
            self.occ[:, :, a:b] |= disk[:, :, None]
        elif axis == "y":
            self.occ[:, a:b, :] |= disk[:, None, :]
        else:
            self.occ[a:b, :, :] |= disk[None, :, :]


def _u(rng, lo, hi):
    """Uniform integer in [lo, hi] (inclusive)."""
    return int(rng.integers(lo, hi + 1))


# ------------------------------------------------------------------------------------------- families
# Each family: visible(rng) -> vis, hidden(rng, vis) -> hid, build(canvas, vis, hid), stable_hid(vis) -> hid.
# x is centred at 16 (+ a visible offset); the front (min y) is a visible parameter and objects extend to +y.


def _table_visible(rng):
    return dict(
        W=_u(rng, 14, 28),
        H=_u(rng, 12, 20),
        T=_u(rng, 2, 3),
        lt=_u(rng, 2, 3),
        lx=_u(rng, 0, 2),
        ly=_u(rng, 0, 1),
        yf=_u(rng, 2, 5),
        dx=_u(rng, -2, 2),
    )


def _table_hidden(rng, v):
    # D <= 2·(leg height) + ...: a table without back legs then tips by >= 26° before its top hits the floor
    d_max = min(24, 31 - v["yf"], 2 * (v["H"] - v["T"]) + v["ly"] + v["lt"])
    return dict(D=_u(rng, 14, d_max), back=int(rng.random() < 0.5))


def _table_stable(v):
    return dict(D=14, back=1)


def _table_build(c, v, h):
    x0 = 16 - v["W"] // 2 + v["dx"]
    x1 = x0 + v["W"]
    yf, lt, ly, H, T = v["yf"], v["lt"], v["ly"], v["H"], v["T"]
    c.box(x0, x1, yf, yf + h["D"], H - T, H)  # top
    for xl in (x0 + v["lx"], x1 - v["lx"] - lt):
        c.box(xl, xl + lt, yf + ly, yf + ly + lt, 0, H - T)  # front legs
        if h["back"]:  # back legs: exactly behind the front ones, at a fixed spacing (the top may overhang them)
            c.box(xl, xl + lt, yf + 14 - ly - lt, yf + 14 - ly, 0, H - T)


def _stool_visible(rng):
    rs = _u(rng, 6, 8)
    ox = _u(rng, 2, rs - 3)
    oy = _u(rng, 4, rs - 2)  # >= 4: without back legs the seat's centre is >= 3 voxels behind the front legs
    hb = 0 if rng.random() < 0.4 else _u(rng, 4, 10)
    return dict(
        rs=rs,
        Hs=_u(rng, 12, 20),
        ox=ox,
        oy=oy,
        hb=hb,
        bw=_u(rng, 4, 2 * rs - 4) if hb else 0,
        rung=int(rng.random() < 0.5),
        yf=_u(rng, 2, 6),
        dx=_u(rng, -2, 2),
    )


def _stool_hidden(rng, v):
    return dict(back=int(rng.random() < 0.5))


def _stool_stable(v):
    return dict(back=1)


def _stool_build(c, v, h):
    cx, yc, rs, Hs, ox, oy = 16 + v["dx"], v["yf"] + v["rs"], v["rs"], v["Hs"], v["ox"], v["oy"]
    c.cylinder("z", cx, yc, rs, Hs - 2, Hs)  # round seat
    legs_y = [yc - oy] + ([yc + oy] if h["back"] else [])
    for ly in legs_y:
        for lx in (cx - ox, cx + ox):
            c.box(lx - 1, lx + 1, ly - 1, ly + 1, 0, Hs - 2)
        if v["rung"]:
            c.box(cx - ox, cx + ox, ly - 1, ly, Hs // 3, Hs // 3 + 1)
    if v["hb"]:  # backrest on the back edge of the seat (its face is visible above the seat)
        c.box(cx - v["bw"] / 2, cx + v["bw"] / 2, yc + rs - 3, yc + rs - 1, Hs, Hs + v["hb"])


def _lamp_visible(rng):
    a, pt, e = _u(rng, 2, 5), _u(rng, 2, 3), _u(rng, 0, 2)
    tube = int(rng.random() < 0.5)
    return dict(
        yf=_u(rng, 2, 5),
        Wb=_u(rng, 8, 14),
        hb=_u(rng, 2, 3),
        a=a,
        pt=pt,
        Hp=_u(rng, 15, 23),
        tube=tube,
        Wh=0 if tube else _u(rng, 6, 14),
        Hh=_u(rng, 3, 5) if tube else _u(rng, 5, 9),
        e=e,
        dx=_u(rng, -2, 2),
    )


def _lamp_hidden(rng, v):
    yh = v["yf"] + v["a"] - v["e"]
    return dict(Db=_u(rng, v["a"] + v["pt"] + 1, 13), Dh=_u(rng, max(v["e"] + v["pt"] + 2, 10), min(24, 31 - yh)))


def _lamp_stable(v):
    return dict(Db=13, Dh=max(v["e"] + v["pt"] + 2, 10))


def _lamp_build(c, v, h):
    cx, yf, a, pt, Hp = 16 + v["dx"], v["yf"], v["a"], v["pt"], v["Hp"]
    c.box(cx - v["Wb"] / 2, cx + v["Wb"] / 2, yf, yf + h["Db"], 0, v["hb"])  # base plate
    c.box(cx - pt / 2, cx + pt / 2, yf + a, yf + a + pt, v["hb"], Hp)  # pole
    yh = yf + a - v["e"]
    if v["tube"]:  # round head along y (a spotlight): its length is hidden behind its front disc
        r = v["Hh"]
        c.cylinder("y", cx, Hp + r - 1, r, yh, yh + h["Dh"])
    else:  # box head
        c.box(cx - v["Wh"] / 2, cx + v["Wh"] / 2, yh, yh + h["Dh"], Hp, Hp + v["Hh"])


def _shelf_visible(rng):
    return dict(
        W=_u(rng, 14, 26), H=_u(rng, 18, 28), bt=_u(rng, 1, 2), nb=_u(rng, 3, 5), yf=_u(rng, 2, 5), dx=_u(rng, -2, 2)
    )


def _shelf_hidden(rng, v):
    return dict(Db=_u(rng, 3, 8), Dt=_u(rng, 3, min(26, 31 - v["yf"])))


def _shelf_stable(v):
    return dict(Db=8, Dt=8)


def _shelf_build(c, v, h):
    x0 = 16 - v["W"] // 2 + v["dx"]
    x1 = x0 + v["W"]
    yf, H, bt, Db, Dt = v["yf"], v["H"], v["bt"], h["Db"], h["Dt"]

    def depth(z):  # the side profile: linear from the bottom depth to the top depth
        return int(round(Db + (Dt - Db) * (z + 0.5) / H))

    for z in range(H):  # side panels, one layer at a time
        d = depth(z)
        c.box(x0, x0 + 2, yf, yf + d, z, z + 1)
        c.box(x1 - 2, x1, yf, yf + d, z, z + 1)
    for k in range(v["nb"]):  # boards, bottom and top included
        z = round(k * (H - bt) / (v["nb"] - 1))
        c.box(x0 + 2, x1 - 2, yf, yf + depth(z + bt / 2 - 0.5), z, z + bt)


def _figure_visible(rng):
    lw, g, toe, tf = _u(rng, 3, 4), _u(rng, 1, 3), _u(rng, 1, 3), _u(rng, 0, 1)
    return dict(
        yf=_u(rng, 3, 6),
        lw=lw,
        g=g,
        toe=toe,
        Hl=_u(rng, 8, 12),
        ea=_u(rng, 0, 1),
        Ht=_u(rng, 8, 12),
        tf=tf,
        hs=_u(rng, 4, 6),
        La=_u(rng, 5, 9),
        dx=_u(rng, -2, 2),
    )


def _figure_hidden(rng, v):
    lf = _u(rng, v["toe"] + 4, 11)
    # the backpack starts at the torso's back (yf + toe + 4), stays in the grid and, when it tips the figure,
    # reaches past the heels by at most 2·(its height above the floor), so the fall is >= 26°
    lb_max = min(20, 31 - (v["yf"] + v["toe"] + 4), 2 * (v["Hl"] + 1) + lf - v["toe"] - 4)
    return dict(Lf=lf, Lb=_u(rng, 8, lb_max))


def _figure_stable(v):
    return dict(Lf=11, Lb=8)


def _figure_build(c, v, h):
    cx, yf, lw, g, toe, Hl, Ht, tf = 16 + v["dx"], v["yf"], v["lw"], v["g"], v["toe"], v["Hl"], v["Ht"], v["tf"]
    ld, fh = 3, 2
    yl = yf + toe  # front of the legs
    for x0 in (cx - g / 2 - lw, cx + g / 2):
        c.box(x0, x0 + lw, yf, yf + h["Lf"], 0, fh)  # foot: toe visible, heel hidden behind it
        c.box(x0, x0 + lw, yl, yl + ld, fh, Hl)  # leg
    wt = 2 * lw + g + 2 * v["ea"]
    yt0, yt1 = yl - tf, yl + ld + 1
    c.box(cx - wt / 2, cx + wt / 2, yt0, yt1, Hl, Hl + Ht)  # torso
    if h["Lb"]:  # backpack: inside the torso's front outline, so hidden
        c.box(cx - wt / 2 + 1, cx + wt / 2 - 1, yt1, yt1 + h["Lb"], Hl + 1, Hl + Ht - 1)
    hs = v["hs"]
    c.box(cx - hs / 2, cx + hs / 2, yt0, yt0 + hs, Hl + Ht, Hl + Ht + hs)  # head
    for xa in (cx - wt / 2 - 2, cx + wt / 2):
        c.box(xa, xa + 2, yt0 + 1, yt0 + 3, Hl + Ht - v["La"], Hl + Ht)  # arms


_FAMILIES = (
    (_table_visible, _table_hidden, _table_build, _table_stable),
    (_stool_visible, _stool_hidden, _stool_build, _stool_stable),
    (_lamp_visible, _lamp_hidden, _lamp_build, _lamp_stable),
    (_shelf_visible, _shelf_hidden, _shelf_build, _shelf_stable),
    (_figure_visible, _figure_hidden, _figure_build, _figure_stable),
)


# ------------------------------------------------------------------------------------------ stability


def static_stability(occ: np.ndarray) -> dict:
    """Quasi-static check: is the centre of mass above the support polygon of the lowest layer?

    occ: (..., R, R, R) bool. Mass is uniform over voxels; the support polygon is the convex hull of the
    footprints (full squares) of the lowest occupied layer, which is what a convex-hull collider rests on.
    Returns stable (...,) bool; margin (...,) float32, the signed distance from the COM's ground projection to
    the polygon's edge in cube units (> 0 inside); com (..., 3) float32 in cube coordinates; and tilt (...,)
    float32 degrees, for unstable objects the rotation about the violated edge at which another point of the
    object reaches the floor (a lower bound on the final tilt; 0 for stable ones).
    """
    occ = np.asarray(occ, dtype=bool)
    lead, res = occ.shape[:-3], occ.shape[-1]
    flat = occ.reshape((-1, res, res, res))
    margin = np.full(len(flat), -np.inf, dtype=np.float32)
    tilt = np.zeros(len(flat), dtype=np.float32)
    com = np.zeros((len(flat), 3), dtype=np.float32)
    sq = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=np.float64)
    for n, o in enumerate(flat):
        idx = np.argwhere(o)
        if len(idx) == 0:
            continue
        c = idx.mean(axis=0) + 0.5  # voxel units
        com[n] = c / res - 0.5
        z0 = idx[:, 2].min()
        foot = idx[idx[:, 2] == z0][:, :2].astype(np.float64)
        pts = (foot[:, None, :] + sq[None]).reshape(-1, 2)
        eq = ConvexHull(pts).equations  # (F, 3): n·p + b <= 0 inside, |n| = 1
        viol = eq[:, :2] @ c[:2] + eq[:, 2]
        margin[n] = -viol.max() / res
        if margin[n] <= 0:  # tip about the most violated edge; a voxel first touches with the bottom corner
            e = eq[np.argmax(viol)]  # farthest out along the edge's normal
            s = (idx[:, :2] + 0.5) @ e[:2] + e[2] + 0.5 * np.abs(e[:2]).sum()
            h = (idx[:, 2] - z0).astype(np.float64)
            out = s > 1e-6
            tilt[n] = np.degrees(np.arctan2(h[out], s[out]).min()) if out.any() else 90.0
    return dict(
        stable=(margin > 0).reshape(lead),
        margin=margin.reshape(lead),
        com=com.reshape(lead + (3,)),
        tilt=tilt.reshape(lead),
    )


# ---------------------------------------------------------------------------------------------- API


def _draw(params: dict, res: int) -> _Canvas:
    c = _Canvas(res)
    _FAMILIES[params["kind"]][2](c, params["vis"], params["hid"])
    return c


def build(params: dict, res: int = RES) -> np.ndarray:
    """Rasterise one object's parameters: (res, res, res) bool occupancy, axes (x, y, z), resting on z = 0."""
    return _draw(params, res).occ


def _draw_hidden(kind, vis, rng, res):
    """Hidden parameters given visible ones, redrawn until the static label is clear: stable with margin >=
    MIN_MARGIN, or unstable with margin <= -MIN_MARGIN and a fall of >= MIN_TILT_DEG."""
    for _ in range(_HIDDEN_TRIES):
        p = dict(kind=kind, vis=vis, hid=_FAMILIES[kind][1](rng, vis))
        occ = build(p, res)
        st = static_stability(occ)
        m = float(st["margin"])
        if m >= MIN_MARGIN or (m <= -MIN_MARGIN and float(st["tilt"]) >= MIN_TILT_DEG):
            break
    return p, occ, m


def sample_params(rng: np.random.Generator, kind: int | None = None, res: int = RES) -> dict:
    """One object's parameters (kind drawn uniformly unless given)."""
    if kind is None:
        kind = int(rng.integers(len(KINDS)))
    vis = _FAMILIES[kind][0](rng)
    return _draw_hidden(kind, vis, rng, res)[0]


def resample_hidden(params: dict, rng: np.random.Generator, res: int = RES) -> dict:
    """Same visible parameters (hence the same condition), fresh hidden ones."""
    return _draw_hidden(params["kind"], params["vis"], rng, res)[0]


def stable_variant(params: dict) -> dict:
    """The family's stabilising completion of the same visible parameters (same condition, statically stable)."""
    return dict(kind=params["kind"], vis=params["vis"], hid=_FAMILIES[params["kind"]][3](params["vis"]))


def split_of(params: dict) -> str:
    """'heldout' or 'train', decided by a hash of the kind and visible parameters (so by the condition)."""
    key = repr((params["kind"], sorted(params["vis"].items()))).encode()
    return "heldout" if zlib.crc32(key) % HELDOUT_MOD == 0 else "train"


_SPLIT_ID = {"train": 0, "heldout": 1}


def _as_rng(rng_or_seed, split):
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(np.random.SeedSequence([int(rng_or_seed), _SPLIT_ID[split]]))


def sample_objects(rng_or_seed, n: int, split: str = "train", res: int = RES, kinds=None) -> dict:
    """n objects of one split, deterministic in the seed (a prefix of a longer draw with the same seed).

    Returns occ (n, res, res, res) bool, kind (n,) int32, stable (n,) bool and margin (n,) float32 (static
    check), and params (list of n dicts, for `resample_hidden` / `stable_variant`). Train and held-out
    objects never share visible parameters (`split_of`).
    """
    if split not in _SPLIT_ID:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = _as_rng(rng_or_seed, split)
    kinds = (
        tuple(range(len(KINDS)))
        if kinds is None
        else tuple(KINDS.index(k) if isinstance(k, str) else int(k) for k in kinds)
    )
    occ = np.zeros((n, res, res, res), dtype=bool)
    kind = np.zeros(n, dtype=np.int32)
    margin = np.zeros(n, dtype=np.float32)
    params = []
    for i in range(n):
        while True:
            k = kinds[int(rng.integers(len(kinds)))]
            vis = _FAMILIES[k][0](rng)
            if split_of(dict(kind=k, vis=vis)) == split:
                break
        p, occ[i], margin[i] = _draw_hidden(k, vis, rng, res)
        kind[i] = k
        params.append(p)
    return dict(occ=occ, kind=kind, stable=margin > 0, margin=margin, params=params)


def train_batch(seed: int, step: int, batch_size: int, packed: bool = False) -> np.ndarray:
    """The pre-training objects of step ``step``: (B, 32, 32, 32) bool from the train split, a function of
    (seed, step) only (so any number of worker processes give the same run). ``packed`` returns
    ``np.packbits`` of it (B, 4096) uint8, 8x less to send between processes (`unpack_occ` inverts it)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7, int(step)]))
    occ = sample_objects(rng, batch_size, "train")["occ"]
    return np.packbits(occ.reshape(batch_size, -1), axis=-1) if packed else occ


def completions(params: dict, k: int, rng: np.random.Generator, res: int = RES) -> dict:
    """k hidden resamples of one object's visible parameters: occ (k, res³) bool, stable (k,), margin (k,)."""
    ps = [resample_hidden(params, rng, res) for _ in range(k)]
    occ = np.stack([build(p, res) for p in ps])
    st = static_stability(occ)
    return dict(occ=occ, stable=st["stable"], margin=st["margin"], params=ps)


def make_dataset(seed: int, n: int, k: int = 4, split: str = "train", res: int = RES) -> dict:
    """DSO-style offline data: n conditions, each with k completions (index 0: the conditioning object itself,
    then k - 1 hidden resamples sharing its condition) and their static labels.

    Returns occ_bits (n, k, res³/8) uint8 (np.packbits of the C-order occupancy; `unpack_occ` inverts it),
    stable (n, k) bool, margin (n, k) float32, kind (n,) int32 and cond (n, L, C) float32.
    """
    objs = sample_objects(seed, n, split, res)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_ID[split], 2]))
    occ = np.zeros((n, k, res, res, res), dtype=bool)
    occ[:, 0] = objs["occ"]
    for i, p in enumerate(objs["params"]):
        for j in range(1, k):
            occ[i, j] = build(resample_hidden(p, rng, res), res)
    st = static_stability(occ)
    return dict(
        occ_bits=np.packbits(occ.reshape(n, k, -1), axis=-1),
        stable=st["stable"],
        margin=st["margin"],
        kind=objs["kind"],
        cond=condition.tokens(objs["occ"]),
    )


def unpack_occ(occ_bits: np.ndarray, res: int = RES) -> np.ndarray:
    """Inverse of the packing in `make_dataset`: (..., res³/8) uint8 -> (..., res, res, res) bool."""
    bits = np.unpackbits(occ_bits, axis=-1, count=res**3)
    return bits.reshape(occ_bits.shape[:-1] + (res, res, res)).astype(bool)
