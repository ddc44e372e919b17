"""TRELLIS's sparse-structure flow transformer (stage 1), in Flax.

``SparseStructureFlowModel(**json_args)`` accepts every argument of a released ``ckpts/*.json``.
Inputs and outputs use TRELLIS's layout: x (B, C, R, R, R), t (B,) in [0, 1000], cond (B, S, Cc).

Dtype policy: parameters are float32 masters. The transformer blocks compute in ``dtype``
(the original's ``use_fp16`` becomes bf16 on GPU by the caller's choice); the timestep embedder,
input/output layers and the final norm always run in float32, as in the original.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from dso_jax.models.attention import MultiHeadAttention, rope_phases
from dso_jax.models.layers import (
    FeedForwardNet,
    LayerNorm32,
    TimestepEmbedder,
    absolute_position_embedding,
    grid_coords,
    layer_norm_no_affine,
    patchify,
    unpatchify,
)

Dtype = Any


class ModulatedTransformerCrossBlock(nn.Module):
    """adaLN-modulated self-attention, plain cross-attention (affine ``norm2``), modulated MLP.

    Also TRELLIS's ``ModulatedSparseTransformerCrossBlock`` (same math and names): with ``lengths`` (B,)
    the tokens are padded sparse voxels and self-attention runs over each object's valid tokens.
    """

    channels: int
    ctx_channels: int
    num_heads: int
    mlp_ratio: float = 4.0
    use_rope: bool = False
    qk_rms_norm: bool = False
    qk_rms_norm_cross: bool = False
    qkv_bias: bool = True
    share_mod: bool = False
    dtype: Dtype = jnp.float32
    attn_impl: str = "auto"

    @nn.compact
    def __call__(self, x, mod, context, rope=None, lengths=None):
        # x (B, L, C), mod (B, C) or (B, 6C), context (B, S, Cc) or None (the all-zero condition), lengths (B,)
        if not self.share_mod:
            mod = nn.Dense(6 * self.channels, dtype=self.dtype, name="adaLN_modulation_1")(nn.silu(mod))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = [
            m[:, None] for m in jnp.split(mod, 6, axis=-1)
        ]
        attn = dict(num_heads=self.num_heads, qkv_bias=self.qkv_bias, dtype=self.dtype, attn_impl=self.attn_impl)

        h = LayerNorm32(1e-6, affine=False, name="norm1")(x)
        h = h * (1 + scale_msa) + shift_msa
        h = MultiHeadAttention(
            self.channels, type="self", use_rope=self.use_rope, qk_rms_norm=self.qk_rms_norm, name="self_attn", **attn
        )(h, rope=rope, lengths=lengths)
        x = x + h * gate_msa

        h = LayerNorm32(1e-6, affine=True, name="norm2")(x)
        h = MultiHeadAttention(
            self.channels,
            ctx_channels=self.ctx_channels,
            type="cross",
            qk_rms_norm=self.qk_rms_norm_cross,
            name="cross_attn",
            **attn,
        )(h, context)
        x = x + h

        h = LayerNorm32(1e-6, affine=False, name="norm3")(x)
        h = h * (1 + scale_mlp) + shift_mlp
        h = FeedForwardNet(self.channels, self.mlp_ratio, dtype=self.dtype, name="mlp")(h)
        return x + h * gate_mlp


class SparseStructureFlowModel(nn.Module):
    """Stage-1 flow DiT: dense 3-D latent tokens with cross-attention to image tokens."""

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
    pe_mode: str = "ape"
    use_fp16: bool = False  # the original's flag, kept for config round trips; compute dtype is `dtype`
    use_checkpoint: bool = False  # rematerialise each block in the backward pass
    share_mod: bool = False
    qk_rms_norm: bool = False
    qk_rms_norm_cross: bool = False
    dtype: Dtype = jnp.float32
    attn_impl: str = "auto"

    @property
    def heads(self) -> int:
        return self.num_heads or self.model_channels // self.num_head_channels

    @property
    def token_resolution(self) -> int:
        return self.resolution // self.patch_size

    def pos_emb(self) -> np.ndarray:
        """The ``pos_emb`` buffer of the original, (L, C) float32."""
        return absolute_position_embedding(grid_coords(self.token_resolution), self.model_channels)

    @nn.compact
    def __call__(self, x, t, cond):  # cond (B, S, Cc), or None: TRELLIS's all-zero unconditional input, exactly
        b = x.shape[0]
        expected = (b, self.in_channels, self.resolution, self.resolution, self.resolution)
        if tuple(x.shape) != expected:
            raise ValueError(f"SparseStructureFlowModel: x has shape {tuple(x.shape)}, expected {expected}")
        if cond is not None and (cond.ndim != 3 or cond.shape[-1] != self.cond_channels):
            raise ValueError(
                f"SparseStructureFlowModel: cond has shape {tuple(cond.shape)}, expected (B, S, {self.cond_channels})"
            )
        if self.pe_mode not in ("ape", "rope"):
            raise ValueError(f"pe_mode must be 'ape' or 'rope', got {self.pe_mode!r}")
        r = self.token_resolution

        h = patchify(x, self.patch_size)  # (B, C p^3, r, r, r)
        h = h.reshape(b, h.shape[1], -1).transpose(0, 2, 1)  # (B, L, C p^3)
        h = nn.Dense(self.model_channels, dtype=jnp.float32, name="input_layer")(h.astype(jnp.float32))
        rope = None
        if self.pe_mode == "ape":
            h = h + jnp.asarray(self.pos_emb())[None]
        else:
            rope = jnp.asarray(rope_phases(grid_coords(r), self.model_channels // self.heads))

        t_emb = TimestepEmbedder(self.model_channels, name="t_embedder")(t)  # (B, C) float32
        if self.share_mod:
            t_emb = nn.Dense(6 * self.model_channels, dtype=jnp.float32, name="adaLN_modulation_1")(nn.silu(t_emb))
        t_emb, h = t_emb.astype(self.dtype), h.astype(self.dtype)
        cond = None if cond is None else cond.astype(self.dtype)

        block_cls = nn.remat(ModulatedTransformerCrossBlock) if self.use_checkpoint else ModulatedTransformerCrossBlock
        for i in range(self.num_blocks):
            h = block_cls(
                self.model_channels,
                self.cond_channels,
                self.heads,
                mlp_ratio=self.mlp_ratio,
                use_rope=self.pe_mode == "rope",
                qk_rms_norm=self.qk_rms_norm,
                qk_rms_norm_cross=self.qk_rms_norm_cross,
                share_mod=self.share_mod,
                dtype=self.dtype,
                attn_impl=self.attn_impl,
                name=f"blocks_{i}",
            )(h, t_emb, cond, rope)

        h = layer_norm_no_affine(h.astype(jnp.float32), 1e-5)
        h = nn.Dense(self.out_channels * self.patch_size**3, dtype=jnp.float32, name="out_layer")(h)  # (B, L, Co p^3)
        h = h.transpose(0, 2, 1).reshape(b, -1, r, r, r)
        return unpatchify(h, self.patch_size).astype(x.dtype)  # (B, Co, R, R, R)
