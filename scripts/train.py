"""Train a LoRA overlay on TRELLIS stage 1 with DSO's objectives, offline (labelled pairs) or online (toy world).

    python scripts/train.py --config configs/dro.py:tiny --workdir runs/tiny
    python scripts/train.py --config configs/dro.py:toy --workdir runs/toy
    python scripts/train.py --config configs/dpo.py --config.data.path=/data/dso_pairs --workdir runs/dpo

``config.mode`` picks the trainer (``dso_jax.train`` offline, ``dso_jax.online`` online). Rerunning the same
command resumes from the workdir's latest checkpoint. Bad input ends in one line and exit status 2
(``--debug`` or ``DSO_JAX_DEBUG=1`` for the traceback).
"""

import sys

from absl import flags

from dso_jax import cli, config_cli, online, train

TRAINERS = {"offline": train.train_and_evaluate, "online": online.train_and_evaluate}


def _define(fv):
    flags.DEFINE_string("workdir", None, "checkpoints, TensorBoard events and config.json go here", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)


def run(argv) -> None:
    fv = config_cli.parse(argv, _define, "configs/<loss>.py[:variant]")
    config = fv.config
    if config.mode not in TRAINERS:
        raise ValueError(f"config.mode must be one of {sorted(TRAINERS)}, got {config.mode!r}")
    config_cli.setup_logging()
    TRAINERS[config.mode](config, fv.workdir)


def main(argv=None) -> int:
    argv = sys.argv if argv is None else argv
    return cli.run(lambda: run(argv), prog="train.py")


if __name__ == "__main__":
    sys.exit(main())
