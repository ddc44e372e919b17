"""The TFDS dataset and the converter from DSO's on-disk layout (torch .pt files)."""

import numpy as np
import pytest

from dso_jax.data import synthetic, tfds_dso

SHAPES = dict(cond_len=6, cond_channels=8, latent_channels=2, resolution=4)
COND, LAT = (6, 8), (2, 4, 4, 4)


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
    synthetic.write_dso_layout(str(tmp_path / "category"), records)
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
    synthetic.write_dso_layout(str(tmp_path / "c"), records)
    bad = tmp_path / "c" / "obj0000" / "000_sparse_sample_001.pt"
    torch.save(torch.zeros((8, 16, 16, 16), dtype=torch.bfloat16), bad)
    with pytest.raises(ValueError, match=r"000_sparse_sample_001.pt: shape \(8, 16, 16, 16\), expected \(2, 4, 4, 4\)"):
        tfds_dso.convert_dso_layout(str(tmp_path / "c"), str(tmp_path / "t"), 4, cond_shape=COND, latent_shape=LAT)


def test_converter_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        list(tfds_dso.read_dso_layout(str(tmp_path / "missing")))
