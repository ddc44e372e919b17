"""Renders of toy voxel occupancies and the figures made of them.

`render_iso` draws the exposed voxel faces as shaded polygons, far to near (painter's algorithm), seen from an
orthographic camera in direction `view` (from the object towards the camera, frame x, y, z with +z up and the
condition's camera at -y). The default views: FRONT_VIEW (front-left-above, roughly what the condition sees)
and BACK_VIEW (back-right-above, where the hidden parts are); `front_depth_image` is the condition's view and
`panel` the two views side by side. `save_rows` lays panels out as a matplotlib figure: one row per condition,
its conditioning view first, a title, a legend for the colours and captions (angles folded to [0°, 180°] by
`fold_angle`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

FRONT_VIEW = (-0.55, -1.0, 0.6)
BACK_VIEW = (0.9, 0.75, 0.6)
STABLE_COLOR = (90, 170, 110)
UNSTABLE_COLOR = (210, 90, 80)
NEUTRAL_COLOR = (150, 160, 190)

_NORMALS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=np.float64)
_LIGHT = np.array([-0.3, -0.5, 0.8]) / np.linalg.norm([-0.3, -0.5, 0.8])


def _face_corners(normal):
    """The 4 corners (offsets from the voxel's min corner) of the unit-cube face with this outward normal."""
    a = int(np.argmax(np.abs(normal)))
    b, c = [i for i in range(3) if i != a]
    base = np.zeros(3)
    base[a] = 1.0 if normal[a] > 0 else 0.0
    quad = []
    for u, v in ((0, 0), (1, 0), (1, 1), (0, 1)):
        p = base.copy()
        p[b], p[c] = u, v
        quad.append(p)
    return np.array(quad)  # (4, 3)


def render_iso(occ, size: int = 256, view=FRONT_VIEW, color=NEUTRAL_COLOR, background=(255, 255, 255)):
    """Shaded orthographic render of a (R, R, R) occupancy: PIL RGB image of size x size."""
    occ = np.asarray(occ, dtype=bool)
    res = occ.shape[0]
    v = np.asarray(view, dtype=np.float64)
    v = v / np.linalg.norm(v)
    right = np.cross([0.0, 0.0, 1.0], v)
    right /= np.linalg.norm(right)
    up = np.cross(v, right)
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    # The grid cube's projection fixes the scale, so every object of one resolution is drawn at the same scale.
    cube = np.array([[i, j, k] for i in (0, res) for j in (0, res) for k in (0, res)], dtype=np.float64)
    sx, sy = cube @ right, -(cube @ up)
    scale = 0.94 * size / max(sx.max() - sx.min(), sy.max() - sy.min())
    off = np.array([size / 2 - scale * (sx.max() + sx.min()) / 2, size / 2 - scale * (sy.max() + sy.min()) / 2])

    def to_px(p):  # (..., 3) -> (..., 2)
        return np.stack([p @ right, -(p @ up)], axis=-1) * scale + off

    floor = np.array([[0, 0, 0], [res, 0, 0], [res, res, 0], [0, res, 0]], dtype=np.float64)
    draw.polygon([tuple(q) for q in to_px(floor)], fill=(238, 238, 238), outline=(200, 200, 200))
    padded = np.pad(occ, 1)
    faces, depth, shade = [], [], []
    for n in _NORMALS:
        if n @ v <= 0:
            continue
        nb = np.roll(padded, shift=tuple(-n.astype(int)), axis=(0, 1, 2))[1:-1, 1:-1, 1:-1]
        idx = np.argwhere(occ & ~nb).astype(np.float64)  # voxels whose face towards n is exposed
        if len(idx) == 0:
            continue
        quads = idx[:, None, :] + _face_corners(n)[None]  # (F, 4, 3)
        faces.append(quads)
        depth.append(quads.mean(axis=1) @ v)
        shade.append(np.full(len(idx), 0.45 + 0.55 * max(0.0, float(n @ _LIGHT))))
    if faces:
        quads, depth, shade = np.concatenate(faces), np.concatenate(depth), np.concatenate(shade)
        order = np.argsort(depth)
        px = to_px(quads[order]).tolist()  # (F, 4, 2) pixel corners, far to near
        col = np.asarray(color, dtype=np.float64)[None] * shade[order, None]  # (F, 3)
        fills = np.clip(col, 0, 255).astype(int).tolist()
        edges = np.clip(col * 0.8, 0, 255).astype(int).tolist()
        for quad, fill, edge in zip(px, fills, edges):
            draw.polygon([tuple(p) for p in quad], fill=tuple(fill), outline=tuple(edge))
    return img


def front_depth_image(occ, size: int = 256):
    """The condition's view: front depth (near = dark, background white), image x right and z up; PIL 'L'."""
    occ = np.asarray(occ, dtype=bool)
    res = occ.shape[0]
    hit = occ.any(axis=1)  # (x, z)
    first = np.argmax(occ, axis=1)
    g = np.where(hit, 40 + 170 * first / max(res - 1, 1), 255).astype(np.uint8)
    return Image.fromarray(g.T[::-1]).resize((size, size), Image.NEAREST)


def panel(occ, size: int = 192, color=NEUTRAL_COLOR):
    """Front-left render | back-right render, side by side (PIL RGB, 2·size x size)."""
    out = Image.new("RGB", (2 * size, size), (255, 255, 255))
    out.paste(render_iso(occ, size, FRONT_VIEW, color), (0, 0))
    out.paste(render_iso(occ, size, BACK_VIEW, color), (size, 0))
    return out


def fold_angle(deg: float) -> float:
    """DSO's total rotation angle (2·arccos(w), in [0°, 360°]) as the rotation it is, in [0°, 180°]."""
    a = float(deg) % 360.0
    return min(a, 360.0 - a)


def angle_caption(deg: float, stable: bool) -> str:
    """``"12° stable"``; a DSO angle past 180° shows beside the folded one, since DSO's verdict reads it."""
    folded = fold_angle(deg)
    raw = f" (DSO {float(deg):.0f}°)" if abs(folded - float(deg)) >= 0.5 else ""
    return f"{folded:.0f}°{raw} {'stable' if stable else 'unstable'}"


PANEL_NOTE = (
    "left: the condition, the conditioning object's front depth image (what the model sees; near = dark); "
    "each object: front-left view | back-right view (where the parts the condition cannot see are)"
)


def _bare(ax) -> None:
    """No axis; no ticks either (matplotlib would still lay out the hidden ticks for each title, most of a figure's
    drawing time)."""
    ax.set(xticks=[], yticks=[])
    ax.axis("off")


def save_rows(path, rows, *, title: str, size: int = 160, legend: str = "simulated", note: str = PANEL_NOTE) -> str:
    """A PNG figure (matplotlib): one row per condition, its conditioning view first, then its objects.

    ``rows``: ``[(cond_occ (R, R, R), cond_caption, [(occ (R, R, R), caption, stable or None), ...]), ...]``;
    objects are drawn green when stable, red when not, blue-grey when ``stable`` is None. ``legend`` names
    where the verdict comes from (``"simulated"``, ``"static check"``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ncols = 1 + max(len(cells) for _, _, cells in rows)
    views = 1 + 2 * (ncols - 1)  # rendered views across a row
    inch = 1.6 * size / 160
    fig = plt.figure(figsize=(views * inch, len(rows) * inch * 1.2 + 1.0))
    top = 1.0 - 0.9 / (len(rows) * inch * 1.2 + 1.0)
    grid = fig.add_gridspec(len(rows), ncols, width_ratios=[1] + [2] * (ncols - 1), top=top, bottom=0.02, hspace=0.3)
    grid.update(left=0.01, right=0.99, wspace=0.04)
    for r, (cond_occ, cond_caption, cells) in enumerate(rows):
        ax = fig.add_subplot(grid[r, 0])
        ax.imshow(front_depth_image(cond_occ, size), cmap="gray", vmin=0, vmax=255)
        ax.set_title(cond_caption, fontsize=8)
        _bare(ax)
        for c, (occ, caption, stable) in enumerate(cells, start=1):
            color = NEUTRAL_COLOR if stable is None else (STABLE_COLOR if stable else UNSTABLE_COLOR)
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(panel(occ, size, color))
            ax.set_title(caption, fontsize=8)
            _bare(ax)
    fig.suptitle(title, fontsize=10, y=0.995, va="top")
    handles = [
        Patch(color=np.asarray(STABLE_COLOR) / 255, label=f"stable ({legend})"),
        Patch(color=np.asarray(UNSTABLE_COLOR) / 255, label=f"unstable ({legend})"),
    ]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8, frameon=False)
    if note:
        fig.text(0.5, -0.035 * 6 / max(len(rows), 1), note, ha="center", va="top", fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return str(path)
