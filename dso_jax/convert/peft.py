"""LoRA files in peft's format: read, write, and apply one to a model's params (one function for all loaders).

Layouts (``dso.md`` §4). DSO saves the whole peft-wrapped state dict: base weights under
``<module>.base_layer.{weight,bias}``, factors under ``<module>.lora_{A,B}.default.weight``, every key
prefixed ``base_model.model.``. peft's ``save_pretrained`` writes a folder with ``adapter_model.safetensors``
(``get_peft_model_state_dict``'s spelling, no ``.default``) and ``adapter_config.json`` (``r``,
``lora_alpha``, ``target_modules``). :func:`load_peft` reads either spelling, keys with or without the
prefix (or behind ``module.`` / ``_orig_mod.``), a file or such a folder; bf16 factors are widened to float32.

alpha is not part of the tensors. It is taken from, in order: the caller; the file's safetensors header
metadata (``lora_alpha``, which our exports write along with ``r`` and ``target_modules``); an
``adapter_config.json`` beside the file; else DSO's 128 (:data:`dso_jax.lora.DSO_ALPHA`), because DSO's
released files carry no metadata. A declared ``r`` must match the tensors.

Refused with one line naming the file and tensor: pickled files (``.pt`` / ``.bin`` ...; never unpickled),
truncated or corrupt safetensors, non-finite factors, wrong shapes (another architecture), unknown modules,
mixed ranks and unsupported peft variants. :func:`apply_lora` warns when a file adapts only part of its targets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dso_jax import lora
from dso_jax.convert import files, rules, trellis

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"  # peft's save_pretrained: beside the weights
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip container, a raw pickle stream
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers, stripped on load
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.(?P<leaf>weight|bias)$")
_UNSUPPORTED = ("lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")  # DoRA, embedding LoRA


class PartialLoraWarning(UserWarning):
    """A LoRA file adapts only some of the modules its targets name; the others keep their base weights."""


@dataclasses.dataclass(frozen=True)
class LoraFileConfig:
    """What a LoRA file declares about itself (None where it says nothing); ``source`` names where it was read."""

    rank: Optional[int] = None
    alpha: Optional[float] = None
    targets: Optional[Tuple[str, ...]] = None
    use_rslora: bool = False
    source: str = "none"


# ---------------------------------------------------------------------------------------------- reading


def _weights_path(path: str) -> str:
    """The safetensors file of ``path`` (a file, or a peft folder holding ``adapter_model.safetensors``)."""
    if os.path.isdir(path):
        inner = os.path.join(path, ADAPTER_WEIGHTS)
        if not os.path.isfile(inner):
            raise FileNotFoundError(f"{path}: a folder without {ADAPTER_WEIGHTS} (peft's save_pretrained layout)")
        return inner
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such LoRA file")
    if path.lower().endswith(PICKLE_SUFFIXES) or _starts_with_pickle(path):
        raise ValueError(
            f"{path}: a pickled PyTorch file; LoRA files are read as safetensors only (unpickling can run code). "
            "Convert it once: safetensors.torch.save_file(torch.load(f, weights_only=True), 'lora.safetensors')"
        )
    return path


def _starts_with_pickle(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return any(head.startswith(m) for m in _PICKLE_MAGIC)


def _open_safetensors(path: str):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="numpy")
    except Exception as e:  # safetensors raises its own error types for corrupt or truncated files
        raise ValueError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; torch is never imported here
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def read_tensors(path_or_state_dict) -> Tuple[Dict[str, np.ndarray], str]:
    """The LoRA entries (``*.lora_*``, float32 numpy) of a file, peft folder or in-memory state dict, and its name."""
    wanted = lambda k: ".lora_" in k
    if isinstance(path_or_state_dict, Mapping):
        return {k: _to_numpy(v) for k, v in path_or_state_dict.items() if wanted(k)}, "state dict"
    path = _weights_path(os.fspath(path_or_state_dict))
    out = {}
    with _open_safetensors(path) as f:
        for k in f.keys():
            if not wanted(k):
                continue
            try:
                out[k] = np.asarray(f.get_tensor(k), np.float32)
            except TypeError:  # bfloat16 has no numpy dtype; read it through JAX
                from safetensors import safe_open

                with safe_open(path, framework="flax") as g:
                    out[k] = np.asarray(g.get_tensor(k), np.float32)
    return out, path


def _config_from(d: Mapping, source: str, *, metadata: bool) -> LoraFileConfig:
    """A LoraFileConfig from peft's config keys: an adapter_config.json, or safetensors metadata (JSON strings)."""

    def parse(v):
        return json.loads(v) if metadata and isinstance(v, str) else v

    try:
        rank = parse(d["r"]) if "r" in d else None
        alpha = parse(d["lora_alpha"]) if "lora_alpha" in d else None
        targets = parse(d["target_modules"]) if d.get("target_modules") is not None else None
        rslora = bool(parse(d.get("use_rslora", False)))
        patterns = {k: parse(d[k]) for k in ("rank_pattern", "alpha_pattern") if d.get(k)}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: unreadable LoRA config value ({e})") from None
    if patterns:
        raise ValueError(f"{source}: per-module {sorted(patterns)} are not supported (one rank and alpha per file)")
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"{source}: r must be a positive integer, got {rank!r}")
    if alpha is not None and (not isinstance(alpha, (int, float)) or not math.isfinite(alpha)):
        raise ValueError(f"{source}: lora_alpha must be a finite number, got {alpha!r}")
    if isinstance(targets, str):  # peft allows a regex string; only name lists are understood here
        raise ValueError(f"{source}: target_modules is a pattern ({targets!r}); expected a list of module names")
    return LoraFileConfig(
        rank=rank,
        alpha=None if alpha is None else float(alpha),
        targets=None if targets is None else tuple(sorted(targets)),
        use_rslora=rslora,
        source=source,
    )


def read_config(path) -> LoraFileConfig:
    """What a LoRA file says about its rank / alpha / targets: safetensors metadata, else ``adapter_config.json``."""
    path = _weights_path(os.fspath(path))
    with _open_safetensors(path) as f:
        meta = f.metadata() or {}
    if "lora_alpha" in meta or "r" in meta:
        return _config_from(meta, f"{path} (metadata)", metadata=True)
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), ADAPTER_CONFIG)
    if os.path.isfile(beside):
        try:
            with open(beside) as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{beside}: not a readable peft adapter config ({e})") from None
        if not isinstance(cfg, Mapping):
            raise ValueError(f"{beside}: expected a JSON object (peft's adapter_config.json)")
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{beside}: peft_type {cfg['peft_type']!r}, only LORA is supported")
        return _config_from(cfg, beside, metadata=False)
    return LoraFileConfig()


def _strip_prefix(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES + (PEFT_PREFIX,):
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def _all_names(base_params) -> Iterable[str]:
    names = set()

    def walk(node):
        if isinstance(node, Mapping):
            names.update(k for k in node if isinstance(k, str))
            for v in node.values():
                walk(v)

    walk(base_params)
    return names


def load_peft(
    path_or_state_dict,
    base_params,
    *,
    alpha: Optional[float] = None,
    targets: Optional[Sequence[str]] = lora.DEFAULT_TARGETS,
    rank: Optional[int] = None,
) -> lora.Overlay:
    """A peft LoRA checkpoint (file, peft folder or state dict) -> :class:`dso_jax.lora.Overlay`.

    ``targets`` (module names) must match the adapted modules exactly; ``None`` takes whatever Dense
    modules the file adapts. ``alpha`` overrides the file's (see the module docstring for the order);
    ``rank``, if given, is checked. Any mismatch raises ``ValueError`` naming the file and the tensor.
    """
    overlay, _ = _load(path_or_state_dict, base_params, alpha=alpha, targets=targets, rank=rank)
    return overlay


def _load(path_or_state_dict, base_params, *, alpha, targets, rank) -> Tuple[lora.Overlay, dict]:
    tensors, source = read_tensors(path_or_state_dict)
    declared = LoraFileConfig() if isinstance(path_or_state_dict, Mapping) else read_config(path_or_state_dict)
    if not tensors:
        raise ValueError(f"{source}: holds no LoRA weights (no '*.lora_A*' / '*.lora_B*' keys)")
    bad = [k for k in tensors if any(u in k for u in _UNSUPPORTED)]
    if bad:
        raise ValueError(f"{source}: uses unsupported LoRA variants (DoRA / embedding LoRA): {bad[:3]}")
    nonfinite = [k for k, v in tensors.items() if not np.all(np.isfinite(v))]
    if nonfinite:
        n = int(sum(np.size(tensors[k]) - np.count_nonzero(np.isfinite(tensors[k])) for k in nonfinite))
        raise ValueError(
            f"{source}: tensor {nonfinite[0]!r} has non-finite values ({len(nonfinite)} tensors, {n} values)"
        )

    by_module: Dict[str, Dict[str, np.ndarray]] = {}
    adapters = set()
    for key, value in tensors.items():
        m = _LORA_KEY.match(_strip_prefix(key))
        if m is None:
            raise ValueError(f"{source}: unrecognised LoRA key {key!r}")
        if m["leaf"] == "bias":
            raise ValueError(f"{source}: has LoRA biases ({key!r}, peft lora_bias=True); not supported")
        adapters.add(m["adapter"] or "default")
        by_module.setdefault(m["module"], {})[m["factor"]] = value
    if len(adapters) > 1:
        raise ValueError(f"{source}: holds several adapters {sorted(adapters)}; save one adapter per file")

    names = targets if targets is not None else _all_names(base_params)
    known = {lora.torch_name(p): p for p in lora.target_paths(base_params, names)}
    unknown = sorted(set(by_module) - set(known))
    if unknown:
        raise ValueError(
            f"{source}: adapts modules that are not {'targets' if targets else 'Dense layers'} "
            f"of the base model: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
        )
    if targets is not None:
        missing = sorted(set(known) - set(by_module))
        if missing:
            raise ValueError(
                f"{source}: lacks LoRA factors for {len(missing)} targeted modules, e.g. {missing[:5]} "
                f"(targets={tuple(targets)}; pass targets=None to accept a partial adapter)"
            )

    factors, ranks = {}, set()
    for name in sorted(by_module):
        pair = by_module[name]
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{source}: has only lora_{''.join(pair)} for {name}")
        A, B = pair["A"], pair["B"]  # (r, in), (out, r)
        fan_in, fan_out = np.shape(lora.get_path(base_params, known[name])["kernel"])
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != fan_in or B.shape[0] != fan_out or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"{source}: shape mismatch at {name}: lora_A {A.shape}, lora_B {B.shape}; the base Linear is "
                f"{fan_in} -> {fan_out}, so expected lora_A (r, {fan_in}) and lora_B ({fan_out}, r)"
            )
        ranks.add(A.shape[0])
        factors[known[name]] = {"a": jnp.asarray(A.T), "b": jnp.asarray(B.T)}
    if len(ranks) != 1:
        raise ValueError(f"{source}: mixes LoRA ranks {sorted(ranks)}; one alpha/r scale needs one rank")
    r = ranks.pop()
    if declared.rank is not None and declared.rank != r:
        raise ValueError(f"{declared.source}: declares r={declared.rank}, but the tensors of {source} have rank {r}")
    if rank is not None and r != rank:
        raise ValueError(f"{source}: has LoRA rank {r}, expected {rank}")
    if alpha is not None:
        alpha_from = "argument"
    elif declared.alpha is not None:
        alpha, alpha_from = declared.alpha, declared.source
    else:
        alpha, alpha_from = lora.DSO_ALPHA, "default (DSO's; the file declares none)"
    if not math.isfinite(float(alpha)):
        raise ValueError(f"{source}: lora alpha must be finite, got {alpha!r}")
    scale = float(alpha) / (math.sqrt(r) if declared.use_rslora else float(r))
    info = dict(
        path=source if source == "state dict" else os.path.abspath(source),
        rank=int(r),
        alpha=float(alpha),
        alpha_from=alpha_from,
        modules=len(factors),
        declared_targets=declared.targets,
    )
    return lora.from_modules(factors, scale), info


def apply_lora(base_params, path_or_state_dict, *, alpha: Optional[float] = None) -> Tuple[dict, dict]:
    """``base_params`` with a LoRA file merged in, and what was applied (path, rank, alpha and its origin, modules).

    The one way every loader applies a LoRA file (``load_pretrained``, the generators). The file may
    adapt any Dense modules of the base; if it covers only part of its targets (the ones it declares,
    else DSO's :data:`dso_jax.lora.DEFAULT_TARGETS`) a :class:`PartialLoraWarning` says how many are missing.
    """
    overlay, info = _load(path_or_state_dict, base_params, alpha=alpha, targets=None, rank=None)
    targets = info.pop("declared_targets") or lora.DEFAULT_TARGETS
    expected = {lora.torch_name(p) for p in lora.target_paths(base_params, targets)}
    missing = sorted(expected - {lora.torch_name(p) for p in lora.modules(overlay)})
    if missing:
        warnings.warn(
            f"{info['path']}: the LoRA adapts {len(expected) - len(missing)} of the {len(expected)} modules named "
            f"{tuple(targets)} (e.g. not {missing[:3]}); those keep their base weights",
            PartialLoraWarning,
            stacklevel=2,
        )
    return lora.merge(base_params, overlay), info


# ---------------------------------------------------------------------------------------------- writing


def _trellis_config(config, buffers):
    """(TRELLIS json, buffers) from a json dict or from a Flax TRELLIS module (``apply_fn.module``)."""
    if config is None:
        raise ValueError(
            "save_peft(full_state_dict=True) writes the base weights too and needs the model: pass "
            "config=apply_fn.module (from load_pretrained) or the TRELLIS json with buffers={'pos_emb': ...}"
        )
    if isinstance(config, Mapping):
        json_cfg = {"name": config["name"], "args": dict(config["args"])}
    else:  # a Flax module of the port: its fields are the json args
        name = type(config).__name__
        spec = {trellis.FLOW: trellis.FLOW_ARGS, trellis.DECODER: trellis.DECODER_ARGS}.get(name)
        if spec is None:
            raise ValueError(f"save_peft: config must be a TRELLIS json or a TRELLIS Flax module, got {name}")
        json_cfg = {"name": name, "args": {k: getattr(config, k) for k in spec}}
        if buffers is None and getattr(config, "pe_mode", None) == "ape":
            buffers = {"pos_emb": config.pos_emb()}
    needed = [e.torch_key for e in trellis.key_table(json_cfg) if e.kind == rules.BUFFER]
    missing = [k for k in needed if buffers is None or k not in buffers]
    if missing:
        raise ValueError(
            f"save_peft: the state dict needs the buffers {missing}; pass buffers= or config=apply_fn.module"
        )
    return json_cfg, buffers


def peft_state_dict(
    base_params,
    overlay: lora.Overlay,
    *,
    full_state_dict: bool = True,
    config=None,
    buffers: Optional[Mapping[str, np.ndarray]] = None,
    base_dtype: str = "released",
    adapter: str = "default",
) -> Dict[str, np.ndarray]:
    """The numpy state dict :func:`save_peft` writes (PyTorch names, peft spelling).

    ``full_state_dict``: the whole ``PeftModel.state_dict()`` as DSO saves it (base weights of adapted
    Linears under ``base_layer``, every key under ``base_model.model.``, factors as ``lora_X.<adapter>.weight``),
    loadable strictly with ``load_state_dict`` into ``get_peft_model(model, LoraConfig(...))``. Otherwise
    ``get_peft_model_state_dict``'s adapter-only spelling (``lora_X.weight``), loadable with
    ``set_peft_model_state_dict`` / ``PeftModel.from_pretrained``. ``config``/``buffers``/``base_dtype``
    (full state dict only): the TRELLIS json or Flax module (``apply_fn.module``), the persistent buffers
    (recomputed from a module), and the base weights' dtype ('released': fp16 block Linears like DSO's
    files; LoRA factors are always float32, as peft keeps them).
    """
    mods = lora.modules(overlay)
    out: Dict[str, np.ndarray] = {}
    if full_state_dict:
        json_cfg, buffers = _trellis_config(config, buffers)
        base = jax.tree_util.tree_map(np.asarray, base_params)
        adapted = {lora.torch_name(p) for p in mods}
        for k, v in trellis.params_to_torch_state_dict(base, json_cfg, dtype=base_dtype, buffers=buffers).items():
            mod, _, leaf = k.rpartition(".")
            if mod in adapted:
                k = f"{mod}.base_layer.{leaf}"
            out[PEFT_PREFIX + k] = np.ascontiguousarray(v)
    tag = f".{adapter}" if full_state_dict else ""
    for path, fac in mods.items():
        name = PEFT_PREFIX + lora.torch_name(path)
        out[f"{name}.lora_A{tag}.weight"] = np.ascontiguousarray(np.asarray(fac["a"], np.float32).T)  # (r, in)
        out[f"{name}.lora_B{tag}.weight"] = np.ascontiguousarray(np.asarray(fac["b"], np.float32).T)  # (out, r)
    return out


def adapter_config(overlay: lora.Overlay) -> dict:
    """peft's ``adapter_config.json`` fields for ``overlay``: r, lora_alpha (= scale * r), target_modules."""
    r = lora.rank_of(overlay)
    return dict(
        peft_type="LORA",
        r=int(r),
        lora_alpha=float(overlay.scale) * r,
        target_modules=sorted({p[-1] for p in lora.modules(overlay)}),
        lora_dropout=0.0,
        bias="none",
        use_rslora=False,
        fan_in_fan_out=False,
        init_lora_weights=True,
        rank_pattern={},
        alpha_pattern={},
    )


def save_peft(
    path, base_params, overlay: lora.Overlay, *, adapter_config_beside: Optional[bool] = None, **kwargs
) -> None:
    """Write the overlay as peft safetensors (see :func:`peft_state_dict` for ``kwargs``), atomically.

    The header metadata always records ``r``, ``lora_alpha`` and ``target_modules``. ``adapter_config_beside``
    (default: when the file is named ``adapter_model.safetensors``, i.e. it forms a peft folder) also writes
    peft's ``adapter_config.json`` in the same folder; with ``full_state_dict=False`` that folder is what
    ``PeftModel.from_pretrained`` loads. (A folder of several exports, such as a run's ``peft/step_*``, gets
    none: one config file cannot speak for each of them, and the metadata already does.) With
    ``full_state_dict`` (the default) the file is DSO's layout, which its ``example.py`` loads unchanged
    (needs ``config``). Only process 0 writes.
    """
    if jax.process_index() != 0:
        return
    from safetensors.numpy import save_file

    state = peft_state_dict(base_params, overlay, **kwargs)
    cfg = adapter_config(overlay)
    meta = {"format": "pt", **{k: json.dumps(cfg[k]) for k in ("peft_type", "r", "lora_alpha", "target_modules")}}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(state, tmp, metadata=meta)
    os.replace(tmp, path)
    if adapter_config_beside is None:
        adapter_config_beside = os.path.basename(path) == ADAPTER_WEIGHTS
    if adapter_config_beside:
        files.write_json(os.path.join(os.path.dirname(os.path.abspath(path)), ADAPTER_CONFIG), cfg, sort_keys=True)
