"""DINOv2 ViT with register tokens (TRELLIS's image-conditioning encoder), in Flax.

TRELLIS conditions stage 1 on ``dinov2_vitl14_reg``: the whole token sequence after the last block and
before DINOv2's learned final norm (``x_prenorm``, order [CLS, reg x 4, patches]), followed by a
parameter-free LayerNorm (eps 1e-5). ``encode_condition`` reproduces that from uint8 images.

Submodule and parameter names mirror the PyTorch attribute names (``blocks.3.attn.qkv`` ->
``blocks_3/attn/qkv``) so conversion is a mechanical rename (``dso_jax.convert.dinov2``).
Weights are float32; ``dtype`` sets the matmul/attention dtype, while norms, LayerScale and the residual
stream stay float32. This module does no file I/O.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COND_LN_EPS = 1e-5  # TRELLIS's F.layer_norm on x_prenorm
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class DinoV2Config:
    """Architecture of a DINOv2 ViT (hub ``_make_dinov2_model`` arguments; ffn 'mlp', block_chunks 0)."""

    img_size: int = 518  # sets the stored pos_embed grid: (img_size // patch_size)^2 + 1 rows
    patch_size: int = 14
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    layerscale: bool = True  # hub: init_values=1.0 -> ls1/ls2 present
    norm_eps: float = 1e-6
    interpolate_antialias: bool = True
    interpolate_offset: float = 0.0

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def num_tokens(self, height: int, width: int) -> int:
        return 1 + self.num_register_tokens + (height // self.patch_size) * (width // self.patch_size)


VITL14_REG4 = DinoV2Config()  # dinov2_vitl14_reg: 304,372,736 parameters, 344 state-dict entries
CONFIGS = {
    "vitl14_reg4": VITL14_REG4,
    # Test configs: full width, 2 blocks; and a narrow one that keeps the released 37x37 grid.
    "vitl14_reg4_2blocks": dataclasses.replace(VITL14_REG4, depth=2),
    "tiny_reg4": dataclasses.replace(VITL14_REG4, embed_dim=64, depth=2, num_heads=4),
}


def get_config(name: str) -> DinoV2Config:
    if name not in CONFIGS:
        raise KeyError(f"unknown DINOv2 config {name!r}; known: {sorted(CONFIGS)}")
    return CONFIGS[name]


def config_from_dict(d: dict) -> DinoV2Config:
    """Inverse of ``dataclasses.asdict`` (what the converter writes as config.json); rejects unknown keys."""
    known = {f.name for f in dataclasses.fields(DinoV2Config)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown DINOv2 config keys {unknown}")
    return DinoV2Config(**d)


# ----------------------------------------------------------------------------------------------------
# Positional-embedding interpolation (torch F.interpolate, mode='bicubic', antialias=True)
# ----------------------------------------------------------------------------------------------------


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys cubic kernel; a = -0.5 is what the antialiased (PIL-style) bicubic resampler uses."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def antialiased_bicubic_matrix(in_size: int, out_size: int, scale: Optional[float] = None) -> np.ndarray:
    """(out_size, in_size) float64 weights of 1-D antialiased bicubic resampling (half-pixel centres).

    ``scale`` is input/output sample spacing (default in_size / out_size). When downsampling the
    kernel is stretched by the scale; each row is clipped to the input range and renormalised.
    """
    scale = in_size / out_size if scale is None else scale
    support = 2.0 * max(scale, 1.0)
    inv = 1.0 / max(scale, 1.0)
    w = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = _cubic((np.arange(lo, hi) - center + 0.5) * inv)
        total = taps.sum()
        w[i, lo:hi] = taps / total if total != 0.0 else taps
    return w


def interpolate_pos_embed(pos_embed, grid_hw: tuple[int, int], cfg: DinoV2Config):
    """(1, 1 + M*M, D) stored embedding -> (1, 1 + h*w, D) for a (h, w) patch grid, float32.

    The identity when the grid equals the stored M x M grid (518 px for the released weights).
    """
    n_stored = pos_embed.shape[1] - 1
    m = int(round(n_stored**0.5))
    if m * m != n_stored:
        raise ValueError(f"pos_embed holds {n_stored} patch rows, not a square grid")
    h, w = grid_hw
    if (h, w) == (m, m):
        return pos_embed.astype(jnp.float32)
    if not cfg.interpolate_antialias:
        raise NotImplementedError("only antialiased bicubic pos-embed interpolation is implemented")
    off = cfg.interpolate_offset  # with an offset, torch passes scale_factor=(n + off) / M instead of a size
    wh = antialiased_bicubic_matrix(m, h, m / (h + off) if off else None)  # (h, M)
    ww = antialiased_bicubic_matrix(m, w, m / (w + off) if off else None)  # (w, M)
    pos = pos_embed.astype(jnp.float32)
    grid = pos[0, 1:].reshape(m, m, -1)  # (M, M, D)
    grid = jnp.einsum(
        "ia,jb,abd->ijd",
        jnp.asarray(wh, jnp.float32),
        jnp.asarray(ww, jnp.float32),
        grid,
        precision=jax.lax.Precision.HIGHEST,
    )  # (h, w, D)
    return jnp.concatenate([pos[:, :1], grid.reshape(1, h * w, -1)], axis=1)


# ----------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------


def attention_implementation(dtype) -> Optional[str]:
    """cuDNN fused attention on GPU for bf16/fp16; XLA's default (None) on CPU or in float32."""
    return "cudnn" if jax.default_backend() == "gpu" and jnp.dtype(dtype) in _HALF else None


def layer_norm(x, eps: float):
    """Parameter-free two-pass LayerNorm over the last axis in float32 (``F.layer_norm(x, x.shape[-1:])``)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def _norm(eps: float, name: str) -> nn.LayerNorm:
    # float32 statistics with the two-pass variance: DINOv2 residuals carry large-norm tokens.
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False, name=name)


class LayerScale(nn.Module):
    """Per-channel scale ``x * gamma`` (PyTorch ``ls1`` / ``ls2``), float32."""

    dim: int

    @nn.compact
    def __call__(self, x):  # (B, N, D)
        gamma = self.param("gamma", nn.initializers.ones, (self.dim,), jnp.float32)
        return x.astype(jnp.float32) * gamma


class Attention(nn.Module):
    """Fused ``qkv`` projection (output channels ordered [q | k | v], heads inside), softmax attention, ``proj``."""

    dim: int
    num_heads: int
    qkv_bias: bool = True
    proj_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # (B, N, D)
        b, n, d = x.shape
        hd = d // self.num_heads
        qkv = nn.Dense(3 * d, use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(x)
        qkv = qkv.reshape(b, n, 3, self.num_heads, hd)  # (B, N, 3, H, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (B, N, H, hd)
        o = jax.nn.dot_product_attention(q, k, v, implementation=attention_implementation(q.dtype))
        return nn.Dense(d, use_bias=self.proj_bias, dtype=self.dtype, name="proj")(o.reshape(b, n, d))


class Mlp(nn.Module):
    """``fc1 -> GELU (exact erf) -> fc2``."""

    hidden: int
    dim: int
    bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # (B, N, D)
        h = nn.Dense(self.hidden, use_bias=self.bias, dtype=self.dtype, name="fc1")(x)
        h = jax.nn.gelu(h, approximate=False)
        return nn.Dense(self.dim, use_bias=self.bias, dtype=self.dtype, name="fc2")(h)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``."""

    cfg: DinoV2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # (B, N, D) float32
        c = self.cfg
        h = _norm(c.norm_eps, "norm1")(x).astype(self.dtype)
        h = Attention(c.embed_dim, c.num_heads, c.qkv_bias, c.proj_bias, self.dtype, name="attn")(h)
        x = x + (LayerScale(c.embed_dim, name="ls1")(h) if c.layerscale else h.astype(jnp.float32))
        h = _norm(c.norm_eps, "norm2")(x).astype(self.dtype)
        h = Mlp(c.mlp_hidden, c.embed_dim, c.ffn_bias, self.dtype, name="mlp")(h)
        return x + (LayerScale(c.embed_dim, name="ls2")(h) if c.layerscale else h.astype(jnp.float32))


class PatchEmbed(nn.Module):
    """Non-overlapping ``proj`` convolution, kernel = stride = patch size: (B, H, W, 3) -> (B, h*w, D)."""

    cfg: DinoV2Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.cfg.patch_size
        y = nn.Conv(self.cfg.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="proj")(
            x
        )  # (B, h, w, D)
        b, h, w, d = y.shape
        return y.reshape(b, h * w, d)  # row-major patches, as torch's flatten(2)


class DinoVisionTransformer(nn.Module):
    """DINOv2 backbone; ``__call__`` mirrors ``forward_features`` and returns its dict.

    Input: normalised images (B, H, W, 3), H and W multiples of the patch size.
    Output keys: ``x_prenorm`` (B, 1 + R + h*w, D), ``x_norm_clstoken`` (B, D), ``x_norm_regtokens``
    (B, R, D), ``x_norm_patchtokens`` (B, h*w, D); all float32.
    """

    cfg: DinoV2Config = VITL14_REG4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, masks=None):  # x (B, H, W, 3); masks (B, h*w) bool or None
        c = self.cfg
        b, hh, ww, _ = x.shape
        p = c.patch_size
        if hh % p or ww % p:
            raise ValueError(f"image size {hh}x{ww} is not a multiple of the patch size {p}")
        n_stored = c.grid_size * c.grid_size + 1
        cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, c.embed_dim), jnp.float32)
        pos_embed = self.param("pos_embed", nn.initializers.normal(0.02), (1, n_stored, c.embed_dim), jnp.float32)
        mask_token = self.param("mask_token", nn.initializers.zeros, (1, c.embed_dim), jnp.float32)

        tok = PatchEmbed(c, self.dtype, name="patch_embed")(x.astype(self.dtype)).astype(jnp.float32)  # (B, h*w, D)
        if masks is not None:
            tok = jnp.where(masks[..., None], mask_token[None], tok)
        tok = jnp.concatenate([jnp.broadcast_to(cls_token, (b, 1, c.embed_dim)), tok], axis=1)  # (B, 1+h*w, D)
        tok = tok + interpolate_pos_embed(pos_embed, (hh // p, ww // p), c)
        if c.num_register_tokens:  # registers go after CLS and carry no positional embedding
            reg = self.param(
                "register_tokens", nn.initializers.normal(1e-6), (1, c.num_register_tokens, c.embed_dim), jnp.float32
            )
            reg = jnp.broadcast_to(reg, (b, c.num_register_tokens, c.embed_dim))
            tok = jnp.concatenate([tok[:, :1], reg, tok[:, 1:]], axis=1)  # (B, 1+R+h*w, D)

        for i in range(c.depth):
            tok = Block(c, self.dtype, name=f"blocks_{i}")(tok)

        normed = _norm(c.norm_eps, "norm")(tok)
        r = c.num_register_tokens
        return {
            "x_prenorm": tok,
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1 : r + 1],
            "x_norm_patchtokens": normed[:, r + 1 :],
        }


def normalize_images(images_uint8):
    """(B, H, W, 3) uint8 -> float32 ``(x / 255 - mean) / std`` with ImageNet statistics."""
    x = jnp.asarray(images_uint8).astype(jnp.float32) / 255.0
    return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def encode_condition(params, images_uint8, cfg: DinoV2Config = VITL14_REG4, dtype: Dtype = jnp.float32):
    """TRELLIS's ``encode_image``: (B, 518, 518, 3) uint8 -> cond tokens (B, 1374, 1024) float32.

    ImageNet normalisation, the backbone up to ``x_prenorm``, then a parameter-free LayerNorm (eps 1e-5).
    ``params`` is the backbone's parameter tree (what ``convert_dinov2_state_dict`` returns). Jittable.
    """
    x = normalize_images(images_uint8)  # (B, H, W, 3)
    feats = DinoVisionTransformer(cfg, dtype).apply({"params": params}, x)["x_prenorm"]  # (B, N, D)
    return layer_norm(feats, COND_LN_EPS)


def init_params(rng, cfg: DinoV2Config, image_size: Optional[int] = None):
    """Random float32 parameters (tests and shapes); use ``jax.eval_shape`` on it for a shape tree."""
    s = image_size or cfg.patch_size
    x = jnp.zeros((1, s, s, cfg.in_chans), jnp.float32)
    return jax.jit(DinoVisionTransformer(cfg).init)(rng, x)["params"]


def param_count(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def check_encoder(params, cfg: DinoV2Config = VITL14_REG4, seed: int = 0, batch: int = 1) -> dict:
    """Smoke check of converted weights: encode a random 518-px image twice; finite and bit-identical.

    Raises ``ValueError`` otherwise; returns summary statistics of the cond tokens.
    """
    size = cfg.img_size
    img = jax.random.randint(jax.random.PRNGKey(seed), (batch, size, size, 3), 0, 256).astype(jnp.uint8)
    fn = jax.jit(lambda p, x: encode_condition(p, x, cfg))
    a, b = np.asarray(fn(params, img)), np.asarray(fn(params, img))
    if not np.all(np.isfinite(a)):
        raise ValueError(f"cond tokens contain {int(np.sum(~np.isfinite(a)))} non-finite values")
    if not np.array_equal(a, b):
        raise ValueError(f"two identical forwards differ by up to {float(np.max(np.abs(a - b)))}")
    return {"shape": a.shape, "mean": float(a.mean()), "std": float(a.std()), "max_abs": float(np.abs(a).max())}
