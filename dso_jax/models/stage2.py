"""Stage-2 models of the image -> 3D pipeline: the SLat flow, the mesh decoder and the Gaussian decoder, loaded from
converted folders / TRELLIS prefixes (``load_pretrained``) or as random weights of a preset (demos, tests, benches).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

from dso_jax.convert import trellis_slat
from dso_jax.models.pretrained import _random_model, load_pretrained
from dso_jax.models.slat_decoders import SLatGaussianDecoder, SLatMeshDecoder
from dso_jax.models.slat_flow import SLatFlowModel

# Stage 2 for random weights: (SLat flow, mesh decoder, Gaussian decoder) args per preset. "tiny" keeps the released
# layout (64³ SLat grid, 8 latent channels, one io stage, swin 8³ windows, 32 Gaussians) at CPU size; the mesh
# decoder's 256 channels are the least its GroupNorm32 on C / 8 allows. Its cond width is the tiny DINOv2's.
STAGE2_PRESETS = {
    "released": (
        trellis_slat.RELEASED_SLAT_FLOW_ARGS,
        trellis_slat.RELEASED_SLAT_MESH_DECODER_ARGS,
        trellis_slat.RELEASED_SLAT_GS_DECODER_ARGS,
    ),
    "tiny": (
        dict(
            trellis_slat.RELEASED_SLAT_FLOW_ARGS,
            model_channels=32,
            cond_channels=64,
            num_blocks=1,
            num_heads=2,
            io_block_channels=[16],
            use_fp16=False,
        ),
        dict(
            trellis_slat.RELEASED_SLAT_MESH_DECODER_ARGS, model_channels=256, num_blocks=1, num_heads=4, use_fp16=False
        ),
        dict(trellis_slat.RELEASED_SLAT_GS_DECODER_ARGS, model_channels=32, num_blocks=1, num_heads=2, use_fp16=False),
    ),
}


@dataclasses.dataclass
class Stage2Models:
    """Stage 2: the SLat flow, the mesh decoder and (optionally) the Gaussian decoder, ``.module`` attached."""

    slat_flow: Callable
    slat_flow_params: dict
    mesh_decoder: Callable
    mesh_decoder_params: dict
    gs_decoder: Optional[Callable]
    gs_decoder_params: Optional[dict]
    source: dict


def load_stage2(
    slat_flow: Optional[str] = None,
    mesh_decoder: Optional[str] = None,
    gs_decoder: Optional[str] = None,
    *,
    random_weights: Optional[str] = None,
    seed: int = 0,
    gaussians: bool = True,
) -> Stage2Models:
    """Stage-2 models from paths (converted folders / TRELLIS prefixes), the ones without a path as random weights
    of ``STAGE2_PRESETS[random_weights]``; ``gaussians=False`` skips the Gaussian decoder."""
    if random_weights is not None and random_weights not in STAGE2_PRESETS:
        raise ValueError(f"random_weights must be one of {sorted(STAGE2_PRESETS)}, got {random_weights!r}")
    wanted = (("--slat_flow", slat_flow), ("--mesh_decoder", mesh_decoder)) + (
        (("--gs_decoder", gs_decoder),) if gaussians else ()
    )
    missing = [n for n, p in wanted if not p]
    if missing and random_weights is None:
        raise ValueError(f"no path for {', '.join(missing)}; pass them or --random_weights released|tiny")
    preset = STAGE2_PRESETS.get(random_weights or "tiny")
    names = (trellis_slat.SLAT_FLOW, trellis_slat.SLAT_MESH_DECODER, trellis_slat.SLAT_GS_DECODER)
    loaded = []
    for i, (path, name, args, cls) in enumerate(
        zip((slat_flow, mesh_decoder, gs_decoder), names, preset, (SLatFlowModel, SLatMeshDecoder, SLatGaussianDecoder))
    ):
        if i == 2 and not gaussians:
            loaded.append((None, None))
            continue
        apply_fn, params = load_pretrained(path) if path else _random_model(name, args, seed + 10 + i)
        if not isinstance(apply_fn.module, cls):
            raise ValueError(f"{path}: is a {type(apply_fn.module).__name__}, expected a {cls.__name__}")
        loaded.append((apply_fn, params))
    (f, fp), (m, mp), (g, gp) = loaded
    latent = f.module.out_channels
    for dec in (m, g):
        if dec is not None and (dec.module.latent_channels != latent or dec.module.resolution != f.module.resolution):
            raise ValueError(
                f"{type(dec.module).__name__} takes {dec.module.latent_channels} channels at {dec.module.resolution}^3, "
                f"the SLat flow gives {latent} at {f.module.resolution}^3"
            )
    name = lambda p: os.path.abspath(p) if p else f"random:{random_weights}"  # noqa: E731
    source = dict(
        slat_flow=name(slat_flow), mesh_decoder=name(mesh_decoder), gs_decoder=name(gs_decoder) if gaussians else None
    )
    return Stage2Models(f, fp, m, mp, g, gp, source)
