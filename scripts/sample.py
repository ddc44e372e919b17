"""Image -> TRELLIS (stage 1 + LoRA, stage 2) -> GLB with vertex colours + Gaussians .ply, entirely in JAX.

    python scripts/sample.py --image "photos/*.png" --flow W/ss_flow_img_dit_L_16l8_fp16 \
        --decoder W/ss_dec_conv3d_16l8_fp16 --dinov2 W/dinov2_vitl14_reg4 --slat_flow W/slat_flow_img_dit_L_64l8p2_fp16 \
        --mesh_decoder W/slat_dec_mesh_swin8_B_64l8m256c_fp16 --gs_decoder W/slat_dec_gs_swin8_B_64l8gs32_fp16 \
        [--lora lora.safetensors] [--num_samples N] [--seed S] --out DIR
    python scripts/sample.py --image img.png --random_weights tiny --out /tmp/demo   # no weight files
    python scripts/sample.py --image img.png --stage 1 ...                          # stage 1's occupancy mesh only

Per image and sample k (seed S + k): DIR/{stem}_{k:03d}.glb (y-up, unit cube; stage 2: the FlexiCubes mesh with
vertex colours, post-processed like TRELLIS's to_glb: --simplify 0.95, invisible inner surfaces removed, small
holes closed; --raw_mesh keeps it as extracted), .ply (3D Gaussians, the standard 3DGS layout), _ss_latent.npy
(1, 8, 16, 16, 16) float32 and _coords.npy (N, 4) int32 (batch, x, y, z), plus DIR/manifest.json and
DIR/failures.json. A LoRA applies to stage 1 only (DSO fine-tunes the SS flow); stage 2 uses SLat 12 steps CFG 3.
Sampler defaults: DSO's stage-1 settings (dso_jax.sampling.DSO_STAGE1: 12 steps, CFG 7.5, interval [0.5, 1],
rescale_t 3; TRELLIS's pipeline.json says --steps 25 --cfg_strength 5). Images need alpha (or --background
R,G,B). A LoRA's alpha comes from the file (metadata / adapter_config.json) unless --lora_alpha is given.
Rerunning skips images whose outputs exist. See dso_jax/generate.py.
"""

from __future__ import annotations

import sys

from dso_jax import cli


def main(argv=None) -> int:
    from dso_jax import generate
    from dso_jax import generate_args as flags
    from dso_jax.data.images import expand_images
    from dso_jax.pipeline import load_noise

    ap = cli.ArgumentParser(description=__doc__)
    ap.add_argument("--image", required=True, nargs="+", help="image path(s) or glob(s) (quote globs)")
    ap.add_argument("--out", required=True)
    flags.add_lora_args(ap, "peft LoRA safetensors (DSO's full state dict, adapter-only, or a peft folder)")
    ap.add_argument("--num_samples", type=cli.positive_int, default=1)
    ap.add_argument("--seed", type=cli.non_negative_int, default=0, help="sample k uses seed S + k")
    ap.add_argument("--noise_file", default="", help=".npy (num_samples, C, R, R, R): exact noise (e.g. TRELLIS's)")
    ap.add_argument("--naming_level", type=int, default=1, choices=[1, 2], help="1: {stem}; 2: {parent}-{stem}")
    flags.add_model_args(ap)
    flags.add_stage2_args(ap)
    args = ap.parse_args(argv)

    paths = expand_images(args.image)
    names = generate.output_names(paths, args.naming_level)
    post = flags.postprocess_from_args(args) if args.stage == 2 else None
    gen = flags.generator_from_args(args, lora=args.lora or None, lora_alpha=args.lora_alpha)
    stage2 = flags.stage2_from_args(args) if args.stage == 2 else None
    noise = load_noise(args.noise_file, args.num_samples, gen.models.latent_shape) if args.noise_file else None
    generate.sample_images(
        gen,
        paths,
        args.out,
        num_samples=args.num_samples,
        seed=args.seed,
        names=names,
        noise=noise,
        background=args.background,
        stage2=stage2,
        postprocess=post,
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
