"""PyTorch -> Flax conversion rules, one per line. Pure numpy; no model imports.

Two kinds of rule:

* **Names.** A PyTorch key is ``<module path>.<leaf>``. In the module path, an integer component
  (an ``nn.ModuleList`` / ``nn.Sequential`` index) is joined to its parent with ``_``, every other
  ``.`` becomes ``/``: ``blocks.3.adaLN_modulation.1.weight`` -> ``blocks_3/adaLN_modulation_1/kernel``.
  The leaf is renamed by the module kind (below).
* **Tensors.** Each (module kind, torch leaf) pair has a Flax leaf name and an axis permutation
  taking the PyTorch layout to the Flax layout (``None``: unchanged). The inverse permutation is the
  export rule.

Converted parameter trees are nested dicts; on disk they are flat dicts with '/'-joined keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Mapping, Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class LeafRule:
    flax_leaf: str
    perm: Optional[tuple[int, ...]]  # torch axes -> flax axes (np.transpose order); None: identity

    def to_flax(self, w: np.ndarray) -> np.ndarray:
        return w if self.perm is None else np.transpose(w, self.perm)

    def to_torch(self, w: np.ndarray) -> np.ndarray:
        return w if self.perm is None else np.transpose(w, np.argsort(self.perm))

    def flax_shape(self, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(torch_shape) if self.perm is None else tuple(torch_shape[i] for i in self.perm)


# (module kind, torch leaf)       Flax leaf  torch -> flax axis order
LEAF_RULES: dict[tuple[str, str], LeafRule] = {
    ("linear", "weight"): LeafRule("kernel", (1, 0)),  # nn.Linear (out, in) -> Dense (in, out)
    ("linear", "bias"): LeafRule("bias", None),
    ("conv3d", "weight"): LeafRule(
        "kernel", (2, 3, 4, 1, 0)
    ),  # nn.Conv3d (O, I, kx, ky, kz) -> Conv (kx, ky, kz, I, O)
    ("conv3d", "bias"): LeafRule("bias", None),
    ("spconv", "weight"): LeafRule("kernel", (1, 2, 3, 4, 0)),  # spconv KRSC (O, kx, ky, kz, I) -> (kx, ky, kz, I, O)
    ("spconv", "bias"): LeafRule("bias", None),
    ("layernorm", "weight"): LeafRule("scale", None),  # nn.LayerNorm weight -> scale
    ("layernorm", "bias"): LeafRule("bias", None),
    ("groupnorm", "weight"): LeafRule("scale", None),  # nn.GroupNorm weight -> scale
    ("groupnorm", "bias"): LeafRule("bias", None),
    ("rmsnorm", "gamma"): LeafRule("gamma", None),  # TRELLIS MultiHeadRMSNorm gamma (heads, dim) as is
}

BUFFER = "buffer"  # a persistent buffer: checked against a recomputed value, never a Flax param

_INDEX = re.compile(r"^\d+$")


def flax_module_path(torch_module: str) -> str:
    """``'blocks.3.adaLN_modulation.1'`` -> ``'blocks_3/adaLN_modulation_1'``."""
    out: list[str] = []
    for part in torch_module.split("."):
        if _INDEX.match(part):
            if not out:
                raise ValueError(f"torch module path {torch_module!r} starts with an index")
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return "/".join(out)


def leaf_rule(kind: str, torch_key: str) -> LeafRule:
    leaf = torch_key.rsplit(".", 1)[-1]
    try:
        return LEAF_RULES[(kind, leaf)]
    except KeyError:
        raise ValueError(f"no conversion rule for {kind} leaf {leaf!r} (key {torch_key!r})") from None


def flax_key(torch_key: str, kind: str) -> Optional[str]:
    """'/'-joined Flax key of a PyTorch key of module ``kind``; None for buffers."""
    if kind == BUFFER:
        return None
    module = torch_key.rsplit(".", 1)[0] if "." in torch_key else ""
    rule = leaf_rule(kind, torch_key)
    return f"{flax_module_path(module)}/{rule.flax_leaf}" if module else rule.flax_leaf


def flatten(tree: Mapping, prefix: str = "") -> dict:
    """Nested dict -> flat dict with '/'-joined keys (leaves untouched)."""
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(flatten(v, f"{prefix}{k}/"))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def unflatten(flat: Mapping) -> dict:
    """Flat dict with '/'-joined keys -> nested dict."""
    tree: dict = {}
    for key, v in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = v
    return tree


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()
