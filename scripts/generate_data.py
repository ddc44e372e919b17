"""DSO's training-data generation -> the TFDS dataset that ``scripts/train.py`` reads (``data.path``).

    python scripts/generate_data.py --images "ROOT/category/*/*.png" --flow W/ss_flow_img_dit_L_16l8_fp16 \
        --decoder W/ss_dec_conv3d_16l8_fp16 --dinov2 W/dinov2_vitl14_reg4 --out DATA [--batch_images 8]
    python scripts/train.py --config configs/dro.py --config.data.path=DATA --workdir runs/dro

Per image (DSO's category/prompt/view.png): K=4 latents with seeds 0..3, SS 12 steps CFG 7.5, the DINOv2
condition, and each latent's rotation angle from MJX: --labels occupancy (default, fast) simulates its stage-1
occupancy; --labels mesh (DSO's recipe) its final stage-2 mesh (SLat 12 steps CFG 3, FlexiCubes, to_glb's
post-processing) on MJX's mesh path. --sim_preset occupancy|mesh picks dso_jax.physics.rollout's settings (default:
the labels' own), --sim KEY=VALUE overrides single keys. Finished
images land in DATA/objects/ and are skipped when the command is run again; bad images and non-finite
samples go to DATA/failures.json and the run goes on. The dataset DATA/dso_pairs/ is rebuilt from all
finished images at the end of every run; the command fails when no image gave a usable sample.
"""

from __future__ import annotations

import sys

from dso_jax import cli


def main(argv=None) -> int:
    from dso_jax import generate
    from dso_jax import generate_args as flags
    from dso_jax.data.images import expand_images
    from dso_jax.physics import rollout

    ap = cli.ArgumentParser(description=__doc__)
    ap.add_argument("--images", required=True, nargs="+", help='glob(s) such as "ROOT/category/*/*.png" (quote them)')
    ap.add_argument("--out", required=True, help="output directory (work files, failures.json, dso_pairs/)")
    ap.add_argument("--num_samples", type=cli.positive_int, default=generate.DSO_DATA_SAMPLES, help="latents per image")
    ap.add_argument("--seed", type=cli.non_negative_int, default=0, help="sample k uses seed S + k (DSO: 0..3)")
    ap.add_argument("--noise_file", default="", help=".npy (num_samples, C, R, R, R): exact noise (e.g. TRELLIS's)")
    ap.add_argument("--labels", default="occupancy", choices=generate.LABELS, help="what MJX simulates per latent")
    flags.add_lora_args(ap, "optional peft LoRA merged into the flow (iterated DSO)")
    rollout.add_sim_args(ap, default_preset="occupancy")
    ap.set_defaults(sim_preset=None)  # None: the labels' preset (occupancy / mesh)
    flags.add_model_args(ap)
    flags.add_stage2_args(ap, stage_flag=False)
    args = ap.parse_args(argv)

    paths = expand_images(args.images)
    args.sim_preset = args.sim_preset or args.labels
    physics = rollout.sim_config_from_args(args)
    post = flags.postprocess_from_args(args) if args.labels == "mesh" else None
    gen = flags.generator_from_args(args, physics=physics, lora=args.lora or None, lora_alpha=args.lora_alpha)
    stage2 = flags.stage2_from_args(args) if args.labels == "mesh" else None
    summary = generate.generate_dataset(
        gen,
        paths,
        args.out,
        num_samples=args.num_samples,
        seed=args.seed,
        noise_file=args.noise_file or None,
        background=args.background,
        labels=args.labels,
        stage2=stage2,
        postprocess=post,
    )
    if not summary["dataset"]:
        raise cli.UserError(f"no usable sample in {args.out} (see failures.json); no dataset was written")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
