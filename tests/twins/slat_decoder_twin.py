"""PyTorch twin of TRELLIS's SLat decoders (mesh and Gaussian), written from ``trellis.md`` §4.6 and the semantics
of ``trellis/models/structured_latent_vae/{base,decoder_mesh,decoder_gs}.py`` and ``trellis/modules/sparse``, in
plain torch (test-only; no spconv, flash-attn or kaolin).

Built on :mod:`twins.slat_twin`'s independent oracles: submanifold convs by gathers from a dense index grid (or
``F.conv3d`` on each object's bounding box), swin attention as one ``F.scaled_dot_product_attention`` call per
window (TRELLIS's ``calc_window_partition``: window id of ``(coords + shift) // window`` with the batch index),
full attention per object, per-object ``nn.GroupNorm``. ``forward`` returns the ``out_layer`` features as a
``SparseTensor`` (the mesh decoder's on the subdivided voxels, in TRELLIS's subdivide order); the representations
(FlexiCubes, Gaussians) are not part of the twin. State-dict names, order and (``use_fp16``) dtypes are a
released checkpoint's.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from twins import gaussian_twin
from twins import slat_twin as st
from twins import trellis_twin as tw


class SparseSiLU(nn.Module):
    def forward(self, x: st.SparseTensor) -> st.SparseTensor:
        return x.replace(F.silu(x.feats))


class SparseMultiHeadAttention(nn.Module):
    """Self-attention: fused to_qkv (out channel s C + h D + d), optional q/k RMS norm, swin or full, to_out."""

    # swin: "loop" (one SDPA call per window, the oracle) or "bucketed" (one call per power-of-two bucket of window
    # sizes, the bucket tables cached per coords like the conv's neighbours: the GPU bench's fast path)
    window_impl = "loop"

    def __init__(self, channels, num_heads, attn_mode="swin", window_size=8, shift_window=0, qk_rms_norm=False):
        super().__init__()
        self.heads, self.attn_mode, self.window, self.shift = num_heads, attn_mode, window_size, shift_window
        self.qk_rms_norm = qk_rms_norm
        self.to_qkv = nn.Linear(channels, 3 * channels)
        if qk_rms_norm:
            self.q_rms_norm = tw.MultiHeadRMSNorm(channels // num_heads, num_heads)
            self.k_rms_norm = tw.MultiHeadRMSNorm(channels // num_heads, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: st.SparseTensor) -> st.SparseTensor:
        m = x.feats.shape[0]
        q, k, v = self.to_qkv(x.feats).reshape(m, 3, self.heads, -1).unbind(1)  # (M, H, D) each
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        if self.attn_mode == "swin" and self.window_impl == "bucketed":
            key = ("windows", self.window, self.shift)
            if key not in x.cache or x.cache[key][0] is not x.coords:
                x.cache[key] = (x.coords, st.window_buckets(x.coords, self.window, self.shift))
            h = st.bucketed_window_attention(q, k, v, x.cache[key][1])
        elif self.attn_mode == "swin":
            h = st.windowed_self_attention(q, k, v, x.coords, self.window, self.shift)
        else:
            h = torch.cat([st.sdpa_rows(q[sl], k[sl], v[sl]) for sl in x.layout], 0)
        return x.replace(self.to_out(h.reshape(m, -1)))


class SparseTransformerBlock(nn.Module):
    def __init__(self, channels, num_heads, mlp_ratio=4.0, attn_mode="swin", window_size=8, shift=0, qk_rms_norm=False):
        super().__init__()
        self.norm1 = tw.LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = tw.LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.attn = SparseMultiHeadAttention(channels, num_heads, attn_mode, window_size, shift, qk_rms_norm)
        self.mlp = tw.FeedForwardNet(channels, mlp_ratio)

    def forward(self, x: st.SparseTensor) -> st.SparseTensor:
        x = x + self.attn(x.replace(self.norm1(x.feats)))
        return x + x.replace(self.mlp(self.norm2(x.feats)))


class SparseTransformerBase(nn.Module):
    """input_layer + APE at the voxel coords (float32), cast to the torso dtype, the blocks (shift w/2 on odd ones)."""

    def __init__(
        self,
        resolution: int,
        model_channels: int,
        latent_channels: int,
        num_blocks: int,
        num_heads: Optional[int] = None,
        num_head_channels: int = 64,
        mlp_ratio: float = 4,
        attn_mode: str = "swin",
        window_size: int = 8,
        pe_mode: str = "ape",
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        qk_rms_norm: bool = False,
        representation_config: Optional[dict] = None,
    ):
        super().__init__()
        if attn_mode not in ("swin", "full") or pe_mode != "ape":
            raise NotImplementedError("twin covers attn_mode swin/full with pe_mode ape")
        heads = num_heads or model_channels // num_head_channels
        self.model_channels, self.rep_config, self.resolution = model_channels, representation_config, resolution
        self.input_layer = st.SparseLinear(latent_channels, model_channels)
        self.blocks = nn.ModuleList(
            SparseTransformerBlock(
                model_channels, heads, mlp_ratio, attn_mode, window_size, window_size // 2 * (i % 2), qk_rms_norm
            )
            for i in range(num_blocks)
        )
        self.dtype = torch.float32

    def trunk(self, x: st.SparseTensor) -> st.SparseTensor:
        h = self.input_layer(x)
        h = h + tw.ape(x.coords[:, 1:], self.model_channels).to(h.feats.device)
        h = h.replace(h.feats.to(self.dtype))
        for block in self.blocks:
            h = block(h)
        return h

    def _torso(self):
        return [self.blocks]

    def to_fp16(self):
        """Released layout: the torso's Linear / sparse-conv parameters fp16 (norms fp32), torso computed in fp16."""
        tw._cast_torso(self._torso(), torch.float16, (nn.Linear, st.SubMConv3d))
        self.dtype = torch.float16
        return self

    def to_fp32(self):
        tw._cast_torso(self._torso(), torch.float32, (nn.Linear, st.SubMConv3d))
        self.dtype = torch.float32
        return self


class SparseSubdivideBlock3d(nn.Module):
    def __init__(self, channels: int, out_channels: int, num_groups: int = 32):
        super().__init__()
        self.act_layers = nn.Sequential(st.SparseGroupNorm32(num_groups, channels), SparseSiLU())
        self.out_layers = nn.Sequential(
            st.SparseConv3d(channels, out_channels, 3),
            st.SparseGroupNorm32(num_groups, out_channels),
            SparseSiLU(),
            st.SparseConv3d(out_channels, out_channels, 3),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else st.SparseConv3d(channels, out_channels, 1)

    def forward(self, x: st.SparseTensor) -> st.SparseTensor:
        h = st.subdivide(self.act_layers(x))
        x = st.subdivide(x)
        return self.out_layers(h) + self.skip_connection(x)


class SLatMeshDecoder(SparseTransformerBase):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.model_channels
        out = 53 + (48 if (self.rep_config or {}).get("use_color", False) else 0)
        self.upsample = nn.ModuleList([SparseSubdivideBlock3d(c, c // 4), SparseSubdivideBlock3d(c // 4, c // 8)])
        self.out_layer = st.SparseLinear(c // 8, out)
        if kwargs.get("use_fp16"):
            self.to_fp16()

    def _torso(self):
        return [self.blocks, self.upsample]

    def forward(self, x: st.SparseTensor) -> st.SparseTensor:
        h = self.trunk(x)
        for block in self.upsample:
            h = block(h)
        return self.out_layer(h.replace(h.feats.to(x.dtype)))


class SLatGaussianDecoder(SparseTransformerBase):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.rep_config
        self.register_buffer(
            "offset_perturbation", gaussian_twin.hammersley_perturbation(cfg["num_gaussians"], cfg["voxel_size"])
        )
        self.out_layer = st.SparseLinear(self.model_channels, 14 * cfg["num_gaussians"])
        if kwargs.get("use_fp16"):
            self.to_fp16()

    def forward(self, x: st.SparseTensor) -> st.SparseTensor:
        h = self.trunk(x)
        h = h.replace(F.layer_norm(h.feats.to(x.dtype), h.feats.shape[-1:]))  # no affine, eps 1e-5
        return self.out_layer(h)


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial random values for every parameter (buffers untouched)."""
    return tw.randomize_(module, seed)
