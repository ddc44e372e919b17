"""PyTorch twin of TRELLIS's Gaussian decoder read-out and ``Gaussian.save_ply``, written from ``trellis.md`` §4.6
and TRELLIS's ``decoder_gs.to_representation`` / ``gaussian_model.Gaussian`` semantics (test-only).

The PLY rotation is derived another way than :mod:`dso_jax.gaussians` (a Hamilton product with the transform's
quaternion instead of a round trip through matrices), so the two check each other.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def hammersley_perturbation(num_gaussians: int, voxel_size: float) -> torch.Tensor:
    def radical_inverse(base, n):
        digits = []
        while n:
            n, d = divmod(n, base)
            digits.append(d)
        return sum(d / base ** (k + 1) for k, d in enumerate(digits))

    pts = [[i / num_gaussians, radical_inverse(2, i), radical_inverse(3, i)] for i in range(num_gaussians)]
    return torch.atanh((torch.tensor(pts).float() * 2 - 1) / voxel_size)


def to_gaussians(coords: np.ndarray, feats: np.ndarray, cfg: dict) -> list[dict]:
    """Per batch index: activated xyz, features_dc, scaling, rotation (w, x, y, z), opacity as numpy arrays."""
    g, res, lr = cfg["num_gaussians"], cfg["resolution"], cfg["lr"]
    coords, feats = torch.from_numpy(np.asarray(coords)), torch.from_numpy(np.asarray(feats, np.float32))
    pert = hammersley_perturbation(g, cfg["voxel_size"])
    if cfg["scaling_activation"] == "softplus":
        act, inv = F.softplus, lambda x: x + torch.log(-torch.expm1(-x))
    else:
        act, inv = torch.exp, torch.log
    scale_bias = inv(torch.tensor(cfg["scaling_bias"]))
    opacity_bias = torch.logit(torch.tensor(cfg["opacity_bias"]))
    out = []
    for b in range(int(coords[:, 0].max()) + 1):
        sel = coords[:, 0] == b
        f = feats[sel]
        off, dc, sc, rot, op = torch.split(f, [3 * g, 3 * g, 3 * g, 4 * g, g], dim=1)
        off = off.reshape(-1, g, 3) * lr["_xyz"]
        if cfg["perturb_offset"]:
            off = off + pert
        off = torch.tanh(off) / res * 0.5 * cfg["voxel_size"]
        xyz = ((coords[sel, 1:].float() + 0.5) / res)[:, None] + off
        sc = sc.reshape(-1, 3) * lr["_scaling"]
        scaling = torch.sqrt(act(sc + scale_bias) ** 2 + cfg["3d_filter_kernel_size"] ** 2)
        q = rot.reshape(-1, 4) * lr["_rotation"] + torch.tensor([1.0, 0, 0, 0])
        out.append(
            dict(
                xyz=(xyz.reshape(-1, 3) - 0.5).numpy(),
                features_dc=(dc.reshape(-1, 3) * lr["_features_dc"]).numpy(),
                scaling=scaling.numpy(),
                rotation=F.normalize(q, dim=1).numpy(),
                opacity=torch.sigmoid(op.reshape(-1) * lr["_opacity"] + opacity_bias).numpy(),
            )
        )
    return out


def _hamilton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        -1,
    )


def ply_rows_default_transform(g: dict) -> np.ndarray:
    """Rows (N, 17) of TRELLIS's ``save_ply`` with its default transform T = R_x(+90°) = [[1,0,0],[0,0,−1],[0,1,0]]."""
    xyz = torch.from_numpy(g["xyz"]).double()
    xyz = torch.stack([xyz[:, 0], -xyz[:, 2], xyz[:, 1]], -1)  # T @ p
    q_t = torch.tensor([math.cos(math.pi / 4), math.sin(math.pi / 4), 0.0, 0.0], dtype=torch.float64)
    q = _hamilton(q_t.expand(len(xyz), 4), F.normalize(torch.from_numpy(g["rotation"]).double(), dim=1))
    big = q.abs().argmax(1, keepdim=True)
    q = q * torch.sign(torch.gather(q, 1, big))  # utils3d's convention: the largest component positive
    p = torch.from_numpy(g["opacity"])[:, None]
    cols = [xyz, torch.zeros_like(xyz), torch.from_numpy(g["features_dc"]), torch.log(p / (1 - p))]
    cols += [torch.log(torch.from_numpy(g["scaling"])), q]
    return torch.cat([c.float() for c in cols], 1).numpy()
