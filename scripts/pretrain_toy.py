"""Pre-train the toy world's stage-1 flow model and write it as a converted folder.

    python scripts/pretrain_toy.py --config configs/pretrain_toy.py --workdir runs/pretrain_toy --out ported_weights/toy
    python scripts/pretrain_toy.py --config configs/pretrain_toy.py:micro --workdir /tmp/micro --out /tmp/micro/toy

``--out`` receives ``params.safetensors``, ``config.json`` and ``manifest.json`` (how it was made, with the
held-out evaluation); ``--workdir`` receives ``metrics.jsonl``, ``eval.json`` and ``heldout_samples.png``.
``dso_jax.models.load_pretrained(OUT)`` loads the result.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from dso_jax import pretrain_toy

config_flags.DEFINE_config_file("config", None, "configs/pretrain_toy.py[:variant]", lock_config=True)
flags.DEFINE_string("workdir", None, "metrics, evaluation and renders go here")
flags.DEFINE_string("out", "ported_weights/toy", "the converted folder to write")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    pretrain_toy.pretrain_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.out)


if __name__ == "__main__":
    app.run(main)
