"""Pretrained TRELLIS models (stage 1, and stage 2's SLat flow): build from a json, convert, load, and the
conversion CLI's work.

``load_pretrained(path)`` returns ``(apply_fn, params)``:

* ``path`` is a converted folder (``params.safetensors`` + ``config.json``, see
  ``ported_weights/README.md``), a folder holding exactly one converted folder, or a TRELLIS checkpoint
  prefix ``.../ckpts/NAME`` (``NAME.json`` and ``NAME.safetensors`` beside it), converted in memory;
* ``params`` is the inner parameter dict (what ``variables['params']`` is), float32 master weights;
* ``apply_fn(params, x, t, cond)`` (flow; x (B, C, R, R, R), t (B,) in [0, 1000], cond (B, S, Cc)) or
  ``apply_fn(params, z)`` (decoder; z (B, 8, R, R, R) -> logits (B, 1, 4R, 4R, 4R)) or
  ``apply_fn(params, x, t, cond)`` (SLat flow; x a ``dso_jax.sparse.SparseBatch`` -> a SparseBatch of
  velocities on the same voxels; build x with ``sparse.from_trellis(coords, feats,
  downsamples=apply_fn.module.downsamples)``) calls
  ``module.apply({'params': params}, ...)``. It is not jitted, so it composes into jitted samplers
  and train steps; ``jax.jit(apply_fn)`` works.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dso_jax import sparse
from dso_jax.convert import trellis, trellis_slat
from dso_jax.convert.verify import ConversionError, check_finite_and_deterministic, tree_diff
from dso_jax.models.slat_flow import SLatFlowModel
from dso_jax.models.ss_decoder import SparseStructureDecoder
from dso_jax.models.ss_flow import SparseStructureFlowModel

MODEL_CLASSES = {
    trellis.FLOW: SparseStructureFlowModel,
    trellis.DECODER: SparseStructureDecoder,
    **{name: SLatFlowModel for name in trellis_slat.SLAT_FLOW_NAMES},
}
EXAMPLE_VOXELS = (300, 200)  # voxels per object of the SLat flow's example inputs (two objects for batch 2)


def model_from_config(name: str, args: Mapping[str, Any], dtype: Any = jnp.float32) -> nn.Module:
    """The Flax module of a TRELLIS json ``{"name": name, "args": args}``, computing in ``dtype``."""
    cls = MODEL_CLASSES.get(name)
    if cls is None:
        raise ValueError(f"model_from_config: unknown model {name!r}; known: {sorted(MODEL_CLASSES)}")
    trellis.full_args(name, args, source=f"{name} args")  # names any unknown or missing arg
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    return cls(**kwargs, dtype=jnp.dtype(dtype))


def default_dtype(name: str, args: Mapping[str, Any]) -> jnp.dtype:
    """float32 on CPU; bfloat16 on an accelerator when the json asks for ``use_fp16``."""
    if jax.default_backend() != "cpu" and trellis.full_args(name, args)["use_fp16"]:
        return jnp.dtype(jnp.bfloat16)
    return jnp.dtype(jnp.float32)


def example_inputs(
    module: nn.Module, *, batch: int = 1, cond_len: int = 8, latent_res: int = 16, seed: int = 0
) -> tuple:
    """Random inputs in TRELLIS's layout: (x, t, cond) for the flow models, (z,) for the decoder."""
    rng = np.random.default_rng(seed)
    if isinstance(module, SLatFlowModel):
        counts = [EXAMPLE_VOXELS[i % len(EXAMPLE_VOXELS)] for i in range(batch)]
        coords = sparse.example_coords(counts, module.resolution, seed=seed)
        feats = rng.standard_normal((len(coords), module.in_channels), np.float32)
        x = sparse.from_trellis(
            coords, feats, resolution=module.resolution, downsamples=module.downsamples, quantum=256, coarse_quantum=128
        )
        t = rng.uniform(0.0, 1000.0, (batch,)).astype(np.float32)
        cond = rng.standard_normal((batch, cond_len, module.cond_channels), np.float32)
        return x, jnp.asarray(t), jnp.asarray(cond)
    if isinstance(module, SparseStructureFlowModel):
        r = module.resolution
        x = rng.standard_normal((batch, module.in_channels, r, r, r), np.float32)
        t = rng.uniform(0.0, 1000.0, (batch,)).astype(np.float32)
        cond = rng.standard_normal((batch, cond_len, module.cond_channels), np.float32)
        return jnp.asarray(x), jnp.asarray(t), jnp.asarray(cond)
    if isinstance(module, SparseStructureDecoder):
        z = rng.standard_normal((batch, module.latent_channels) + (latent_res,) * 3, np.float32)
        return (jnp.asarray(z),)
    raise TypeError(f"example_inputs: unsupported module {type(module).__name__}")


def abstract_params(module: nn.Module) -> dict:
    """``jax.eval_shape`` of the module's init: the inner params tree of ShapeDtypeStructs (no compute)."""
    small = example_inputs(module, cond_len=1, latent_res=1)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *small))
    return shapes["params"]


def make_apply_fn(module: nn.Module) -> Callable:
    """``apply_fn(params, *inputs) = module.apply({'params': params}, *inputs)``."""

    def apply_fn(params, *inputs):
        return module.apply({"params": params}, *inputs)

    apply_fn.module = module
    return apply_fn


def buffers_of(module: nn.Module) -> dict[str, np.ndarray]:
    """Recomputed persistent buffers of the original (the 'ape' flow model's ``pos_emb``)."""
    if isinstance(module, SparseStructureFlowModel) and module.pe_mode == "ape":
        return {"pos_emb": module.pos_emb()}
    return {}


def convert_checkpoint(prefix: str, *, hash_files: bool = False) -> tuple[dict, dict, dict]:
    """TRELLIS ``PREFIX.{json,safetensors}`` -> (config, float32 numpy params, manifest), strictly checked."""
    config, state_dict, info = trellis.read_checkpoint(prefix, hash_files=hash_files)
    module = model_from_config(config["name"], config["args"])
    buffers = buffers_of(module)
    params = trellis.convert_state_dict(state_dict, config, buffers=buffers, source=info["safetensors"])
    tree_diff(params, abstract_params(module), source=info["safetensors"])
    checks = {
        k: {
            "recomputed_by": f"{type(module).__name__}.{k}()",
            "atol": trellis.BUFFER_ATOL,
            "max_abs_diff": float(np.max(np.abs(state_dict[k].astype(np.float64) - v))),
        }
        for k, v in buffers.items()
    }
    manifest = trellis.make_manifest(os.path.basename(prefix), config, state_dict, info, checks)
    return config, params, manifest


def _load_params(path: str) -> tuple[dict, dict]:
    """(config, numpy params) from a converted folder or a TRELLIS prefix, checked against the model."""
    if trellis.is_converted_folder(path):
        config, params = trellis.read_converted(path)
        module = model_from_config(config["name"], config["args"])
        tree_diff(params, abstract_params(module), source=os.path.join(path, trellis.PARAMS_FILE))
        return config, params
    if trellis.is_trellis_prefix(path):
        config, params, _ = convert_checkpoint(path)
        return config, params
    if trellis.is_pipeline_folder(path):
        prefixes = sorted(
            [*trellis.pipeline_stage1_prefixes(path).values(), *trellis.pipeline_stage2_prefixes(path).values()]
        )
        raise ValueError(f"{path} is a TRELLIS pipeline folder; load one model: {prefixes}")
    subs = (
        sorted(d for d in os.listdir(path) if trellis.is_converted_folder(os.path.join(path, d)))
        if os.path.isdir(path)
        else []
    )
    if len(subs) == 1:  # DST of a one-model conversion: that model
        return _load_params(os.path.join(path, subs[0]))
    if subs:
        raise ValueError(f"{path} holds converted models {subs}; pass one of those folders")
    raise FileNotFoundError(
        f"{path}: neither a converted folder ({trellis.PARAMS_FILE} + {trellis.CONFIG_FILE}) "
        f"nor a TRELLIS checkpoint prefix ({path}.json + {path}.safetensors)"
    )


def load_pretrained(path: str, *, dtype: Any = None, lora: Any = None, lora_alpha: Optional[float] = None):
    """(apply_fn, params) for a converted folder or a TRELLIS ``NAME`` prefix; see the module docstring.

    ``dtype`` is the compute dtype of the transformer blocks / decoder torso (params stay float32);
    None picks float32 on CPU and bfloat16 on an accelerator when the json says ``use_fp16``.
    ``lora`` (a peft / DSO safetensors file or state dict) is merged into the params with
    ``lora_alpha`` (peft does not store alpha; DSO: 128); see ``dso_jax.lora.load_peft``.
    """
    if (lora is None) != (lora_alpha is None):
        raise ValueError(
            "load_pretrained: pass lora and lora_alpha together (peft files do not store alpha; DSO used 128)"
        )
    config, params = _load_params(path)
    if lora is not None:
        from dso_jax import lora as lora_overlay

        params = lora_overlay.merge(params, lora_overlay.load_peft(lora, params, alpha=lora_alpha, targets=None))
    dtype = default_dtype(config["name"], config["args"]) if dtype is None else dtype
    module = model_from_config(config["name"], config["args"], dtype=dtype)
    return make_apply_fn(module), jax.tree.map(jnp.asarray, params)


def convert_trellis(src: str, dst: str, *, verify: bool = False, log: Callable[[str], None] = print) -> list[str]:
    """The conversion CLI: ``src`` is a TRELLIS folder (its stage-1 models, and the stage-2 SLat flow when its
    files are there) or one ``NAME`` prefix.

    Writes ``dst/NAME/{params.safetensors, config.json, manifest.json}`` per model and copies a
    folder's ``pipeline.json`` to ``dst/source_pipeline.json``. With ``verify``, reloads each model
    and checks that a forward pass on random inputs is finite and deterministic. Returns the folders.
    """
    if trellis.is_pipeline_folder(src):
        prefixes = list(trellis.pipeline_stage1_prefixes(src).values()) + list(
            trellis.pipeline_stage2_prefixes(src).values()
        )
    elif trellis.is_trellis_prefix(src):
        prefixes = [src]
    else:
        raise FileNotFoundError(
            f"{src}: neither a TRELLIS folder ({trellis.PIPELINE_FILE}) nor a checkpoint prefix ({src}.json + {src}.safetensors)"
        )
    out = []
    for prefix in prefixes:
        config, params, manifest = convert_checkpoint(prefix, hash_files=True)
        folder = os.path.join(dst, os.path.basename(prefix))
        trellis.write_converted(folder, config, params, manifest)
        log(
            f"{prefix} -> {folder}: {config['name']}, {manifest['params']['count']:,} params, "
            f"source sha256 {manifest['source']['sha256'][:16]}"
        )
        del params
        out.append(folder)
    if trellis.is_pipeline_folder(
        src
    ):  # kept for its sampler settings; renamed so DST is not taken for a TRELLIS folder
        shutil.copyfile(os.path.join(src, trellis.PIPELINE_FILE), os.path.join(dst, trellis.SOURCE_PIPELINE_FILE))
    if verify:
        for folder in out:
            apply_fn, params = load_pretrained(folder)
            fn = apply_fn if not isinstance(apply_fn.module, SLatFlowModel) else lambda p, *a: apply_fn(p, *a).feats
            stats = check_finite_and_deterministic(fn, params, example_inputs(apply_fn.module), name=folder)
            log(
                f"verify {folder}: output {stats['shape']} finite and deterministic; mean {stats['mean']:.4g} "
                f"std {stats['std']:.4g} max|y| {stats['max_abs']:.4g}"
            )
    return out


__all__ = ["load_pretrained", "model_from_config", "convert_trellis", "convert_checkpoint", "ConversionError"]
