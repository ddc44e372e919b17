"""Gaussian-decoder output -> 3D Gaussian parameters, and the standard 3DGS ``.ply`` export (TRELLIS's semantics).

TRELLIS's ``SLatGaussianDecoder.to_representation`` + ``representations/gaussian/gaussian_model.Gaussian``
(``trellis.md`` §4.6): the decoder's ``out_layer`` gives 448 channels per active 64³ voxel = 32 Gaussians ×
(xyz offset 3, SH DC colour 3, scaling 3, rotation 4, opacity 1), laid out as blocks of 96, 96, 96, 128, 32.
Each block is scaled by its ``lr`` entry, then:

- centre = ``(coord + 0.5)/res + tanh(offset + perturbation)/res · 0.5 · voxel_size`` − 0.5 (the aabb shift),
  with ``perturbation = atanh((hammersley·2 − 1)/voxel_size)``, one fixed point of the Hammersley set per slot;
- scale = ``sqrt(softplus(s + softplus⁻¹(scaling_bias))² + 3d_filter_kernel_size²)``;
- rotation = normalised ``q + (1, 0, 0, 0)`` (w, x, y, z);
- opacity = ``sigmoid(o + logit(opacity_bias))``; the DC colour is taken as is.

``save_ply`` writes what TRELLIS's ``Gaussian.save_ply`` writes: x y z nx ny nz f_dc_0..2 opacity scale_0..2
rot_0..3 as little-endian float32, with the inverse activations (logit opacity, log scale) and TRELLIS's default
transform (native z-up to y-up: positions ``T @ p``, rotations ``T @ R``, T = [[1,0,0],[0,0,−1],[0,1,0]]).
Host-side numpy, float32 like TRELLIS.
"""

from __future__ import annotations

import os

import numpy as np
from scipy.special import expit

from dso_jax.convert.trellis_slat import RELEASED_SLAT_GS_DECODER_ARGS

# representation_config of the released slat_dec_gs_swin8_B_64l8gs32_fp16 (+ the decoder's grid resolution).
RELEASED_GS_CONFIG = {
    "resolution": RELEASED_SLAT_GS_DECODER_ARGS["resolution"],
    **RELEASED_SLAT_GS_DECODER_ARGS["representation_config"],
}


def decoder_config(module) -> dict:
    """The read-out config of a ``SLatGaussianDecoder`` module: its ``representation_config`` + grid resolution."""
    rep = module.representation_config
    return {"resolution": int(module.resolution), **{k: dict(v) if hasattr(v, "items") else v for k, v in rep.items()}}


AABB = np.array([-0.5, -0.5, -0.5, 1.0, 1.0, 1.0], np.float32)  # TRELLIS's Gaussian aabb: origin, size
PLY_TRANSFORM = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], np.float64)  # Gaussian.save_ply's default
PLY_FIELDS = ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity")
PLY_FIELDS += ("scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")
# Per-Gaussian channel blocks of the decoder output, in layout order (name, width).
_LAYOUT = (("_xyz", 3), ("_features_dc", 3), ("_scaling", 3), ("_rotation", 4), ("_opacity", 1))


def _radical_inverse(base: int, n: int) -> float:
    val, scale = 0.0, 1.0 / base
    while n > 0:
        val += (n % base) * scale
        n //= base
        scale /= base
    return val


def offset_perturbation(num_gaussians: int, voxel_size: float) -> np.ndarray:
    """(G, 3) float32 ``atanh((h·2 − 1)/voxel_size)`` for the 3-D Hammersley points h_i = (i/G, φ2(i), φ3(i)).

    The released checkpoint stores this as the decoder's ``offset_perturbation`` buffer (fp32).
    """
    h = [[i / num_gaussians, _radical_inverse(2, i), _radical_inverse(3, i)] for i in range(num_gaussians)]
    return np.arctanh((np.asarray(h, np.float32) * 2 - 1) / np.float32(voxel_size)).astype(np.float32)


def _softplus(x):
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20)))).astype(np.float32)  # torch's threshold 20


def _logit(p):
    return np.log(p / (1 - p)).astype(np.float32)


def gaussians_from_decoder(coords, feats=None, config: dict | None = None, perturbation=None) -> list[dict]:
    """Gaussians per object from the decoder's output: its ``SparseBatch`` (``gaussians_from_decoder(raw, config=...)``,
    one entry per object of the batch) or TRELLIS's ``SparseTensor`` layout.

    ``coords`` (M, 4) int rows [batch, x, y, z] on the ``config['resolution']`` grid, ``feats`` (M, 14·G) with G
    = ``config['num_gaussians']`` (448 for the released decoder). ``config`` defaults to
    :data:`RELEASED_GS_CONFIG`; ``perturbation`` (G, 3) to :func:`offset_perturbation` (pass the checkpoint's
    buffer to use it). Returns, per batch index 0..max, a dict of float32 arrays over its N = M_b·G Gaussians:
    ``xyz`` (N, 3) centres in TRELLIS's z-up frame, ``features_dc`` (N, 3) SH DC coefficients, ``scaling`` (N, 3),
    ``rotation`` (N, 4) unit quaternions (w, x, y, z), ``opacity`` (N,) in (0, 1).
    """
    from dso_jax.sparse.batch import SparseBatch, to_trellis

    cfg = RELEASED_GS_CONFIG if config is None else config
    g, res, lr = int(cfg["num_gaussians"]), int(cfg["resolution"]), cfg["lr"]
    n_obj = None
    if isinstance(coords, SparseBatch):
        if feats is not None:
            raise TypeError("gaussians_from_decoder(raw: SparseBatch) takes no separate feats")
        if coords.resolution != res:
            raise ValueError(f"the decoder output is at resolution {coords.resolution}, config['resolution'] is {res}")
        n_obj = coords.batch_size
        coords, feats = to_trellis(coords)
    elif feats is None:
        raise TypeError("gaussians_from_decoder: pass a SparseBatch, or coords (M, 4) and feats (M, 14 G)")
    coords, feats = np.asarray(coords), np.asarray(feats, np.float32)
    width = g * sum(w for _, w in _LAYOUT)
    if coords.ndim != 2 or coords.shape[1] != 4:
        raise ValueError(f"coords must be (M, 4) int rows [batch, x, y, z], got shape {coords.shape}")
    if feats.shape != (len(coords), width):
        raise ValueError(
            f"feats must be (M, {width}) for {g} Gaussians per voxel and coords {coords.shape}, got {feats.shape}"
        )
    if coords.size and (coords.min() < 0 or coords[:, 1:].max() >= res):
        raise ValueError(f"coords must be >= 0 with x, y, z < {res}, got range [{coords.min()}, {coords.max()}]")
    pert = offset_perturbation(g, cfg["voxel_size"]) if perturbation is None else np.asarray(perturbation, np.float32)
    if pert.shape != (g, 3):
        raise ValueError(f"perturbation must be ({g}, 3), got shape {pert.shape}")
    if cfg["scaling_activation"] == "softplus":
        act, inv_act = _softplus, lambda x: x + np.log(-np.expm1(-x))
    elif cfg["scaling_activation"] == "exp":
        act, inv_act = np.exp, np.log
    else:
        raise ValueError(f"scaling_activation must be 'softplus' or 'exp', got {cfg['scaling_activation']!r}")
    scale_bias = inv_act(np.float32(cfg["scaling_bias"])).astype(np.float32)
    opacity_bias = _logit(np.float32(cfg["opacity_bias"]))
    min_kernel = np.float32(cfg["3d_filter_kernel_size"])

    n_obj = (int(coords[:, 0].max()) + 1 if len(coords) else 0) if n_obj is None else n_obj
    out = []
    for b in range(n_obj):
        rows = coords[:, 0] == b
        f, start, raw = feats[rows], 0, {}
        for name, w in _LAYOUT:
            raw[name] = f[:, start : start + g * w].reshape(-1, g, w) * np.float32(lr[name])  # (M_b, G, w)
            start += g * w
        offset = raw["_xyz"] + pert if cfg["perturb_offset"] else raw["_xyz"]
        offset = np.tanh(offset) / np.float32(res) * np.float32(0.5) * np.float32(cfg["voxel_size"])
        centre = (coords[rows, 1:].astype(np.float32) + np.float32(0.5)) / np.float32(res)  # (M_b, 3)
        xyz = (centre[:, None, :] + offset).reshape(-1, 3) * AABB[3:] + AABB[:3]
        scaling = np.sqrt(np.square(act(raw["_scaling"].reshape(-1, 3) + scale_bias)) + min_kernel**2)
        q = raw["_rotation"].reshape(-1, 4) + np.array([1, 0, 0, 0], np.float32)
        rotation = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), np.float32(1e-12))
        opacity = expit(raw["_opacity"].reshape(-1) + opacity_bias)
        out.append(
            dict(
                xyz=xyz.astype(np.float32),
                features_dc=raw["_features_dc"].reshape(-1, 3),
                scaling=scaling.astype(np.float32),
                rotation=rotation.astype(np.float32),
                opacity=opacity.astype(np.float32),
            )
        )
    return out


def quaternion_to_matrix(q: np.ndarray) -> np.ndarray:
    """(N, 4) quaternions (w, x, y, z), normalised here -> (N, 3, 3) rotation matrices."""
    w, x, y, z = (q / np.linalg.norm(q, axis=-1, keepdims=True)).T
    return np.stack(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    ).transpose(2, 0, 1)


def matrix_to_quaternion(m: np.ndarray) -> np.ndarray:
    """(N, 3, 3) rotations -> (N, 4) unit quaternions (w, x, y, z) whose largest-magnitude component is positive.

    Component magnitudes come from the diagonal; the other signs from the off-diagonal sums/differences
    relative to the largest one (as utils3d's ``matrix_to_quaternion``, which TRELLIS's ``save_ply`` uses).
    """
    d = np.stack([m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]], -1)
    mag = 0.5 * np.sqrt(np.clip(1 + d @ np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]).T, 0, None))
    big = np.argmax(mag, axis=-1)
    xw, yw, zw = np.sign(m[:, 2, 1] - m[:, 1, 2]), np.sign(m[:, 0, 2] - m[:, 2, 0]), np.sign(m[:, 1, 0] - m[:, 0, 1])
    yz, xz, xy = np.sign(m[:, 2, 1] + m[:, 1, 2]), np.sign(m[:, 0, 2] + m[:, 2, 0]), np.sign(m[:, 0, 1] + m[:, 1, 0])
    one = np.ones_like(xw)
    signs = np.stack(
        [np.stack(s, -1) for s in ([one, xw, yw, zw], [xw, one, xy, xz], [yw, xy, one, yz], [zw, xz, yz, one])], 1
    )  # (N, 4 choices of the largest component, 4)
    q = signs[np.arange(len(m)), big] * mag
    return q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)


def ply_rows(gaussians: dict, transform=PLY_TRANSFORM) -> np.ndarray:
    """(N, 17) float32 rows in :data:`PLY_FIELDS` order, as TRELLIS's ``save_ply`` stores them."""
    xyz = np.asarray(gaussians["xyz"], np.float64)
    rot = np.asarray(gaussians["rotation"], np.float64)
    if transform is not None:
        t = np.asarray(transform, np.float64)
        xyz = xyz @ t.T
        rot = matrix_to_quaternion(t @ quaternion_to_matrix(rot))
    opacity = _logit(np.asarray(gaussians["opacity"], np.float32))[:, None]
    scale = np.log(np.asarray(gaussians["scaling"], np.float32))
    cols = [xyz, np.zeros_like(xyz), gaussians["features_dc"], opacity, scale, rot]
    return np.concatenate([np.asarray(c, np.float32) for c in cols], axis=1)


def save_ply(path: str, gaussians: dict, transform=PLY_TRANSFORM) -> str:
    """Write one object's Gaussians (a dict from :func:`gaussians_from_decoder`) as a binary 3DGS ``.ply``.

    ``transform=None`` keeps TRELLIS's native z-up frame. Written atomically (a partial file never has the name).
    """
    rows = ply_rows(gaussians, transform)
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(rows)}"]
    header += [f"property float {name}" for name in PLY_FIELDS] + ["end_header\n"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write("\n".join(header).encode("ascii"))
        f.write(rows.astype("<f4").tobytes())
    os.replace(tmp, path)
    return path
