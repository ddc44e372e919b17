"""Pre-train the toy world's stage-1 flow model and write it as a converted folder.

    python scripts/pretrain_toy.py --config configs/pretrain_toy.py --workdir runs/pretrain_toy --out ported_weights/toy
    python scripts/pretrain_toy.py --config configs/pretrain_toy.py:micro --workdir /tmp/micro --out /tmp/micro/toy

``--out`` receives ``params.safetensors``, ``config.json`` and ``manifest.json`` (how it was made, with the
held-out evaluation); ``--workdir`` receives ``metrics.jsonl``, TensorBoard events, ``eval.json`` and
``heldout_samples.png``. ``dso_jax.models.load_pretrained(OUT)`` loads the result. Bad input ends in one line
and exit status 2 (``--debug`` or ``DSO_JAX_DEBUG=1`` for the traceback).
"""

import sys

from absl import flags

from dso_jax import cli, config_cli
from dso_jax.toy import pretrain


def _define(fv):
    flags.DEFINE_string("workdir", None, "metrics, evaluation and renders go here", flag_values=fv)
    flags.DEFINE_string("out", "ported_weights/toy", "the converted folder to write", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)


def run(argv) -> None:
    fv = config_cli.parse(argv, _define, "configs/pretrain_toy.py[:variant]")
    config_cli.setup_logging()
    pretrain.pretrain_and_evaluate(fv.config, fv.workdir, fv.out)


def main(argv=None) -> int:
    argv = sys.argv if argv is None else argv
    return cli.run(lambda: run(argv), prog="pretrain_toy.py")


if __name__ == "__main__":
    sys.exit(main())
