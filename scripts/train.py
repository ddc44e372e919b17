"""Train a LoRA overlay on TRELLIS stage 1 with DSO's objectives.

    python scripts/train.py --config configs/dro.py:tiny --workdir runs/tiny
    python scripts/train.py --config configs/dpo.py --config.data.path=/data/dso_pairs --workdir runs/dpo

Rerunning the same command resumes from the workdir's latest checkpoint.
"""

import logging as pylogging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dso_jax import train

config_flags.DEFINE_config_file("config", None, "configs/<loss>.py[:variant]", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, TensorBoard events and config.json go here")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
    """absl parsing, with an override of an undeclared config key reported in one line."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        overrides = [a.split("=", 1)[0][len("--config.") :] for a in argv[1:] if a.startswith("--config.")]
        config = _load_config(argv)
        unknown = [k for k in overrides if config is not None and not _has_key(config, k)]
        print(
            f"FATAL Flags parsing error: unknown config key {', '.join(unknown) or e} (every key is declared in configs/common.py)",
            file=sys.stderr,
        )
        sys.exit(1)


def _load_config(argv):
    """The ``--config FILE[:ARG]`` ConfigDict, loaded again only to name a bad override."""
    import importlib.util

    for i, a in enumerate(argv[1:], 1):
        spec = (
            a[len("--config=") :]
            if a.startswith("--config=")
            else argv[i + 1]
            if a == "--config" and i + 1 < len(argv)
            else None
        )
        if spec is None:
            continue
        path, _, arg = spec.partition(":")
        mod_spec = importlib.util.spec_from_file_location("_config_for_error", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        return module.get_config(arg or None)
    return None


def _has_key(config, dotted):
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    # orbax narrates every save at INFO; keep its warnings and errors only.
    quiet_orbax = lambda r: r.levelno >= pylogging.WARNING or "/orbax/" not in r.pathname
    for handler in pylogging.getLogger().handlers:
        handler.addFilter(quiet_orbax)
    train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
