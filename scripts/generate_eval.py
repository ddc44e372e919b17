"""Eval meshes with and without a LoRA (DSO's ``finetune.py --eval``), for ``scripts/evaluate_*.py``.

    python scripts/generate_eval.py --images "EVAL/objaverse/*/*.png" --lora runs/dro/peft/step_0002000.safetensors \
        --flow W/ss_flow_img_dit_L_16l8_fp16 --decoder W/ss_dec_conv3d_16l8_fp16 --dinov2 W/dinov2_vitl14_reg4 \
        --out EVALOUT [--ids stable_objaverse_ids.txt]
    python scripts/evaluate_stability.py --mesh_paths "EVALOUT/lora/*.glb" --out EVALOUT/lora_stability.json
    python scripts/evaluate_geometry.py --mesh_paths "EVALOUT/lora/*.glb" --ground_truth_paths GT

Writes EVALOUT/base/{uid}-{view}_{k:03d}.glb and, with --lora, EVALOUT/lora/... (uid = the image's folder,
view = its stem), one model per image with seed 1 (DSO's bid + 1), SS 12 steps CFG 7.5, SLat 12 steps CFG 3: the
final stage-2 mesh post-processed as DSO's to_glb(simplify=0.95, fill_holes=True) (--stage 1: the occupancy's
mesh). The LoRA changes stage 1 only; pass the stage-2 models with --slat_flow / --mesh_decoder. --ids (one uid per line)
filters images only when given; unlike DSO's script it is never applied implicitly to other eval sets.
"""

from __future__ import annotations

import sys

from dso_jax import cli


def read_ids(path: str) -> list[str]:
    """One object uid per line (blank lines ignored); an empty file is an error."""
    with open(path) as f:
        ids = [line.strip() for line in f if line.strip()]
    if not ids:
        raise ValueError(f"{path}: lists no object ids (expected one uid per line)")
    return ids


def main(argv=None) -> int:
    from dso_jax import generate
    from dso_jax import generate_args as flags
    from dso_jax.data.images import expand_images

    ap = cli.ArgumentParser(description=__doc__)
    ap.add_argument("--images", required=True, nargs="+", help="glob(s) of eval images (quote them)")
    ap.add_argument("--out", required=True)
    flags.add_lora_args(ap, "peft LoRA safetensors (or peft folder); without it only OUT/base is written")
    ap.add_argument("--ids", default="", help="file of object uids (one per line) to keep")
    ap.add_argument("--num_samples", type=cli.positive_int, default=1, help="models per image (DSO: 1)")
    ap.add_argument(
        "--seed",
        type=cli.non_negative_int,
        default=generate.DSO_EVAL_SEED,
        help="sample k uses seed S + k (DSO: bid + 1)",
    )
    flags.add_model_args(ap)
    flags.add_stage2_args(ap)
    args = ap.parse_args(argv)

    paths = expand_images(args.images)
    ids = read_ids(args.ids) if args.ids else None
    post = flags.postprocess_from_args(args) if args.stage == 2 else None
    gen = flags.generator_from_args(args)
    stage2 = flags.stage2_from_args(args) if args.stage == 2 else None
    generate.generate_eval(
        gen,
        paths,
        args.out,
        lora=args.lora or None,
        lora_alpha=args.lora_alpha,
        ids=ids,
        seed=args.seed,
        num_samples=args.num_samples,
        background=args.background,
        stage2=stage2,
        postprocess=post,
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
