"""Pinned sizes of the released stage-1 architectures (``trellis.md`` §2.9, §3.3), from shapes only."""

import jax
import numpy as np
import pytest
from helpers_trellis import RELEASED_DECODER_ARGS, RELEASED_FLOW_ARGS, TINY_DECODER_ARGS, TINY_FLOW_ARGS

from dso_jax.convert import rules, trellis
from dso_jax.models.pretrained import abstract_params, model_from_config

RELEASED = {
    # name: (json args, parameters, state-dict entries, bytes at the released dtypes)
    "ss_flow_img_dit_L_16l8_fp16": (trellis.FLOW, RELEASED_FLOW_ARGS, 555_543_560, 489, 1_130_721_312),
    "ss_dec_conv3d_16l8_fp16": (trellis.DECODER, RELEASED_DECODER_ARGS, 73_671_201, 74, 147_585_412),
}


@pytest.mark.parametrize("ckpt", sorted(RELEASED))
def test_released_param_count_via_eval_shape(ckpt):
    name, args, n_params, _, _ = RELEASED[ckpt]
    shapes = abstract_params(model_from_config(name, args))  # jax.eval_shape: nothing is allocated
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == n_params


@pytest.mark.parametrize("ckpt", sorted(RELEASED))
def test_released_key_table_sizes(ckpt):
    name, args, n_params, n_entries, n_bytes = RELEASED[ckpt]
    table = trellis.key_table({"name": name, "args": args})
    params = sum(int(np.prod(e.shape)) for e in table if e.kind != rules.BUFFER)
    nbytes = sum(int(np.prod(e.shape)) * np.dtype(e.released).itemsize for e in table)
    assert {"entries": len(table), "params": params, "bytes": nbytes} == {
        "entries": n_entries,
        "params": n_params,
        "bytes": n_bytes,
    }


def test_released_flow_table_entries():
    table = {e.torch_key: e for e in trellis.key_table({"name": trellis.FLOW, "args": RELEASED_FLOW_ARGS})}
    want = {  # trellis.md §2.9
        "pos_emb": ((4096, 1024), "float32"),
        "t_embedder.mlp.0.weight": ((1024, 256), "float32"),
        "input_layer.weight": ((1024, 8), "float32"),
        "out_layer.bias": ((8,), "float32"),
        "blocks.23.norm2.weight": ((1024,), "float32"),
        "blocks.0.self_attn.to_qkv.weight": ((3072, 1024), "float16"),
        "blocks.0.self_attn.q_rms_norm.gamma": ((16, 64), "float32"),
        "blocks.5.cross_attn.to_kv.bias": ((2048,), "float16"),
        "blocks.7.mlp.mlp.2.weight": ((1024, 4096), "float16"),
        "blocks.23.adaLN_modulation.1.weight": ((6144, 1024), "float16"),
    }
    assert {k: (table[k].shape, table[k].released) for k in want} == want


def test_released_decoder_table_entries():
    table = {e.torch_key: e for e in trellis.key_table({"name": trellis.DECODER, "args": RELEASED_DECODER_ARGS})}
    want = {  # trellis.md §3.3
        "input_layer.weight": ((512, 8, 3, 3, 3), "float32"),
        "middle_block.1.norm2.bias": ((512,), "float32"),
        "middle_block.0.conv1.weight": ((512, 512, 3, 3, 3), "float16"),
        "blocks.2.conv.weight": ((1024, 512, 3, 3, 3), "float16"),
        "blocks.5.conv.bias": ((256,), "float16"),
        "blocks.7.conv2.weight": ((32, 32, 3, 3, 3), "float16"),
        "out_layer.0.weight": ((32,), "float32"),
        "out_layer.2.weight": ((1, 32, 3, 3, 3), "float32"),
    }
    assert {k: (table[k].shape, table[k].released) for k in want} == want


@pytest.mark.parametrize(
    "name,args",
    [
        (trellis.FLOW, RELEASED_FLOW_ARGS),
        (trellis.FLOW, {**TINY_FLOW_ARGS, "share_mod": True, "qk_rms_norm_cross": True, "pe_mode": "rope"}),
        (trellis.FLOW, {**TINY_FLOW_ARGS, "num_heads": None, "num_head_channels": 16, "mlp_ratio": 2.5}),
        (trellis.DECODER, RELEASED_DECODER_ARGS),
        (
            trellis.DECODER,
            {**TINY_DECODER_ARGS, "channels": [32, 32], "norm_type": "group", "num_res_blocks_middle": 0},
        ),
    ],
)
def test_key_table_matches_the_flax_module(name, args):
    # The key table (written from the reference) and the Flax module (the port) agree leaf for leaf.
    shapes = {k: tuple(v.shape) for k, v in rules.flatten(abstract_params(model_from_config(name, args))).items()}
    assert trellis.expected_flax_shapes({"name": name, "args": args}) == shapes
