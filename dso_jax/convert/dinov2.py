"""Conversion of DINOv2 PyTorch state dicts (``dinov2_vitl14_reg4_pretrain.pth``) to Flax parameters.

The key table lists one rule per parameter: PyTorch key -> Flax path ('/'-joined) and a layout rule.
``convert_dinov2_state_dict`` is strict: it raises naming every missing, unexpected or mis-shaped key.
Expected shapes come from the config alone, so this package does not import the model (``cfg`` is any
object with the ``DinoV2Config`` fields; ``tests/test_dinov2.py`` checks the table against the model).
The output is float32 (master weights); the released file is float32 already.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable

import numpy as np

from dso_jax.convert.files import read_json, read_safetensors, staged_folder, write_json
from dso_jax.convert.rules import flatten, sha256_file, unflatten
from dso_jax.convert.trellis import CONFIG_FILE, MANIFEST_FILE, PARAMS_FILE
from dso_jax.convert.verify import ConversionError, check_finite

Rule = Callable[[np.ndarray], np.ndarray]


# Layout rules: PyTorch tensor -> Flax array.
def keep(w: np.ndarray) -> np.ndarray:
    return w


def linear_weight(w: np.ndarray) -> np.ndarray:  # nn.Linear (out, in) -> Dense kernel (in, out)
    return w.T


def conv2d_weight(w: np.ndarray) -> np.ndarray:  # nn.Conv2d OIHW -> Conv kernel HWIO
    return w.transpose(2, 3, 1, 0)


def dinov2_key_table(cfg) -> list[tuple[str, str, Rule, tuple[int, ...]]]:
    """(torch key, flax path, rule, torch shape) for every entry of the state dict of ``cfg``."""
    d, hid, p, c = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), cfg.patch_size, cfg.in_chans
    n_pos = (cfg.img_size // p) ** 2 + 1
    t = [
        ("cls_token", "cls_token", keep, (1, 1, d)),
        ("pos_embed", "pos_embed", keep, (1, n_pos, d)),
        ("mask_token", "mask_token", keep, (1, d)),
        ("patch_embed.proj.weight", "patch_embed/proj/kernel", conv2d_weight, (d, c, p, p)),
        ("patch_embed.proj.bias", "patch_embed/proj/bias", keep, (d,)),
        ("norm.weight", "norm/scale", keep, (d,)),
        ("norm.bias", "norm/bias", keep, (d,)),
    ]
    if cfg.num_register_tokens:
        t.append(("register_tokens", "register_tokens", keep, (1, cfg.num_register_tokens, d)))
    for i in range(cfg.depth):
        s, f = f"blocks.{i}.", f"blocks_{i}/"
        t += [
            (s + "norm1.weight", f + "norm1/scale", keep, (d,)),
            (s + "norm1.bias", f + "norm1/bias", keep, (d,)),
            (s + "attn.qkv.weight", f + "attn/qkv/kernel", linear_weight, (3 * d, d)),
            (s + "attn.proj.weight", f + "attn/proj/kernel", linear_weight, (d, d)),
            (s + "norm2.weight", f + "norm2/scale", keep, (d,)),
            (s + "norm2.bias", f + "norm2/bias", keep, (d,)),
            (s + "mlp.fc1.weight", f + "mlp/fc1/kernel", linear_weight, (hid, d)),
            (s + "mlp.fc2.weight", f + "mlp/fc2/kernel", linear_weight, (d, hid)),
        ]
        if cfg.qkv_bias:
            t.append((s + "attn.qkv.bias", f + "attn/qkv/bias", keep, (3 * d,)))
        if cfg.proj_bias:
            t.append((s + "attn.proj.bias", f + "attn/proj/bias", keep, (d,)))
        if cfg.ffn_bias:
            t += [
                (s + "mlp.fc1.bias", f + "mlp/fc1/bias", keep, (hid,)),
                (s + "mlp.fc2.bias", f + "mlp/fc2/bias", keep, (d,)),
            ]
        if cfg.layerscale:
            t += [(s + "ls1.gamma", f + "ls1/gamma", keep, (d,)), (s + "ls2.gamma", f + "ls2/gamma", keep, (d,))]
    return t


def convert_dinov2_state_dict(sd: dict[str, np.ndarray], cfg, *, source: str = "DINOv2 state dict") -> dict:
    """PyTorch state dict (numpy arrays) -> nested Flax params (float32) for ``DinoVisionTransformer(cfg)``.

    Refuses, in one error, every missing, unexpected, mis-shaped, non-float or non-finite tensor.
    """
    table = dinov2_key_table(cfg)
    expected = {k: shape for k, _, _, shape in table}
    problems = [f"missing: {k} {expected[k]}" for k in expected if k not in sd]
    problems += [f"unexpected: {k} {tuple(np.shape(sd[k]))}" for k in sd if k not in expected]
    for k, shape in expected.items():
        if k not in sd:
            continue
        a = sd[k]
        if tuple(a.shape) != shape:
            problems.append(f"shape: {k} is {tuple(a.shape)}, expected {shape}")
        elif not np.issubdtype(np.asarray(a).dtype, np.floating):
            problems.append(f"dtype: {k} is {np.asarray(a).dtype}, expected a floating type")
        elif not np.all(np.isfinite(a)):
            problems.append(f"non-finite: {k} has {int(a.size - np.count_nonzero(np.isfinite(a)))} NaN/Inf values")
    if problems:
        raise ConversionError(
            f"{source} does not match the DINOv2 config ({len(problems)} problems):\n  " + "\n  ".join(problems)
        )
    return unflatten(
        {fpath: np.ascontiguousarray(rule(np.asarray(sd[tkey], np.float32))) for tkey, fpath, rule, _ in table}
    )


def load_dinov2_pth(path: str) -> dict[str, np.ndarray]:
    """Read a DINOv2 ``.pth`` state dict safely (``torch.load(weights_only=True)``) as float32 numpy arrays.

    A file that needs full unpickling (arbitrary objects) is refused, never executed.
    """
    import pickle

    try:
        import torch  # lazy: only this reader needs torch
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs PyTorch (pip install torch); converted safetensors load without it"
        ) from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch colours its message
        first = text.splitlines()[0] if text else type(e).__name__
        raise ConversionError(f"{path}: not loadable with torch.load(weights_only=True), refused ({first})") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated zip, not a torch file
        raise ConversionError(f"{path}: not a readable PyTorch state dict ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConversionError(f"{path}: expected a flat state dict of tensors (the hub's *_pretrain.pth)")
    return {k: v.detach().to(torch.float32).numpy() for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------------
# Converted-directory format: params.safetensors ('/'-joined keys) + config.json + manifest.json
# ----------------------------------------------------------------------------------------------------


def convert_dinov2_file(src: str, dst: str, cfg, *, overwrite: bool = False) -> dict:
    """Convert a ``.pth`` into ``dst/`` (params, config, manifest); returns the nested params.

    Written into a temporary sibling and renamed when complete; a non-empty ``dst`` is refused unless ``overwrite``.
    """
    from safetensors.numpy import save_file

    with staged_folder(dst, overwrite=overwrite) as tmp:
        params = convert_dinov2_state_dict(load_dinov2_pth(src), cfg, source=src)
        flat = {k: np.asarray(v) for k, v in flatten(params).items()}
        save_file(flat, os.path.join(tmp, PARAMS_FILE))
        write_json(os.path.join(tmp, CONFIG_FILE), dataclasses.asdict(cfg))
        manifest = {
            "model": "dinov2",
            "source": os.path.basename(src),
            "source_sha256": sha256_file(src),
            "num_params": int(sum(a.size for a in flat.values())),
            "tensors": [{"name": k, "shape": list(a.shape), "dtype": str(a.dtype)} for k, a in sorted(flat.items())],
        }
        write_json(os.path.join(tmp, MANIFEST_FILE), manifest)
    return params


def load_converted_dinov2(path: str) -> tuple[dict, dict]:
    """Read a converted directory -> (config dict, nested float32 params), checked against its manifest."""
    config = read_json(os.path.join(path, CONFIG_FILE))
    manifest = read_json(os.path.join(path, MANIFEST_FILE))
    flat = read_safetensors(os.path.join(path, PARAMS_FILE))
    tensors = manifest.get("tensors") if isinstance(manifest, dict) else None
    if not isinstance(tensors, list):
        raise ConversionError(f"{os.path.join(path, MANIFEST_FILE)}: no 'tensors' list")
    listed = {t["name"]: (tuple(t["shape"]), t["dtype"]) for t in tensors}
    found = {k: (tuple(a.shape), str(a.dtype)) for k, a in flat.items()}
    if listed != found:
        bad = sorted(k for k in set(listed) | set(found) if listed.get(k) != found.get(k))
        raise ConversionError(f"{path}: {PARAMS_FILE} does not match {MANIFEST_FILE} at {bad}")
    check_finite(flat, source=os.path.join(path, PARAMS_FILE))
    return config, unflatten(flat)
