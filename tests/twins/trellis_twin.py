"""PyTorch twins of TRELLIS's stage-1 modules and sampler, written from ``trellis.md`` §2, §3 and §5.

Test-only (torch is not a runtime dependency). Attribute names follow the reference state-dict
names, so ``twin.state_dict()`` has the keys of a released checkpoint and loads one strictly.
Attention uses ``F.scaled_dot_product_attention`` (TRELLIS's ``sdpa`` backend). ``use_fp16`` casts
the Linear/Conv parameters of the torso to float16 and runs the torso in float16, as the
original; :meth:`to_fp32` undoes both (the weights and the compute dtype).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# Flow model pieces (§2)
# ----------------------------------------------------------------------------------------------------


def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """§2.3: w_j = exp(-ln(max_period) j / half); [cos(t w), sin(t w)], cosine first, float32."""
    half = dim // 2
    w = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angle = t.float()[:, None] * w[None, :]
    out = torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)
    if dim % 2:
        out = F.pad(out, (0, 1))
    return out


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):  # (B,) -> (B, hidden)
        return self.mlp(sinusoid(t, self.freq_dim))


def ape(coords: torch.Tensor, channels: int) -> torch.Tensor:
    """§2.4: per axis [sin(x v), cos(x v)] with v_j = 10000^(-j / f), f = channels // axes // 2; zero pad."""
    n, axes = coords.shape
    f = channels // axes // 2
    nu = 1.0 / (10000.0 ** (torch.arange(f, dtype=torch.float32, device=coords.device) / f))
    ang = coords.reshape(-1).float()[:, None] * nu[None, :]  # (N * axes, f)
    emb = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1).reshape(n, axes * 2 * f)
    return F.pad(emb, (0, channels - emb.shape[1]))


def grid(res: int) -> torch.Tensor:
    """(res^3, 3) integer coordinates, row n = (x, y, z) with n = res^2 x + res y + z."""
    axes = torch.meshgrid(torch.arange(res), torch.arange(res), torch.arange(res), indexing="ij")
    return torch.stack(axes, dim=-1).reshape(-1, 3)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm over the last axis computed in float32, result cast back to the input dtype."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class MultiHeadRMSNorm(nn.Module):
    """§2.6: x / max(||x||, 1e-12) * gamma * sqrt(dim), in float32; gamma (heads, dim)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.dim = dim
        self.gamma = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x):  # (B, L, H, D)
        y = F.normalize(x.float(), dim=-1) * self.gamma * math.sqrt(self.dim)
        return y.to(x.dtype)


def sdpa(q, k, v):
    """(B, L, H, D) layout in and out; scale 1/sqrt(D), no mask."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class MultiHeadAttention(nn.Module):
    """§2.6: self (fused to_qkv) or cross (to_q, fused to_kv), optional per-head q/k RMS norm, to_out."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        ctx_channels: Optional[int] = None,
        type: str = "self",
        qkv_bias: bool = True,
        qk_rms_norm: bool = False,
    ):
        super().__init__()
        self.heads, self.kind = num_heads, type
        head_dim = channels // num_heads
        if type == "self":
            self.to_qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        else:
            self.to_q = nn.Linear(channels, channels, bias=qkv_bias)
            self.to_kv = nn.Linear(ctx_channels or channels, 2 * channels, bias=qkv_bias)
        self.qk_rms_norm = qk_rms_norm
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(head_dim, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x, context=None):
        b, n, c = x.shape
        if self.kind == "self":
            q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, -1).unbind(2)  # channel s*C + h*D + d
        else:
            q = self.to_q(x).view(b, n, self.heads, -1)
            k, v = self.to_kv(context).view(b, context.shape[1], 2, self.heads, -1).unbind(2)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        return self.to_out(sdpa(q, k, v).reshape(b, n, c))


class FeedForwardNet(nn.Module):
    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x):
        return self.mlp(x)


class ModulatedTransformerCrossBlock(nn.Module):
    """§2.5: adaLN-modulated self-attention (gated), plain cross-attention after affine norm2, modulated MLP (gated)."""

    def __init__(
        self,
        channels: int,
        ctx_channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
        share_mod: bool = False,
    ):
        super().__init__()
        self.share_mod = share_mod
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = MultiHeadAttention(channels, num_heads, type="self", qk_rms_norm=qk_rms_norm)
        self.cross_attn = MultiHeadAttention(
            channels, num_heads, ctx_channels, type="cross", qk_rms_norm=qk_rms_norm_cross
        )
        self.mlp = FeedForwardNet(channels, mlp_ratio)
        if not share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))

    def forward(self, x, mod, context):  # x (B, L, C), mod (B, C) or (B, 6C) when shared
        if not self.share_mod:
            mod = self.adaLN_modulation(mod)
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None, :] for m in mod.chunk(6, dim=1))
        x = x + gate1 * self.self_attn(self.norm1(x) * (1 + scale1) + shift1)
        x = x + self.cross_attn(self.norm2(x), context)
        return x + gate2 * self.mlp(self.norm3(x) * (1 + scale2) + shift2)


def patchify(x, p: int):
    """(B, C, D, H, W) -> (B, C p^3, D/p, H/p, W/p), channel c p^3 + i p^2 + j p + k."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // p, p, h // p, p, w // p, p).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * p**3, d // p, h // p, w // p)


def unpatchify(x, p: int):
    b, cp, d, h, w = x.shape
    x = x.reshape(b, cp // p**3, p, p, p, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, cp // p**3, d * p, h * p, w * p)


def _cast_torso(modules: Sequence[nn.Module], dtype, kinds) -> None:
    for root in modules:
        for m in root.modules():
            if isinstance(m, kinds):
                for prm in m.parameters(recurse=False):
                    prm.data = prm.data.to(dtype)


class SparseStructureFlowModel(nn.Module):
    """§2: the stage-1 flow DiT ('ape' only: TRELLIS's dense-rope path is not part of the release)."""

    def __init__(
        self,
        resolution: int,
        in_channels: int,
        model_channels: int,
        cond_channels: int,
        out_channels: int,
        num_blocks: int,
        num_heads: Optional[int] = None,
        num_head_channels: int = 64,
        mlp_ratio: float = 4,
        patch_size: int = 2,
        pe_mode: str = "ape",
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        share_mod: bool = False,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
    ):
        super().__init__()
        if pe_mode != "ape":
            raise NotImplementedError("twin covers pe_mode='ape' only")
        self.resolution, self.patch_size, self.share_mod = resolution, patch_size, share_mod
        self.out_channels = out_channels
        heads = num_heads or model_channels // num_head_channels
        self.t_embedder = TimestepEmbedder(model_channels)
        if share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 6 * model_channels))
        self.register_buffer("pos_emb", ape(grid(resolution // patch_size), model_channels))
        self.input_layer = nn.Linear(in_channels * patch_size**3, model_channels)
        self.blocks = nn.ModuleList(
            [
                ModulatedTransformerCrossBlock(
                    model_channels, cond_channels, heads, mlp_ratio, qk_rms_norm, qk_rms_norm_cross, share_mod
                )
                for _ in range(num_blocks)
            ]
        )
        self.out_layer = nn.Linear(model_channels, out_channels * patch_size**3)
        self.dtype = torch.float32
        if use_fp16:
            self.to_fp16()

    def to_fp16(self):
        """Released layout (§2.7): Linear weights/biases inside `blocks` fp16; blocks compute in fp16."""
        _cast_torso([self.blocks], torch.float16, (nn.Linear,))
        self.dtype = torch.float16
        return self

    def to_fp32(self):
        _cast_torso([self.blocks], torch.float32, (nn.Linear,))
        self.dtype = torch.float32
        return self

    def forward(self, x, t, cond):  # x (B, C, R, R, R), t (B,) in [0, 1000], cond (B, S, Cc)
        b, r = x.shape[0], self.resolution // self.patch_size
        h = patchify(x, self.patch_size).reshape(b, -1, r**3).transpose(1, 2)  # (B, L, C p^3)
        h = self.input_layer(h) + self.pos_emb[None]
        mod = self.t_embedder(t)
        if self.share_mod:
            mod = self.adaLN_modulation(mod)
        h, mod, cond = h.to(self.dtype), mod.to(self.dtype), cond.to(self.dtype)
        for block in self.blocks:
            h = block(h, mod, cond)
        h = F.layer_norm(h.to(x.dtype), h.shape[-1:])  # no affine, eps 1e-5
        h = self.out_layer(h).transpose(1, 2).reshape(b, -1, r, r, r)
        return unpatchify(h, self.patch_size)


# ----------------------------------------------------------------------------------------------------
# Decoder (§3)
# ----------------------------------------------------------------------------------------------------


class ChannelLayerNorm32(LayerNorm32):
    """LayerNorm over the channel axis (dim 1) of (B, C, D, H, W), in float32."""

    def forward(self, x):
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class GroupNorm32(nn.GroupNorm):
    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


def make_norm(norm_type: str, channels: int) -> nn.Module:
    return ChannelLayerNorm32(channels, eps=1e-5) if norm_type == "layer" else GroupNorm32(32, channels, eps=1e-5)


class ResBlock3d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = make_norm("layer", channels)
        self.norm2 = make_norm("layer", channels)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.conv2(F.silu(self.norm2(h))) + x


def pixel_shuffle_3d(x, s: int):
    """out[c, s h + i, s w + j, s d + k] = in[c s^3 + i s^2 + j s + k, h, w, d]."""
    b, c, h, w, d = x.shape
    x = x.reshape(b, c // s**3, s, s, s, h, w, d).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // s**3, h * s, w * s, d * s)


class UpsampleBlock3d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, 8 * out_channels, 3, padding=1)

    def forward(self, x):
        return pixel_shuffle_3d(self.conv(x), 2)


class SparseStructureDecoder(nn.Module):
    """§3.2: input conv (fp32), middle ResBlocks, ResBlocks + upsamplers (torso, fp16 when asked), norm-SiLU-conv out."""

    def __init__(
        self,
        out_channels: int,
        latent_channels: int,
        num_res_blocks: int,
        channels: Sequence[int],
        num_res_blocks_middle: int = 2,
        norm_type: str = "layer",
        use_fp16: bool = False,
    ):
        super().__init__()
        ch = list(channels)
        self.input_layer = nn.Conv3d(latent_channels, ch[0], 3, padding=1)
        self.middle_block = nn.Sequential(*[ResBlock3d(ch[0]) for _ in range(num_res_blocks_middle)])
        blocks = []
        for i, c in enumerate(ch):
            blocks += [ResBlock3d(c) for _ in range(num_res_blocks)]
            if i + 1 < len(ch):
                blocks.append(UpsampleBlock3d(c, ch[i + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.out_layer = nn.Sequential(
            make_norm(norm_type, ch[-1]), nn.SiLU(), nn.Conv3d(ch[-1], out_channels, 3, padding=1)
        )
        self.dtype = torch.float32
        if use_fp16:
            self.to_fp16()

    def to_fp16(self):
        _cast_torso([self.middle_block, self.blocks], torch.float16, (nn.Conv3d,))
        self.dtype = torch.float16
        return self

    def to_fp32(self):
        _cast_torso([self.middle_block, self.blocks], torch.float32, (nn.Conv3d,))
        self.dtype = torch.float32
        return self

    def forward(self, z):  # (B, Cl, R, R, R) -> (B, Co, 4R, 4R, 4R)
        h = self.input_layer(z).to(self.dtype)
        h = self.middle_block(h)
        for block in self.blocks:
            h = block(h)
        return self.out_layer(h.to(z.dtype))


# ----------------------------------------------------------------------------------------------------
# Sampler (§5)
# ----------------------------------------------------------------------------------------------------


class FlowEulerGuidanceIntervalSampler:
    """Euler over t_i = r s_i / (1 + (r - 1) s_i), s = linspace(1, 0, N + 1) (float64); CFG on lo <= t_i <= hi."""

    def __init__(self, sigma_min: float):
        self.sigma_min = sigma_min

    def velocity(self, model, x, t: float, cond, neg_cond, cfg_strength: float, cfg_interval):
        def call(c):
            tt = torch.full((x.shape[0],), 1000 * t, dtype=torch.float32, device=c.device)
            if c.shape[0] == 1 and x.shape[0] > 1:
                c = c.expand(x.shape[0], *c.shape[1:])
            return model(x, tt, c)

        if cfg_interval[0] <= t <= cfg_interval[1]:
            return (1 + cfg_strength) * call(cond) - cfg_strength * call(neg_cond)
        return call(cond)

    @torch.no_grad()
    def sample(
        self,
        model,
        noise,
        cond,
        neg_cond,
        steps: int = 50,
        rescale_t: float = 1.0,
        cfg_strength: float = 3.0,
        cfg_interval=(0.0, 1.0),
    ):
        """Returns (samples, [x0 prediction per step])."""
        s = np.linspace(1.0, 0.0, steps + 1)
        ts = rescale_t * s / (1 + (rescale_t - 1) * s)
        x, x0s = noise, []
        for t, t_next in zip(ts[:-1], ts[1:]):
            v = self.velocity(model, x, float(t), cond, neg_cond, cfg_strength, cfg_interval)
            x0s.append((1 - self.sigma_min) * x - (self.sigma_min + (1 - self.sigma_min) * float(t)) * v)
            x = x - float(t - t_next) * v
        return x, x0s


# ----------------------------------------------------------------------------------------------------
# Test utilities: random weights, and module-by-module conversion by torch module type
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial random values for every parameter (weights ~ 1/sqrt(fan_in), norms ~ 1 +- 0.1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        r = torch.randn(p.shape, generator=g)
        if leaf == "weight" and p.ndim >= 2:
            p.copy_(r / math.sqrt(p[0].numel()))
        elif leaf == "bias":
            p.copy_(0.1 * r)
        else:
            p.copy_(1.0 + 0.1 * r)
    return module


def module_kind(m: nn.Module) -> Optional[str]:
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.Conv3d):
        return "conv3d"
    if isinstance(m, nn.LayerNorm):
        return "layernorm"
    if isinstance(m, nn.GroupNorm):
        return "groupnorm"
    if isinstance(m, MultiHeadRMSNorm):
        return "rmsnorm"
    return None


def flax_params_of(module: nn.Module) -> dict:
    """Nested float32 Flax params of a twin, using the module's type to pick each rule (an independent
    path from the key tables of ``dso_jax.convert.trellis``)."""
    from dso_jax.convert import rules

    flat = {}
    for path, m in module.named_modules():
        kind = module_kind(m)
        for leaf, p in m.named_parameters(recurse=False):
            assert kind is not None, f"no rule for {type(m).__name__} at {path!r}"
            key = f"{path}.{leaf}" if path else leaf
            w = p.detach().float().numpy()
            flat[rules.flax_key(key, kind)] = rules.leaf_rule(kind, key).to_flax(w)
    return rules.unflatten(flat)
