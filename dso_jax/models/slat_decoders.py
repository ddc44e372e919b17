"""TRELLIS's SLat decoders (stage 2): the mesh and the Gaussian decoder, in Flax, on a padded :class:`SparseBatch`.

``SLatMeshDecoder(**json_args)`` / ``SLatGaussianDecoder(**json_args)`` accept every argument of a released
``ckpts/slat_dec_{mesh,gs}_*.json`` (also under the training names ``ElasticSLat*``: same parameters and
forward). ``model.apply(variables, x)``: x a ``SparseBatch`` of (B, N, latent_channels) denormalised SLat feats
at ``resolution``³ built by :func:`decoder_input` -> a ``SparseBatch`` of the float32 ``out_layer`` features
(padding rows 0): the mesh decoder's 101 channels (``use_color``; 53 without) on the 4x-finer voxels (its
last level: 8 children per voxel, twice), the Gaussian decoder's 14·G channels (448) on the input voxels.

Forward (``trellis/models/structured_latent_vae/{base,decoder_mesh,decoder_gs}.py``, ``trellis.md`` §4.6):

* trunk (``SparseTransformerBase``): SparseLinear in (float32) + APE of the voxel coords (768 channels: 128
  frequencies per axis, no padding), cast to the compute dtype, ``num_blocks`` ``SparseTransformerBlock``s:
  LN (no affine, eps 1e-6) -> self-attention -> residual -> LN -> MLP (GELU tanh) -> residual. ``attn_mode``
  "swin": attention within 8³ windows of ``(coords + shift) // 8``, shift ``window_size // 2`` on odd blocks;
  "full": within each object;
* mesh: two ``SparseSubdivideBlock3d`` (C -> C/4 at 2x, C/4 -> C/8 at 4x): per-object GroupNorm32 (32 groups,
  eps 1e-5) -> SiLU -> subdivide -> conv 3³ -> GroupNorm32 -> SiLU -> conv 3³, plus the subdivided input
  through a 1³ conv; cast to float32, ``out_layer`` (no final norm);
* Gaussians: cast to float32, LayerNorm (no affine, eps 1e-5), ``out_layer``.

Dtype policy as TRELLIS's ``use_fp16``: the torso (blocks, subdivide blocks) computes in ``dtype`` (bf16 on
GPU) with float32 norms; ``input_layer``, the APE and ``out_layer`` in float32; parameters float32.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from dso_jax.models.attention import FusedProjection, dot_product_attention, resolve_attention_impl
from dso_jax.models.layers import (
    FeedForwardNet,
    LayerNorm32,
    MultiHeadRMSNorm,
    layer_norm_no_affine,
    voxel_position_embedding,
)
from dso_jax.sparse import SparseConv3d, SparseGroupNorm32, subdivide, tables, window_partition, windowed_attention
from dso_jax.sparse.batch import TOKEN_QUANTUM, SparseBatch, SparseLevel, from_trellis

Dtype = Any
SERIALIZED_MODES = ("shift_window", "shift_sequence", "shift_order")  # TRELLIS's vox2seq CUDA modes
GROUPS = 32  # SparseSubdivideBlock3d's GroupNorm32 groups (fixed in TRELLIS)


def block_shifts(attn_mode: str, num_blocks: int, window_size: int) -> tuple[int, ...]:
    """The swin shift of each block (TRELLIS's ``block_attn_config``): 0 on even blocks, window // 2 on odd."""
    if attn_mode != "swin":
        return ()
    return tuple(window_size // 2 * (i % 2) for i in range(num_blocks))


def decoder_input(
    coords,
    feats,
    *,
    resolution: int = 64,
    window_size: int = 8,
    shifts: Sequence[int] = (0, 4),
    subdivisions: int = 0,
    quantum: int = TOKEN_QUANTUM,
) -> SparseBatch:
    """Host side: TRELLIS's layout (coords (M, 4) [batch, x, y, z], feats (M, C)) -> a decoder's input batch.

    ``levels[0]`` is ``sparse.from_trellis``'s level (token bucket N, a multiple of ``quantum``) with the swin
    partitions of ``shifts``; ``levels[k]`` (k = 1..``subdivisions``) are its subdivisions: 8^k N rows at
    ``resolution`` · 2^k, each voxel's children in TRELLIS's ``SparseSubdivide`` order, with their 3³ neighbour
    tables (derived from the coarser table, ``tables.subdivide_neighbours``). Built once per object; the mesh
    decoder needs ``subdivisions=2``, the Gaussian decoder 0 (it ignores extra levels). Pass a module's
    :attr:`input_kwargs` for the rest.
    """
    x = from_trellis(coords, feats, resolution=resolution, quantum=quantum)
    top = x.levels[0]
    parts = tuple(window_partition(top.coords, top.mask, window_size, s) for s in sorted(set(shifts)))
    levels = [top.replace(windows=parts)]
    for _ in range(subdivisions):
        fine = levels[-1]
        c, m = tables.subdivide_coords(fine.coords, fine.mask)
        nbrs = tables.subdivide_neighbours(fine.neighbours)
        levels.append(SparseLevel(coords=c, mask=m, neighbours=nbrs, resolution=2 * fine.resolution))
    return SparseBatch(feats=x.feats, levels=tuple(levels))


def _partition(level: SparseLevel, shift: int):
    for part in level.windows:
        if part.shift == shift:
            return part
    have = sorted(p.shift for p in level.windows)
    raise ValueError(
        f"swin block needs the window partition of shift {shift}; x has shifts {have}: build x with "
        "slat_decoders.decoder_input(coords, feats, **module.input_kwargs)"
    )


class SparseSelfAttention(nn.Module):
    """TRELLIS's ``SparseMultiHeadAttention(type="self")``: fused ``to_qkv``, optional q/k RMS norm, windowed
    (swin) or per-object (full) attention, ``to_out``."""

    channels: int
    num_heads: int
    attn_mode: str = "swin"
    shift_window: int = 0
    qk_rms_norm: bool = False
    dtype: Dtype = jnp.float32
    attn_impl: str = "xla"

    @nn.compact
    def __call__(self, x, level: SparseLevel):  # (B, N, C) -> (B, N, C)
        b, n, c = x.shape
        heads, head_dim = self.num_heads, self.channels // self.num_heads
        q, k, v = FusedProjection(self.channels, 3, True, self.dtype, name="to_qkv")(x)
        q, k, v = (y.reshape(b, n, heads, head_dim) for y in (q, k, v))
        if self.qk_rms_norm:
            q = MultiHeadRMSNorm(head_dim, heads, name="q_rms_norm")(q)
            k = MultiHeadRMSNorm(head_dim, heads, name="k_rms_norm")(k)
        if self.attn_mode == "swin":
            impl = resolve_attention_impl(self.attn_impl, q.dtype)
            h = windowed_attention(q, k, v, _partition(level, self.shift_window), implementation=impl)
        else:
            h = dot_product_attention(q, k, v, self.attn_impl, level.lengths)
        return nn.Dense(self.channels, dtype=self.dtype, name="to_out")(h.reshape(b, n, c))


class SparseTransformerBlock(nn.Module):
    """TRELLIS's ``SparseTransformerBlock`` (no adaLN, no cross-attention; LNs without parameters)."""

    channels: int
    num_heads: int
    mlp_ratio: float = 4.0
    attn_mode: str = "swin"
    shift_window: int = 0
    qk_rms_norm: bool = False
    dtype: Dtype = jnp.float32
    attn_impl: str = "xla"

    @nn.compact
    def __call__(self, x, level: SparseLevel):  # (B, N, C) in the compute dtype
        attn = SparseSelfAttention(
            self.channels,
            self.num_heads,
            self.attn_mode,
            self.shift_window,
            self.qk_rms_norm,
            self.dtype,
            self.attn_impl,
            name="attn",
        )
        x = x + attn(LayerNorm32(1e-6, name="norm1")(x), level)
        return x + FeedForwardNet(self.channels, self.mlp_ratio, self.dtype, name="mlp")(
            LayerNorm32(1e-6, name="norm2")(x)
        )


class SparseSubdivideBlock3d(nn.Module):
    """TRELLIS's ``SparseSubdivideBlock3d``: GroupNorm32 -> SiLU -> subdivide -> conv -> GroupNorm32 -> SiLU ->
    conv, plus the subdivided input (through a 1³ conv when the channels change)."""

    channels: int
    out_channels: Optional[int] = None
    num_groups: int = GROUPS
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, coarse: SparseLevel, fine: SparseLevel):
        """x (B, N, C) on ``coarse`` -> (B, 8 N, Cout) on ``fine`` (its subdivision)."""
        cout = self.out_channels or self.channels
        h = nn.silu(SparseGroupNorm32(self.num_groups, name="act_layers_0")(x, coarse.mask))
        h = SparseConv3d(cout, 3, self.dtype, name="out_layers_0")(subdivide(h), fine.neighbours)
        h = nn.silu(SparseGroupNorm32(self.num_groups, name="out_layers_1")(h, fine.mask))
        h = SparseConv3d(cout, 3, self.dtype, name="out_layers_3")(h, fine.neighbours)
        if cout != self.channels:  # a 1³ conv is per row: applied before the subdivide, 8x cheaper, same values
            x = SparseConv3d(cout, 1, self.dtype, name="skip_connection")(x)
        return h + subdivide(x).astype(h.dtype)


class _SLatDecoder(nn.Module):
    """``SparseTransformerBase`` (the shared trunk) and the json args both decoders take."""

    resolution: int
    model_channels: int
    latent_channels: int
    num_blocks: int
    num_heads: Optional[int] = None
    num_head_channels: Optional[int] = 64
    mlp_ratio: float = 4
    attn_mode: str = "swin"
    window_size: int = 8
    pe_mode: str = "ape"
    use_fp16: bool = False  # the original's flag, kept for config round trips; compute dtype is `dtype`
    use_checkpoint: bool = False  # rematerialise each transformer block in the backward pass
    qk_rms_norm: bool = False
    representation_config: Optional[Mapping] = None
    dtype: Dtype = jnp.float32
    attn_impl: str = "xla"  # swin: XLA with a same-window mask; 'cudnn' / 'auto' to try cuDNN's masked kernel

    subdivisions = 0  # levels of 2x subdivision after the trunk (class constant)

    @property
    def heads(self) -> int:
        return self.num_heads or self.model_channels // self.num_head_channels

    @property
    def input_kwargs(self) -> dict:
        """:func:`decoder_input` keyword arguments for this model's input batch."""
        shifts = block_shifts(self.attn_mode, self.num_blocks, self.window_size)
        return dict(
            resolution=self.resolution,
            window_size=self.window_size,
            shifts=tuple(sorted(set(shifts))),
            subdivisions=self.subdivisions,
        )

    def _check(self, x: SparseBatch):
        name = type(self).__name__
        if self.attn_mode in SERIALIZED_MODES:
            raise NotImplementedError(f"{name}: attn_mode {self.attn_mode!r} needs TRELLIS's vox2seq CUDA extension")
        if self.attn_mode not in ("swin", "full"):
            raise ValueError(f"{name}: attn_mode must be 'swin' or 'full', got {self.attn_mode!r}")
        if (
            self.pe_mode == "rope"
        ):  # SparseMultiHeadAttention builds RotaryPositionEmbedder(channels): per-head mismatch
            raise NotImplementedError(f"{name}: pe_mode 'rope' does not run in TRELLIS either (phase shape mismatch)")
        if self.pe_mode != "ape":
            raise ValueError(f"{name}: pe_mode must be 'ape' or 'rope', got {self.pe_mode!r}")
        if x.feats.ndim != 3 or x.feats.shape[-1] != self.latent_channels:
            raise ValueError(
                f"{name}: x.feats has shape {tuple(x.feats.shape)}, expected (B, N, {self.latent_channels})"
            )
        if x.resolution != self.resolution:
            raise ValueError(f"{name}: x is at resolution {x.resolution}, the model at {self.resolution}")
        n = x.levels[0].size
        for k in range(1, self.subdivisions + 1):
            ok = len(x.levels) > k and x.levels[k].size == 8**k * n and x.levels[k].resolution == self.resolution * 2**k
            if not ok or x.levels[k].neighbours is None:
                raise ValueError(
                    f"{name}: x needs {self.subdivisions} subdivided level(s) with neighbour tables: build it with "
                    "slat_decoders.decoder_input(coords, feats, **module.input_kwargs)"
                )

    def trunk(self, x: SparseBatch):
        """(B, N, latent) -> (B, N, C) in the compute dtype."""
        self._check(x)
        level, c = x.levels[0], self.model_channels
        h = nn.Dense(c, dtype=jnp.float32, name="input_layer")(x.feats.astype(jnp.float32))
        h = h + voxel_position_embedding(level.coords, c, self.resolution)  # float32, before the cast (TRELLIS)
        h = h.astype(self.dtype)
        block_cls = nn.remat(SparseTransformerBlock) if self.use_checkpoint else SparseTransformerBlock
        shifts = block_shifts(self.attn_mode, self.num_blocks, self.window_size) or (0,) * self.num_blocks
        for i, shift in enumerate(shifts):
            block = block_cls(
                c,
                self.heads,
                self.mlp_ratio,
                self.attn_mode,
                shift,
                self.qk_rms_norm,
                self.dtype,
                self.attn_impl,
                name=f"blocks_{i}",
            )
            h = block(h, level)
        return h


class SLatMeshDecoder(_SLatDecoder):
    """Trunk -> two subdivide blocks -> ``out_layer``: FlexiCubes features on the 4x-finer voxels."""

    subdivisions = 2

    @property
    def out_channels(self) -> int:
        """8 SDFs + 8x3 deformations + 21 weights (+ 8x6 colours with ``use_color``): TRELLIS's layout."""
        return 53 + (48 if (self.representation_config or {}).get("use_color", False) else 0)

    @nn.compact
    def __call__(self, x: SparseBatch) -> SparseBatch:
        h = self.trunk(x)  # (B, N, C)
        c = self.model_channels
        for i, (cin, cout) in enumerate(((c, c // 4), (c // 4, c // 8))):
            h = SparseSubdivideBlock3d(cin, cout, dtype=self.dtype, name=f"upsample_{i}")(
                h, x.levels[i], x.levels[i + 1]
            )  # (B, 8^(i+1) N, cout)
        out = x.levels[self.subdivisions]
        h = nn.Dense(self.out_channels, dtype=jnp.float32, name="out_layer")(h.astype(jnp.float32))
        h = jnp.where(out.mask[..., None], h, 0.0)  # (B, 64 N, 101)
        return SparseBatch(feats=h, levels=(out,))


class SLatGaussianDecoder(_SLatDecoder):
    """Trunk -> LayerNorm -> ``out_layer``: 32 Gaussians' parameters per input voxel."""

    @property
    def num_gaussians(self) -> int:
        return int((self.representation_config or {})["num_gaussians"])

    @property
    def out_channels(self) -> int:
        """Per Gaussian: xyz 3, DC colour 3, scaling 3, rotation 4, opacity 1 (TRELLIS's ``_calc_layout``)."""
        return 14 * self.num_gaussians

    def _check(self, x: SparseBatch):
        if not self.representation_config or "num_gaussians" not in self.representation_config:
            raise ValueError("SLatGaussianDecoder: representation_config needs 'num_gaussians'")
        super()._check(x)

    @nn.compact
    def __call__(self, x: SparseBatch) -> SparseBatch:
        h = layer_norm_no_affine(self.trunk(x).astype(jnp.float32), 1e-5)
        h = nn.Dense(self.out_channels, dtype=jnp.float32, name="out_layer")(h)  # (B, N, 448)
        h = jnp.where(x.mask[..., None], h, 0.0)
        return SparseBatch(feats=h, levels=x.levels[:1])


def offset_perturbation_of(module: SLatGaussianDecoder) -> np.ndarray:
    """The decoder's ``offset_perturbation`` buffer (G, 3) float32, recomputed (``dso_jax.gaussians``)."""
    from dso_jax import gaussians

    cfg = module.representation_config
    return gaussians.offset_perturbation(int(cfg["num_gaussians"]), float(cfg["voxel_size"]))
