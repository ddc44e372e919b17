"""Toy renders: PNGs with the object drawn in the requested colour."""

import numpy as np
from PIL import Image

from dso_jax.data import toy, toy_render


def test_panels_and_grid_png(tmp_path):
    d = toy.sample_objects(2, 2)
    path = tmp_path / "objs.png"
    toy_render.save_objects(path, d["occ"], ["a", "b"], stable=np.array([True, False]), size=96)
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert img.shape[1] > 2 * 3 * 96
    greenish = (img[..., 1] > img[..., 0] + 30).sum()
    reddish = (img[..., 0] > img[..., 1] + 60).sum()
    assert greenish > 200 and reddish > 200


def test_iso_render_of_empty_and_full():
    empty = np.asarray(toy_render.render_iso(np.zeros((8, 8, 8), bool), size=64))
    full = np.asarray(toy_render.render_iso(np.ones((8, 8, 8), bool), size=64))
    assert empty.shape == (64, 64, 3)
    assert (np.abs(full.astype(int) - empty).sum(-1) > 0).sum() > 0.3 * 64 * 64
    depth = np.asarray(toy_render.front_depth_image(np.ones((8, 8, 8), bool), size=16))
    assert depth.shape == (16, 16) and depth.max() < 255
