"""TRELLIS checkpoints: key tables, strict conversion to Flax, export back, and file I/O.

Key tables are written from the reference (``trellis.md`` §2.9, §3.3; stage 2's SLat flow in
``trellis_slat``, §4.4): for a model's json ``args``
they list every state-dict entry with its module kind (which picks the rule in ``rules.py``), its
PyTorch shape and the dtype the released ``*_fp16`` checkpoints store it in. Conversion checks a
state dict against the table and raises one :class:`ConversionError` naming every missing,
unexpected or mis-shaped key. Persistent buffers (the flow model's ``pos_emb``) are not parameters:
the caller passes their recomputed value and conversion refuses a stored copy that differs.

This module does not import ``dso_jax.models``; ``dso_jax.models.pretrained`` ties tables to modules.

File formats:

* TRELLIS: ``FOLDER/pipeline.json`` lists ``ckpts/NAME``; each ``NAME.json`` is ``{"name", "args"}``
  and ``NAME.safetensors`` the state dict.
* Converted: ``DIR/params.safetensors`` (float32, '/'-joined Flax keys), ``DIR/config.json`` (the
  TRELLIS json, verbatim) and ``DIR/manifest.json`` (source sha256, every source tensor's name,
  shape, dtype and the Flax key it became).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional

import numpy as np

from dso_jax.convert import rules
from dso_jax.convert.files import read_json, read_safetensors, write_json
from dso_jax.convert.rules import BUFFER, flatten, unflatten
from dso_jax.convert.verify import ConversionError, diff_lines, is_float, raise_if

FLOW = "SparseStructureFlowModel"
DECODER = "SparseStructureDecoder"
STAGE1_ROLES = ("sparse_structure_flow_model", "sparse_structure_decoder")  # keys of pipeline.json args.models
STAGE2_ROLES = ("slat_flow_model", "slat_decoder_mesh", "slat_decoder_gs")  # converted when their files are there

PARAMS_FILE, CONFIG_FILE, MANIFEST_FILE, PIPELINE_FILE = (
    "params.safetensors",
    "config.json",
    "manifest.json",
    "pipeline.json",
)
SOURCE_PIPELINE_FILE = "source_pipeline.json"  # a converted folder's copy of the source pipeline.json
FORMAT = "dso_jax.converted.v1"
BUFFER_ATOL = 1e-5  # stored buffers must equal their recomputed value to this absolute tolerance

F16, F32 = "float16", "float32"
STORED_DTYPES = (F16, "bfloat16", F32)  # what a checkpoint may store; float64 is refused, not silently narrowed


@dataclasses.dataclass(frozen=True)
class Entry:
    """One state-dict entry: PyTorch key, module kind, PyTorch shape, dtype in the released file."""

    torch_key: str
    kind: str
    shape: tuple[int, ...]
    released: str

    @property
    def flax_key(self) -> Optional[str]:
        return rules.flax_key(self.torch_key, self.kind)

    @property
    def flax_shape(self) -> Optional[tuple[int, ...]]:
        return None if self.kind == BUFFER else rules.leaf_rule(self.kind, self.torch_key).flax_shape(self.shape)


# ----------------------------------------------------------------------------------------------------
# Key tables
# ----------------------------------------------------------------------------------------------------

# Constructor defaults of the TRELLIS classes (json args may omit them). None marks a required arg.
FLOW_ARGS = dict(
    resolution=None,
    in_channels=None,
    model_channels=None,
    cond_channels=None,
    out_channels=None,
    num_blocks=None,
    num_heads=None,
    num_head_channels=64,
    mlp_ratio=4,
    patch_size=2,
    pe_mode="ape",
    use_fp16=False,
    use_checkpoint=False,
    share_mod=False,
    qk_rms_norm=False,
    qk_rms_norm_cross=False,
)
DECODER_ARGS = dict(
    out_channels=None,
    latent_channels=None,
    num_res_blocks=None,
    channels=None,
    num_res_blocks_middle=2,
    norm_type="layer",
    use_fp16=False,
)
_REQUIRED_NONE_OK = {"num_heads", "io_block_channels", "representation_config"}  # default to None legitimately
# The released stage-1 models' json args (TRELLIS-image-large ``ckpts/ss_flow_img_dit_L_16l8_fp16.json`` and
# ``ckpts/ss_dec_conv3d_16l8_fp16.json``; trellis.md §2.1, §3.1): configs, random-weight presets and benches.
RELEASED_FLOW_ARGS = dict(
    resolution=16,
    in_channels=8,
    model_channels=1024,
    cond_channels=1024,
    out_channels=8,
    num_blocks=24,
    num_heads=16,
    mlp_ratio=4,
    patch_size=1,
    pe_mode="ape",
    qk_rms_norm=True,
    use_fp16=True,
)
RELEASED_DECODER_ARGS = dict(
    out_channels=1, latent_channels=8, num_res_blocks=2, num_res_blocks_middle=2, channels=(512, 128, 32), use_fp16=True
)


def _models() -> dict:
    """Model name -> (constructor defaults, key-table builder); stage 2 lives in ``trellis_slat``."""
    from dso_jax.convert import trellis_slat  # imported here: its tables build on this module's helpers

    stage2 = {
        name: (trellis_slat.SLAT_FLOW_ARGS, trellis_slat.slat_flow_table) for name in trellis_slat.SLAT_FLOW_NAMES
    }
    stage2.update(
        {
            n: (trellis_slat.SLAT_DECODER_ARGS, trellis_slat.slat_mesh_decoder_table)
            for n in trellis_slat.SLAT_MESH_DECODER_NAMES
        }
    )
    stage2.update(
        {
            n: (trellis_slat.SLAT_DECODER_ARGS, trellis_slat.slat_gs_decoder_table)
            for n in trellis_slat.SLAT_GS_DECODER_NAMES
        }
    )
    return {FLOW: (FLOW_ARGS, ss_flow_table), DECODER: (DECODER_ARGS, ss_decoder_table), **stage2}


def full_args(name: str, args: Mapping, *, source: str = "config") -> dict:
    """``args`` with the constructor defaults filled in; raises naming unknown or missing args."""
    spec = _models().get(name, (None,))[0]
    if spec is None:
        raise ConversionError(f"{source}: model name {name!r} is not a model we convert ({', '.join(_models())})")
    unknown = sorted(set(args) - set(spec))
    missing = sorted(k for k, v in spec.items() if v is None and k not in _REQUIRED_NONE_OK and k not in args)
    lines = [f"{source}: unknown arg {k!r} for {name}" for k in unknown]
    lines += [f"{source}: missing required arg {k!r} for {name}" for k in missing]
    raise_if(lines, f"{source}: bad {name} config")
    return {**spec, **args}


def _linear(prefix: str, fan_in: int, fan_out: int, dtype: str = F32, bias: bool = True) -> list[Entry]:
    t = [Entry(f"{prefix}.weight", "linear", (fan_out, fan_in), dtype)]
    return t + [Entry(f"{prefix}.bias", "linear", (fan_out,), dtype)] if bias else t


def _conv3d(prefix: str, cin: int, cout: int, k: int, dtype: str = F32) -> list[Entry]:
    return [
        Entry(f"{prefix}.weight", "conv3d", (cout, cin, k, k, k), dtype),
        Entry(f"{prefix}.bias", "conv3d", (cout,), dtype),
    ]


def _norm(prefix: str, c: int, kind: str = "layernorm") -> list[Entry]:
    return [Entry(f"{prefix}.weight", kind, (c,), F32), Entry(f"{prefix}.bias", kind, (c,), F32)]


def _rms(prefix: str, heads: int, head_dim: int) -> list[Entry]:
    return [Entry(f"{prefix}.gamma", "rmsnorm", (heads, head_dim), F32)]


def ss_flow_table(args: Mapping) -> list[Entry]:
    """State-dict entries of ``SparseStructureFlowModel(**args)``, in PyTorch's order (``trellis.md`` §2.9)."""
    a = full_args(FLOW, args)
    c, p = a["model_channels"], a["patch_size"]
    tokens = (a["resolution"] // p) ** 3
    half = F16 if a["use_fp16"] else F32  # convert_to_fp16 casts the Linear params inside `blocks` only
    t = [Entry("pos_emb", BUFFER, (tokens, c), F32)] if a["pe_mode"] == "ape" else []
    t += _linear("t_embedder.mlp.0", 256, c) + _linear("t_embedder.mlp.2", c, c)
    if a["share_mod"]:
        t += _linear("adaLN_modulation.1", c, 6 * c)
    t += _linear("input_layer", a["in_channels"] * p**3, c)
    for i in range(a["num_blocks"]):
        t += cross_block_entries(f"blocks.{i}.", a, half)
    return t + _linear("out_layer", c, a["out_channels"] * p**3)


def cross_block_entries(b: str, a: Mapping, half: str) -> list[Entry]:
    """One ``ModulatedTransformerCrossBlock`` (stage 1) / ``ModulatedSparseTransformerCrossBlock`` (stage 2)."""
    c, cc = a["model_channels"], a["cond_channels"]
    heads = a["num_heads"] or c // a["num_head_channels"]
    hd, hidden = c // heads, int(c * a["mlp_ratio"])
    t = _norm(b + "norm2", c)
    t += _linear(b + "self_attn.to_qkv", c, 3 * c, half)
    if a["qk_rms_norm"]:
        t += _rms(b + "self_attn.q_rms_norm", heads, hd) + _rms(b + "self_attn.k_rms_norm", heads, hd)
    t += _linear(b + "self_attn.to_out", c, c, half)
    t += _linear(b + "cross_attn.to_q", c, c, half) + _linear(b + "cross_attn.to_kv", cc, 2 * c, half)
    if a["qk_rms_norm_cross"]:
        t += _rms(b + "cross_attn.q_rms_norm", heads, hd) + _rms(b + "cross_attn.k_rms_norm", heads, hd)
    t += _linear(b + "cross_attn.to_out", c, c, half)
    t += _linear(b + "mlp.mlp.0", c, hidden, half) + _linear(b + "mlp.mlp.2", hidden, c, half)
    if not a["share_mod"]:
        t += _linear(b + "adaLN_modulation.1", c, 6 * c, half)
    return t


def _resblock(prefix: str, c: int, half: str) -> list[Entry]:
    # ResBlock3d(c, c): channel LayerNorms always (whatever norm_type), no skip conv.
    return (
        _norm(prefix + ".norm1", c)
        + _norm(prefix + ".norm2", c)
        + _conv3d(prefix + ".conv1", c, c, 3, half)
        + _conv3d(prefix + ".conv2", c, c, 3, half)
    )


def ss_decoder_table(args: Mapping) -> list[Entry]:
    """State-dict entries of ``SparseStructureDecoder(**args)``, in PyTorch's order (``trellis.md`` §3.3)."""
    a = full_args(DECODER, args)
    ch, half = list(a["channels"]), F16 if a["use_fp16"] else F32
    if a["norm_type"] not in ("layer", "group"):
        raise ConversionError(f"config: norm_type must be 'layer' or 'group', got {a['norm_type']!r}")
    t = _conv3d("input_layer", a["latent_channels"], ch[0], 3)
    for i in range(a["num_res_blocks_middle"]):
        t += _resblock(f"middle_block.{i}", ch[0], half)
    idx = 0
    for i, c in enumerate(ch):
        for _ in range(a["num_res_blocks"]):
            t += _resblock(f"blocks.{idx}", c, half)
            idx += 1
        if i < len(ch) - 1:
            t += _conv3d(f"blocks.{idx}.conv", c, 8 * ch[i + 1], 3, half)  # UpsampleBlock3d: conv, then pixel shuffle
            idx += 1
    t += _norm("out_layer.0", ch[-1], "layernorm" if a["norm_type"] == "layer" else "groupnorm")
    return t + _conv3d("out_layer.2", ch[-1], a["out_channels"], 3)


def key_table(config: Mapping, *, source: str = "config") -> list[Entry]:
    """Key table of a TRELLIS json ``{"name": ..., "args": ...}``."""
    if not isinstance(config, Mapping) or "name" not in config or "args" not in config:
        raise ConversionError(f"{source}: expected a TRELLIS model json {{'name': ..., 'args': ...}}")
    full_args(config["name"], config["args"], source=source)
    return _models()[config["name"]][1](config["args"])


# ----------------------------------------------------------------------------------------------------
# Conversion (torch layout <-> Flax layout), numpy in and out
# ----------------------------------------------------------------------------------------------------


def _meta(state_dict: Mapping) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(np.shape(v)), np.asarray(v).dtype.name) for k, v in state_dict.items()}


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    config: Mapping,
    *,
    buffers: Optional[Mapping[str, np.ndarray]] = None,
    source: str = "state dict",
) -> dict:
    """Strictly convert a TRELLIS state dict (numpy arrays, any float dtype) to nested float32 Flax params.

    ``buffers`` maps each persistent buffer of the table (``pos_emb`` for the 'ape' flow model) to its
    recomputed value; a stored buffer farther than ``BUFFER_ATOL`` from it is refused.
    """
    table = key_table(config, source=source)
    lines = diff_lines(_meta(state_dict), {e.torch_key: (e.shape, None) for e in table}, source=source)
    for e in table:
        v = state_dict.get(e.torch_key)
        if v is None or tuple(np.shape(v)) != e.shape:
            continue
        dtype = np.asarray(v).dtype.name
        if dtype not in STORED_DTYPES and is_float(dtype):
            lines.append(
                f"{source}: mis-typed key {e.torch_key!r}: dtype {dtype}, expected one of {STORED_DTYPES} "
                "(TRELLIS stores float16 / float32; cast the file first if the values are meant)"
            )
        elif is_float(dtype) and not np.all(np.isfinite(v)):
            bad = int(np.size(v) - np.count_nonzero(np.isfinite(v)))
            lines.append(f"{source}: tensor {e.torch_key!r} has {bad} non-finite value(s) of {np.size(v)}")
    for e in table:
        if e.kind != BUFFER or e.torch_key not in state_dict or tuple(np.shape(state_dict[e.torch_key])) != e.shape:
            continue
        if buffers is None or e.torch_key not in buffers:
            raise TypeError(
                f"convert_state_dict: pass buffers={{{e.torch_key!r}: recomputed value}} to check the stored buffer"
            )
        d = float(
            np.max(
                np.abs(np.asarray(state_dict[e.torch_key], np.float64) - np.asarray(buffers[e.torch_key], np.float64))
            )
        )
        if not d <= BUFFER_ATOL:
            lines.append(
                f"{source}: buffer {e.torch_key!r} differs from its recomputed value "
                f"(max |diff| {d:.3g} > {BUFFER_ATOL:g})"
            )
    raise_if(lines, f"{source} does not match {config['name']}")
    flat = {}
    for e in table:
        if e.kind != BUFFER:
            w = np.asarray(state_dict[e.torch_key], dtype=np.float32)
            flat[e.flax_key] = np.ascontiguousarray(rules.leaf_rule(e.kind, e.torch_key).to_flax(w))
    return unflatten(flat)


def expected_flax_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """'/'-joined Flax key -> shape, for every parameter of the table."""
    return {e.flax_key: e.flax_shape for e in key_table(config) if e.kind != BUFFER}


def params_to_torch_state_dict(
    params: Mapping,
    config: Mapping,
    *,
    dtype: str = "released",
    buffers: Optional[Mapping[str, np.ndarray]] = None,
) -> dict[str, np.ndarray]:
    """Flax params -> TRELLIS state dict (numpy, PyTorch layout and key order).

    ``dtype``: 'released' (fp16 block weights when the json says ``use_fp16``, like the released
    files), or any numpy dtype name for every tensor. ``buffers`` (e.g. ``{'pos_emb': ...}``) are
    included as given, float32; TRELLIS loads strictly, so pass them for a loadable state dict.
    """
    table = key_table(config)
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    found = {k: (v.shape, v.dtype.name) for k, v in flat.items()}
    raise_if(
        diff_lines(found, {k: (s, None) for k, s in expected_flax_shapes(config).items()}, source="params"),
        f"params do not match {config['name']}",
    )
    out = {}
    for e in table:
        if e.kind == BUFFER:
            if buffers is not None and e.torch_key in buffers:
                out[e.torch_key] = np.ascontiguousarray(np.asarray(buffers[e.torch_key], np.float32))
            continue
        target = e.released if dtype == "released" else np.dtype(dtype).name
        w = rules.leaf_rule(e.kind, e.torch_key).to_torch(flat[e.flax_key])
        out[e.torch_key] = np.ascontiguousarray(w.astype(target))
    return out


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------


def is_trellis_prefix(path: str) -> bool:
    return os.path.isfile(path + ".json") and os.path.isfile(path + ".safetensors")


def is_pipeline_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, PIPELINE_FILE))


def is_converted_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, PARAMS_FILE))


def pipeline_stage1_prefixes(folder: str) -> dict[str, str]:
    """role -> checkpoint prefix for the stage-1 models that ``FOLDER/pipeline.json`` lists."""
    path = os.path.join(folder, PIPELINE_FILE)
    pipe = read_json(path)
    models = pipe.get("args", {}).get("models")
    if not isinstance(models, Mapping):
        raise ConversionError(f"{path}: no 'args.models' table")
    found = {role: os.path.join(folder, models[role]) for role in STAGE1_ROLES if role in models}
    if not found:
        raise ConversionError(f"{path}: lists none of the stage-1 models {STAGE1_ROLES}")
    return found


def pipeline_stage2_prefixes(folder: str) -> dict[str, str]:
    """role -> checkpoint prefix for the stage-2 models ``FOLDER/pipeline.json`` lists and the folder holds."""
    models = read_json(os.path.join(folder, PIPELINE_FILE)).get("args", {}).get("models", {})
    prefixes = {role: os.path.join(folder, models[role]) for role in STAGE2_ROLES if role in models}
    return {role: p for role, p in prefixes.items() if is_trellis_prefix(p)}


def read_checkpoint(prefix: str, *, hash_files: bool = False) -> tuple[dict, dict, dict]:
    """``PREFIX.json`` + ``PREFIX.safetensors`` -> (config, state dict, source info)."""
    json_path, st_path = prefix + ".json", prefix + ".safetensors"
    for p in (json_path, st_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"{p}: no such file (a TRELLIS checkpoint prefix needs NAME.json and NAME.safetensors)"
            )
    config = read_json(json_path)
    key_table(config, source=json_path)  # validate the json before reading a large file
    state_dict = read_safetensors(st_path)
    info = {
        "json": os.path.abspath(json_path),
        "safetensors": os.path.abspath(st_path),
        "bytes": os.path.getsize(st_path),
    }
    if hash_files:
        info["sha256"] = rules.sha256_file(st_path)
        info["json_sha256"] = rules.sha256_file(json_path)
    return config, state_dict, info


def make_manifest(name: str, config: Mapping, state_dict: Mapping, source: Mapping, buffer_checks: Mapping) -> dict:
    """Provenance of a converted folder: source files and every source tensor -> Flax key."""
    table = {e.torch_key: e for e in key_table(config)}
    tensors = []
    for k, v in state_dict.items():
        e = table[k]
        rule = "buffer (recomputed, checked)" if e.kind == BUFFER else f"{e.kind}.{k.rsplit('.', 1)[-1]}"
        tensors.append(
            {"name": k, "shape": list(np.shape(v)), "dtype": np.asarray(v).dtype.name, "flax": e.flax_key, "rule": rule}
        )
    n = sum(int(np.prod(e.shape)) for e in table.values() if e.kind != BUFFER)
    return {
        "format": FORMAT,
        "name": name,
        "model": config["name"],
        "source": dict(source),
        "params": {"file": PARAMS_FILE, "dtype": "float32", "count": n},
        "buffers": dict(buffer_checks),
        "tensors": tensors,
    }


def write_converted(folder: str, config: Mapping, params: Mapping, manifest: Mapping) -> None:
    """Write params.safetensors (float32, '/'-joined keys), config.json and manifest.json into ``folder``."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    flat = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flatten(params).items()}
    tmp = os.path.join(folder, PARAMS_FILE + ".tmp")
    save_file(flat, tmp, metadata={"format": FORMAT, "model": str(config["name"])})
    os.replace(tmp, os.path.join(folder, PARAMS_FILE))
    write_json(os.path.join(folder, CONFIG_FILE), config)
    write_json(os.path.join(folder, MANIFEST_FILE), manifest)


def read_converted(folder: str) -> tuple[dict, dict]:
    """A converted folder -> (TRELLIS json config, nested float32 params as numpy)."""
    config = read_json(os.path.join(folder, CONFIG_FILE))
    key_table(config, source=os.path.join(folder, CONFIG_FILE))
    return config, unflatten(read_safetensors(os.path.join(folder, PARAMS_FILE)))
