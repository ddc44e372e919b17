"""Held-out evaluation of a toy flow model folder (the protocol of ``dso_jax.pretrain_toy.evaluate``).

    python scripts/eval_toy.py --config configs/pretrain_toy.py --weights ported_weights/toy --workdir runs/eval_toy
    python scripts/eval_toy.py --config configs/pretrain_toy.py --config.sampler.cfg_strength=0 \
        --config.eval.physics=static --weights ported_weights/toy --workdir runs/eval_toy_nocfg

Fixed held-out conditions and noise (``eval.seed``), the configured sampler; writes ``eval.json`` (stable rate,
mean angle, IoU and front IoU to the conditioning object, per kind, and what the world itself gives on the
same conditions) and ``heldout_samples.png`` into the workdir.
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from dso_jax import pretrain_toy

config_flags.DEFINE_config_file("config", None, "configs/pretrain_toy.py[:variant]", lock_config=True)
flags.DEFINE_string("weights", "ported_weights/toy", "a converted folder (params.safetensors + config.json)")
flags.DEFINE_string("workdir", None, "eval.json and heldout_samples.png go here")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    summary = pretrain_toy.evaluate_folder(flags.FLAGS.config, flags.FLAGS.weights, flags.FLAGS.workdir)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    app.run(main)
