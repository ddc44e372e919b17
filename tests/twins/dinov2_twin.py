"""PyTorch twin of the DINOv2 ViT with registers, written from the public architecture (test-only).

Attribute names reproduce the released state-dict keys (``blocks.{i}.attn.qkv.weight``, ``ls1.gamma``,
``register_tokens``, ...). ``forward`` returns the ``forward_features`` dict used by TRELLIS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TwinAttention(nn.Module):
    def __init__(self, dim, heads, qkv_bias, proj_bias):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, N, hd) each
        att = torch.softmax((q @ k.transpose(-1, -2)) * (d // self.heads) ** -0.5, dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, d))


class TwinMlp(nn.Module):
    def __init__(self, dim, hidden, bias):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class TwinLayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class TwinBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.attn = TwinAttention(d, cfg.num_heads, cfg.qkv_bias, cfg.proj_bias)
        self.ls1 = TwinLayerScale(d) if cfg.layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlp = TwinMlp(d, int(d * cfg.mlp_ratio), cfg.ffn_bias)
        self.ls2 = TwinLayerScale(d) if cfg.layerscale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class TwinPatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=p, stride=p)

    def forward(self, x):  # (B, 3, H, W) -> (B, h*w, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoV2Twin(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, g = cfg.embed_dim, cfg.img_size // cfg.patch_size
        self.patch_embed = TwinPatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, g * g + 1, d))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, cfg.num_register_tokens, d)) if cfg.num_register_tokens else None
        )
        self.blocks = nn.ModuleList([TwinBlock(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, d))

    def pos_for(self, rows, cols):
        stored = self.pos_embed.shape[1] - 1
        m = int(round(stored**0.5))
        if (rows, cols) == (m, m):
            return self.pos_embed
        grid = self.pos_embed[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)  # (1, D, M, M)
        off = self.cfg.interpolate_offset
        kw = dict(scale_factor=((rows + off) / m, (cols + off) / m)) if off else dict(size=(rows, cols))
        grid = F.interpolate(grid, mode="bicubic", antialias=self.cfg.interpolate_antialias, **kw)
        assert grid.shape[-2:] == (rows, cols)
        grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([self.pos_embed[:, :1], grid], dim=1)

    def forward(self, x):  # (B, 3, H, W) normalised
        b, _, h, w = x.shape
        p = self.cfg.patch_size
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(b, -1, -1), t], dim=1)
        t = t + self.pos_for(h // p, w // p)
        if self.register_tokens is not None:
            t = torch.cat([t[:, :1], self.register_tokens.expand(b, -1, -1), t[:, 1:]], dim=1)
        for blk in self.blocks:
            t = blk(t)
        n = self.norm(t)
        r = self.cfg.num_register_tokens
        return {
            "x_prenorm": t,
            "x_norm_clstoken": n[:, 0],
            "x_norm_regtokens": n[:, 1 : r + 1],
            "x_norm_patchtokens": n[:, r + 1 :],
        }


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter with random values of a plausible scale (LayerScale/norm around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "norm1.weight", "norm2.weight", "norm.weight")):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2 and "token" not in name and "pos_embed" not in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * fan_in**-0.5)
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def state_dict_numpy(model: nn.Module) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
