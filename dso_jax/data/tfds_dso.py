"""TFDS dataset of DSO-style training data, and the converter from DSO's on-disk layout.

    python -m dso_jax.data.tfds_dso CATEGORY_DIR DATA_DIR [--num_models_per_image 4]

One record per object (DSO's "prompt"):

| feature            | shape              | dtype    | meaning                                        |
|--------------------|--------------------|----------|------------------------------------------------|
| object_id          | ()                 | text     | prompt directory name                          |
| image_ids          | (V,)               | int32    | the views with simulated models                |
| cond               | (V, S, Cc)         | bfloat16 | DINOv2 tokens per view (S=1374, Cc=1024)       |
| latents            | (N, C, R, R, R)    | bfloat16 | stage-1 latents z_s (C=8, R=16)                |
| latent_image_ids   | (N,)               | int32    | the view each latent was generated from        |
| latent_glb_ids     | (N,)               | int32    | its sample index (seed)                        |
| angles             | (N,)               | float32  | simulated rotation angle, degrees              |

Records keep generation order (``disable_shuffling``), so record ``i`` is the ``i``-th object of
``info.metadata['objects']``, a light index (id, number of views, angles) that lets pair sampling pick objects
without reading the heavy arrays. Files are array_record, read through ``tfds`` data sources:
no TensorFlow needed. bf16 arrays are stored bit-exactly.

DSO's layout (``dso.md`` §2): ``category/prompt/{img:03d}_cond.pt`` (1374, 1024) bf16,
``{img:03d}_sparse_sample_{k:03d}.pt`` (8, 16, 16, 16) bf16, ``model_info.npz`` with
``image_ids`` int8, ``glb_ids`` int8, ``angles`` float16 (N, 1), and ``available_images.npy``.
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Callable, Iterable, Iterator, Optional

import ml_dtypes
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NAME = "dso_pairs"
VERSION = "1.0.0"
BF16 = ml_dtypes.bfloat16

ObjectRecord = dict  # the features of the table above, numpy-valued


class DsoPairs(tfds.core.GeneratorBasedBuilder):
    """DSO training objects; ``source`` is a zero-argument callable yielding :data:`ObjectRecord`s.

    Without ``source``, the objects come from DSO's layout in the download config's ``manual_dir``.
    """

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {"1.0.0": "One record per object: per-view DINOv2 tokens, latents, angles."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Point manual_dir at a DSO category directory (category/prompt/{img}_cond.pt, "
        "{img}_sparse_sample_{k}.pt, model_info.npz), e.g. via convert_dso_layout()."
    )

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS's default probes importlib_resources, which TF-free installs may lack.
        return epath.Path(__file__)

    def __init__(
        self, *, source: Optional[Callable[[], Iterable[ObjectRecord]]] = None, num_models_per_image: int = 4, **kwargs
    ):
        self._source = source
        self._num_models_per_image = num_models_per_image
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        tensor = lambda ndim, dtype: tfds.features.Tensor(shape=(None,) * ndim, dtype=dtype, encoding="bytes")
        return tfds.core.DatasetInfo(
            builder=self,
            description="DSO training data: DINOv2 conditions, TRELLIS stage-1 latents and their simulated angles.",
            features=tfds.features.FeaturesDict(
                {
                    "object_id": tfds.features.Text(),
                    "image_ids": tensor(1, np.int32),
                    "cond": tensor(3, BF16),
                    "latents": tensor(5, BF16),
                    "latent_image_ids": tensor(1, np.int32),
                    "latent_glb_ids": tensor(1, np.int32),
                    "angles": tensor(1, np.float32),
                }
            ),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        if self._source is not None:
            source = self._source
        else:
            root = os.fspath(dl_manager.manual_dir)
            source = lambda: read_dso_layout(root, self._num_models_per_image)
        return {"train": self._generate_examples(source)}

    def _generate_examples(self, source):
        objects, cond_shape, latent_shape = [], None, None
        for i, rec in enumerate(source()):
            rec = _normalise_record(rec)
            cs, ls = rec["cond"].shape[1:], rec["latents"].shape[1:]
            if cond_shape is None:
                cond_shape, latent_shape = cs, ls
            elif (cs, ls) != (cond_shape, latent_shape):
                raise ValueError(
                    f"object {rec['object_id']}: cond {cs} / latents {ls} differ from the first object's {cond_shape} / {latent_shape}"
                )
            objects.append(
                {
                    "object_id": rec["object_id"],
                    "num_views": len(rec["image_ids"]),
                    "angles": [float(a) for a in rec["angles"]],
                }
            )
            yield i, rec
        # Written with dataset_info once generation ends; record i <-> objects[i].
        self.info.metadata["objects"] = objects
        self.info.metadata["cond_shape"] = list(cond_shape or ())
        self.info.metadata["latent_shape"] = list(latent_shape or ())


def _normalise_record(rec: ObjectRecord) -> ObjectRecord:
    out = {
        "object_id": str(rec["object_id"]),
        "image_ids": np.asarray(rec["image_ids"], np.int32).reshape(-1),
        "cond": np.asarray(rec["cond"]).astype(BF16),
        "latents": np.asarray(rec["latents"]).astype(BF16),
        "latent_image_ids": np.asarray(rec["latent_image_ids"], np.int32).reshape(-1),
        "latent_glb_ids": np.asarray(rec["latent_glb_ids"], np.int32).reshape(-1),
        "angles": np.asarray(rec["angles"], np.float32).reshape(-1),
    }
    v, n = len(out["image_ids"]), len(out["angles"])
    if out["cond"].ndim != 3 or out["cond"].shape[0] != v:
        raise ValueError(f"object {out['object_id']}: cond has shape {out['cond'].shape}, expected ({v}, S, Cc)")
    if out["latents"].ndim != 5 or out["latents"].shape[0] != n:
        raise ValueError(
            f"object {out['object_id']}: latents have shape {out['latents'].shape}, expected ({n}, C, R, R, R)"
        )
    if len(out["latent_image_ids"]) != n or len(out["latent_glb_ids"]) != n:
        raise ValueError(f"object {out['object_id']}: {n} angles but {len(out['latent_image_ids'])} latent image ids")
    missing = set(out["latent_image_ids"].tolist()) - set(out["image_ids"].tolist())
    if missing:
        raise ValueError(f"object {out['object_id']}: latents from views {sorted(missing)} without a condition")
    return out


# --------------------------------------------------------------------------------------------
# DSO's on-disk layout
# --------------------------------------------------------------------------------------------


def _load_pt(path: str, shape: tuple) -> np.ndarray:
    import torch  # lazily: only the converter needs it

    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing") from None
    if tuple(t.shape) != shape:
        raise ValueError(f"{path}: shape {tuple(t.shape)}, expected {shape}")
    # bf16 -> float32 is exact, and float32 -> bf16 of such a value round-trips bit-exactly.
    return t.float().numpy().astype(BF16)


def read_dso_layout(
    root: str,
    num_models_per_image: int = 4,
    cond_shape: tuple = (1374, 1024),
    latent_shape: tuple = (8, 16, 16, 16),
) -> Iterator[ObjectRecord]:
    """Yield one record per prompt directory of a DSO category directory, in sorted order.

    As DSO's ``SyntheticDataset``: prompts are the subdirectories holding ``available_images.npy``;
    models come from ``model_info.npz`` restricted to ``glb_id < num_models_per_image``; the
    condition views are ``unique(image_ids)``. Prompts without a ``model_info.npz`` are skipped.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: not a directory (expected a DSO category directory)")
    prompts = sorted(
        os.path.dirname(p) for p in glob.glob(os.path.join(glob.escape(root), "*", "available_images.npy"))
    )
    skipped = 0
    for prompt in prompts:
        info_path = os.path.join(prompt, "model_info.npz")
        if not os.path.exists(info_path):
            skipped += 1
            continue
        info = np.load(info_path)
        image_ids = np.asarray(info["image_ids"]).astype(np.int32).reshape(-1)
        glb_ids = np.asarray(info["glb_ids"]).astype(np.int32).reshape(-1)
        angles = np.asarray(info["angles"]).astype(np.float32).reshape(-1)
        if not (len(image_ids) == len(glb_ids) == len(angles)):
            raise ValueError(
                f"{info_path}: image_ids {image_ids.shape}, glb_ids {glb_ids.shape}, angles {angles.shape} differ in length"
            )
        keep = glb_ids < num_models_per_image
        image_ids, glb_ids, angles = image_ids[keep], glb_ids[keep], angles[keep]
        if len(angles) == 0:
            skipped += 1
            continue
        views = np.unique(image_ids)
        cond = np.stack([_load_pt(os.path.join(prompt, f"{v:03d}_cond.pt"), tuple(cond_shape)) for v in views])
        latents = np.stack(
            [
                _load_pt(os.path.join(prompt, f"{i:03d}_sparse_sample_{k:03d}.pt"), tuple(latent_shape))
                for i, k in zip(image_ids, glb_ids)
            ]
        )
        yield {
            "object_id": os.path.basename(prompt),
            "image_ids": views,
            "cond": cond,
            "latents": latents,
            "latent_image_ids": image_ids,
            "latent_glb_ids": glb_ids,
            "angles": angles,
        }
    if skipped:
        logging.info("read_dso_layout: skipped %d prompt directories without usable model_info.npz", skipped)


def build(data_dir: str, source: Callable[[], Iterable[ObjectRecord]], num_models_per_image: int = 4) -> str:
    """Write the dataset under ``data_dir`` from ``source``; returns the dataset directory."""
    builder = DsoPairs(
        data_dir=data_dir, source=source, num_models_per_image=num_models_per_image, file_format="array_record"
    )
    builder.download_and_prepare()
    return os.fspath(builder.data_path)


def convert_dso_layout(src_root: str, data_dir: str, num_models_per_image: int = 4, **shapes) -> str:
    """Convert DSO's preprocessing output (a category directory) into the TFDS dataset."""
    return build(data_dir, lambda: read_dso_layout(src_root, num_models_per_image, **shapes), num_models_per_image)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def find_dataset_dir(path: str) -> str:
    """``path`` itself if it holds ``dataset_info.json``, else the newest ``dso_pairs/<version>`` below it."""
    if os.path.exists(os.path.join(path, "dataset_info.json")):
        return path
    candidates = sorted(glob.glob(os.path.join(glob.escape(path), NAME, "*", "dataset_info.json")))
    if not candidates:
        raise FileNotFoundError(
            f"data.path {path!r}: no {NAME} TFDS dataset (dataset_info.json) found; build one with "
            "dso_jax.data.tfds_dso.convert_dso_layout or use data.kind='synthetic'"
        )
    return os.path.dirname(candidates[-1])


def open_dataset(path: str):
    """(random-access data source of records, metadata dict) of a built dataset."""
    ds_dir = find_dataset_dir(path)
    builder = tfds.builder_from_directory(ds_dir)
    meta = dict(builder.info.metadata or {})
    if "objects" not in meta:
        raise ValueError(f"{ds_dir}: dataset_info has no 'objects' metadata; rebuild it with dso_jax.data.tfds_dso")
    source = builder.as_data_source(split="train")
    if len(source) != len(meta["objects"]):
        raise ValueError(f"{ds_dir}: {len(source)} records but {len(meta['objects'])} objects in the metadata")
    return source, meta


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(
        description="Convert DSO's preprocessing output (one category directory) to the TFDS dataset."
    )
    ap.add_argument("src", help="category directory: PROMPT/{img}_cond.pt, {img}_sparse_sample_{k}.pt, model_info.npz")
    ap.add_argument("data_dir", help="output TFDS data_dir (the dataset lands in DATA_DIR/dso_pairs/1.0.0)")
    ap.add_argument("--num_models_per_image", type=int, default=4)
    a = ap.parse_args()
    print(convert_dso_layout(a.src, a.data_dir, a.num_models_per_image))
