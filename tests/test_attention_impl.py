"""Attention implementation choice (``dso_jax.models.attention``): names, tile specs, and the Mosaic-GPU route.

The Mosaic-GPU kernel itself only runs on a Hopper GPU (bench/attention.py times it); here its entry point is
replaced by a plain softmax(q k^T) v without a scale, so the tests pin what the library adds around it: the
1/sqrt(D) scale folded into q, the tiles passed through, and cuDNN wherever the kernel cannot take the shapes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.gpu import attention_mgpu

from dso_jax.models import attention


@jax.jit
def _unscaled(q, k, v):
    s = jnp.einsum("blhd,bshd->bhls", q.astype(jnp.float32), k.astype(jnp.float32))
    return jnp.einsum("bhls,bshd->blhd", jax.nn.softmax(s, axis=-1), v.astype(jnp.float32)).astype(q.dtype)


def _qkv(l, s):  # (1, L|S, 2 heads, 64) bf16, drawn on the host
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((1, n, 2, 64)), jnp.bfloat16) for n in (l, s, s))


def test_names_and_tile_specs():
    assert attention.resolve_attention_impl("auto", jnp.float32) is None
    assert attention.resolve_attention_impl("xla", jnp.bfloat16) is None
    assert attention.resolve_attention_impl("cudnn", jnp.float32) == "cudnn"
    on_gpu = jax.default_backend() == "gpu"
    assert attention.resolve_attention_impl("mgpu:64x256x2", jnp.bfloat16) == ("mgpu:64x256x2" if on_gpu else None)
    assert attention._mgpu_tiles("mgpu") == attention.MGPU_TILES
    assert attention._mgpu_tiles("mgpu:64x256x3") == (64, 256, 3)
    for bad in ("mgpu:64,128,2", "mgpu:64x128", "flash"):
        with pytest.raises(ValueError, match="attention implementation"):
            attention.resolve_attention_impl(bad, jnp.bfloat16)


@pytest.fixture
def fake_gpu(monkeypatch):
    """The backend reads as GPU; the Mosaic kernel is an unscaled reference and cuDNN a recorder."""
    calls = {"mgpu": [], "cudnn": []}

    def mgpu(q, k, v, cfg):
        # the kernel's shared-memory tiles are float16 (jax 0.10-0.11): bf16 inputs must arrive as fp16
        calls["mgpu"].append((cfg.block_q, cfg.block_kv, cfg.max_concurrent_steps, q.dtype, k.dtype, v.dtype))
        return _unscaled(q, k, v)

    def cudnn(q, k, v, implementation=None, **kw):
        calls["cudnn"].append(implementation)
        return jnp.zeros(q.shape, q.dtype)

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention_mgpu, "attention", mgpu)
    monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn)
    return calls


def test_mgpu_route_folds_the_softmax_scale_into_q(fake_gpu):
    q, k, v = _qkv(128, 128)
    got = attention.dot_product_attention(q, k, v, "mgpu:64x128x3")
    want = _unscaled((q.astype(jnp.float32) / 8.0).astype(q.dtype), k, v)  # 1/sqrt(64), exact in bf16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=1e-2)
    unscaled = np.asarray(_unscaled(q, k, v), np.float32)
    assert np.abs(np.asarray(got, np.float32) - unscaled).max() > 0.1  # the scale matters at these inputs
    assert got.dtype == q.dtype == jnp.bfloat16  # cast back to the caller's dtype
    assert fake_gpu == {"mgpu": [(64, 128, 3, jnp.float16, jnp.float16, jnp.float16)], "cudnn": []}


def test_mgpu_falls_back_to_cudnn_where_its_tiles_do_not_fit(fake_gpu):
    q, k, v = _qkv(128, 100)  # 100 keys: no multiple of the key tile (cross-attention to 1374 DINOv2 tokens)
    attention.dot_product_attention(q, k, v, "mgpu")
    q, k, v = _qkv(128, 128)
    attention.dot_product_attention(q, k, v, "mgpu", lengths=jnp.array([100]))  # padded objects: a mask
    assert fake_gpu == {"mgpu": [], "cudnn": ["cudnn", "cudnn"]}
