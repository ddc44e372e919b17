"""Import single TRELLIS source files from a fetched checkout without TRELLIS's package ``__init__`` files.

Test/bench-only. TRELLIS's package imports pull in CUDA-only extensions (spconv, kaolin, nvdiffrast, …). The
representation and read-out code our tests compare against needs none of them at run time, so
:func:`trellis_modules` registers bare packages pointing at the checkout's folders, stubs the few names those
files import but the compared paths never use, and restores ``sys.modules`` afterwards (the imported modules
keep working: they hold their own globals).
"""

from __future__ import annotations

import contextlib
import os
import sys
import types

STUBBED = ("trellis", "kaolin", "easydict", "plyfile", "utils3d")  # top-level names managed here


class _EasyDict(dict):
    """The slice of ``easydict.EasyDict`` TRELLIS's cube2mesh uses: attribute access on nested dicts."""

    def __init__(self, d=None):
        super().__init__()
        for k, v in (d or {}).items():
            self[k] = _EasyDict(v) if isinstance(v, dict) else v

    __getattr__ = dict.__getitem__


def stub(name: str, **attrs) -> types.ModuleType:
    """Register module ``name`` with ``attrs`` (a package if ``__path__`` is given)."""
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


@contextlib.contextmanager
def trellis_modules(trellis_src: str, flexicubes_src: str = ""):
    """Within the block, ``trellis.<pkg>.<file>`` imports the checkout's file; yields the ``trellis`` folder."""
    root = os.path.join(os.path.abspath(trellis_src), "trellis")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root} not found (pass a checkout of github:microsoft/TRELLIS)")
    managed = lambda name: name.split(".")[0] in STUBBED
    saved = {k: v for k, v in sys.modules.items() if managed(k)}
    try:
        for name in ("kaolin", "kaolin.utils", "utils3d"):
            stub(name)
        stub("kaolin.utils.testing", check_tensor=lambda *a, **k: True)
        stub("plyfile", PlyData=None, PlyElement=None)
        stub("easydict", EasyDict=_EasyDict)
        stub("trellis", __path__=[root])
        for sub in (
            "models",
            "models/structured_latent_vae",
            "representations",
            "representations/mesh",
            "utils",
            "representations/gaussian",
        ):
            stub("trellis." + sub.replace("/", "."), __path__=[os.path.join(root, sub)])
        stub("trellis.modules", __path__=[])
        stub("trellis.modules.sparse", SparseTensor=object)
        if flexicubes_src:  # TRELLIS's flexicubes/ is a submodule: empty in an archive
            stub("trellis.representations.mesh.flexicubes", __path__=[os.path.abspath(flexicubes_src)])
        yield root
    finally:
        for k in [k for k in sys.modules if managed(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
