"""Toy renders and figures: objects drawn in their verdict's colour, captions with folded angles."""

import numpy as np
import pytest
from PIL import Image

from dso_jax.toy import objects as toy
from dso_jax.toy import render as toy_render


def test_figure_rows_colour_objects_by_verdict(tmp_path):
    d = toy.sample_objects(2, 2)
    path = tmp_path / "objs.png"
    rows = [(d["occ"][0], "condition 0", [(d["occ"][0], "a", True), (d["occ"][1], "b", False)])]
    toy_render.save_rows(path, rows, title="two objects", size=96)
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert img.shape[1] > 4 * 96  # the condition's view and two panels of two views side by side
    greenish = (img[..., 1] > img[..., 0] + 30).sum()
    reddish = (img[..., 0] > img[..., 1] + 60).sum()
    assert greenish > 200 and reddish > 200


@pytest.mark.parametrize("deg, folded", [(0.0, 0.0), (12.0, 12.0), (180.0, 180.0), (237.0, 123.0), (359.5, 0.5)])
def test_angles_fold_to_the_rotation_they_are(deg, folded):
    assert toy_render.fold_angle(deg) == pytest.approx(folded)


def test_caption_keeps_dso_angle_beside_the_folded_one():
    assert toy_render.angle_caption(12.4, True) == "12° stable"
    assert toy_render.angle_caption(350.0, False) == "10° (DSO 350°) unstable"  # DSO's verdict reads 350°


def test_iso_render_of_empty_and_full():
    empty = np.asarray(toy_render.render_iso(np.zeros((8, 8, 8), bool), size=64))
    full = np.asarray(toy_render.render_iso(np.ones((8, 8, 8), bool), size=64))
    assert empty.shape == (64, 64, 3)
    assert (np.abs(full.astype(int) - empty).sum(-1) > 0).sum() > 0.3 * 64 * 64
    depth = np.asarray(toy_render.front_depth_image(np.ones((8, 8, 8), bool), size=16))
    assert depth.shape == (16, 16) and depth.max() < 255
