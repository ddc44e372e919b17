"""TRELLIS's structured-latent (SLat) flow transformer (stage 2), in Flax, on a padded :class:`SparseBatch`.

``SLatFlowModel(**json_args)`` accepts every argument of a released ``ckpts/slat_flow_*.json``
(``SLatFlowModel`` or the training name ``ElasticSLatFlowModel``: same parameters and forward).
``model.apply(variables, x, t, cond)``: x a ``SparseBatch`` of (B, N, in_channels) noisy SLat feats at
64³ with ``log2(patch_size)`` coarser levels (``sparse.from_trellis(..., downsamples=model.downsamples)``),
t (B,) in [0, 1000], cond (B, S, Cc) -> a ``SparseBatch`` of (B, N, out_channels) float32 velocities on
the same voxels (padding rows 0).

Forward (``trellis/models/structured_latent_flow.py``, ``trellis.md`` §4.2): SparseLinear in -> input
``SparseResBlock3d``s (the last of each stage downsamples 2x first; each output is a skip) -> APE on the
coarse coords -> ``ModulatedTransformerCrossBlock``s (the stage-1 block with per-object self-attention)
-> output res blocks on ``concat[h, skip]`` (the first of each stage upsamples first) -> LayerNorm (no
affine, eps 1e-5) -> SparseLinear out. Dtype policy: float32 masters; the torso (input blocks, blocks,
output blocks) computes in ``dtype`` (bf16 on GPU for the original's ``use_fp16``), norms in float32;
the timestep embedder, input and output layers in float32.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dso_jax.models.layers import LayerNorm32, TimestepEmbedder, layer_norm_no_affine, voxel_position_embedding
from dso_jax.models.ss_flow import ModulatedTransformerCrossBlock
from dso_jax.sparse import SparseConv3d, downsample, upsample
from dso_jax.sparse.batch import SparseBatch, SparseLevel

Dtype = Any


class SparseResBlock3d(nn.Module):
    """TRELLIS's ``SparseResBlock3d``: optional 2x resample, LN-SiLU-conv, LN scaled/shifted by the timestep
    embedding (chunk order **scale, shift**), SiLU-conv, plus a (linear when channels change) skip of the
    resampled input."""

    channels: int
    emb_channels: int
    out_channels: Optional[int] = None
    downsample: bool = False
    upsample: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb, fine: SparseLevel, coarse: Optional[SparseLevel] = None):
        """x (B, N_in, C) at ``fine`` (``coarse`` when upsampling) -> (B, N_out, Cout) at ``fine``
        (``coarse`` when downsampling); emb (B, emb_channels)."""
        cout = self.out_channels or self.channels
        if self.downsample and self.upsample:
            raise ValueError("SparseResBlock3d: cannot downsample and upsample at the same time")
        emb_out = nn.Dense(2 * cout, dtype=self.dtype, name="emb_layers_1")(nn.silu(emb)).astype(x.dtype)
        scale, shift = (a[:, None] for a in jnp.split(emb_out, 2, axis=-1))

        level = fine
        if self.downsample:
            x, level = downsample(x, coarse), coarse
        elif self.upsample:
            x = upsample(x, coarse)
        h = nn.silu(LayerNorm32(1e-6, affine=True, name="norm1")(x))
        h = SparseConv3d(cout, 3, dtype=self.dtype, name="conv1")(h, level.neighbours)
        h = LayerNorm32(1e-6, affine=False, name="norm2")(h) * (1 + scale) + shift
        h = SparseConv3d(cout, 3, dtype=self.dtype, name="conv2")(nn.silu(h), level.neighbours)
        if self.channels != cout:
            x = nn.Dense(cout, dtype=self.dtype, name="skip_connection")(x)
        return h + x


def io_plan(model_channels: int, io_block_channels: Optional[Sequence[int]], num_io_res_blocks: int, skip: bool):
    """The res blocks' (channels in, channels out, resample) as TRELLIS builds them: (input plan, output plan)."""
    if not io_block_channels:
        return [], []
    chs = list(io_block_channels)
    inp, out = [], []
    for c, nxt in zip(chs, chs[1:] + [model_channels]):
        inp += [(c, c, False)] * (num_io_res_blocks - 1) + [(c, nxt, True)]
    for c, prev in zip(reversed(chs), [model_channels] + list(reversed(chs[1:]))):
        out += [(prev * 2 if skip else prev, c, True)]
        out += [(c * 2 if skip else c, c, False)] * (num_io_res_blocks - 1)
    return inp, out


class SLatFlowModel(nn.Module):
    """Stage-2 flow DiT on sparse voxels; see the module docstring."""

    resolution: int
    in_channels: int
    model_channels: int
    cond_channels: int
    out_channels: int
    num_blocks: int
    num_heads: Optional[int] = None
    num_head_channels: Optional[int] = 64
    mlp_ratio: float = 4
    patch_size: int = 2
    num_io_res_blocks: int = 2
    io_block_channels: Optional[Sequence[int]] = None
    pe_mode: str = "ape"
    use_fp16: bool = False  # the original's flag, kept for config round trips; compute dtype is `dtype`
    use_checkpoint: bool = False  # rematerialise each transformer block in the backward pass
    use_skip_connection: bool = True
    share_mod: bool = False
    qk_rms_norm: bool = False
    qk_rms_norm_cross: bool = False
    dtype: Dtype = jnp.float32
    attn_impl: str = "auto"

    @property
    def heads(self) -> int:
        return self.num_heads or self.model_channels // self.num_head_channels

    @property
    def downsamples(self) -> int:
        """How many 2x-coarser levels the input ``SparseBatch`` needs (``log2(patch_size)``)."""
        return len(self.io_block_channels or ())

    def _check(self, x: SparseBatch, t, cond):
        name = type(self).__name__
        if self.io_block_channels and 2 ** len(self.io_block_channels) != self.patch_size:
            raise ValueError(f"{name}: patch_size {self.patch_size} needs log2 = len(io_block_channels) stages")
        if self.pe_mode not in ("ape", "rope"):
            raise ValueError(f"{name}: pe_mode must be 'ape' or 'rope', got {self.pe_mode!r}")
        if self.pe_mode == "rope":  # TRELLIS builds RotaryPositionEmbedder(channels) and cannot apply it per head
            raise NotImplementedError(f"{name}: pe_mode 'rope' does not run in TRELLIS either (phase shape mismatch)")
        if self.share_mod and self.io_block_channels:  # TRELLIS feeds the (B, 6C) shared modulation to the res blocks
            raise NotImplementedError(f"{name}: share_mod with io_block_channels does not run in TRELLIS either")
        if self.downsamples > 1:  # SparseTensor._scale 1 // 2 = 0: both downsamples cache under scale (0, 0, 0)
            raise NotImplementedError(
                f"{name}: {self.downsamples} io stages; TRELLIS's down/upsample caches collide beyond one "
                "(its second upsample reuses the first's map), so only one stage (patch_size 2) is defined"
            )
        if x.feats.ndim != 3 or x.feats.shape[-1] != self.in_channels:
            raise ValueError(f"{name}: x.feats has shape {tuple(x.feats.shape)}, expected (B, N, {self.in_channels})")
        if len(x.levels) < 1 + self.downsamples:
            raise ValueError(
                f"{name}: x has {len(x.levels)} level(s), needs {1 + self.downsamples}: build it with "
                f"sparse.from_trellis(..., downsamples={self.downsamples})"
            )
        if x.resolution != self.resolution:
            raise ValueError(f"{name}: x is at resolution {x.resolution}, the model at {self.resolution}")
        b = x.batch_size
        bad_cond = cond is not None and (cond.ndim != 3 or cond.shape[0] != b or cond.shape[-1] != self.cond_channels)
        if t.shape != (b,) or bad_cond:
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(
                f"{name}: t {tuple(t.shape)} / cond {got} do not match (B,) / (B, S, {self.cond_channels}), B = {b}"
            )

    @nn.compact
    def __call__(self, x: SparseBatch, t, cond) -> SparseBatch:
        self._check(x, t, cond)
        c, io = self.model_channels, list(self.io_block_channels or ())
        inp, outp = io_plan(c, io, self.num_io_res_blocks, self.use_skip_connection)

        h = nn.Dense(io[0] if io else c, dtype=jnp.float32, name="input_layer")(x.feats.astype(jnp.float32))
        h = h.astype(self.dtype)  # (B, N, C0)
        t_emb = TimestepEmbedder(c, name="t_embedder")(t)  # (B, C) float32
        if self.share_mod:
            t_emb = nn.Dense(6 * c, dtype=jnp.float32, name="adaLN_modulation_1")(nn.silu(t_emb))
        t_emb = t_emb.astype(self.dtype)
        cond = None if cond is None else cond.astype(self.dtype)  # None: the all-zero condition, exactly

        skips, lvl = [], 0
        for i, (cin, cout, down) in enumerate(inp):
            coarse = x.levels[lvl + 1] if down else None
            block = SparseResBlock3d(cin, c, cout, downsample=down, dtype=self.dtype, name=f"input_blocks_{i}")
            h = block(h, t_emb, x.levels[lvl], coarse)
            lvl += int(down)
            skips.append(h)

        level = x.levels[lvl]  # the transformer's level (32³ in the released model)
        if self.pe_mode == "ape":
            h = h + voxel_position_embedding(level.coords, c, level.resolution).astype(self.dtype)
        block_cls = nn.remat(ModulatedTransformerCrossBlock) if self.use_checkpoint else ModulatedTransformerCrossBlock
        for i in range(self.num_blocks):
            h = block_cls(
                c,
                self.cond_channels,
                self.heads,
                mlp_ratio=self.mlp_ratio,
                qk_rms_norm=self.qk_rms_norm,
                qk_rms_norm_cross=self.qk_rms_norm_cross,
                share_mod=self.share_mod,
                dtype=self.dtype,
                attn_impl=self.attn_impl,
                name=f"blocks_{i}",
            )(h, t_emb, cond, None, level.lengths)

        for i, (cin, cout, up) in enumerate(outp):
            if self.use_skip_connection:
                h = jnp.concatenate([h, skips.pop()], axis=-1)  # TRELLIS: cat([h, skip])
            coarse = x.levels[lvl] if up else None
            lvl -= int(up)
            block = SparseResBlock3d(cin, c, cout, upsample=up, dtype=self.dtype, name=f"out_blocks_{i}")
            h = block(h, t_emb, x.levels[lvl], coarse)

        h = layer_norm_no_affine(h.astype(jnp.float32), 1e-5)
        h = nn.Dense(self.out_channels, dtype=jnp.float32, name="out_layer")(h)  # (B, N, Co)
        h = jnp.where(x.mask[..., None], h, 0.0)
        return x.replace(feats=h.astype(jnp.float32))
