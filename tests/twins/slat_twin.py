"""PyTorch twin of TRELLIS's sparse stack and SLat flow model, written from ``trellis.md`` §4 and the semantics
of ``trellis/modules/sparse`` and ``trellis/models/structured_latent_flow.py``, in plain torch.

Test-only; it does not import TRELLIS (spconv and flash-attn are unavailable here). Data live in
TRELLIS's layout: ``SparseTensor(feats (M, C), coords (M, 4) [batch, x, y, z])``, rows grouped by
batch. Independent oracles, not the port's algorithms:

* submanifold conv: scatter each object into a dense grid (its bounding box), ``F.conv3d`` with
  spconv's (O, kx, ky, kz, I) weight permuted to (O, I, kx, ky, kz), read at the active sites (spconv's
  own test of SubMConv3d; ``SparseConv3d.impl = "dense"``). The default ``"gather"`` computes the same
  sum at a cost linear in the voxels: neighbours read from a dense index grid, one gather and matmul per
  offset with fp32 accumulation (tested against the dense oracle; the GPU bench uses it too);
* downsample: TRELLIS's packed code, ``unique`` and ``torch.scatter_reduce(zeros, 0, idx, feats,
  reduce='mean')`` (default include_self: a parent of n children gets sum / (n + 1));
* attention: one ``F.scaled_dot_product_attention`` call per object (and per window for swin): the
  transformer block is the stage-1 twin's block run on each object's tokens.

State-dict names, order and (with ``use_fp16``) dtypes are those of a released checkpoint.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from twins import trellis_twin as tw

# ----------------------------------------------------------------------------------------------------
# SparseTensor: feats + coords + per-batch layout + a shared cache (the down/up pairing)
# ----------------------------------------------------------------------------------------------------


class SparseTensor:
    def __init__(self, feats, coords, layout=None, cache=None, scale=(1, 1, 1)):
        self.feats, self.coords = feats, coords
        if layout is None:
            counts = torch.bincount(coords[:, 0].long())
            ends = torch.cumsum(counts, 0).tolist()
            layout = [slice(e - n, e) for e, n in zip(ends, counts.tolist())]
        self.layout, self.cache, self.scale = layout, ({} if cache is None else cache), tuple(scale)

    @property
    def shape(self):
        return (len(self.layout), *self.feats.shape[1:])

    @property
    def dtype(self):
        return self.feats.dtype

    def replace(self, feats, coords=None):
        layout = self.layout if coords is None else None
        return SparseTensor(feats, self.coords if coords is None else coords, layout, self.cache, self.scale)

    def counts(self):
        return torch.tensor([s.stop - s.start for s in self.layout], device=self.feats.device)

    def _other(self, other):
        if isinstance(other, SparseTensor):
            return other.feats
        if isinstance(other, torch.Tensor) and other.ndim >= 1 and other.shape[0] == len(self.layout):
            return torch.repeat_interleave(other, self.counts(), dim=0)  # (B, C) broadcast per object
        return other

    def __add__(self, o):
        return self.replace(self.feats + self._other(o))

    __radd__ = __add__

    def __sub__(self, o):
        return self.replace(self.feats - self._other(o))

    def __rsub__(self, o):
        return self.replace(self._other(o) - self.feats)

    def __mul__(self, o):
        return self.replace(self.feats * self._other(o))

    __rmul__ = __mul__

    def __neg__(self):
        return self.replace(-self.feats)


def from_numpy(coords, feats, device="cpu") -> SparseTensor:
    return SparseTensor(torch.as_tensor(feats, device=device), torch.as_tensor(coords, device=device).int())


# ----------------------------------------------------------------------------------------------------
# Linear, conv, resampling, norms
# ----------------------------------------------------------------------------------------------------


class SparseLinear(nn.Linear):
    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(super().forward(x.feats))


class SubMConv3d(nn.Module):
    """spconv's parameters: weight (O, k, k, k, I) (KRSC), bias (O,)."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cout, k, k, k, cin))
        self.bias = nn.Parameter(torch.zeros(cout))


def _dense_submconv(x: SparseTensor, w, b) -> torch.Tensor:
    k = w.shape[1]
    out = []
    for sl in x.layout:
        xyz = x.coords[sl, 1:].long()
        lo = xyz.min(0).values
        p = xyz - lo
        size = (p.max(0).values + 1).tolist()
        grid = torch.zeros(1, x.feats.shape[1], *size, dtype=x.feats.dtype, device=x.feats.device)
        grid[0, :, p[:, 0], p[:, 1], p[:, 2]] = x.feats[sl].t()
        y = F.conv3d(grid, w.permute(0, 4, 1, 2, 3), b, padding=k // 2)
        out.append(y[0, :, p[:, 0], p[:, 1], p[:, 2]].t())
    return torch.cat(out, 0)


def neighbour_rows(coords, k: int) -> torch.Tensor:
    """(M, k³) row of ``p + delta`` (kx, ky, kz order) in the same object, M if inactive: a dense index grid."""
    r = k // 2
    b, xyz = coords[:, 0].long(), coords[:, 1:].long() + r
    size = [int(b.max()) + 1] + (xyz.max(0).values + r + 1).tolist()
    grid = torch.full(size, len(coords), dtype=torch.long, device=coords.device)
    grid[b, xyz[:, 0], xyz[:, 1], xyz[:, 2]] = torch.arange(len(coords), device=coords.device)
    axis = torch.arange(-r, r + 1, device=coords.device)
    offs = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    q = xyz[:, None, :] + offs[None]  # (M, k³, 3)
    return grid[b[:, None], q[..., 0], q[..., 1], q[..., 2]]


def _gather_submconv(x: SparseTensor, w, b) -> torch.Tensor:
    k, cout, cin = w.shape[1], w.shape[0], w.shape[-1]
    key = ("neighbours", k, x.scale)
    if key not in x.cache or x.cache[key][0] is not x.coords:
        x.cache[key] = (x.coords, neighbour_rows(x.coords, k))
    nbr = x.cache[key][1]
    fpad = torch.cat([x.feats, torch.zeros_like(x.feats[:1])], 0)
    wk = w.reshape(cout, k**3, cin)
    if nbr.numel() * cin <= 1 << 24:  # small: one gather of every neighbourhood
        acc = torch.einsum("mki,oki->mo", fpad[nbr].float(), wk.float())
    else:  # large (Cin 2048 at full size): one offset at a time
        acc = torch.zeros(len(x.feats), cout, device=x.feats.device)
        for o in range(k**3):
            acc += (fpad[nbr[:, o]] @ wk[:, o].t()).float()
    return (acc + b.float()).to(x.feats.dtype)


class SparseConv3d(nn.Module):
    """TRELLIS's wrapper (stride 1, no padding: spconv SubMConv3d); parameters under ``conv``."""

    impl = "gather"  # or "dense": F.conv3d on each object's bounding box (the oracle; cost grows with the box)

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.conv = SubMConv3d(cin, cout, k)

    def forward(self, x: SparseTensor) -> SparseTensor:
        fn = _dense_submconv if self.impl == "dense" else _gather_submconv
        return x.replace(fn(x, self.conv.weight, self.conv.bias))


class SparseDownsample(nn.Module):
    """Coords // 2; parents unique and sorted by the packed (batch, x, y, z) code; mean counting the zero buffer."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        c = x.coords.long()
        b, xyz = c[:, 0], c[:, 1:] // 2
        mx = (xyz.max(0).values + 1).tolist()
        code = ((b * mx[0] + xyz[:, 0]) * mx[1] + xyz[:, 1]) * mx[2] + xyz[:, 2]
        code, idx = code.unique(return_inverse=True)
        zeros = torch.zeros(len(code), x.feats.shape[1], dtype=x.feats.dtype, device=x.feats.device)
        feats = torch.scatter_reduce(zeros, 0, idx[:, None].expand(-1, x.feats.shape[1]), x.feats, reduce="mean")
        coords = torch.stack(
            [code // (mx[0] * mx[1] * mx[2]), (code // (mx[1] * mx[2])) % mx[0], (code // mx[2]) % mx[1], code % mx[2]],
            -1,
        ).int()
        scale = tuple(s // 2 for s in x.scale)
        out = SparseTensor(feats, coords, cache=x.cache, scale=scale)
        x.cache[("upsample", scale)] = (x.coords, x.layout, idx)
        return out


class SparseUpsample(nn.Module):
    """Nearest: the cached children of the paired downsample take their parent's features."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        coords, layout, idx = x.cache[("upsample", x.scale)]
        return SparseTensor(x.feats[idx], coords, layout, x.cache, tuple(s * 2 for s in x.scale))


def subdivide(x: SparseTensor) -> SparseTensor:
    """Each voxel -> its 8 children (2 coords + nonzero(ones(2, 2, 2)) order), features copied."""
    kids = torch.nonzero(torch.ones(2, 2, 2, dtype=torch.int, device=x.coords.device)).int()
    c = x.coords.clone()
    c[:, 1:] *= 2
    c = (c[:, None, :] + torch.cat([torch.zeros_like(kids[:, :1]), kids], 1)[None]).flatten(0, 1)
    return SparseTensor(x.feats.repeat_interleave(8, 0), c, cache=x.cache)


class SparseGroupNorm32(nn.GroupNorm):
    """nn.GroupNorm on each object's (1, C, N_k) features, in float32."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        out = torch.zeros_like(x.feats)
        for sl in x.layout:
            f = x.feats[sl].float().t()[None]
            out[sl] = super().forward(f)[0].t().to(x.dtype)
        return x.replace(out)


def window_ids(coords, window: int, shift: int) -> torch.Tensor:
    """(M,) TRELLIS's ``calc_window_partition`` id: the window of (coords + shift) // window, with the batch index."""
    c = coords.long().clone()
    c[:, 1:] += shift
    nwin = [math.ceil((m + 1) / window) for m in c[:, 1:].max(0).values.tolist()]
    offset = [nwin[0] * nwin[1] * nwin[2], nwin[1] * nwin[2], nwin[2], 1]
    c[:, 1:] //= window
    return (c * torch.tensor(offset, device=c.device)).sum(1)


def windowed_self_attention(q, k, v, coords, window: int, shift: int):
    """Swin attention of TRELLIS's windowed_attn: q, k, v (M, H, D); windows of (coords + shift) // window."""
    wid = window_ids(coords, window, shift)
    out = torch.empty_like(q)
    for w in wid.unique():
        rows = (wid == w).nonzero()[:, 0]
        out[rows] = sdpa_rows(q[rows], k[rows], v[rows])
    return out


def window_buckets(coords, window: int, shift: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The windows of :func:`window_ids` as padded groups for :func:`bucketed_window_attention`: per group of
    windows whose sizes round up to the same power of two L, (rows (W, L) long, M at padding; valid (W, L) bool)."""
    m = len(coords)
    wid = window_ids(coords, window, shift)
    order = torch.argsort(wid, stable=True)
    _, sizes = torch.unique_consecutive(wid[order], return_counts=True)  # (W,) rows per window, in id order
    starts = torch.cumsum(sizes, 0) - sizes
    length = 2 ** torch.ceil(torch.log2(sizes.double())).long()
    out = []
    for size in torch.unique(length).tolist():
        sel = (length == size).nonzero()[:, 0]
        slot = torch.arange(size, device=coords.device)
        valid = slot[None] < sizes[sel, None]
        rows = order[(starts[sel, None] + slot[None]).clamp(max=m - 1)]
        out.append((torch.where(valid, rows, m), valid))
    return out


def bucketed_window_attention(q, k, v, buckets):
    """:func:`windowed_self_attention` in one ``F.scaled_dot_product_attention`` call per bucket of
    :func:`window_buckets` (keys masked to the window's rows; at most 2x padding), like TRELLIS's one varlen
    flash-attention call per block rather than a call per window: the twin's fast path for the GPU bench."""
    out = torch.zeros_like(q)
    pad = lambda x: torch.cat([x, torch.zeros_like(x[:1])], 0)  # noqa: E731  (row M: the padding row)
    qp, kp, vp = pad(q), pad(k), pad(v)
    for rows, valid in buckets:
        qs, ks, vs = (x[rows].transpose(1, 2) for x in (qp, kp, vp))  # (W, H, L, D)
        h = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=valid[:, None, None, :]).transpose(1, 2)
        out[rows[valid]] = h[valid]
    return out


def sdpa_rows(q, k, v):
    """One sequence: (L, H, D) -> (L, H, D)."""
    return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)).transpose(0, 1)


# ----------------------------------------------------------------------------------------------------
# SLat flow model
# ----------------------------------------------------------------------------------------------------


class SparseResBlock3d(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels=None, downsample=False, upsample=False):
        super().__init__()
        cout = out_channels or channels
        self.norm1 = tw.LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm2 = tw.LayerNorm32(cout, elementwise_affine=False, eps=1e-6)
        self.conv1 = SparseConv3d(channels, cout, 3)
        self.conv2 = SparseConv3d(cout, cout, 3)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * cout))
        self.skip_connection = SparseLinear(channels, cout) if channels != cout else nn.Identity()
        self.updown = SparseDownsample() if downsample else SparseUpsample() if upsample else None

    def forward(self, x: SparseTensor, emb) -> SparseTensor:
        scale, shift = self.emb_layers(emb).type(x.dtype).chunk(2, dim=1)  # scale first
        if self.updown is not None:
            x = self.updown(x)
        h = self.conv1(x.replace(F.silu(self.norm1(x.feats))))
        h = h.replace(self.norm2(h.feats)) * (1 + scale) + shift
        h = self.conv2(h.replace(F.silu(h.feats)))
        return h + self.skip_connection(x)


class ModulatedSparseTransformerCrossBlock(tw.ModulatedTransformerCrossBlock):
    """The stage-1 block run object by object on its tokens (full attention within each object)."""

    def forward(self, x: SparseTensor, mod, context) -> SparseTensor:
        dense = super().forward
        outs = [dense(x.feats[sl][None], mod[i : i + 1], context[i : i + 1])[0] for i, sl in enumerate(x.layout)]
        return x.replace(torch.cat(outs, 0))


class SLatFlowModel(nn.Module):
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
        num_io_res_blocks: int = 2,
        io_block_channels: Optional[Sequence[int]] = None,
        pe_mode: str = "ape",
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        use_skip_connection: bool = True,
        share_mod: bool = False,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
    ):
        super().__init__()
        if pe_mode != "ape" or (share_mod and io_block_channels):
            raise NotImplementedError("twin covers what TRELLIS can run: 'ape', no share_mod with io blocks")
        c, io = model_channels, list(io_block_channels or [])
        heads = num_heads or c // num_head_channels
        self.model_channels, self.skip, self.share_mod = c, use_skip_connection, share_mod
        self.t_embedder = tw.TimestepEmbedder(c)
        if share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.input_layer = SparseLinear(in_channels, io[0] if io else c)
        self.input_blocks = nn.ModuleList()
        for ch, nxt in zip(io, io[1:] + [c]):
            self.input_blocks.extend(SparseResBlock3d(ch, c, ch) for _ in range(num_io_res_blocks - 1))
            self.input_blocks.append(SparseResBlock3d(ch, c, nxt, downsample=True))
        self.blocks = nn.ModuleList(
            ModulatedSparseTransformerCrossBlock(
                c, cond_channels, heads, mlp_ratio, qk_rms_norm, qk_rms_norm_cross, share_mod
            )
            for _ in range(num_blocks)
        )
        self.out_blocks = nn.ModuleList()
        for ch, prev in zip(reversed(io), [c] + list(reversed(io[1:]))):
            self.out_blocks.append(SparseResBlock3d(prev * 2 if self.skip else prev, c, ch, upsample=True))
            self.out_blocks.extend(
                SparseResBlock3d(ch * 2 if self.skip else ch, c, ch) for _ in range(num_io_res_blocks - 1)
            )
        self.out_layer = SparseLinear(io[0] if io else c, out_channels)
        self.dtype = torch.float32
        if use_fp16:
            self.to_fp16()

    def _cast(self, dtype):
        for root in (self.input_blocks, self.blocks, self.out_blocks):
            for m in root.modules():
                if isinstance(m, (nn.Linear, SubMConv3d)):
                    for p in m.parameters(recurse=False):
                        p.data = p.data.to(dtype)
        self.dtype = dtype
        return self

    def to_fp16(self):
        """Released layout: Linear / sparse-conv parameters of the torso fp16, torso computed in fp16."""
        return self._cast(torch.float16)

    def to_fp32(self):
        return self._cast(torch.float32)

    def forward(self, x: SparseTensor, t, cond) -> SparseTensor:
        h = self.input_layer(x)
        h = h.replace(h.feats.to(self.dtype))
        t_emb = self.t_embedder(t)
        if self.share_mod:
            t_emb = self.adaLN_modulation(t_emb)
        t_emb, cond = t_emb.to(self.dtype), cond.to(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, t_emb)
            skips.append(h.feats)
        h = h + tw.ape(h.coords[:, 1:], self.model_channels).to(h.feats.device, self.dtype)
        for block in self.blocks:
            h = block(h, t_emb, cond)
        for block, skip in zip(self.out_blocks, reversed(skips)):
            h = block(h.replace(torch.cat([h.feats, skip], 1)) if self.skip else h, t_emb)
        h = h.replace(F.layer_norm(h.feats, h.feats.shape[-1:]))  # no affine, eps 1e-5
        return self.out_layer(h.replace(h.feats.to(x.dtype)))


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial random values for every parameter (the stage-1 twin's rule; conv fan-in = k³ I)."""
    return tw.randomize_(module, seed)


def sample_slat(model, noise: SparseTensor, cond, neg_cond, normalization, **params) -> SparseTensor:
    """TRELLIS's ``sample_slat`` after the noise: the guidance-interval Euler sampler, then slat * std + mean."""
    x, _ = tw.FlowEulerGuidanceIntervalSampler(sigma_min=1e-5).sample(model, noise, cond, neg_cond, **params)
    std = torch.tensor(normalization["std"], dtype=x.dtype, device=x.feats.device)[None]
    mean = torch.tensor(normalization["mean"], dtype=x.dtype, device=x.feats.device)[None]
    return x * std + mean
