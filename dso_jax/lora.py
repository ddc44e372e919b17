"""LoRA as a parameter overlay: low-rank factors kept apart from the frozen base weights.

The overlay is the only trainable pytree. ``merge(base, overlay)`` adds ``scale * a @ b`` to each
targeted Dense kernel inside the loss, so gradients and optimizer state exist for the factors only.
Flax kernels are (in, out); the factors are ``a`` (in, r) and ``b`` (r, out), i.e. peft's
``lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r) transposed, and ``scale = alpha / r``.

Checkpoints use peft's layout (``dso.md`` §4): DSO saves the whole peft-wrapped state dict, base
weights under ``<module>.base_layer.{weight,bias}``, factors under ``<module>.lora_{A,B}.default.weight``,
every key prefixed ``base_model.model.``. ``load_peft`` also accepts ``get_peft_model_state_dict``'s
spelling (no ``.default``) and keys without the prefix. The rank comes from the shapes; alpha is not
stored by peft and comes from the caller (DSO: 128).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

DEFAULT_TARGETS = ("to_q", "to_kv", "to_out", "to_qkv")  # DSO's LoraConfig.target_modules
DSO_RANK, DSO_ALPHA = 64, 128.0  # DSO's LoraConfig(r=64, lora_alpha=128): the defaults of configs and loaders
PEFT_PREFIX = "base_model.model."
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers, stripped on load
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.(?P<leaf>weight|bias)$")
_UNSUPPORTED = ("lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")  # DoRA, embedding LoRA

Path = Tuple[str, ...]


@flax.struct.dataclass
class Overlay:
    """The trainable pytree: ``factors`` mirrors the base param tree at targeted Dense modules only,
    ``{'blocks_0': {'self_attn': {'to_qkv': {'a': (in, r), 'b': (r, out)}}}}``; ``scale`` = alpha / r."""

    factors: dict
    scale: float = flax.struct.field(pytree_node=False)


# ----------------------------------------------------------------------------- tree helpers


def _get(tree, path: Path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: Path, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _leaf_paths(factors) -> Dict[Path, Any]:
    """{module path: {'a': ..., 'b': ...}} for every module of a factors tree, in sorted order."""
    out = {}

    def walk(node, path):
        if "a" in node and "b" in node and not isinstance(node["a"], Mapping):
            out[path] = node
            return
        for k in sorted(node):
            walk(node[k], path + (k,))

    walk(factors, ())
    return out


def target_paths(base_params, targets: Sequence[str] = DEFAULT_TARGETS) -> Tuple[Path, ...]:
    """Paths of the Dense modules whose name is in ``targets`` (peft's rule: the last name matches).

    A Dense module is a node holding a 2-D ``kernel``. Sorted, so the order is deterministic.
    """
    targets = set(targets)
    found = []

    def walk(node, path):
        if not isinstance(node, Mapping):
            return
        kernel = node.get("kernel")
        if path and path[-1] in targets and kernel is not None and len(np.shape(kernel)) == 2:
            found.append(path)
            return
        for k in node:
            walk(node[k], path + (k,))

    walk(base_params, ())
    return tuple(sorted(found))


def torch_name(path: Path) -> str:
    """Flax module path -> PyTorch module name: ``('blocks_3', 'self_attn', 'to_qkv')`` -> ``blocks.3.self_attn.to_qkv``.

    The ports name list children ``name_i`` for PyTorch's ``name.i`` (``dso_jax.convert`` rules).
    """
    return ".".join(re.sub(r"_(\d+)$", r".\1", k) for k in path)


# ----------------------------------------------------------------------------- overlay


def init_overlay(key, base_params, *, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS) -> Overlay:
    """peft's default init: ``a ~ U(-1/sqrt(in), 1/sqrt(in))`` (kaiming-uniform, a = sqrt(5), on the
    (r, in) torch weight), ``b = 0``; float32. The merged model therefore starts equal to the base.

    Works on ``jax.ShapeDtypeStruct`` leaves too (only shapes are read), so it can run under ``eval_shape``.
    """
    if rank <= 0:
        raise ValueError(f"init_overlay: rank must be positive, got {rank}")
    paths = target_paths(base_params, targets)
    if not paths:
        raise ValueError(f"init_overlay: no Dense module named one of {tuple(targets)} in the base params")
    keys = jax.random.split(key, len(paths))
    factors: dict = {}
    for k, path in zip(keys, paths):
        fan_in, fan_out = np.shape(_get(base_params, path)["kernel"])
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(k, (fan_in, rank), jnp.float32, -bound, bound)
        _set(factors, path, {"a": a, "b": jnp.zeros((rank, fan_out), jnp.float32)})
    return Overlay(factors=factors, scale=float(alpha) / float(rank))


def merge(base_params, overlay: Overlay):
    """Base params with ``kernel + scale * a @ b`` at every overlay path; all other leaves untouched.

    The product is formed in float32 at full precision and cast to the kernel's dtype. Jittable and
    differentiable in the overlay. Returns the container type of ``base_params`` (dict or FrozenDict).
    """

    def walk(node, fac, path):
        if "a" in fac and "b" in fac and not isinstance(fac["a"], Mapping):
            if not isinstance(node, Mapping) or "kernel" not in node:
                raise KeyError(f"merge: overlay module {'/'.join(path)} has no kernel in the base params")
            kernel = node["kernel"]
            delta = jnp.matmul(
                fac["a"].astype(jnp.float32), fac["b"].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
            )
            out = dict(node)
            out["kernel"] = (kernel.astype(jnp.float32) + overlay.scale * delta).astype(kernel.dtype)
            return out
        out = dict(node)
        for k, sub in fac.items():
            if k not in node:
                raise KeyError(f"merge: overlay path {'/'.join(path + (k,))} is not in the base params")
            out[k] = walk(node[k], sub, path + (k,))
        return out

    merged = walk(base_params, overlay.factors, ())
    return FrozenDict(merged) if isinstance(base_params, FrozenDict) else merged


def count(overlay: Overlay) -> int:
    """Number of trainable scalars in the overlay."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(overlay)))


def rank_of(overlay: Overlay) -> int:
    """The common rank r of the overlay's factors."""
    ranks = {np.shape(m["a"])[1] for m in _leaf_paths(overlay.factors).values()}
    if len(ranks) != 1:
        raise ValueError(f"overlay has mixed ranks {sorted(ranks)}")
    return ranks.pop()


# ----------------------------------------------------------------------------- peft import / export


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; torch is never imported here
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def _read_lora_tensors(path_or_state_dict) -> Tuple[Dict[str, np.ndarray], str]:
    """The LoRA-related entries (float32 numpy) of a safetensors file or an in-memory state dict."""
    wanted = lambda k: ".lora_" in k
    if isinstance(path_or_state_dict, Mapping):
        return {k: _to_numpy(v) for k, v in path_or_state_dict.items() if wanted(k)}, "state dict"
    path = os.fspath(path_or_state_dict)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_peft: no LoRA checkpoint at {path}")
    from safetensors import safe_open

    try:
        f = safe_open(path, framework="numpy")
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"load_peft: cannot read {path} as safetensors: {e}") from e
    out = {}
    with f:
        for k in f.keys():
            if not wanted(k):
                continue
            try:
                out[k] = np.asarray(f.get_tensor(k), np.float32)
            except TypeError:  # bfloat16 has no numpy dtype; read it through JAX
                with safe_open(path, framework="flax") as g:
                    out[k] = np.asarray(g.get_tensor(k), np.float32)
    return out, path


def _strip_prefix(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES + (PEFT_PREFIX,):
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def load_peft(
    path_or_state_dict,
    base_params,
    *,
    alpha: float,
    targets: Optional[Sequence[str]] = DEFAULT_TARGETS,
    rank: Optional[int] = None,
) -> Overlay:
    """A peft LoRA checkpoint (DSO's safetensors file, or any state dict) -> :class:`Overlay`.

    Accepted key spellings, per module ``M`` (e.g. ``blocks.0.self_attn.to_qkv``):
    ``[base_model.model.]M.lora_{A,B}[.<adapter>].weight``, optionally behind ``module.`` / ``_orig_mod.``;
    base weights (``M.base_layer.*``) and other entries are ignored. The rank is read from the
    shapes. ``targets`` (module names) must match the adapted modules exactly; pass ``None`` to take
    whatever the file adapts. ``rank``, if given, is checked. Any mismatch raises ``ValueError``.
    """
    tensors, source = _read_lora_tensors(path_or_state_dict)
    if not tensors:
        raise ValueError(f"load_peft: {source} holds no LoRA weights (no '*.lora_A*' / '*.lora_B*' keys)")
    bad = [k for k in tensors if any(u in k for u in _UNSUPPORTED)]
    if bad:
        raise ValueError(f"load_peft: {source} uses unsupported LoRA variants (DoRA / embedding LoRA): {bad[:3]}")

    by_module: Dict[str, Dict[str, np.ndarray]] = {}
    adapters = set()
    for key, value in tensors.items():
        m = _LORA_KEY.match(_strip_prefix(key))
        if m is None:
            raise ValueError(f"load_peft: unrecognised LoRA key {key!r} in {source}")
        if m["leaf"] == "bias":
            raise ValueError(f"load_peft: {source} has LoRA biases ({key!r}, peft lora_bias=True); not supported")
        adapters.add(m["adapter"] or "default")
        by_module.setdefault(m["module"], {})[m["factor"]] = value
    if len(adapters) > 1:
        raise ValueError(f"load_peft: {source} holds several adapters {sorted(adapters)}; save one adapter per file")

    known = {
        torch_name(p): p for p in target_paths(base_params, targets if targets is not None else _all_names(base_params))
    }
    unknown = sorted(set(by_module) - set(known))
    if unknown:
        raise ValueError(
            f"load_peft: {source} adapts modules that are not {'targets' if targets else 'Dense layers'} "
            f"of the base model: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
        )
    if targets is not None:
        missing = sorted(set(known) - set(by_module))
        if missing:
            raise ValueError(
                f"load_peft: {source} lacks LoRA factors for {len(missing)} targeted modules, e.g. {missing[:5]} "
                f"(targets={tuple(targets)}; pass targets=None to accept a partial adapter)"
            )

    factors: dict = {}
    ranks = set()
    for name in sorted(by_module):
        pair = by_module[name]
        if set(pair) != {"A", "B"}:
            raise ValueError(f"load_peft: {source} has only lora_{''.join(pair)} for {name}")
        A, B = pair["A"], pair["B"]  # (r, in), (out, r)
        fan_in, fan_out = np.shape(_get(base_params, known[name])["kernel"])
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != fan_in or B.shape[0] != fan_out or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"load_peft: shape mismatch at {name}: lora_A {A.shape}, lora_B {B.shape}; the base Linear is "
                f"{fan_in} -> {fan_out}, so expected lora_A (r, {fan_in}) and lora_B ({fan_out}, r)"
            )
        ranks.add(A.shape[0])
        _set(factors, known[name], {"a": jnp.asarray(A.T), "b": jnp.asarray(B.T)})
    if len(ranks) != 1:
        raise ValueError(f"load_peft: {source} mixes LoRA ranks {sorted(ranks)}; one alpha/r scale needs one rank")
    r = ranks.pop()
    if rank is not None and r != rank:
        raise ValueError(f"load_peft: {source} has LoRA rank {r}, expected {rank}")
    return Overlay(factors=factors, scale=float(alpha) / float(r))


def _all_names(base_params) -> Iterable[str]:
    names = set()

    def walk(node):
        if isinstance(node, Mapping):
            names.update(k for k in node if isinstance(k, str))
            for v in node.values():
                walk(v)

    walk(base_params)
    return names


def _trellis_config(config, buffers):
    """(TRELLIS json, buffers) from a json dict or from a Flax TRELLIS module (``apply_fn.module``)."""
    from dso_jax.convert import rules, trellis

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
    overlay: Overlay,
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
    ``set_peft_model_state_dict``. ``config``/``buffers``/``base_dtype`` (full state dict only): the
    TRELLIS json or Flax module (``apply_fn.module``), the persistent buffers (recomputed from a
    module), and the base weights' dtype ('released': fp16 block Linears like DSO's files; LoRA
    factors are always float32, as peft keeps them).
    """
    mods = _leaf_paths(overlay.factors)
    out: Dict[str, np.ndarray] = {}
    if full_state_dict:
        from dso_jax.convert.trellis import params_to_torch_state_dict

        json_cfg, buffers = _trellis_config(config, buffers)
        base = jax.tree_util.tree_map(np.asarray, base_params)
        adapted = {torch_name(p) for p in mods}
        for k, v in params_to_torch_state_dict(base, json_cfg, dtype=base_dtype, buffers=buffers).items():
            mod, _, leaf = k.rpartition(".")
            if mod in adapted:
                k = f"{mod}.base_layer.{leaf}"
            out[PEFT_PREFIX + k] = np.ascontiguousarray(v)
    tag = f".{adapter}" if full_state_dict else ""
    for path, fac in mods.items():
        name = PEFT_PREFIX + torch_name(path)
        out[f"{name}.lora_A{tag}.weight"] = np.ascontiguousarray(np.asarray(fac["a"], np.float32).T)  # (r, in)
        out[f"{name}.lora_B{tag}.weight"] = np.ascontiguousarray(np.asarray(fac["b"], np.float32).T)  # (out, r)
    return out


def save_peft(
    path,
    base_params,
    overlay: Overlay,
    *,
    full_state_dict: bool = True,
    config=None,
    buffers: Optional[Mapping[str, np.ndarray]] = None,
    base_dtype: str = "released",
) -> None:
    """Write the overlay as peft safetensors: with ``full_state_dict`` the whole peft-wrapped state
    dict that DSO's ``example.py`` loads unchanged (needs ``config``, see :func:`peft_state_dict`),
    otherwise adapter-only. Only process 0 writes."""
    if jax.process_index() != 0:
        return
    from safetensors.numpy import save_file

    state = peft_state_dict(
        base_params, overlay, full_state_dict=full_state_dict, config=config, buffers=buffers, base_dtype=base_dtype
    )
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)
