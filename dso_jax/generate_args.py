"""The model, sampler, stage-2 and post-processing flags shared by ``scripts/{sample,generate_data,generate_eval}.py``,
and the :class:`~dso_jax.pipeline.Generator` / :class:`~dso_jax.pipeline.Stage2` they build."""

from __future__ import annotations

import argparse
from typing import Optional

from dso_jax import cli, mesh_postprocess, sampling
from dso_jax.data.images import parse_color
from dso_jax.models import pretrained
from dso_jax.models.stage2 import load_stage2
from dso_jax.pipeline import IMAGES_PER_BATCH, OBJECTS_PER_BATCH, Generator, Stage2
from dso_jax.sparse.batch import COARSE_QUANTUM, TOKEN_QUANTUM


def add_model_args(ap) -> None:
    """The model / sampler flags shared by ``scripts/{sample,generate_data,generate_eval}.py``."""
    s = sampling.DSO_STAGE1
    ap.add_argument("--flow", default="", help="SS flow: converted folder or TRELLIS prefix (.../ckpts/NAME)")
    ap.add_argument("--decoder", default="", help="SS decoder: converted folder or TRELLIS prefix")
    ap.add_argument("--dinov2", default="", help="DINOv2: converted folder (scripts/convert_dinov2.py) or the hub .pth")
    ap.add_argument(
        "--random_weights",
        default=None,
        choices=sorted(pretrained.RANDOM_PRESETS),
        help="random weights of this preset for the models without a path (demos, benchmarks)",
    )
    ap.add_argument("--weights_seed", type=cli.non_negative_int, default=0, help="seed of --random_weights")
    ap.add_argument("--steps", type=cli.positive_int, default=s.steps)
    ap.add_argument("--cfg_strength", type=cli.non_negative_float, default=s.cfg_strength)
    ap.add_argument("--cfg_interval", type=cli.non_negative_float, nargs=2, default=list(s.cfg_interval))
    ap.add_argument("--rescale_t", type=cli.positive_float, default=s.rescale_t)
    ap.add_argument("--batch_images", type=cli.positive_int, default=IMAGES_PER_BATCH, help="images per device batch")
    ap.add_argument("--dinov2_dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--background",
        default=None,
        type=_color,
        help="RGB images without alpha: background colour to key out (R,G,B)",
    )


def _color(text: str):
    try:
        return parse_color(text)
    except ValueError as e:  # argparse shows an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(e)) from None


def add_lora_args(ap, help: str) -> None:
    """``--lora FILE`` and ``--lora_alpha`` (default: the file's own alpha, else DSO's 128)."""
    ap.add_argument("--lora", default="", help=help)
    ap.add_argument(
        "--lora_alpha",
        type=cli.positive_float,
        default=None,
        help="LoRA alpha; default: the file's (safetensors metadata or adapter_config.json beside it), else DSO's 128",
    )


def generator_from_args(
    args, physics=None, lora: Optional[str] = None, lora_alpha: Optional[float] = None
) -> Generator:
    lo, hi = args.cfg_interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"--cfg_interval {lo:g} {hi:g}: expected 0 <= LO <= HI <= 1 (on the rescaled time)")
    models = pretrained.load_models(
        args.flow or None,
        args.decoder or None,
        args.dinov2 or None,
        random_weights=args.random_weights,
        seed=args.weights_seed,
    )
    if lora:
        models = pretrained.with_lora(models, lora, lora_alpha)
    sampler = sampling.SamplerSettings(args.steps, args.cfg_strength, (lo, hi), args.rescale_t)
    return Generator(
        models, sampler, images_per_batch=args.batch_images, dinov2_dtype=args.dinov2_dtype, physics=physics
    )


def add_stage2_args(ap, *, stage_flag: bool = True) -> None:
    """Stage-2 models, sampler, batching and the final mesh's post-processing (TRELLIS's ``to_glb`` defaults)."""
    s, p = sampling.DSO_STAGE2, mesh_postprocess.PostprocessSettings()
    if stage_flag:
        ap.add_argument(
            "--stage",
            type=int,
            default=2,
            choices=[1, 2],
            help="2: the final FlexiCubes mesh (+ Gaussians .ply); 1: stage 1's marching-cubes mesh of the occupancy",
        )
    ap.add_argument("--slat_flow", default="", help="SLat flow: converted folder or TRELLIS prefix")
    ap.add_argument("--mesh_decoder", default="", help="SLat mesh decoder: converted folder or TRELLIS prefix")
    ap.add_argument("--gs_decoder", default="", help="SLat Gaussian decoder: converted folder or TRELLIS prefix")
    ap.add_argument("--no_gaussians", action="store_true", help="skip the Gaussian decoder and the .ply")
    ap.add_argument("--slat_steps", type=cli.positive_int, default=s.steps)
    ap.add_argument("--slat_cfg_strength", type=cli.non_negative_float, default=s.cfg_strength)
    ap.add_argument(
        "--stage2_batch", type=cli.positive_int, default=OBJECTS_PER_BATCH, help="stage-2 objects per device batch"
    )
    ap.add_argument(
        "--stage2_quantum", type=cli.positive_int, default=TOKEN_QUANTUM, help="stage-2 token bucket quantum (voxels)"
    )
    ap.add_argument("--simplify", type=cli.non_negative_float, default=p.simplify, help="fraction of faces removed")
    ap.add_argument("--no_fill_holes", action="store_true", help="keep invisible inner surfaces and holes")
    ap.add_argument("--raw_mesh", action="store_true", help="no post-processing: the FlexiCubes mesh as extracted")
    ap.add_argument("--visibility_views", type=cli.positive_int, default=p.num_views)
    ap.add_argument("--visibility_resolution", type=cli.positive_int, default=p.resolution)


def postprocess_from_args(args) -> Optional[mesh_postprocess.PostprocessSettings]:
    """The final mesh's post-processing settings, None for ``--raw_mesh``; checks that simplification can run."""
    if args.raw_mesh:
        return None
    if not args.simplify < 1:
        raise ValueError(f"--simplify {args.simplify:g}: expected a fraction of faces to remove in [0, 1)")
    if args.simplify > 0:
        mesh_postprocess.require_simplifier()
    return mesh_postprocess.PostprocessSettings(
        simplify=args.simplify,
        fill_holes=not args.no_fill_holes,
        num_views=args.visibility_views,
        resolution=args.visibility_resolution,
    )


def stage2_from_args(args) -> Stage2:
    models = load_stage2(
        args.slat_flow or None,
        args.mesh_decoder or None,
        args.gs_decoder or None,
        random_weights=args.random_weights,
        seed=args.weights_seed,
        gaussians=not args.no_gaussians,
    )
    s = sampling.DSO_STAGE2
    sampler = sampling.SamplerSettings(args.slat_steps, args.slat_cfg_strength, s.cfg_interval, s.rescale_t)
    return Stage2(
        models,
        sampler,
        objects_per_batch=args.stage2_batch,
        quantum=args.stage2_quantum,
        coarse_quantum=min(COARSE_QUANTUM, args.stage2_quantum),
    )
