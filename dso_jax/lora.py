"""LoRA as a parameter overlay: low-rank factors kept apart from the frozen base weights.

The overlay is the only trainable pytree. ``merge(base, overlay)`` adds ``scale * a @ b`` to each
targeted Dense kernel inside the loss, so gradients and optimizer state exist for the factors only.
Flax kernels are (in, out); the factors are ``a`` (in, r) and ``b`` (r, out), i.e. peft's
``lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r) transposed, and ``scale = alpha / r``.

This module is the overlay math only; LoRA files (peft / DSO safetensors, read, written and applied)
live in ``dso_jax.convert.peft``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, Mapping, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

DEFAULT_TARGETS = ("to_q", "to_kv", "to_out", "to_qkv")  # DSO's LoraConfig.target_modules
DSO_RANK, DSO_ALPHA = 64, 128.0  # DSO's LoraConfig(r=64, lora_alpha=128): the defaults of configs and loaders

Path = Tuple[str, ...]


@flax.struct.dataclass
class Overlay:
    """The trainable pytree: ``factors`` mirrors the base param tree at targeted Dense modules only,
    ``{'blocks_0': {'self_attn': {'to_qkv': {'a': (in, r), 'b': (r, out)}}}}``; ``scale`` = alpha / r."""

    factors: dict
    scale: float = flax.struct.field(pytree_node=False)


# ----------------------------------------------------------------------------- tree helpers


def get_path(tree, path: Path):
    """``tree[path[0]][path[1]]...``: the node of a nested param dict at a module path."""
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: Path, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def modules(overlay: Overlay) -> Dict[Path, Any]:
    """{module path: {'a': (in, r), 'b': (r, out)}} for every adapted module, in sorted order."""
    out = {}

    def walk(node, path):
        if "a" in node and "b" in node and not isinstance(node["a"], Mapping):
            out[path] = node
            return
        for k in sorted(node):
            walk(node[k], path + (k,))

    walk(overlay.factors, ())
    return out


def from_modules(factors_by_path: Mapping[Path, Mapping[str, Any]], scale: float) -> Overlay:
    """The :class:`Overlay` of ``{module path: {'a': (in, r), 'b': (r, out)}}`` (the inverse of :func:`modules`)."""
    factors: dict = {}
    for path, fac in factors_by_path.items():
        _set(factors, tuple(path), {"a": fac["a"], "b": fac["b"]})
    return Overlay(factors=factors, scale=float(scale))


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
        fan_in, fan_out = np.shape(get_path(base_params, path)["kernel"])
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
    ranks = {np.shape(m["a"])[1] for m in modules(overlay).values()}
    if len(ranks) != 1:
        raise ValueError(f"overlay has mixed ranks {sorted(ranks)}")
    return ranks.pop()
