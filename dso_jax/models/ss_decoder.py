"""TRELLIS's sparse-structure VAE decoder (stage 1), in Flax: latent (B, 8, 16^3) -> logits (B, 1, 64^3).

Inputs/outputs use TRELLIS's channels-first layout; inside, activations are channels-last (NDHWC)
so XLA's convolutions run in their native layout. ``input_layer`` and ``out_layer`` run in float32;
``middle_block`` and ``blocks`` in ``dtype`` (the original's fp16 torso).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dso_jax.models.layers import LayerNorm32

Dtype = Any


def pixel_shuffle_3d(x, scale: int):
    """Channels-last 3-D pixel shuffle: out[2h+i, 2w+j, 2d+k, c] = in[h, w, d, 8c + 4i + 2j + k]."""
    b, h, w, d, c = x.shape
    s = scale
    x = x.reshape(b, h, w, d, c // s**3, s, s, s)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, h * s, w * s, d * s, c // s**3)


def _conv(features: int, kernel: int, dtype, name: str):
    return nn.Conv(features, (kernel,) * 3, padding=kernel // 2, dtype=dtype, name=name)


class GroupNorm32(nn.Module):
    """``GroupNorm(32, C)``, eps 1e-5, in float32; owns ``scale``/``bias`` (only ``out_layer`` with 'group')."""

    num_groups: int = 32

    @nn.compact
    def __call__(self, x):  # (B, D, H, W, C)
        c = x.shape[-1]
        x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        axes = tuple(range(1, x32.ndim - 2)) + (x32.ndim - 1,)
        mean = jnp.mean(x32, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True)
        y = ((x32 - mean) / jnp.sqrt(var + 1e-5)).reshape(x.shape)
        y = y * self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        y = y + self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return y.astype(x.dtype)


def norm_layer(norm_type: str, name: str) -> nn.Module:
    if norm_type == "layer":
        return LayerNorm32(1e-5, affine=True, name=name)  # ChannelLayerNorm32 (channels are last here)
    if norm_type == "group":
        return GroupNorm32(name=name)
    raise ValueError(f"norm_type must be 'layer' or 'group', got {norm_type!r}")


class ResBlock3d(nn.Module):
    """``conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))) + skip(x)``; norms are always channel LayerNorms."""

    channels: int
    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # (B, D, H, W, C)
        h = nn.silu(norm_layer("layer", "norm1")(x))
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
        h = nn.silu(norm_layer("layer", "norm2")(h))
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
        skip = (
            x if self.channels == self.out_channels else _conv(self.out_channels, 1, self.dtype, "skip_connection")(x)
        )
        return h + skip


class UpsampleBlock3d(nn.Module):
    """Conv to 8x channels then 2x pixel shuffle (TRELLIS ``mode='conv'``)."""

    in_channels: int
    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return pixel_shuffle_3d(_conv(8 * self.out_channels, 3, self.dtype, "conv")(x), 2)


class SparseStructureDecoder(nn.Module):
    out_channels: int
    latent_channels: int
    num_res_blocks: int
    channels: Sequence[int]
    num_res_blocks_middle: int = 2
    norm_type: str = "layer"
    use_fp16: bool = False  # the original's flag, kept for config round trips; compute dtype is `dtype`
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):  # (B, Cl, R, R, R) -> (B, Co, 4R, 4R, 4R) for three channel stages
        if z.ndim != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(
                f"SparseStructureDecoder: z has shape {tuple(z.shape)}, expected (B, {self.latent_channels}, R, R, R)"
            )
        chans = list(self.channels)
        h = z.astype(jnp.float32).transpose(0, 2, 3, 4, 1)  # (B, R, R, R, Cl)
        h = _conv(chans[0], 3, jnp.float32, "input_layer")(h).astype(self.dtype)
        for i in range(self.num_res_blocks_middle):
            h = ResBlock3d(chans[0], chans[0], self.dtype, name=f"middle_block_{i}")(h)
        idx = 0
        for i, ch in enumerate(chans):
            for _ in range(self.num_res_blocks):
                h = ResBlock3d(ch, ch, self.dtype, name=f"blocks_{idx}")(h)
                idx += 1
            if i < len(chans) - 1:
                h = UpsampleBlock3d(ch, chans[i + 1], self.dtype, name=f"blocks_{idx}")(h)
                idx += 1
        h = h.astype(jnp.float32)
        h = nn.silu(norm_layer(self.norm_type, "out_layer_0")(h))
        h = _conv(self.out_channels, 3, jnp.float32, "out_layer_2")(h)
        return h.transpose(0, 4, 1, 2, 3).astype(z.dtype)  # (B, Co, D, H, W)


def occupancy_from_logits(logits):
    """TRELLIS's readout: voxel occupied iff logit > 0. (B, 1, D, H, W) -> bool (B, D, H, W)."""
    return logits[:, 0] > 0
