"""Multi-head attention of TRELLIS's dense transformer blocks, in Flax.

Attention itself goes through ``jax.nn.dot_product_attention``: the cuDNN fused kernel on GPU for
half-precision inputs (4x faster than XLA's default in our probe), XLA elsewhere. ``'mgpu'`` selects the Pallas
Mosaic-GPU flash kernel for Hopper (``jax.experimental.pallas.ops.gpu.attention_mgpu``) where it applies (no
padding mask, key count a multiple of its key tile) and cuDNN otherwise; ``'mgpu:BQxBKVxSTEPS'`` sets its tiles.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dso_jax.models.layers import MultiHeadRMSNorm
from dso_jax.models.remat import name_attention_output

Dtype = Any
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


MGPU_TILES = (64, 128, 2)  # block_q, block_kv, max_concurrent_steps of the Mosaic-GPU kernel (bench/attention.py)


def resolve_attention_impl(implementation: str, dtype) -> Optional[str]:
    """'auto' -> 'cudnn' on GPU for bf16/fp16, else XLA (None). 'xla' / 'cudnn' force one; 'mgpu[:...]' is
    returned as given on GPU for half precision (``dot_product_attention`` falls back to cuDNN where it cannot)."""
    on_gpu_half = jax.default_backend() == "gpu" and jnp.dtype(dtype) in _HALF
    if implementation == "auto":
        return "cudnn" if on_gpu_half else None
    if implementation == "xla":
        return None
    if implementation == "cudnn":
        return "cudnn"
    if implementation == "mgpu" or implementation.startswith("mgpu:"):
        _mgpu_tiles(implementation)  # a malformed tile spec fails here, on every backend
        return implementation if on_gpu_half else None
    raise ValueError(
        f"attention implementation must be 'auto', 'xla', 'cudnn' or 'mgpu[:BQxBKVxSTEPS]', got {implementation!r}"
    )


def _mgpu_tiles(implementation: str) -> tuple:
    if implementation == "mgpu":
        return MGPU_TILES
    try:
        tiles = tuple(int(t) for t in implementation.split(":", 1)[1].split("x"))
    except ValueError:
        tiles = ()
    if len(tiles) != 3:
        raise ValueError(f"attention implementation 'mgpu:BQxBKVxSTEPS' needs three integers, got {implementation!r}")
    return tiles


def _mgpu_attention(q, k, v, tiles):
    """The Mosaic-GPU flash kernel (forward and backward) with TRELLIS's softmax scale folded into q."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    bq, bkv, steps = tiles
    cfg = attention_mgpu.TuningConfig(
        block_q=bq, block_kv=bkv, max_concurrent_steps=steps,
        block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64,
    )  # fmt: skip
    scale = 1.0 / np.sqrt(q.shape[-1])  # 1/8 at head dim 64: exact in bf16
    # the kernel's shared-memory tiles are float16 whatever the input (jax 0.10-0.11): run bf16 inputs in fp16
    # (3 more mantissa bits; TRELLIS's qk-normed q/k and its values sit far inside fp16's range) and cast back
    dt = jnp.float16
    out = attention_mgpu.attention((q * scale).astype(dt), k.astype(dt), v.astype(dt), cfg)
    return out.astype(q.dtype)


def dot_product_attention(q, k, v, implementation: str = "auto", lengths=None):
    """Softmax attention with scale 1/sqrt(head_dim); q (B, L, H, D), k/v (B, S, H, D) -> (B, L, H, D).

    ``lengths`` (B,) int32 (self-attention over padded objects): object b attends over its first
    ``lengths[b]`` tokens only, and its padding queries return 0 (cuDNN's padding mask on GPU).
    """
    impl = resolve_attention_impl(implementation, q.dtype)
    if impl is not None and impl.startswith("mgpu"):
        tiles = _mgpu_tiles(impl)
        fits = q.shape[1] % (2 * tiles[0]) == 0 and k.shape[1] % tiles[1] == 0 and q.shape[-1] % 64 == 0
        if lengths is None and fits:
            return _mgpu_attention(q, k, v, tiles)
        impl = "cudnn"  # a padding mask or a ragged key count: cuDNN's kernel
    if lengths is None:
        return jax.nn.dot_product_attention(q, k, v, implementation=impl)
    lengths = lengths.astype(jnp.int32)
    return jax.nn.dot_product_attention(
        q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths, implementation=impl
    )


def rope_phases(coords: np.ndarray, head_dim: int) -> np.ndarray:
    """3-D rotary phases for integer token coordinates (L, 3) -> (L, head_dim // 2) angles.

    Each axis gets ``head_dim // 3 // 2`` frequencies ``1 / 10000^(j / f)``; leftover pairs get
    phase 0 (identity), as in TRELLIS's ``RotaryPositionEmbedder`` padding.
    """
    coords = np.asarray(coords, np.float32)
    n, axes = coords.shape
    freq_dim = head_dim // axes // 2
    freqs = 1.0 / (10000.0 ** (np.arange(freq_dim, dtype=np.float32) / freq_dim))
    phases = (coords[:, :, None] * freqs[None, None]).reshape(n, axes * freq_dim)
    pad = head_dim // 2 - phases.shape[1]
    return np.concatenate([phases, np.zeros((n, pad), np.float32)], axis=1)


def apply_rope(x, phases):
    """Rotate adjacent channel pairs of x (B, L, H, D) by phases (L, D/2), in float32."""
    b, l, h, d = x.shape
    x32 = x.astype(jnp.float32).reshape(b, l, h, d // 2, 2)
    cos = jnp.cos(phases)[None, :, None, :]
    sin = jnp.sin(phases)[None, :, None, :]
    re = x32[..., 0] * cos - x32[..., 1] * sin
    im = x32[..., 0] * sin + x32[..., 1] * cos
    return jnp.stack([re, im], axis=-1).reshape(b, l, h, d).astype(x.dtype)


class FusedProjection(nn.Module):
    """One Linear ``C -> n C`` (PyTorch's fused ``to_qkv``) applied as n contiguous projections.

    The parameters are exactly ``nn.Dense``'s (``kernel`` (C, n C), ``bias`` (n C,)); computing each
    slice separately gives contiguous (B, L, C) outputs, so no strided copies precede attention.
    """

    features: int
    num: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # (B, L, Cin) -> num x (B, L, features)
        n = self.num * self.features
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], n), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (n,), jnp.float32) if self.use_bias else None
        x = x.astype(self.dtype)
        outs = []
        for s in range(self.num):
            sl = slice(s * self.features, (s + 1) * self.features)
            y = jnp.einsum("...c,cf->...f", x, kernel[:, sl].astype(self.dtype))
            outs.append(y + bias[sl].astype(self.dtype) if bias is not None else y)
        return outs


class MultiHeadAttention(nn.Module):
    """Self (``to_qkv``) or cross (``to_q`` + ``to_kv``) attention followed by ``to_out``.

    Fused projections keep PyTorch's output-channel order ``s * C + h * D + d`` (s = q/k/v), so
    converted kernels need no permutation. ``lengths`` (B,) makes self-attention per object over padded
    sparse tokens (each object's valid tokens first; TRELLIS's varlen attention).

    Cross-attention with ``context=None`` is TRELLIS's unconditional input (an all-zero context) computed
    exactly and cheaply: every key is ``to_kv``'s key bias, so softmax is uniform and every query receives the
    value bias; the output is ``to_out(value bias)`` for every token (no q/kv projection, no attention).
    """

    channels: int
    num_heads: int
    ctx_channels: Optional[int] = None
    type: str = "self"
    qkv_bias: bool = True
    use_rope: bool = False
    qk_rms_norm: bool = False
    dtype: Dtype = jnp.float32
    attn_impl: str = "auto"

    @nn.compact
    def __call__(self, x, context=None, rope=None, lengths=None):  # x (B, L, C), context (B, S, Cc), lengths (B,)
        b, l, c = x.shape
        heads, head_dim = self.num_heads, self.channels // self.num_heads
        dense = lambda n, name, bias=self.qkv_bias: nn.Dense(n, use_bias=bias, dtype=self.dtype, name=name)
        if self.type == "self":
            q, k, v = FusedProjection(self.channels, 3, self.qkv_bias, self.dtype, name="to_qkv")(x)
            q, k, v = (y.reshape(b, l, heads, head_dim) for y in (q, k, v))
            if self.use_rope:
                q, k = apply_rope(q, rope), apply_rope(k, rope)
        elif self.type == "cross" and context is None:  # the all-zero condition (see the class docstring)
            zero = jnp.zeros((1, 1, self.ctx_channels or c), self.dtype)
            v = dense(2 * self.channels, "to_kv")(zero)[..., self.channels :]  # (1, 1, C): the value bias
            h = nn.Dense(self.channels, dtype=self.dtype, name="to_out")(v)
            return jnp.broadcast_to(h, (b, l, self.channels))
        elif self.type == "cross":
            s = context.shape[1]
            q = dense(self.channels, "to_q")(x).reshape(b, l, heads, head_dim)
            kv = dense(2 * self.channels, "to_kv")(context).reshape(b, s, 2, heads, head_dim)
            k, v = kv[:, :, 0], kv[:, :, 1]
        else:
            raise ValueError(f"attention type must be 'self' or 'cross', got {self.type!r}")
        if self.qk_rms_norm:
            q = MultiHeadRMSNorm(head_dim, heads, name="q_rms_norm")(q)
            k = MultiHeadRMSNorm(head_dim, heads, name="k_rms_norm")(k)
        h = dot_product_attention(q, k, v, self.attn_impl, lengths if self.type == "self" else None)
        h = name_attention_output(h).reshape(b, l, c)  # (B, L, C)
        return nn.Dense(self.channels, dtype=self.dtype, name="to_out")(h)
