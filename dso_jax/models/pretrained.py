"""Pretrained models: build from a json, convert, load (TRELLIS stage 1, the stage-2 SLat flow and decoders, DINOv2,
LoRA), and the conversion CLI's work.

``load_pretrained(path)`` returns ``(apply_fn, params)``:

* ``path`` is a converted folder (``params.safetensors`` + ``config.json``, see
  ``ported_weights/README.md``), a folder holding exactly one converted folder, or a TRELLIS checkpoint
  prefix ``.../ckpts/NAME`` (``NAME.json`` and ``NAME.safetensors`` beside it), converted in memory;
* ``params`` is the inner parameter dict (what ``variables['params']`` is), float32 master weights;
* ``apply_fn(params, x, t, cond)`` (flow; x (B, C, R, R, R), t (B,) in [0, 1000], cond (B, S, Cc)) or
  ``apply_fn(params, z)`` (decoder; z (B, 8, R, R, R) -> logits (B, 1, 4R, 4R, 4R)) or
  ``apply_fn(params, x, t, cond)`` (SLat flow; x a ``dso_jax.sparse.SparseBatch`` -> a SparseBatch of
  velocities on the same voxels; build x with ``sparse.from_trellis(coords, feats,
  downsamples=apply_fn.module.downsamples)``) or ``apply_fn(params, x)`` (SLat mesh / Gaussian decoder; x from
  ``slat_decoders.decoder_input(coords, slat, **apply_fn.module.input_kwargs)`` -> a SparseBatch of the
  ``out_layer`` features: 101 channels on the 256³ voxels / 448 on the input voxels) calls
  ``module.apply({'params': params}, ...)``. It is not jitted, so it composes into jitted samplers
  and train steps; ``jax.jit(apply_fn)`` works.

``load_models(flow, decoder, dinov2)`` loads the three models of the image -> 3D pipeline (:class:`Models`),
any of them as random weights of a preset (``RANDOM_PRESETS``) for demos and tests; ``load_dinov2`` reads
a converted DINOv2 folder or the hub's ``.pth``. LoRA files are applied by ``dso_jax.convert.peft.apply_lora``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from dso_jax import sparse
from dso_jax.convert import files, peft, trellis, trellis_slat
from dso_jax.convert.verify import ConversionError, check_finite, check_finite_and_deterministic, tree_diff
from dso_jax.models import dinov2
from dso_jax.models.slat_decoders import SLatGaussianDecoder, SLatMeshDecoder, decoder_input, offset_perturbation_of
from dso_jax.models.slat_flow import SLatFlowModel
from dso_jax.models.ss_decoder import SparseStructureDecoder
from dso_jax.models.ss_flow import SparseStructureFlowModel

MODEL_CLASSES = {
    trellis.FLOW: SparseStructureFlowModel,
    trellis.DECODER: SparseStructureDecoder,
    **{name: SLatFlowModel for name in trellis_slat.SLAT_FLOW_NAMES},
    **{name: SLatMeshDecoder for name in trellis_slat.SLAT_MESH_DECODER_NAMES},
    **{name: SLatGaussianDecoder for name in trellis_slat.SLAT_GS_DECODER_NAMES},
}
SPARSE_MODELS = (SLatFlowModel, SLatMeshDecoder, SLatGaussianDecoder)  # SparseBatch in, SparseBatch out
EXAMPLE_VOXELS = (300, 200)  # voxels per object of the SLat flow's example inputs (two objects for batch 2)


def model_from_config(name: str, args: Mapping[str, Any], dtype: Any = jnp.float32) -> nn.Module:
    """The Flax module of a TRELLIS json ``{"name": name, "args": args}``, computing in ``dtype``."""
    cls = MODEL_CLASSES.get(name)
    if cls is None:
        raise ValueError(f"model_from_config: unknown model {name!r}; known: {sorted(MODEL_CLASSES)}")
    trellis.full_args(name, args, source=f"{name} args")  # names any unknown or missing arg
    # Module fields must be hashable (jit / lru_cache keys): lists -> tuples, dicts (representation_config) frozen.
    kwargs = {
        k: tuple(v) if isinstance(v, list) else FrozenDict(v) if isinstance(v, Mapping) else v for k, v in args.items()
    }
    return cls(**kwargs, dtype=jnp.dtype(dtype))


def default_dtype(name: str, args: Mapping[str, Any]) -> jnp.dtype:
    """float32 on CPU; bfloat16 on an accelerator when the json asks for ``use_fp16``."""
    if jax.default_backend() != "cpu" and trellis.full_args(name, args)["use_fp16"]:
        return jnp.dtype(jnp.bfloat16)
    return jnp.dtype(jnp.float32)


def example_inputs(
    module: nn.Module, *, batch: int = 1, cond_len: int = 8, latent_res: int = 16, seed: int = 0
) -> tuple:
    """Random inputs in TRELLIS's layout: (x, t, cond) for the flow models, (z,) for the decoder, (x,) for the SLat
    decoders (a ``SparseBatch`` of small voxel shells)."""
    rng = np.random.default_rng(seed)
    if isinstance(module, (SLatMeshDecoder, SLatGaussianDecoder)):
        counts = [EXAMPLE_VOXELS[i % len(EXAMPLE_VOXELS)] for i in range(batch)]
        coords = sparse.example_coords(counts, module.resolution, seed=seed)
        feats = rng.standard_normal((len(coords), module.latent_channels), np.float32)
        return (decoder_input(coords, feats, quantum=256, **module.input_kwargs),)
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
    if isinstance(module, SLatGaussianDecoder):
        return {"offset_perturbation": offset_perturbation_of(module)}
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
        source = os.path.join(path, trellis.PARAMS_FILE)
        tree_diff(params, abstract_params(module), source=source)
        check_finite(params, source=source)
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
    ``lora`` (a peft / DSO safetensors file, peft folder or state dict) is merged into the params by
    ``dso_jax.convert.peft.apply_lora``: alpha is ``lora_alpha`` if given, else the file's own, else DSO's 128.
    """
    config, params = _load_params(path)
    if lora is not None:
        params, _ = peft.apply_lora(params, lora, alpha=lora_alpha)
    dtype = default_dtype(config["name"], config["args"]) if dtype is None else dtype
    module = model_from_config(config["name"], config["args"], dtype=dtype)
    return make_apply_fn(module), jax.tree.map(jnp.asarray, params)


# ---------------------------------------------------------------------------------------------- image -> 3D models

# Architectures for random weights (no files): the released ones (trellis.md §2.1, §3.1) and a CPU-sized set
# with the released latent / occupancy shapes ((8, 16, 16, 16) -> 64^3) and 1374 DINOv2 tokens.
RANDOM_PRESETS = {
    "released": (trellis.RELEASED_FLOW_ARGS, trellis.RELEASED_DECODER_ARGS, "vitl14_reg4"),
    "tiny": (
        dict(
            trellis.RELEASED_FLOW_ARGS,
            model_channels=32,
            cond_channels=64,
            num_blocks=2,
            num_heads=2,
            patch_size=2,
            use_fp16=False,
        ),
        dict(
            trellis.RELEASED_DECODER_ARGS,
            num_res_blocks=1,
            num_res_blocks_middle=1,
            channels=(16, 8, 8),
            use_fp16=False,
        ),
        "tiny_reg4",
    ),
}


# The tiny random SS decoder's output bias: about 0.4% of the 64³ grid occupied (~1k voxels, a shell's count at CPU
# size) instead of ~50% for a zero-mean bias, so that stage 2 runs on its structure on a CPU.
RANDOM_OCCUPANCY_BIAS = {"tiny": -1.5}


@dataclasses.dataclass
class Models:
    """Stage-1 flow, decoder and DINOv2: apply functions (``.module`` attached) and float32 params."""

    flow: Callable
    flow_params: dict
    decoder: Callable
    decoder_params: dict
    dinov2_cfg: dinov2.DinoV2Config
    dinov2_params: dict
    source: dict  # what was loaded (paths, random preset, LoRA): recorded with generated data

    @property
    def latent_shape(self) -> tuple:
        m = self.flow.module
        return (m.in_channels,) + (m.resolution,) * 3


def random_params(abstract, seed: int) -> dict:
    """Random non-trivial float32 values for a shape tree (no compile): kernels ~ N(0, 1/fan_in), biases
    ~ 0.1 N, norm scales / LayerScale gammas ~ 1 + 0.1 N, other tensors (tokens, embeddings) ~ 0.02 N."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = getattr(path[-1], "key", str(path[-1]))
        w = rng.standard_normal(x.shape, np.float32)
        if name == "kernel":
            w /= np.sqrt(max(int(np.prod(x.shape[:-1])), 1))
        elif name in ("scale", "gamma"):
            w = 1.0 + 0.1 * w
        else:
            w *= 0.1 if name == "bias" else 0.02
        return jnp.asarray(w.astype(x.dtype))

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def _random_model(name: str, args: dict, seed: int):
    module = model_from_config(name, args, dtype=default_dtype(name, args))
    return make_apply_fn(module), random_params(abstract_params(module), seed)


def load_dinov2(path: str) -> tuple[dinov2.DinoV2Config, dict]:
    """A converted DINOv2 folder (``scripts/convert_dinov2.py``) or the hub's ``.pth`` (ViT-L/14 reg4)."""
    from dso_jax.convert import dinov2 as convert

    if path.endswith(".pth"):
        return dinov2.VITL14_REG4, convert.convert_dinov2_state_dict(convert.load_dinov2_pth(path), dinov2.VITL14_REG4)
    cfg_file = os.path.join(path, convert.CONFIG_FILE)
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path}: neither a converted DINOv2 folder (no {convert.CONFIG_FILE}) nor a .pth file")
    if "name" in files.read_json(cfg_file):
        raise ValueError(f"{path}: is a converted TRELLIS model folder, not DINOv2 (pass it as --flow/--decoder)")
    config, params = convert.load_converted_dinov2(path)
    return dinov2.config_from_dict(config), params


def load_models(
    flow: Optional[str] = None,
    decoder: Optional[str] = None,
    dinov2_path: Optional[str] = None,
    *,
    random_weights: Optional[str] = None,
    seed: int = 0,
) -> Models:
    """Load the three models from paths (converted folders / TRELLIS prefixes / DINOv2 .pth). With
    ``random_weights`` ('released' | 'tiny'), the models without a path get random weights of that preset."""
    if random_weights is not None and random_weights not in RANDOM_PRESETS:
        raise ValueError(f"random_weights must be one of {sorted(RANDOM_PRESETS)}, got {random_weights!r}")
    missing = [n for n, p in (("--flow", flow), ("--decoder", decoder), ("--dinov2", dinov2_path)) if not p]
    if missing and random_weights is None:
        raise ValueError(f"no path for {', '.join(missing)}; pass them or --random_weights released|tiny")
    preset = RANDOM_PRESETS.get(random_weights or "tiny")
    f_apply, f_params = load_pretrained(flow) if flow else _random_model(trellis.FLOW, preset[0], seed)
    d_apply, d_params = load_pretrained(decoder) if decoder else _random_model(trellis.DECODER, preset[1], seed + 1)
    if not decoder and random_weights in RANDOM_OCCUPANCY_BIAS:
        out = dict(
            d_params["out_layer_2"],
            bias=jnp.full_like(d_params["out_layer_2"]["bias"], RANDOM_OCCUPANCY_BIAS[random_weights]),
        )
        d_params = {**d_params, "out_layer_2": out}
    if dinov2_path:
        g_cfg, g_params = load_dinov2(dinov2_path)
    else:
        g_cfg = dinov2.get_config(preset[2])
        g_params = random_params(jax.eval_shape(lambda: dinov2.init_params(jax.random.PRNGKey(0), g_cfg)), seed + 2)
    fm, dm = f_apply.module, d_apply.module
    if fm.cond_channels != g_cfg.embed_dim:
        raise ValueError(f"flow cond_channels {fm.cond_channels} != DINOv2 embed_dim {g_cfg.embed_dim}")
    if fm.out_channels != dm.latent_channels:
        raise ValueError(f"flow out_channels {fm.out_channels} != decoder latent_channels {dm.latent_channels}")
    name = lambda p: os.path.abspath(p) if p else f"random:{random_weights}"  # noqa: E731
    source = dict(
        flow=name(flow), decoder=name(decoder), dinov2=name(dinov2_path), weights_seed=seed if missing else None
    )
    return Models(f_apply, f_params, d_apply, d_params, g_cfg, jax.tree.map(jnp.asarray, g_params), source)


def with_lora(models: Models, path: str, alpha: Optional[float] = None) -> Models:
    """``models`` with a peft LoRA file merged into the flow (``peft.apply_lora``; the alpha used is recorded)."""
    params, info = peft.apply_lora(models.flow_params, path, alpha=alpha)
    source = dict(models.source, lora=info["path"], lora_alpha=info["alpha"], lora_rank=info["rank"])
    return dataclasses.replace(models, flow_params=params, source=source)


# ---------------------------------------------------------------------------------------------- conversion CLI


def _source_prefixes(src: str) -> list[str]:
    """The checkpoint prefixes to convert: a pipeline folder's stage-1 models (both required) and its stage-2
    SLat flow when the folder holds it, or one ``NAME`` prefix."""
    if trellis.is_pipeline_folder(src):
        found = trellis.pipeline_stage1_prefixes(src)
        missing = [role for role in trellis.STAGE1_ROLES if role not in found]
        if missing:
            raise ConversionError(
                f"{os.path.join(src, trellis.PIPELINE_FILE)}: args.models has no {' / '.join(map(repr, missing))} "
                "entry (a stage-1 TRELLIS pipeline lists both the flow and the decoder)"
            )
        return [found[role] for role in trellis.STAGE1_ROLES] + list(trellis.pipeline_stage2_prefixes(src).values())
    if trellis.is_trellis_prefix(src):
        return [src]
    raise FileNotFoundError(
        f"{src}: neither a TRELLIS folder ({trellis.PIPELINE_FILE}) nor a checkpoint prefix ({src}.json + {src}.safetensors)"
    )


def convert_trellis(
    src: str, dst: str, *, verify: bool = False, overwrite: bool = False, log: Callable[[str], None] = print
) -> list[str]:
    """The conversion CLI: ``src`` is a TRELLIS folder (its stage-1 models, and the stage-2 SLat flow and decoders
    when their files are there) or one ``NAME`` prefix.

    Writes ``dst/NAME/{params.safetensors, config.json, manifest.json}`` per model and copies a
    folder's ``pipeline.json`` to ``dst/source_pipeline.json``. With ``verify``, reloads each model
    and checks that a forward pass on random inputs is finite and deterministic. All of it is written
    into a temporary sibling of ``dst`` and renamed at the end (``dso_jax.convert.files.staged_folder``): a failure
    leaves no partial ``dst``; an existing non-empty ``dst`` is refused unless ``overwrite``.
    Returns the model folders.
    """
    prefixes = _source_prefixes(src)
    dst = os.path.abspath(dst)
    names = [os.path.basename(p) for p in prefixes]
    with files.staged_folder(dst, overwrite=overwrite) as tmp:
        for prefix, name in zip(prefixes, names):
            config, params, manifest = convert_checkpoint(prefix, hash_files=True)
            trellis.write_converted(os.path.join(tmp, name), config, params, manifest)
            log(
                f"{prefix} -> {os.path.join(dst, name)}: {config['name']}, {manifest['params']['count']:,} params, "
                f"source sha256 {manifest['source']['sha256'][:16]}"
            )
            del params
        if trellis.is_pipeline_folder(src):  # kept for its sampler settings; renamed so DST is not a TRELLIS folder
            shutil.copyfile(os.path.join(src, trellis.PIPELINE_FILE), os.path.join(tmp, trellis.SOURCE_PIPELINE_FILE))
        for name in names if verify else ():
            apply_fn, params = load_pretrained(os.path.join(tmp, name))
            where = os.path.join(dst, name)
            fn = apply_fn if not isinstance(apply_fn.module, SPARSE_MODELS) else lambda p, *a: apply_fn(p, *a).feats
            stats = check_finite_and_deterministic(fn, params, example_inputs(apply_fn.module), name=where)
            log(
                f"verify {where}: output {stats['shape']} finite and deterministic; mean {stats['mean']:.4g} "
                f"std {stats['std']:.4g} max|y| {stats['max_abs']:.4g}"
            )
    return [os.path.join(dst, name) for name in names]


__all__ = [
    "load_pretrained",
    "load_models",
    "load_dinov2",
    "with_lora",
    "Models",
    "model_from_config",
    "convert_trellis",
    "convert_checkpoint",
    "ConversionError",
]
