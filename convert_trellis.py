"""Convert TRELLIS checkpoints to Flax: ``python convert_trellis.py --src SRC --dst DST [--verify]``.

SRC is a TRELLIS model folder as released (``pipeline.json`` + ``ckpts/NAME.{json,safetensors}``; its
stage-1 models are converted, and the stage-2 SLat flow, mesh and Gaussian decoders when their files are there) or one checkpoint
prefix ``.../ckpts/NAME`` (any of those models). Each model goes to
``DST/NAME/`` as ``params.safetensors`` (float32, '/'-joined Flax keys), ``config.json`` (the TRELLIS
json) and ``manifest.json`` (source sha256; every source tensor's name, shape, dtype and Flax key).
Conversion is strict: it refuses, naming every missing, unexpected, mis-shaped, float64 or non-finite
tensor, and a pipeline.json without both stage-1 entries. DST is written into a temporary sibling and
renamed when complete (no partial DST on failure); a non-empty DST is refused unless ``--overwrite``.
``--verify`` reloads each converted model and checks that a forward pass on random inputs is finite and
deterministic.
"""

from __future__ import annotations

import sys

from dso_jax import cli


def main(argv=None) -> int:
    ap = cli.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--src", required=True, help="TRELLIS folder (with pipeline.json) or checkpoint prefix .../ckpts/NAME"
    )
    ap.add_argument("--dst", required=True, help="output folder; each model is written to DST/NAME/")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    ap.add_argument(
        "--verify", action="store_true", help="run each converted model on random inputs (finite, deterministic)"
    )
    args = ap.parse_args(argv)

    from dso_jax.models.pretrained import convert_trellis

    convert_trellis(args.src, args.dst, verify=args.verify, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
