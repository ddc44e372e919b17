"""The TFDS dataset and the converter from DSO's on-disk layout (torch .pt files)."""

import os

import numpy as np
import pytest

from dso_jax.data import synthetic, tfds_dso

SHAPES = dict(cond_len=6, cond_channels=8, latent_channels=2, resolution=4)
COND, LAT = (6, 8), (2, 4, 4, 4)


def write_dso_layout(category_dir, records) -> None:
    """``records`` in DSO's preprocessing layout (dso.md §2): bf16 ``.pt`` tensors, ``model_info.npz``."""
    import torch

    for rec in records:
        d = os.path.join(category_dir, rec["object_id"])
        os.makedirs(d, exist_ok=True)
        bf16 = lambda a: torch.from_numpy(np.asarray(a, np.float32)).to(torch.bfloat16)  # noqa: E731
        for v, cond in zip(rec["image_ids"], rec["cond"]):
            torch.save(bf16(cond), os.path.join(d, f"{v:03d}_cond.pt"))
        for i, k, lat in zip(rec["latent_image_ids"], rec["latent_glb_ids"], rec["latents"]):
            torch.save(bf16(lat), os.path.join(d, f"{i:03d}_sparse_sample_{k:03d}.pt"))
        np.savez(
            os.path.join(d, "model_info.npz"),
            image_ids=np.asarray(rec["latent_image_ids"], np.int8),
            glb_ids=np.asarray(rec["latent_glb_ids"], np.int8),
            angles=np.asarray(rec["angles"], np.float16).reshape(-1, 1),
        )
        np.save(os.path.join(d, "available_images.npy"), np.asarray(rec["image_ids"], np.int64))


def test_dataset_round_trips_records_bit_exactly(tmp_path):
    records = synthetic.make_records(num_objects=3, views=2, latents_per_view=2, **SHAPES)
    path = synthetic.write_tfds(str(tmp_path), records)
    source, meta = tfds_dso.open_dataset(str(tmp_path))  # the data_dir works as well as the dataset dir
    assert tfds_dso.find_dataset_dir(str(tmp_path)) == path
    assert [o["object_id"] for o in meta["objects"]] == [r["object_id"] for r in records]
    assert meta["cond_shape"] == list(COND) and meta["latent_shape"] == list(LAT)
    for i, rec in enumerate(records):
        got = source[i]
        for k in ("cond", "latents", "angles", "image_ids", "latent_image_ids", "latent_glb_ids"):
            assert got[k].dtype == rec[k].dtype and np.array_equal(got[k].view(np.uint8), rec[k].view(np.uint8)), k


def test_converter_reads_dso_layout(tmp_path):
    pytest.importorskip("torch")
    records = synthetic.make_records(num_objects=3, views=2, latents_per_view=4, **SHAPES)
    write_dso_layout(str(tmp_path / "category"), records)
    # Models with glb_id >= num_models_per_image (3 here) are ignored, like DSO's filter.
    path = tfds_dso.convert_dso_layout(
        str(tmp_path / "category"), str(tmp_path / "tfds"), 3, cond_shape=COND, latent_shape=LAT
    )
    source, meta = tfds_dso.open_dataset(path)
    assert len(source) == 3
    for i, rec in enumerate(records):
        got, keep = source[i], rec["latent_glb_ids"] < 3
        assert got["object_id"].decode() == rec["object_id"]
        assert np.array_equal(got["cond"].view(np.uint16), rec["cond"].view(np.uint16))
        assert np.array_equal(got["latents"].view(np.uint16), rec["latents"][keep].view(np.uint16))
        # model_info.npz stores float16 angles, as DSO's does
        assert np.array_equal(got["angles"], rec["angles"][keep].astype(np.float16).astype(np.float32))
        assert np.array_equal(got["latent_glb_ids"], rec["latent_glb_ids"][keep])
        assert meta["objects"][i]["angles"] == got["angles"].tolist()


def test_converter_names_a_file_with_the_wrong_shape(tmp_path):
    torch = pytest.importorskip("torch")
    records = synthetic.make_records(num_objects=1, views=1, latents_per_view=2, **SHAPES)
    write_dso_layout(str(tmp_path / "c"), records)
    bad = tmp_path / "c" / "obj0000" / "000_sparse_sample_001.pt"
    torch.save(torch.zeros((8, 16, 16, 16), dtype=torch.bfloat16), bad)
    with pytest.raises(ValueError, match=r"000_sparse_sample_001.pt: shape \(8, 16, 16, 16\), expected \(2, 4, 4, 4\)"):
        tfds_dso.convert_dso_layout(str(tmp_path / "c"), str(tmp_path / "t"), 4, cond_shape=COND, latent_shape=LAT)


def test_converter_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        list(tfds_dso.read_dso_layout(str(tmp_path / "missing")))
