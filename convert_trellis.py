"""Convert TRELLIS checkpoints to Flax: ``python convert_trellis.py --src SRC --dst DST [--verify]``.

SRC is a TRELLIS model folder as released (``pipeline.json`` + ``ckpts/NAME.{json,safetensors}``; its
stage-1 models are converted, and the stage-2 SLat flow when its files are there) or one checkpoint
prefix ``.../ckpts/NAME`` (any of those models). Each model goes to
``DST/NAME/`` as ``params.safetensors`` (float32, '/'-joined Flax keys), ``config.json`` (the TRELLIS
json) and ``manifest.json`` (source sha256; every source tensor's name, shape, dtype and Flax key).
Conversion is strict: it refuses, naming every missing, unexpected or mis-shaped key. ``--verify``
reloads each converted model and checks that a forward pass on random inputs is finite and deterministic.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--src", required=True, help="TRELLIS folder (with pipeline.json) or checkpoint prefix .../ckpts/NAME"
    )
    ap.add_argument("--dst", required=True, help="output folder; each model is written to DST/NAME/")
    ap.add_argument(
        "--verify", action="store_true", help="run each converted model on random inputs (finite, deterministic)"
    )
    args = ap.parse_args(argv)

    from dso_jax.convert.verify import ConversionError
    from dso_jax.models.pretrained import convert_trellis

    try:
        convert_trellis(args.src, args.dst, verify=args.verify)
    except (ConversionError, FileNotFoundError) as e:
        print(f"convert_trellis: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
