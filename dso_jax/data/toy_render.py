"""PIL renders of voxel occupancies for before/after figures (no matplotlib).

`render_iso` draws the exposed voxel faces as shaded polygons, far to near (painter's algorithm), seen from an
orthographic camera in direction `view` (from the object towards the camera, frame x, y, z with +z up and the
condition's camera at -y). The default views: FRONT_VIEW (front-left-above, roughly what the condition sees)
and BACK_VIEW (back-right-above, where the hidden parts are). `panel` puts both views next to the front depth
image; `grid` tiles panels with captions.
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
        col = np.asarray(color, dtype=np.float64)
        for q in np.argsort(depth):
            fill = tuple(int(c) for c in np.clip(col * shade[q], 0, 255))
            edge = tuple(int(c) for c in np.clip(col * shade[q] * 0.8, 0, 255))
            draw.polygon([tuple(p) for p in to_px(quads[q])], fill=fill, outline=edge)
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
    """Front depth | front-left render | back-right render, side by side (PIL RGB, 3·size x size)."""
    out = Image.new("RGB", (3 * size, size), (255, 255, 255))
    out.paste(front_depth_image(occ, size).convert("RGB"), (0, 0))
    out.paste(render_iso(occ, size, FRONT_VIEW, color), (size, 0))
    out.paste(render_iso(occ, size, BACK_VIEW, color), (2 * size, 0))
    return out


def grid(images, captions=None, ncols: int = 2, pad: int = 6, caption_h: int = 16):
    """Tile PIL images (all the same size) with an optional caption above each; PIL RGB."""
    w, h = images[0].size
    nrows = -(-len(images) // ncols)
    ch = caption_h if captions else 0
    out = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + ch + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        x, y = pad + c * (w + pad), pad + r * (h + ch + pad)
        if captions:
            draw.text((x + 2, y + 2), str(captions[i]), fill=(0, 0, 0))
        out.paste(im, (x, y + ch))
    return out


def save_objects(path, occs, captions=None, stable=None, size: int = 160, ncols: int = 2):
    """PNG of one panel per object, coloured by `stable` (green/red) when given."""
    ims = []
    for i, o in enumerate(occs):
        col = NEUTRAL_COLOR if stable is None else (STABLE_COLOR if stable[i] else UNSTABLE_COLOR)
        ims.append(panel(o, size, col))
    grid(ims, captions, ncols).save(path)
