"""Image-to-3D tools as specs, on CPU with the tiny random-weight preset (no weight files).

sample.py: image -> y-up watertight GLB + TRELLIS-layout latent / coords; --lora changes the output.
generate_data.py: two prompt folders (one corrupt image) -> TFDS dataset -> the offline trainer's pairs; resume
skips finished images. generate_eval.py: {uid}-{view}_{k:03d}.glb with and without a LoRA; explicit id filter.
Scripts run in-process through their main(argv), so compiled pipelines are shared between tests.
"""

import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest
import trimesh
from helpers_cli import error_line, run_script
from PIL import Image

from dso_jax import flow, generate, lora, pipeline
from dso_jax.convert import peft
from dso_jax.models import pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAST = ["--random_weights", "tiny", "--steps", "2", "--batch_images", "2"]
STAGE1 = [*FAST, "--stage", "1"]  # these specs are stage 1's (tests/test_pipeline_stage2.py has stage 2)


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _json(path):
    with open(path) as f:
        return json.load(f)


def _rgba(path, seed=0, size=(120, 96)):
    rng = np.random.default_rng(seed)
    a = np.zeros(size + (4,), np.uint8)
    a[20:100, 28:68, :3] = rng.integers(0, 256, (80, 40, 3))
    a[20:100, 28:68, 3] = 255
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(a, "RGBA").save(path)
    return path


@pytest.fixture(scope="module")
def peft_file(tmp_path_factory):
    """A rank-4 LoRA (alpha 8) for the tiny flow, with non-zero B so it changes the model."""
    import jax

    models = pretrained.load_models(random_weights="tiny")
    overlay = lora.init_overlay(jax.random.PRNGKey(1), models.flow_params, rank=4, alpha=8.0)
    overlay = overlay.replace(factors=jax.tree.map(lambda x: x + 0.05, overlay.factors))
    path = str(tmp_path_factory.mktemp("lora") / "lora.safetensors")
    peft.save_peft(path, models.flow_params, overlay, full_state_dict=False)
    return path


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    image = _rgba(str(d / "in" / "chair.png"))
    out = str(d / "base")
    _script("sample")(["--image", image, "--out", out, "--num_samples", "2", *STAGE1])
    return image, out


def test_sample_writes_a_watertight_y_up_glb_and_trellis_layout_latent_and_coords(sampled):
    _, out = sampled
    for k in range(2):
        latent = np.load(os.path.join(out, f"chair_{k:03d}_ss_latent.npy"))
        assert latent.shape == (1, 8, 16, 16, 16) and latent.dtype == np.float32
        coords = np.load(os.path.join(out, f"chair_{k:03d}_coords.npy"))
        assert coords.ndim == 2 and coords.shape[1] == 4 and coords.dtype == np.int32 and len(coords) > 0
        assert (coords[:, 0] == 0).all() and coords[:, 1:].min() >= 0 and coords[:, 1:].max() < 64
        assert (np.diff(coords[:, 1:] @ np.array([64 * 64, 64, 1])) > 0).all()  # argwhere order, unique
        mesh = trimesh.load(os.path.join(out, f"chair_{k:03d}.glb"), force="mesh")
        assert mesh.is_watertight
        # y-up: the GLB's y range is the occupied voxels' native z range (to within a voxel); x unchanged.
        lo, hi = coords[:, 1:].min(0) / 64 - 0.5, (coords[:, 1:].max(0) + 1) / 64 - 0.5
        np.testing.assert_allclose(mesh.bounds[:, 1], [lo[2], hi[2]], atol=1.5 / 64)
        np.testing.assert_allclose(mesh.bounds[:, 0], [lo[0], hi[0]], atol=1.5 / 64)
        np.testing.assert_allclose(mesh.bounds[:, 2], [-hi[1], -lo[1]], atol=1.5 / 64)
    manifest = _json(os.path.join(out, "manifest.json"))
    assert [e["seed"] for e in next(iter(manifest["images"].values()))] == [0, 1]
    assert _json(os.path.join(out, "settings.json"))["seeds"] == [0, 1]
    assert _json(os.path.join(out, "failures.json")) == {}


def test_coords_are_the_occupancy_of_the_saved_latent(sampled):
    import jax

    _, out = sampled
    models = pretrained.load_models(random_weights="tiny")
    latent = np.load(os.path.join(out, "chair_000_ss_latent.npy"))
    logits = np.asarray(jax.jit(models.decoder)(models.decoder_params, latent))  # (1, 1, 64, 64, 64)
    expected = np.argwhere(logits[:, 0] > 0)
    coords = np.load(os.path.join(out, "chair_000_coords.npy"))
    # Same decoder on one row vs inside the batched pipeline: allow a few voxels with |logit| ~ 0 to flip.
    mismatch = len(set(map(tuple, expected)) ^ set(map(tuple, coords)))
    assert mismatch <= 1e-3 * len(coords)


def test_lora_changes_the_samples_and_is_recorded(sampled, peft_file, tmp_path):
    image, base_out = sampled
    out = str(tmp_path / "lora")
    _script("sample")(
        ["--image", image, "--out", out, "--num_samples", "2", "--lora", peft_file, "--lora_alpha", "8", *STAGE1]
    )
    for k in range(2):
        a = np.load(os.path.join(base_out, f"chair_{k:03d}_ss_latent.npy"))
        b = np.load(os.path.join(out, f"chair_{k:03d}_ss_latent.npy"))
        assert np.abs(a - b).max() > 1e-3
    assert _json(os.path.join(out, "settings.json"))["models"]["lora_alpha"] == 8.0
    with pytest.raises(ValueError, match="settings differ.*models"):  # resume into a folder of another model
        _script("sample")(["--image", image, "--out", base_out, "--num_samples", "2", "--lora", peft_file, *STAGE1])


def test_sample_skips_finished_images_and_rejects_name_clashes(sampled, tmp_path, capsys):
    image, out = sampled
    before = os.path.getmtime(os.path.join(out, "chair_000.glb"))
    _script("sample")(["--image", image, "--out", out, "--num_samples", "2", *STAGE1])
    assert "0 images generated, 1 already done" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "chair_000.glb")) == before
    twins = [_rgba(str(tmp_path / d / "0.png")) for d in ("a", "b")]
    with pytest.raises(ValueError, match="share output names"):
        generate.output_names(twins)
    assert generate.output_names(twins, 2) == ["a-0", "b-0"]


def test_a_noise_file_reproduces_the_seeded_run(sampled, tmp_path):
    image, base_out = sampled
    noise = str(tmp_path / "noise.npy")
    np.save(noise, pipeline.noise_for_seeds([0, 1], (8, 16, 16, 16)))  # what --seed 0 draws
    out = str(tmp_path / "from_file")
    _script("sample")(["--image", image, "--out", out, "--num_samples", "2", "--noise_file", noise, *STAGE1])
    for k in range(2):
        np.testing.assert_array_equal(
            np.load(os.path.join(out, f"chair_{k:03d}_ss_latent.npy")),
            np.load(os.path.join(base_out, f"chair_{k:03d}_ss_latent.npy")),
        )


def test_models_load_from_trellis_prefixes_and_a_converted_dinov2_folder(tmp_path, monkeypatch):
    import helpers_trellis
    from safetensors.numpy import save_file

    from dso_jax.convert import rules, trellis
    from dso_jax.models import dinov2

    flow_args, dec_args, dino_name = pretrained.RANDOM_PRESETS["tiny"]
    prefixes = {}
    for name, cls, args in (("flow", trellis.FLOW, flow_args), ("dec", trellis.DECODER, dec_args)):
        config = {"name": cls, "args": dict(args)}
        prefixes[name] = helpers_trellis.write_checkpoint(
            str(tmp_path / "ckpts" / name), config, helpers_trellis.random_state_dict(config)
        )
    cfg = dinov2.get_config(dino_name)
    flat = rules.flatten(pretrained.load_models(random_weights="tiny").dinov2_params)
    flat = {k: np.asarray(v) for k, v in flat.items()}
    folder = tmp_path / "dinov2"
    folder.mkdir()
    save_file(flat, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    (folder / "manifest.json").write_text(
        json.dumps({"tensors": [{"name": k, "shape": list(a.shape), "dtype": str(a.dtype)} for k, a in flat.items()]})
    )

    models = pretrained.load_models(prefixes["flow"], prefixes["dec"], str(folder))
    assert models.latent_shape == (8, 16, 16, 16) and models.dinov2_cfg == cfg
    assert models.source["flow"] == os.path.abspath(prefixes["flow"]) and models.source["weights_seed"] is None
    with pytest.raises(ValueError, match="no path for --decoder, --dinov2; pass them or --random_weights"):
        pretrained.load_models(prefixes["flow"])
    trellis_folder = tmp_path / "converted_flow"
    trellis_folder.mkdir()
    (trellis_folder / "config.json").write_text(json.dumps({"name": trellis.FLOW, "args": flow_args}))
    with pytest.raises(ValueError, match="is a converted TRELLIS model folder, not DINOv2"):
        pretrained.load_dinov2(str(trellis_folder))
    monkeypatch.setitem(pretrained.RANDOM_PRESETS, "tiny", (flow_args, dec_args, "vitl14_reg4_2blocks"))
    with pytest.raises(ValueError, match="flow cond_channels 64 != DINOv2 embed_dim 1024"):
        pretrained.load_models(prefixes["flow"], prefixes["dec"], random_weights="tiny")


def test_noise_is_keyed_by_seed_only_and_a_noise_file_is_checked(tmp_path):
    import jax

    shape = (8, 16, 16, 16)
    n = pipeline.noise_for_seeds([3, 0], shape)
    np.testing.assert_array_equal(n[1], pipeline.noise_for_seeds([0], shape)[0])
    # jax.random.normal(PRNGKey(3), shape), drawn flat (the same numbers: tests/test_losses.py; compiles in 0.5 s)
    np.testing.assert_array_equal(n[0], np.asarray(flow.normal(jax.random.PRNGKey(3), shape)))
    path = str(tmp_path / "noise.npy")
    np.save(path, n)
    np.testing.assert_array_equal(pipeline.load_noise(path, 2, shape), n)
    with pytest.raises(ValueError, match=r"noise.npy: noise has shape \(2, 8, 16, 16, 16\), expected \(4, 8, 16"):
        pipeline.load_noise(path, 4, shape)


def test_generate_data_to_tfds_to_the_trainers_pairs_with_resume(tmp_path, capsys):
    from configs import dro
    from dso_jax import train
    from dso_jax.data import tfds_dso

    images = tmp_path / "images" / "chairs"
    for p in ("p0", "p1"):
        for v in range(2):
            _rgba(str(images / p / f"{v:03d}.png"), seed=10 * v + (p == "p1"))
    (images / "p1" / "001.png").write_bytes(b"not a png")  # reported and skipped
    out = str(tmp_path / "data")
    argv = ["--images", str(images / "*" / "*.png"), "--out", out, "--num_samples", "3", *FAST]
    _script("generate_data")(argv)
    failures = _json(os.path.join(out, "failures.json"))
    bad = str(images / "p1" / "001.png")
    assert list(failures) == [bad] and "cannot read image" in failures[bad]
    records, meta = tfds_dso.open_dataset(out)
    assert [o["object_id"] for o in meta["objects"]] == ["p0", "p1"]
    rec = records[0]
    assert rec["cond"].shape == (2, 1374, 64) and rec["latents"].shape == (6, 8, 16, 16, 16)
    assert list(rec["image_ids"]) == [0, 1] and list(rec["latent_glb_ids"]) == [0, 1, 2, 0, 1, 2]
    assert records[1]["cond"].shape[0] == 1 and len(records[1]["angles"]) == 3

    # Random weights make uniform blobs that all stand; relabel half the latents so pairs exist, then
    # resume: finished images are skipped, the corrupt one is reported again, the dataset is rebuilt.
    for f in sorted((tmp_path / "data" / "objects").rglob("*.npz")):
        z = dict(np.load(f))
        z["angle"] = np.array([5.0, 45.0, 90.0], np.float32)
        np.savez(f, **z)
    capsys.readouterr()
    _script("generate_data")(argv)
    log = capsys.readouterr().out
    assert "0 images generated, 3 already done, 1 failed" in log
    records, meta = tfds_dso.open_dataset(out)
    assert meta["objects"][0]["angles"] == [5.0, 45.0, 90.0] * 2

    with pytest.raises(ValueError, match=r"settings differ .*sampler"):
        _script("generate_data")([*argv, "--steps", "3"])

    # the offline trainer's own pair source reads it: DSO's pairs (a stable winner, an unstable loser of one view)
    config = dro.get_config("tiny")
    config.data.kind, config.data.path = "tfds", out
    for key, value in pretrained.RANDOM_PRESETS["tiny"][0].items():
        config.model.args[key] = value
    config.train.grad_accum = 1
    train.validate(config)
    source = train.make_pair_source(config, str(tmp_path / "run"), global_batch=2)
    batch, rows = source.batch(0), source.pairs(0)
    source.close()
    assert batch["cond"].shape == (1, 2, 1374, 64) and batch["x0_win"].shape == (1, 2, 8, 16, 16, 16)
    for b, (obj, view, win, lose) in enumerate(rows[0]):
        rec = records[obj]
        np.testing.assert_array_equal(batch["cond"][0, b], rec["cond"][view])
        np.testing.assert_array_equal(batch["x0_win"][0, b], rec["latents"][win])
        np.testing.assert_array_equal(batch["x0_lose"][0, b], rec["latents"][lose])
        angles = meta["objects"][obj]["angles"]
        assert angles[win] < config.data.stable_threshold <= angles[lose]


def test_generate_eval_names_meshes_for_the_evaluators_with_and_without_lora(tmp_path, peft_file):
    images = tmp_path / "eval"
    for uid in ("uidA", "uidB"):
        _rgba(str(images / uid / "000.png"), seed=len(uid))
    ids = tmp_path / "ids.txt"
    ids.write_text("uidB\n")
    out = tmp_path / "out"
    _script("generate_eval")(
        [
            "--images",
            str(images / "*" / "*.png"),
            "--out",
            str(out),
            "--lora",
            peft_file,
            "--lora_alpha",
            "8",
            "--ids",
            str(ids),
            *STAGE1,
        ]
    )
    for tag in ("base", "lora"):
        assert sorted(p.name for p in (out / tag).glob("*.glb")) == ["uidB-000_000.glb"]
    assert _json(out / "base" / "settings.json")["seeds"] == [1]  # DSO: seed = bid + 1
    ids.write_text("objaverse_only\n")
    with pytest.raises(ValueError, match="matches none"):
        _script("generate_eval")(
            ["--images", str(images / "*" / "*.png"), "--out", str(out), "--ids", str(ids), *STAGE1]
        )


def test_a_lora_file_brings_its_own_alpha(sampled, peft_file, tmp_path):
    image, _ = sampled
    runs = {"explicit": ["--lora_alpha", "8"], "from_file": []}  # the file's metadata says alpha 8 (rank 4)
    for name, extra in runs.items():
        argv = ["--image", image, "--out", str(tmp_path / name), "--lora", peft_file, *extra, *STAGE1]
        _script("sample")(argv)
    np.testing.assert_array_equal(
        np.load(tmp_path / "explicit" / "chair_000_ss_latent.npy"),
        np.load(tmp_path / "from_file" / "chair_000_ss_latent.npy"),
    )
    models = _json(tmp_path / "from_file" / "settings.json")["models"]
    assert (models["lora_alpha"], models["lora_rank"]) == (8.0, 4)  # not DSO's 128 (16x too strong here)


def test_a_non_finite_sample_is_reported_as_such(sampled, tmp_path):
    import jax

    image, _ = sampled
    models = pretrained.load_models(random_weights="tiny")
    overlay = lora.init_overlay(jax.random.PRNGKey(1), models.flow_params, rank=4, alpha=8.0)
    huge = overlay.replace(factors=jax.tree.map(lambda x: x * 0 + 1e20, overlay.factors))  # finite, overflows
    path = str(tmp_path / "huge.safetensors")
    peft.save_peft(path, models.flow_params, huge, full_state_dict=False)
    out = tmp_path / "out"
    rc, stdout, _ = run_script("sample", ["--image", image, "--out", out, "--lora", path, *STAGE1])
    assert rc == 0
    failures = _json(out / "failures.json")
    assert failures == {f"{image} sample 0": generate.NONFINITE}
    assert "non-finite sample" in stdout and not list(out.glob("*.glb")) and not list(out.glob("*.npy"))


def test_a_full_disk_is_one_line(sampled, tmp_path, monkeypatch):
    import errno

    image, _ = sampled

    def full(path, arr):
        raise OSError(errno.ENOSPC, "No space left on device", path + ".tmp")

    monkeypatch.setattr(generate, "_save_npy", full)
    rc, _, err = run_script("sample", ["--image", image, "--out", tmp_path / "o", *STAGE1])
    assert rc == 2 and "no space left on the device writing " in error_line(err)
    assert "chair_000_ss_latent.npy.tmp" in error_line(err)
