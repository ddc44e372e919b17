"""TRELLIS stage-2 key tables: the SLat flow transformer (``slat_flow_img_dit_L_64l8p2_fp16``) and the SLat mesh /
Gaussian decoders (``slat_dec_{mesh,gs}_swin8_B_64l8*_fp16``).

Written from the reference (``trellis.md`` §4.1, §4.4, §4.6) and ``trellis/models/structured_latent_flow.py``,
``trellis/models/structured_latent_vae/{base,decoder_mesh,decoder_gs}.py``:
for a json's ``args`` the table lists every state-dict entry in PyTorch's order, its module kind,
shape and released dtype. ``use_fp16`` casts the Linear / SparseConv3d / SparseLinear parameters inside
``input_blocks``, ``blocks`` and ``out_blocks`` to float16 (norms and RMS gammas stay float32;
``t_embedder``, ``input_layer`` and ``out_layer`` too). Sparse convs are spconv ``SubMConv3d`` weights
in KRSC layout (out, kx, ky, kz, in) under ``<module>.conv.`` (rule ``spconv`` in ``rules.py``).
The decoders' ``use_fp16`` casts the Linears inside ``blocks`` and the sparse convs inside ``upsample`` (not the
GroupNorms); the Gaussian decoder's ``offset_perturbation`` (G, 3) float32 is a persistent buffer (first in its
state dict: the root module's own entries precede its children's), checked against its recomputed value.
Conversion, files and strictness are ``dso_jax.convert.trellis``'s, which dispatches here by name.
"""

from __future__ import annotations

from typing import Mapping

from dso_jax.convert.rules import BUFFER
from dso_jax.convert.trellis import (
    F16,
    F32,
    FLOW_ARGS,
    RELEASED_FLOW_ARGS,
    ConversionError,
    Entry,
    _linear,
    _norm,
    _rms,
    cross_block_entries,
    full_args,
)

SLAT_FLOW = "SLatFlowModel"
SLAT_FLOW_NAMES = (SLAT_FLOW, "ElasticSLatFlowModel")  # the training config's name: same parameters and forward
SLAT_FLOW_NAME = "slat_flow_img_dit_L_64l8p2_fp16"  # the released checkpoint (pipeline.json role slat_flow_model)

# Constructor defaults of SLatFlowModel (json args may omit them); None marks a required arg. The SS flow's, plus
# the sparse input/output blocks and the U-Net skips.
SLAT_FLOW_ARGS = dict(FLOW_ARGS, num_io_res_blocks=2, io_block_channels=None, use_skip_connection=True)
# The released json args (ckpts/slat_flow_img_dit_L_64l8p2_fp16.json, trellis.md §4.1): the SS flow's widths at
# resolution 64 with 2x2x2 patches and one 128-channel io level.
RELEASED_SLAT_FLOW_ARGS = dict(
    RELEASED_FLOW_ARGS, resolution=64, patch_size=2, num_io_res_blocks=2, io_block_channels=[128]
)


def _spconv(prefix: str, cin: int, cout: int, k: int, dtype: str) -> list[Entry]:
    return [
        Entry(f"{prefix}.conv.weight", "spconv", (cout, k, k, k, cin), dtype),
        Entry(f"{prefix}.conv.bias", "spconv", (cout,), dtype),
    ]


def _res_block(prefix: str, cin: int, cout: int, emb: int, half: str) -> list[Entry]:
    """SparseResBlock3d(cin, emb, cout): norm1 (affine), norm2 (no params), conv1, conv2, emb_layers.1, skip."""
    t = _norm(prefix + ".norm1", cin)
    t += _spconv(prefix + ".conv1", cin, cout, 3, half) + _spconv(prefix + ".conv2", cout, cout, 3, half)
    t += _linear(prefix + ".emb_layers.1", emb, 2 * cout, half)
    return t + (_linear(prefix + ".skip_connection", cin, cout, half) if cin != cout else [])


def slat_flow_table(args: Mapping) -> list[Entry]:
    """State-dict entries of ``SLatFlowModel(**args)`` in PyTorch's order (``trellis.md`` §4.4)."""
    a = full_args(SLAT_FLOW, args)
    c, n_io, skip = a["model_channels"], a["num_io_res_blocks"], a["use_skip_connection"]
    io = list(a["io_block_channels"] or [])
    if io and 2 ** len(io) != a["patch_size"]:
        raise ConversionError(f"config: patch_size {a['patch_size']} needs log2 = len(io_block_channels) = {len(io)}")
    half = F16 if a["use_fp16"] else F32
    t = _linear("t_embedder.mlp.0", 256, c) + _linear("t_embedder.mlp.2", c, c)
    if a["share_mod"]:
        t += _linear("adaLN_modulation.1", c, 6 * c)
    t += _linear("input_layer", a["in_channels"], io[0] if io else c)
    i = 0
    for ch, nxt in zip(io, io[1:] + [c]):
        for cout in [ch] * (n_io - 1) + [nxt]:  # the last block of a stage downsamples
            t += _res_block(f"input_blocks.{i}", ch, cout, c, half)
            i += 1
    for b in range(a["num_blocks"]):
        t += cross_block_entries(f"blocks.{b}.", a, half)
    i = 0
    for ch, prev in zip(reversed(io), [c] + list(reversed(io[1:]))):
        for cin in [prev] + [ch] * (n_io - 1):  # the first block of a stage upsamples
            t += _res_block(f"out_blocks.{i}", 2 * cin if skip else cin, ch, c, half)
            i += 1
    return t + _linear("out_layer", io[0] if io else c, a["out_channels"])


# ---------------------------------------------------------------------------------------------- SLat decoders

SLAT_MESH_DECODER, SLAT_GS_DECODER = "SLatMeshDecoder", "SLatGaussianDecoder"
SLAT_MESH_DECODER_NAMES = (SLAT_MESH_DECODER, "ElasticSLatMeshDecoder")  # the training configs' names: same model
SLAT_GS_DECODER_NAMES = (SLAT_GS_DECODER, "ElasticSLatGaussianDecoder")
SLAT_MESH_DECODER_NAME = "slat_dec_mesh_swin8_B_64l8m256c_fp16"  # pipeline.json role slat_decoder_mesh
SLAT_GS_DECODER_NAME = "slat_dec_gs_swin8_B_64l8gs32_fp16"  # pipeline.json role slat_decoder_gs

# Constructor defaults of SparseTransformerBase's decoders (json args may omit them); None marks a required arg
# (representation_config defaults to None in TRELLIS but both decoders read it: the tables require a dict).
SLAT_DECODER_ARGS = dict(
    resolution=None,
    model_channels=None,
    latent_channels=None,
    num_blocks=None,
    num_heads=None,
    num_head_channels=64,
    mlp_ratio=4,
    attn_mode="swin",
    window_size=8,
    pe_mode="ape",
    use_fp16=False,
    use_checkpoint=False,
    qk_rms_norm=False,
    representation_config=None,
)
_RELEASED_TRUNK = dict(
    resolution=64,
    model_channels=768,
    latent_channels=8,
    num_blocks=12,
    num_heads=12,
    mlp_ratio=4,
    attn_mode="swin",
    window_size=8,
    use_fp16=True,
)
# The released json args (trellis.md §4.6; TRELLIS's configs/vae/slat_vae_dec_mesh_swin8_B_64l8_fp16.json and
# slat_vae_enc_dec_gs_swin8_B_64l8_fp16.json, whose decoders these checkpoints are).
RELEASED_SLAT_MESH_DECODER_ARGS = dict(_RELEASED_TRUNK, representation_config={"use_color": True})
RELEASED_SLAT_GS_DECODER_ARGS = dict(
    _RELEASED_TRUNK,
    representation_config={
        "lr": {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0, "_rotation": 0.1},
        "perturb_offset": True,
        "voxel_size": 1.5,
        "num_gaussians": 32,
        "2d_filter_kernel_size": 0.1,
        "3d_filter_kernel_size": 9e-4,
        "scaling_bias": 4e-3,
        "opacity_bias": 0.1,
        "scaling_activation": "softplus",
    },
)


def _trunk(a: Mapping, half: str) -> list[Entry]:
    """``SparseTransformerBase``: input_layer (float32), then per block attn (to_qkv [, q/k RMS] , to_out), mlp."""
    c = a["model_channels"]
    heads = a["num_heads"] or c // a["num_head_channels"]
    if c % heads:
        raise ConversionError(f"config: model_channels {c} is not divisible by {heads} heads")
    t = _linear("input_layer", a["latent_channels"], c)
    hidden = int(c * a["mlp_ratio"])
    for i in range(a["num_blocks"]):
        b = f"blocks.{i}."
        t += _linear(b + "attn.to_qkv", c, 3 * c, half)
        if a["qk_rms_norm"]:
            t += _rms(b + "attn.q_rms_norm", heads, c // heads) + _rms(b + "attn.k_rms_norm", heads, c // heads)
        t += _linear(b + "attn.to_out", c, c, half)
        t += _linear(b + "mlp.mlp.0", c, hidden, half) + _linear(b + "mlp.mlp.2", hidden, c, half)
    return t


def _rep_config(a: Mapping, name: str, keys: tuple) -> Mapping:
    cfg = a["representation_config"]
    if not isinstance(cfg, Mapping) or any(k not in cfg for k in keys):
        raise ConversionError(f"config: {name} needs representation_config with {list(keys)}, got {cfg!r}")
    return cfg


def _subdivide_block(prefix: str, cin: int, cout: int, half: str) -> list[Entry]:
    """SparseSubdivideBlock3d: act_layers.0 (GroupNorm), out_layers.0 / .3 (3³ convs), .1 (GroupNorm), skip (1³)."""
    t = _norm(prefix + ".act_layers.0", cin, "groupnorm")
    t += _spconv(prefix + ".out_layers.0", cin, cout, 3, half) + _norm(prefix + ".out_layers.1", cout, "groupnorm")
    t += _spconv(prefix + ".out_layers.3", cout, cout, 3, half)
    return t + (_spconv(prefix + ".skip_connection", cin, cout, 1, half) if cin != cout else [])


def slat_mesh_decoder_table(args: Mapping) -> list[Entry]:
    """State-dict entries of ``SLatMeshDecoder(**args)`` in PyTorch's order (``trellis.md`` §4.6: 120 released)."""
    a = full_args(SLAT_MESH_DECODER, args)
    c, half = a["model_channels"], F16 if a["use_fp16"] else F32
    if c % 256:  # GroupNorm32 with 32 groups on c // 8 channels
        raise ConversionError(f"config: model_channels {c} must be a multiple of 256 (32 groups on c / 8)")
    out = 53 + (48 if _rep_config(a, SLAT_MESH_DECODER, ()).get("use_color", False) else 0)
    t = _trunk(a, half)
    t += _subdivide_block("upsample.0", c, c // 4, half) + _subdivide_block("upsample.1", c // 4, c // 8, half)
    return t + _linear("out_layer", c // 8, out)


def slat_gs_decoder_table(args: Mapping) -> list[Entry]:
    """State-dict entries of ``SLatGaussianDecoder(**args)`` in PyTorch's order (``trellis.md`` §4.6: 101 released,
    the ``offset_perturbation`` buffer first)."""
    a = full_args(SLAT_GS_DECODER, args)
    half = F16 if a["use_fp16"] else F32
    g = int(_rep_config(a, SLAT_GS_DECODER, ("num_gaussians", "voxel_size"))["num_gaussians"])
    t = [Entry("offset_perturbation", BUFFER, (g, 3), F32)]
    return t + _trunk(a, half) + _linear("out_layer", a["model_channels"], 14 * g)
