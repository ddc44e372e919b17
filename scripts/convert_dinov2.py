"""Convert DINOv2 weights to Flax: ``python scripts/convert_dinov2.py --src dinov2_vitl14_reg4_pretrain.pth --dst DIR``.

Writes DIR/params.safetensors ('/'-joined Flax paths), DIR/config.json and DIR/manifest.json (source
sha256, every tensor's name/shape/dtype), into a temporary sibling renamed when complete; a non-empty DIR
is refused unless --overwrite. ``--verify`` reloads DIR and encodes a random image twice (finite and
deterministic). The .pth is read with ``torch.load(weights_only=True)``: nothing is unpickled.
"""

from __future__ import annotations

import sys

from dso_jax import cli


def main(argv=None) -> int:
    from dso_jax.convert.dinov2 import convert_dinov2_file, load_converted_dinov2
    from dso_jax.models import dinov2

    ap = cli.ArgumentParser(description=__doc__)
    ap.add_argument("--src", required=True, help="PyTorch state dict (.pth), e.g. dinov2_vitl14_reg4_pretrain.pth")
    ap.add_argument("--dst", required=True, help="output directory")
    ap.add_argument("--config", default="vitl14_reg4", choices=sorted(dinov2.CONFIGS))
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    ap.add_argument("--verify", action="store_true", help="reload DST and run the encoder on a random image")
    args = ap.parse_args(argv)

    cfg = dinov2.get_config(args.config)
    params = convert_dinov2_file(args.src, args.dst, cfg, overwrite=args.overwrite)
    print(f"wrote {args.dst}: {dinov2.param_count(params):,} parameters ({args.config})")
    if args.verify:
        config, params = load_converted_dinov2(args.dst)
        stats = dinov2.check_encoder(params, dinov2.config_from_dict(config))
        print(
            f"verify ok: cond {stats['shape']} finite and deterministic, mean {stats['mean']:.4g} "
            f"std {stats['std']:.4g} max|x| {stats['max_abs']:.4g}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
