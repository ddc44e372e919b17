"""TRELLIS stage-2 key tables: the SLat flow transformer (``slat_flow_img_dit_L_64l8p2_fp16``).

Written from the reference (``trellis.md`` §4.1, §4.4) and ``trellis/models/structured_latent_flow.py``:
for a json's ``args`` the table lists every state-dict entry in PyTorch's order, its module kind,
shape and released dtype. ``use_fp16`` casts the Linear / SparseConv3d / SparseLinear parameters inside
``input_blocks``, ``blocks`` and ``out_blocks`` to float16 (norms and RMS gammas stay float32;
``t_embedder``, ``input_layer`` and ``out_layer`` too). Sparse convs are spconv ``SubMConv3d`` weights
in KRSC layout (out, kx, ky, kz, in) under ``<module>.conv.`` (rule ``spconv`` in ``rules.py``).
Conversion, files and strictness are ``dso_jax.convert.trellis``'s, which dispatches here by name.
"""

from __future__ import annotations

from typing import Mapping

from dso_jax.convert.trellis import F16, F32, ConversionError, Entry, _linear, _norm, cross_block_entries, full_args

SLAT_FLOW = "SLatFlowModel"
SLAT_FLOW_NAMES = (SLAT_FLOW, "ElasticSLatFlowModel")  # the training config's name: same parameters and forward
SLAT_FLOW_NAME = "slat_flow_img_dit_L_64l8p2_fp16"  # the released checkpoint (pipeline.json role slat_flow_model)

# Constructor defaults of SLatFlowModel (json args may omit them); None marks a required arg.
SLAT_FLOW_ARGS = dict(
    resolution=None,
    in_channels=None,
    model_channels=None,
    cond_channels=None,
    out_channels=None,
    num_blocks=None,
    num_heads=None,
    num_head_channels=64,
    mlp_ratio=4,
    patch_size=2,
    num_io_res_blocks=2,
    io_block_channels=None,
    pe_mode="ape",
    use_fp16=False,
    use_checkpoint=False,
    use_skip_connection=True,
    share_mod=False,
    qk_rms_norm=False,
    qk_rms_norm_cross=False,
)
# The released json args (ckpts/slat_flow_img_dit_L_64l8p2_fp16.json, trellis.md §4.1).
RELEASED_SLAT_FLOW_ARGS = dict(
    resolution=64,
    in_channels=8,
    out_channels=8,
    model_channels=1024,
    cond_channels=1024,
    num_blocks=24,
    num_heads=16,
    mlp_ratio=4,
    patch_size=2,
    num_io_res_blocks=2,
    io_block_channels=[128],
    pe_mode="ape",
    qk_rms_norm=True,
    use_fp16=True,
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
