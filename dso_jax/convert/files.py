"""File I/O shared by the converters: atomic JSON, checked reads, and staged output folders.

Every write is atomic: a JSON file is written beside its final name and renamed; a converter writes its
whole output folder as a temporary sibling and renames it when complete (:func:`staged_folder`), so a
failure or a kill never leaves a partial file or folder under the final name. Reads raise one line
naming the file (``FileNotFoundError``, or ``ConversionError`` for unreadable content).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import numpy as np

from dso_jax.convert.verify import ConversionError


@contextlib.contextmanager
def staged_folder(dst: str, *, overwrite: bool = False):
    """Yield a temporary sibling folder of ``dst``; on success it becomes ``dst`` by a rename, on failure it goes.

    A conversion therefore never leaves a partial ``dst``. An existing non-empty ``dst`` (or a file there) is
    refused before anything is written, unless ``overwrite`` (then the old folder is replaced at the end).
    """
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise NotADirectoryError(f"{dst}: the destination exists and is a file")
    if os.path.isdir(dst) and os.listdir(dst) and not overwrite:
        raise FileExistsError(f"{dst}: the destination exists and is not empty (remove it, or pass --overwrite)")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=os.path.dirname(dst))
    except OSError as e:  # name the destination, not the temporary folder
        raise OSError(e.errno, f"cannot write the destination's folder ({e.strerror})", dst) from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would become the destination's mode
    try:
        yield tmp
        old = tmp + ".old"
        if os.path.exists(dst):
            os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str, obj, sort_keys: bool = False) -> None:
    """Write ``obj`` as indented JSON, atomically (a temporary file, then a rename)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, sort_keys=sort_keys)
        f.write("\n")
    os.replace(path + ".tmp", path)


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return load_file(path)
    except (SafetensorError, ValueError, OSError) as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None
