"""Random-weight TRELLIS-format checkpoints at the released dtypes (numpy only; no torch needed).

As a script, writes a TRELLIS model folder like the released one (``pipeline.json`` +
``ckpts/ss_flow_img_dit_L_16l8_fp16.{json,safetensors}`` + ``ckpts/ss_dec_conv3d_16l8_fp16.{json,safetensors}``,
and with ``--slat`` stage 2: ``ckpts/slat_flow_img_dit_L_64l8p2_fp16`` and the mesh / Gaussian decoders)::

    python tests/helpers_trellis.py --out DIR              # tiny args (tests)
    python tests/helpers_trellis.py --out DIR --released   # the exact released architectures (~1.3 GB)
    python tests/helpers_trellis.py --out DIR --released --slat   # + the released stage 2 (~1.6 GB more)

Names, shapes and dtypes come from the key tables in ``dso_jax.convert.trellis`` (fp16 block
Linears / torso Convs, fp32 elsewhere); the ``pos_emb`` buffer is computed here from the reference
formula (``trellis.md`` §2.4), independently of the Flax port. Every tensor is random and
non-trivial (no zero-initialised adaLN / output layers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from dso_jax.convert import trellis, trellis_slat
from dso_jax.convert.rules import BUFFER

FLOW_NAME, DECODER_NAME = "ss_flow_img_dit_L_16l8_fp16", "ss_dec_conv3d_16l8_fp16"

RELEASED_FLOW_ARGS, RELEASED_DECODER_ARGS = (
    trellis.RELEASED_FLOW_ARGS,
    trellis.RELEASED_DECODER_ARGS,
)  # trellis.md §2.1, §3.1
# The released architectures at toy width: same options, fp16 torso, patch 2 to exercise patchify.
TINY_FLOW_ARGS = dict(
    RELEASED_FLOW_ARGS,
    resolution=8,
    in_channels=4,
    out_channels=4,
    model_channels=64,
    cond_channels=32,
    num_blocks=2,
    num_heads=4,
    patch_size=2,
)
TINY_DECODER_ARGS = dict(
    RELEASED_DECODER_ARGS, latent_channels=4, num_res_blocks=1, num_res_blocks_middle=1, channels=[32, 16, 8]
)
SLAT_NAME = trellis_slat.SLAT_FLOW_NAME
RELEASED_SLAT_ARGS = trellis_slat.RELEASED_SLAT_FLOW_ARGS
# The released SLat architecture at toy width (16³ grid, one io stage of 16 channels, 64-wide transformer).
TINY_SLAT_ARGS = dict(
    resolution=16,
    in_channels=8,
    out_channels=8,
    model_channels=64,
    cond_channels=32,
    num_blocks=2,
    num_heads=4,
    mlp_ratio=4,
    patch_size=2,
    num_io_res_blocks=2,
    io_block_channels=[16],
    pe_mode="ape",
    qk_rms_norm=True,
    use_fp16=True,
)

MESH_DECODER_NAME, GS_DECODER_NAME = trellis_slat.SLAT_MESH_DECODER_NAME, trellis_slat.SLAT_GS_DECODER_NAME
RELEASED_MESH_DECODER_ARGS = trellis_slat.RELEASED_SLAT_MESH_DECODER_ARGS
RELEASED_GS_DECODER_ARGS = trellis_slat.RELEASED_SLAT_GS_DECODER_ARGS
# The released decoders at toy size: a 16³ grid (the mesh decoder's output at 64³), 4³ windows (shift 2), 2 blocks,
# 256 channels (the least with 32 GroupNorm groups on C / 8), 4 heads; the Gaussian decoder keeps 32 Gaussians.
TINY_MESH_DECODER_ARGS = dict(
    RELEASED_MESH_DECODER_ARGS, resolution=16, model_channels=256, num_blocks=2, num_heads=4, window_size=4
)
TINY_GS_DECODER_ARGS = dict(
    RELEASED_GS_DECODER_ARGS, resolution=16, model_channels=64, num_blocks=2, num_heads=4, window_size=4
)

# trellis.md §1.1 (pipeline.json); the radiance-field decoder is listed but never written here.
PIPELINE = {
    "name": "TrellisImageTo3DPipeline",
    "args": {
        "models": {
            "sparse_structure_decoder": f"ckpts/{DECODER_NAME}",
            "sparse_structure_flow_model": f"ckpts/{FLOW_NAME}",
            "slat_decoder_gs": "ckpts/slat_dec_gs_swin8_B_64l8gs32_fp16",
            "slat_decoder_rf": "ckpts/slat_dec_rf_swin8_B_64l8r16_fp16",
            "slat_decoder_mesh": "ckpts/slat_dec_mesh_swin8_B_64l8m256c_fp16",
            "slat_flow_model": "ckpts/slat_flow_img_dit_L_64l8p2_fp16",
        },
        "sparse_structure_sampler": {
            "name": "FlowEulerGuidanceIntervalSampler",
            "args": {"sigma_min": 1e-5},
            "params": {"steps": 25, "cfg_strength": 5.0, "cfg_interval": [0.5, 1.0], "rescale_t": 3.0},
        },
        "slat_sampler": {
            "name": "FlowEulerGuidanceIntervalSampler",
            "args": {"sigma_min": 1e-5},
            "params": {"steps": 25, "cfg_strength": 5.0, "cfg_interval": [0.5, 1.0], "rescale_t": 3.0},
        },
        "slat_normalization": {
            "mean": [
                -2.1687545776367188,
                -0.004347046371549368,
                -0.13352349400520325,
                -0.08418072760105133,
                -0.5271206498146057,
                0.7238689064979553,
                -1.1414450407028198,
                1.2039363384246826,
            ],
            "std": [
                2.377650737762451,
                2.386378288269043,
                2.124418020248413,
                2.1748552322387695,
                2.663944721221924,
                2.371192216873169,
                2.6217446327209473,
                2.684523105621338,
            ],
        },
        "image_cond_model": "dinov2_vitl14_reg",
    },
}


def reference_pos_emb(resolution: int, channels: int) -> np.ndarray:
    """trellis.md §2.4 in float32: per axis x, y, z: [sin(c v), cos(c v)], v_j = 10000^(-j/f), zero padded."""
    f = channels // 3 // 2
    nu = (1.0 / (np.float32(10000.0) ** (np.arange(f, dtype=np.float32) / np.float32(f)))).astype(np.float32)
    c = np.stack(np.meshgrid(*[np.arange(resolution)] * 3, indexing="ij"), -1).reshape(-1, 3).astype(np.float32)
    ang = (c[:, :, None] * nu[None, None, :]).astype(np.float32)  # (N, 3, f)
    emb = np.concatenate([np.sin(ang), np.cos(ang)], axis=-1).reshape(len(c), 6 * f)
    return np.pad(emb, ((0, 0), (0, channels - 6 * f))).astype(np.float32)


def reference_offset_perturbation(num_gaussians: int, voxel_size: float) -> np.ndarray:
    """trellis.md §4.6 in float32: atanh((hammersley * 2 - 1) / voxel_size), hammersley_i = (i / G, phi_2(i), phi_3(i))."""

    def phi(base, i):
        out, f = 0.0, 1.0 / base
        while i:
            i, d = divmod(i, base)
            out, f = out + d * f, f / base
        return out

    h = np.array([[i / num_gaussians, phi(2, i), phi(3, i)] for i in range(num_gaussians)], np.float32)
    return np.arctanh((h * 2 - 1) / np.float32(voxel_size)).astype(np.float32)


def random_state_dict(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """A state dict of the json ``config`` with random values, stored at the released dtypes."""
    rng = np.random.default_rng(seed)
    out = {}
    for e in trellis.key_table(config):
        leaf = e.torch_key.rsplit(".", 1)[-1]
        if e.kind == BUFFER and e.torch_key == "offset_perturbation":  # the Gaussian decoder's
            rep = config["args"]["representation_config"]
            w = reference_offset_perturbation(rep["num_gaussians"], rep["voxel_size"])
        elif e.kind == BUFFER:  # pos_emb
            a = trellis.full_args(config["name"], config["args"])
            w = reference_pos_emb(a["resolution"] // a["patch_size"], a["model_channels"])
        elif leaf == "weight" and e.kind in ("linear", "conv3d", "spconv"):
            w = rng.standard_normal(e.shape, np.float32) / np.float32(np.sqrt(np.prod(e.shape[1:])))  # 1/sqrt(fan_in)
        elif leaf == "bias":
            w = 0.1 * rng.standard_normal(e.shape, np.float32)
        else:  # norm scales, rms gamma
            w = 1.0 + 0.1 * rng.standard_normal(e.shape, np.float32)
        out[e.torch_key] = np.ascontiguousarray(w.astype(e.released))
    return out


def flow_pair(args: dict, seed: int = 0):
    """(Flax apply_fn, converted params, float32 PyTorch twin) for random released-dtype weights of ``args``:
    the same state dict loaded into both sides (the twin needs torch; imported here, not at module import)."""
    import torch
    from twins import trellis_twin as tw

    from dso_jax.models.pretrained import buffers_of, make_apply_fn, model_from_config

    config = {"name": trellis.FLOW, "args": dict(args)}
    sd = random_state_dict(config, seed)
    module = model_from_config(trellis.FLOW, config["args"])
    params = trellis.convert_state_dict(sd, config, buffers=buffers_of(module))
    twin = tw.SparseStructureFlowModel(**{**args, "use_fp16": False})
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    return make_apply_fn(module), params, twin


def slat_pair(args: dict, seed: int = 0):
    """(Flax apply_fn, converted params, float32 PyTorch twin) of the SLat flow on random released-dtype weights."""
    import torch
    from twins import slat_twin as st

    from dso_jax.models.pretrained import make_apply_fn, model_from_config

    config = {"name": trellis_slat.SLAT_FLOW, "args": dict(args)}
    sd = random_state_dict(config, seed)
    module = model_from_config(config["name"], config["args"])
    params = trellis.convert_state_dict(sd, config)
    twin = st.SLatFlowModel(**{**args, "use_fp16": False})
    twin.load_state_dict({k: torch.from_numpy(v).float() for k, v in sd.items()}, strict=True)
    return make_apply_fn(module), params, twin


def decoder_pair(name: str, args: dict, seed: int = 0):
    """(Flax apply_fn, converted params, float32 PyTorch twin) of a SLat decoder on random released-dtype weights."""
    import torch
    from twins import slat_decoder_twin as dt

    from dso_jax.models.pretrained import buffers_of, make_apply_fn, model_from_config

    config = {"name": name, "args": dict(args)}
    sd = random_state_dict(config, seed)
    module = model_from_config(config["name"], config["args"])
    params = trellis.convert_state_dict(sd, config, buffers=buffers_of(module))
    cls = dt.SLatMeshDecoder if name == trellis_slat.SLAT_MESH_DECODER else dt.SLatGaussianDecoder
    twin = cls(**{**args, "use_fp16": False})
    twin.load_state_dict({k: torch.from_numpy(v).float() for k, v in sd.items()}, strict=True)
    return make_apply_fn(module), params, twin


def write_checkpoint(prefix: str, config: dict, state_dict: dict) -> str:
    from safetensors.numpy import save_file

    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(config, f, indent=4)
    save_file(state_dict, prefix + ".safetensors")
    return prefix


def write_trellis_folder(
    out: str,
    flow_args: dict = TINY_FLOW_ARGS,
    decoder_args: dict = TINY_DECODER_ARGS,
    seed: int = 0,
    slat_args: dict | None = None,
    mesh_decoder_args: dict | None = None,
    gs_decoder_args: dict | None = None,
) -> dict[str, str]:
    """Write ``out/pipeline.json``, both stage-1 checkpoints and (given their args) the SLat flow and decoders;
    returns {model name: prefix}."""
    os.makedirs(os.path.join(out, "ckpts"), exist_ok=True)
    with open(os.path.join(out, "pipeline.json"), "w") as f:
        json.dump(PIPELINE, f, indent=4)
    prefixes = {}
    for i, (name, cls, args) in enumerate(
        ((FLOW_NAME, trellis.FLOW, flow_args), (DECODER_NAME, trellis.DECODER, decoder_args))
    ):
        config = {"name": cls, "args": dict(args)}
        prefixes[name] = write_checkpoint(os.path.join(out, "ckpts", name), config, random_state_dict(config, seed + i))
    if slat_args is not None:
        config = {"name": trellis_slat.SLAT_FLOW, "args": dict(slat_args)}
        prefix = os.path.join(out, "ckpts", SLAT_NAME)
        prefixes[SLAT_NAME] = write_checkpoint(prefix, config, random_state_dict(config, seed + 2))
    for i, (name, cls, args) in enumerate(
        (
            (MESH_DECODER_NAME, trellis_slat.SLAT_MESH_DECODER, mesh_decoder_args),
            (GS_DECODER_NAME, trellis_slat.SLAT_GS_DECODER, gs_decoder_args),
        )
    ):
        if args is not None:
            config = {"name": cls, "args": dict(args)}
            prefix = os.path.join(out, "ckpts", name)
            prefixes[name] = write_checkpoint(prefix, config, random_state_dict(config, seed + 3 + i))
    return prefixes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write a TRELLIS-format folder of random checkpoints.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--released", action="store_true", help="the released architectures (default: tiny)")
    ap.add_argument("--slat", action="store_true", help="also write the stage-2 checkpoints (SLat flow, decoders)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    flow, dec = (RELEASED_FLOW_ARGS, RELEASED_DECODER_ARGS) if args.released else (TINY_FLOW_ARGS, TINY_DECODER_ARGS)
    stage2 = (RELEASED_SLAT_ARGS, RELEASED_MESH_DECODER_ARGS, RELEASED_GS_DECODER_ARGS)
    stage2 = stage2 if args.released else (TINY_SLAT_ARGS, TINY_MESH_DECODER_ARGS, TINY_GS_DECODER_ARGS)
    slat, mesh, gs = stage2 if args.slat else (None, None, None)
    prefixes = write_trellis_folder(
        args.out, flow, dec, args.seed, slat_args=slat, mesh_decoder_args=mesh, gs_decoder_args=gs
    )
    for prefix in prefixes.values():
        size = os.path.getsize(prefix + ".safetensors")
        print(f"wrote {prefix}.{{json,safetensors}} ({size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def assert_parity(out, ref, rel):
    """``out`` matches ``ref`` within ``rel`` x the reference's largest magnitude (which must not be degenerate)."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err, scale = np.max(np.abs(out - ref)), np.max(np.abs(ref))
    assert scale > 0.1, f"degenerate reference output (max |y| = {scale})"
    print(f"parity: max abs err {err:.3g}, scale {scale:.3g}, ratio {err / scale:.3g}")
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} x output scale {scale:.3g} (ratio {err / scale:.3g})"
