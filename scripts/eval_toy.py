"""Held-out evaluation of a toy flow model folder (the protocol of ``dso_jax.toy.heldout``, the main job's).

    python scripts/eval_toy.py --config configs/pretrain_toy.py --weights ported_weights/toy --workdir runs/eval_toy
    python scripts/eval_toy.py --config configs/pretrain_toy.py --config.sampler.cfg_strength=0 \
        --config.eval.physics=static --weights ported_weights/toy --workdir runs/eval_toy_nocfg

Fixed held-out conditions and noise (``eval.seed``, ``eval.num_conditions``, ``eval.batch``), the configured
sampler, the toy codec and (``eval.physics=mjx``) the ``physics`` section's MJX verdict; writes ``eval.json``
(stable rate, mean angle, IoU and front IoU to the conditioning object, per kind, and what the world itself
gives on the same conditions) and ``heldout_samples.png`` into the workdir. Bad input ends in one line and exit
status 2 (``--debug`` or ``DSO_JAX_DEBUG=1`` for the traceback).
"""

import json
import sys

from absl import flags

from dso_jax import cli, config_cli
from dso_jax.toy import pretrain


def _define(fv):
    flags.DEFINE_string(
        "weights", "ported_weights/toy", "a converted folder (params.safetensors + config.json)", flag_values=fv
    )
    flags.DEFINE_string("workdir", None, "eval.json and heldout_samples.png go here", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)


def run(argv) -> None:
    fv = config_cli.parse(argv, _define, "configs/pretrain_toy.py[:variant]")
    config_cli.setup_logging()
    summary = pretrain.evaluate_folder(fv.config, fv.weights, fv.workdir)
    print(json.dumps(summary, indent=1))


def main(argv=None) -> int:
    argv = sys.argv if argv is None else argv
    return cli.run(lambda: run(argv), prog="eval_toy.py")


if __name__ == "__main__":
    sys.exit(main())
