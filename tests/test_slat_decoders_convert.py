"""SLat decoder conversion: released dtypes, strictness (renamed, missing, mis-shaped key, a wrong buffer), the CLI on
a TRELLIS folder holding the decoders, and ``load_pretrained`` of a ``ckpts/NAME`` prefix against the twin.

Checkpoints are random TRELLIS-format files written by ``helpers_trellis`` at the released dtypes (tiny sizes).
"""

import os

import jax
import numpy as np
import pytest
import torch
from helpers_trellis import (
    GS_DECODER_NAME,
    MESH_DECODER_NAME,
    TINY_GS_DECODER_ARGS,
    TINY_MESH_DECODER_ARGS,
    random_state_dict,
    write_trellis_folder,
)
from safetensors.numpy import load_file
from twins import slat_decoder_twin as dt
from twins import slat_twin as st

from dso_jax import sparse
from dso_jax.convert import rules, trellis, trellis_slat
from dso_jax.convert.verify import ConversionError
from dso_jax.models import load_pretrained
from dso_jax.models.pretrained import convert_trellis as convert_folder
from dso_jax.models.slat_decoders import SLatGaussianDecoder, SLatMeshDecoder, decoder_input

MESH_CFG = {"name": trellis_slat.SLAT_MESH_DECODER, "args": dict(TINY_MESH_DECODER_ARGS)}
GS_CFG = {"name": trellis_slat.SLAT_GS_DECODER, "args": dict(TINY_GS_DECODER_ARGS)}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("trellis"))
    write_trellis_folder(out, mesh_decoder_args=TINY_MESH_DECODER_ARGS, gs_decoder_args=TINY_GS_DECODER_ARGS)
    return out


def test_released_dtypes_convert_exactly(src):
    sd = load_file(os.path.join(src, "ckpts", MESH_DECODER_NAME + ".safetensors"))
    half = {k for k, v in sd.items() if v.dtype == np.float16}
    assert half == {  # use_fp16: the Linears of the blocks and the convs of the subdivide blocks, not the GroupNorms
        k for k in sd if (k.startswith("blocks.") or (k.startswith("upsample.") and ".conv." in k))
    }
    flat = rules.flatten(trellis.convert_state_dict(sd, MESH_CFG))
    for e in trellis.key_table(MESH_CFG):
        back = rules.leaf_rule(e.kind, e.torch_key).to_torch(flat[e.flax_key])
        np.testing.assert_array_equal(back, sd[e.torch_key].astype(np.float32))  # fp16 -> fp32 is exact
    w = sd["upsample.1.skip_connection.conv.weight"]  # spconv (O, 1, 1, 1, I) -> (1, 1, 1, I, O)
    assert flat["upsample_1/skip_connection/conv/kernel"][0, 0, 0, 5, 3] == np.float32(w[3, 0, 0, 0, 5])
    assert flat["upsample_0/act_layers_0/scale"].shape == (256,)  # GroupNorm weight -> scale


def convert_bad(sd, config, buffers=None):
    with pytest.raises(ConversionError) as info:
        trellis.convert_state_dict(sd, config, buffers=buffers, source="dec.safetensors")
    return str(info.value)


def test_renamed_missing_and_misshaped_keys_are_named():
    sd = random_state_dict(MESH_CFG)
    sd["upsample.0.out_layers.0.conv.weights"] = sd.pop("upsample.0.out_layers.0.conv.weight")
    del sd["upsample.1.out_layers.1.bias"]
    sd["blocks.1.attn.to_qkv.weight"] = sd["blocks.1.attn.to_qkv.weight"][:, :200]
    msg = convert_bad(sd, MESH_CFG)
    assert msg.startswith("dec.safetensors does not match SLatMeshDecoder: 4 problem(s)")
    for line in (
        "dec.safetensors: missing key 'upsample.0.out_layers.0.conv.weight' (expected shape (64, 3, 3, 3, 256))",
        "dec.safetensors: unexpected key 'upsample.0.out_layers.0.conv.weights' (shape (64, 3, 3, 3, 256), float16)",
        "dec.safetensors: missing key 'upsample.1.out_layers.1.bias' (expected shape (32,))",
        "dec.safetensors: mis-shaped key 'blocks.1.attn.to_qkv.weight': shape (768, 200), expected (768, 256)",
    ):
        assert line in msg


def test_the_gaussian_decoders_buffer_is_checked():
    from dso_jax.models.pretrained import buffers_of, model_from_config

    buffers = buffers_of(model_from_config(GS_CFG["name"], GS_CFG["args"]))
    sd = random_state_dict(GS_CFG)
    np.testing.assert_allclose(buffers["offset_perturbation"], sd["offset_perturbation"], rtol=0, atol=1e-6)
    sd["offset_perturbation"] = sd["offset_perturbation"] + 1e-3
    assert "buffer 'offset_perturbation' differs from its recomputed value" in convert_bad(sd, GS_CFG, buffers)
    del sd["offset_perturbation"]
    assert "missing key 'offset_perturbation' (expected shape (32, 3))" in convert_bad(sd, GS_CFG, buffers)


def test_the_cli_converts_the_decoders_of_a_folder(src, tmp_path):
    folders = convert_folder(src, str(tmp_path / "out"), log=lambda _: None)
    assert [os.path.basename(f) for f in folders][-2:] == [MESH_DECODER_NAME, GS_DECODER_NAME]
    apply_fn, _ = load_pretrained(str(tmp_path / "out" / MESH_DECODER_NAME))
    assert isinstance(apply_fn.module, SLatMeshDecoder) and apply_fn.module.resolution == 16
    logs = []  # --verify on one decoder prefix (the cheap one)
    convert_folder(os.path.join(src, "ckpts", GS_DECODER_NAME), str(tmp_path / "gs"), verify=True, log=logs.append)
    line = f"verify {tmp_path}/gs/{GS_DECODER_NAME}: output (1, 512, 448) finite"
    assert any(x.startswith(line) for x in logs), logs
    apply_fn, _ = load_pretrained(str(tmp_path / "gs" / GS_DECODER_NAME))
    assert (
        isinstance(apply_fn.module, SLatGaussianDecoder)
        and apply_fn.module.representation_config["num_gaussians"] == 32
    )


# the mesh decoder: parity in test_slat_decoders, its exact conversion in test_released_dtypes_convert_exactly
@pytest.mark.parametrize("name, cls, twin_cls", [(GS_DECODER_NAME, SLatGaussianDecoder, dt.SLatGaussianDecoder)])
def test_load_pretrained_prefix_matches_the_twin(src, name, cls, twin_cls):
    prefix = os.path.join(src, "ckpts", name)
    apply_fn, params = load_pretrained(prefix)
    assert isinstance(apply_fn.module, cls)
    args = TINY_MESH_DECODER_ARGS if cls is SLatMeshDecoder else TINY_GS_DECODER_ARGS
    twin = twin_cls(**{**args, "use_fp16": False})
    twin.load_state_dict({k: torch.from_numpy(v).float() for k, v in load_file(prefix + ".safetensors").items()})
    coords = sparse.example_coords((260, 90), 16, seed=3)
    feats = np.random.default_rng(3).standard_normal((len(coords), 8)).astype(np.float32)
    x = decoder_input(coords, feats, quantum=256, **apply_fn.module.input_kwargs)
    _, out = sparse.to_trellis(jax.jit(apply_fn)(params, x))
    with torch.no_grad():
        ref = twin(st.from_numpy(coords, feats)).feats.numpy()
    assert np.max(np.abs(out - ref)) <= 1e-4 * np.max(np.abs(ref))
