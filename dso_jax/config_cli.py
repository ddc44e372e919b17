"""Command lines of the config-file programs (``scripts/train.py``, ``pretrain_toy.py``, ``eval_toy.py``).

``parse(argv, define)`` reads ``--config FILE[:VARIANT]`` with ``--config.key=value`` overrides
(ml_collections' config flags on a fresh ``absl.flags.FlagValues``, so it can be called more than once in a
process) plus the flags ``define(flag_values)`` declares, and turns every parsing failure into one line naming
the flag, the file or the key: a missing config file, an unknown variant, an undeclared key, a bad value.
Run it inside ``dso_jax.cli.run``. ``setup_logging`` sends INFO lines to stderr (orbax's narration muted).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from typing import Callable

from absl import flags
from ml_collections import config_flags

from dso_jax.cli import UserError, strip_debug


def _config_spec(argv: list[str]):
    """The ``--config`` value of ``argv`` (``FILE[:ARG]``), or None."""
    for i, a in enumerate(argv[1:], 1):
        if a.startswith("--config="):
            return a[len("--config=") :]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_config(spec: str):
    """``get_config(ARG)`` of ``FILE[:ARG]``; a missing file or a bad variant is a one-line error."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file")
    mod_spec = importlib.util.spec_from_file_location("_dso_jax_config", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"--config {path}: defines no get_config(arg)")
    return module.get_config(arg or None)


def _has_key(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def _explain(argv: list[str], error: Exception) -> Exception:
    """The one-line reason of a failed parse."""
    spec = _config_spec(argv)
    if spec is not None:
        config = load_config(spec)  # raises the clean error of a bad file or variant
        overrides = [a[len("--config.") :].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        unknown = [k for k in overrides if not _has_key(config, k)]
        if unknown:
            where = spec.partition(":")[0]
            return UserError(
                f"unknown config key {', '.join(unknown)} (the keys are declared in {where} and the files it builds on)"
            )
    return UserError(str(error).splitlines()[0])


def parse(argv: list[str], define: Callable[[flags.FlagValues], None], config_help: str) -> flags.FlagValues:
    """Parse ``argv`` (program name first); ``--help`` prints the flags and exits 0."""
    argv = strip_debug(list(argv))
    spec = _config_spec(argv)
    if spec is not None and not os.path.isfile(spec.partition(":")[0]):
        raise FileNotFoundError(f"--config {spec.partition(':')[0]}: no such file")
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, config_help, flag_values=fv, lock_config=True, sys_argv=argv)
    flags.mark_flag_as_required("config", flag_values=fv)
    define(fv)
    if "--help" in argv or "-h" in argv:
        print(fv.get_help())
        raise SystemExit(0)
    try:
        rest = fv(argv)
    except (flags.Error, AttributeError, KeyError) as e:  # config_flags reports an undeclared key as either
        raise _explain(argv, e) from None
    if len(rest) > 1:
        raise UserError(f"unexpected arguments: {' '.join(rest[1:])}")
    return fv


def setup_logging() -> None:
    """INFO lines on stderr; orbax narrates every save at INFO, so only its warnings and errors stay."""
    # force: a library that logged at import time has already given the root logger a WARNING-level handler
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(levelname).1s %(asctime)s %(message)s", force=True
    )
    quiet_orbax = lambda r: r.levelno >= logging.WARNING or "/orbax/" not in r.pathname
    for handler in logging.getLogger().handlers:
        handler.addFilter(quiet_orbax)
