"""Bad input to the image -> 3D CLIs (sample, generate_data, generate_eval) is one line naming the file, key or
shape, with exit status 2 and no traceback; nothing here reaches the compiled pipeline (each case fails while
the flags, models, LoRA or noise are checked), so the cases are cheap."""

import os

import jax
import numpy as np
import pytest
from helpers_cli import error_line, run_script
from helpers_trellis import TINY_FLOW_ARGS
from PIL import Image
from safetensors.numpy import load_file, save_file

from dso_jax import lora
from dso_jax.convert import peft, trellis
from dso_jax.models import pretrained

FAST = ["--random_weights", "tiny", "--steps", "2", "--batch_images", "2"]
STAGE1 = [*FAST, "--stage", "1"]  # these specs are stage 1's (tests/test_pipeline_stage2.py has stage 2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    img = np.zeros((64, 64, 4), np.uint8)
    img[16:48, 16:48] = 200
    Image.fromarray(img, "RGBA").save(d / "obj.png")
    flow = pretrained.load_models(random_weights="tiny").flow_params
    good = lora.init_overlay(jax.random.PRNGKey(0), flow, rank=4, alpha=8.0)
    files = {}
    files["good"] = str(d / "good.safetensors")
    peft.save_peft(files["good"], flow, good, full_state_dict=False)
    other = pretrained.random_params(
        pretrained.abstract_params(pretrained.model_from_config(trellis.FLOW, TINY_FLOW_ARGS)), seed=0
    )
    files["architecture"] = str(d / "other_model.safetensors")  # a LoRA of a wider flow model
    peft.save_peft(
        files["architecture"],
        other,
        lora.init_overlay(jax.random.PRNGKey(0), other, rank=4, alpha=8.0),
        full_state_dict=False,
    )
    state = load_file(files["good"])
    key = "base_model.model.blocks.0.self_attn.to_qkv.lora_A.weight"
    keys = {k.replace("blocks.0.", "blocks.7."): v for k, v in state.items()}
    files["keys"] = str(d / "keys.safetensors")  # adapts blocks the model does not have
    save_file(keys, files["keys"])
    files["rank"] = str(d / "rank.safetensors")  # metadata says r=8, the tensors have rank 4
    save_file(state, files["rank"], metadata={"r": "8", "lora_alpha": "16.0"})
    nan = dict(state)
    nan[key] = nan[key].copy()
    nan[key][0, 0] = np.inf
    files["nan"] = str(d / "nan.safetensors")
    save_file(nan, files["nan"])
    data = open(files["good"], "rb").read()
    files["truncated"] = str(d / "truncated.safetensors")
    open(files["truncated"], "wb").write(data[: len(data) - 100])
    files["pickled"] = str(d / "lora.bin")
    open(files["pickled"], "wb").write(b"\x80\x04\x95" + b"\x00" * 32)  # a pickle stream: never opened
    np.save(d / "noise_shape.npy", np.zeros((2, 8, 8, 8, 8), np.float32))
    np.save(d / "noise_nan.npy", np.full((1, 8, 16, 16, 16), np.nan, np.float32))
    np.save(d / "noise_obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(d / "noise.npz", x=np.zeros((1, 8, 16, 16, 16), np.float32))
    (d / "noise_text.npy").write_text("not numpy")
    (d / "afile").write_text("x")
    (d / "empty_ids.txt").write_text("\n\n")
    (d / "ids.txt").write_text("nothing_like_it\n")
    return d, files


def _unwritable_dir(tmp_path):
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        return str(ro / "out")
    return "/sys/dso_jax_test_out"  # root may write anywhere but sysfs refuses new folders


def _cases(d, files):
    img = str(d / "obj.png")
    base = ["--image", img, "--out", str(d / "out"), *STAGE1]
    lora_line = {
        "good": None,
        "architecture": "shape mismatch at blocks.0.cross_attn.to_kv: lora_A (4, 32), lora_B (128, 4)",
        "keys": "adapts modules that are not Dense layers of the base model: ['blocks.7.",
        "rank": "(metadata): declares r=8, but the tensors of",
        "nan": "has non-finite values",
        "truncated": "truncated.safetensors: not a readable safetensors file, truncated or corrupt",
        "pickled": "lora.bin: a pickled PyTorch file",
    }
    cases = {f"lora_{k}": (["--lora", files[k], *base], v) for k, v in lora_line.items() if v is not None}
    cases.update(
        {
            "lora_missing": (["--lora", str(d / "none.safetensors"), *base], "none.safetensors: no such LoRA file"),
            "lora_alpha": (["--lora", files["good"], "--lora_alpha", "-1", *base], "argument --lora_alpha"),
            "no_images": (["--image", str(d / "*.jpg"), "--out", str(d / "o"), *STAGE1], "no image files match"),
            "num_samples": ([*base, "--num_samples", "0"], "argument --num_samples: expected a positive integer"),
            "steps": ([*base, "--steps", "two"], "argument --steps: expected a positive integer, got 'two'"),
            "interval": ([*base, "--cfg_interval", "0.9", "0.2"], "--cfg_interval 0.9 0.2: expected 0 <= LO <= HI"),
            "background": ([*base, "--background", "ultraviolet"], "cannot parse background colour 'ultraviolet'"),
            "preset": ([*base, "--random_weights", "huge"], "argument --random_weights: invalid choice: 'huge'"),
            "flow_path": ([*base, "--flow", str(d / "no_flow")], "no_flow: neither a converted folder"),
            "dinov2_path": ([*base, "--dinov2", str(d / "no_dino")], "no_dino: neither a converted DINOv2 folder"),
            "noise_missing": ([*base, "--noise_file", str(d / "nn.npy")], "nn.npy: no such noise file"),
            "noise_shape": (
                [*base, "--noise_file", str(d / "noise_shape.npy")],
                "noise_shape.npy: noise has shape (2, 8, 8, 8, 8), expected (1, 8, 16, 16, 16)",
            ),
            "noise_nan": (
                [*base, "--noise_file", str(d / "noise_nan.npy")],
                "noise_nan.npy: noise has 32768 non-finite",
            ),
            "noise_pickle": ([*base, "--noise_file", str(d / "noise_obj.npy")], "noise_obj.npy: not a readable .npy"),
            "noise_npz": ([*base, "--noise_file", str(d / "noise.npz")], "noise.npz: an .npz archive"),
            "noise_text": ([*base, "--noise_file", str(d / "noise_text.npy")], "noise_text.npy: not a readable .npy"),
            "out_is_a_file": (["--image", img, "--out", str(d / "afile"), *STAGE1], "afile: exists and is a file"),
        }
    )
    return cases


CASE_NAMES = [
    "lora_architecture",
    "lora_keys",
    "lora_rank",
    "lora_nan",
    "lora_truncated",
    "lora_pickled",
    "lora_missing",
    "lora_alpha",
    "no_images",
    "num_samples",
    "steps",
    "interval",
    "background",
    "preset",
    "flow_path",
    "dinov2_path",
    "noise_missing",
    "noise_shape",
    "noise_nan",
    "noise_pickle",
    "noise_npz",
    "noise_text",
    "out_is_a_file",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_sample_bad_input_is_one_line(world, case):
    d, files = world
    argv, needle = _cases(d, files)[case]
    rc, _, err = run_script("sample", argv)
    assert rc == 2 and needle in error_line(err), err


def test_sample_to_an_unwritable_folder_is_one_line(world, tmp_path):
    d, _ = world
    rc, _, err = run_script("sample", ["--image", str(d / "obj.png"), "--out", _unwritable_dir(tmp_path), *STAGE1])
    line = error_line(err)
    assert rc == 2 and ("dso_jax_test_out" in line or "ro/out" in line), err


def test_generate_data_bad_sim_flags_and_noise_are_one_line(world):
    d, _ = world
    base = ["--images", str(d / "obj.png"), "--out", str(d / "data"), *FAST]
    cases = {
        "--sim 'horizon=3': expected KEY=VALUE with KEY in": [*base, "--sim", "horizon=3"],
        "argument --sim_preset: invalid choice: 'voxel'": [*base, "--sim_preset", "voxel"],
        "noise.npz: an .npz archive": [*base, "--noise_file", str(d / "noise.npz")],
    }
    for needle, argv in cases.items():
        rc, _, err = run_script("generate_data", argv)
        assert rc == 2 and needle in error_line(err), (needle, err)


def test_generate_eval_bad_ids_are_one_line(world):
    d, files = world
    base = ["--images", str(d / "obj.png"), "--out", str(d / "eval"), *STAGE1]
    cases = {
        "missing_ids.txt: No such file": [*base, "--ids", str(d / "missing_ids.txt")],
        "empty_ids.txt: lists no object ids": [*base, "--ids", str(d / "empty_ids.txt")],
        "the id filter (1 ids, e.g. ['nothing_like_it']) matches none of the 1 images": [*base, "--ids", d / "ids.txt"],
        "lora.bin: a pickled PyTorch file": [*base, "--lora", files["pickled"]],
    }
    for needle, argv in cases.items():
        rc, _, err = run_script("generate_eval", argv)
        assert rc == 2 and needle in error_line(err), (needle, err)
    assert not os.path.exists(d / "eval" / "lora")


def test_debug_flag_gives_the_traceback(world):
    d, files = world
    with pytest.raises(ValueError, match="a pickled PyTorch file"):
        run_script(
            "sample",
            ["--image", str(d / "obj.png"), "--out", str(d / "o"), "--lora", files["pickled"], *STAGE1, "--debug"],
        )
