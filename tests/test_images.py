"""TRELLIS image preprocessing: pixel-for-pixel equal to a plain PIL rendition of TRELLIS's steps."""

import numpy as np
import pytest
from PIL import Image

from dso_jax.data.images import (
    ImageInputError,
    load_images,
    object_crop_box,
    parse_color,
    preprocess_image,
    preprocess_rgba,
)


def trellis_reference(img: Image.Image) -> Image.Image:
    """TRELLIS inference steps for an image with alpha (reference §1.2), with Pillow doing crop and resize."""
    arr = np.array(img)
    yx = np.argwhere(arr[:, :, 3] > 0.8 * 255)
    x0, y0, x1, y1 = yx[:, 1].min(), yx[:, 0].min(), yx[:, 1].max(), yx[:, 0].max()
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    size = int(max(x1 - x0, y1 - y0) * 1.2)
    out = img.crop((cx - size // 2, cy - size // 2, cx + size // 2, cy + size // 2))  # float box
    out = out.resize((518, 518), Image.Resampling.LANCZOS)
    out = np.array(out).astype(np.float32) / 255
    out = out[:, :, :3] * out[:, :, 3:4]
    return Image.fromarray((out * 255).astype(np.uint8))


def synthetic_rgba(w, h, box, seed=0, soft=True):
    """Noise RGB; alpha an ellipse filling ``box`` (may leave the image), optionally with a soft edge."""
    rng = np.random.RandomState(seed)
    rgb = rng.randint(0, 256, (h, w, 3)).astype(np.uint8)
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot((xx - (x0 + x1) / 2) / max((x1 - x0) / 2, 0.5), (yy - (y0 + y1) / 2) / max((y1 - y0) / 2, 0.5))
    alpha = np.clip((1.15 - r) / 0.3, 0, 1) if soft else (r <= 1).astype(float)
    return Image.fromarray(np.dstack([rgb, (alpha * 255).astype(np.uint8)]), "RGBA")


CASES = {
    "centred": (300, 200, (100, 50, 200, 150)),
    "odd_size_off_centre": (333, 517, (20, 301, 171, 490)),
    "touches_left_top": (256, 256, (-40, -30, 120, 90)),  # crop box starts at negative coordinates
    "touches_right_bottom": (401, 299, (300, 180, 440, 330)),
    "fills_the_image": (123, 77, (-5, -5, 130, 85)),
    "thin_and_wide": (640, 97, (10, 40, 630, 52)),
    "tiny_image": (31, 45, (3, 10, 27, 40)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_preprocess_rgba_matches_trellis_pixel_for_pixel(name):
    w, h, box = CASES[name]
    for seed, soft in [(0, True), (1, False)]:
        img = synthetic_rgba(w, h, box, seed, soft)
        ours = preprocess_rgba(img)
        assert ours.mode == "RGB" and ours.size == (518, 518)
        np.testing.assert_array_equal(np.array(ours), np.array(trellis_reference(img)))


def test_crop_box_rounds_half_to_even_like_pillow():
    alpha = np.zeros((50, 60), np.uint8)
    alpha[10:21, 5:14] = 255  # x 5..13 (centre 9.0), y 10..20 (centre 15.0); size int(10*1.2)=12
    assert object_crop_box(alpha) == (3, 9, 15, 21)
    alpha[10:21, 5:15] = 255  # x 5..14: centre 9.5 -> 9.5 - 6 = 3.5 -> 4, 15.5 -> 16
    assert object_crop_box(alpha) == (4, 9, 16, 21)
    alpha[:] = 0
    alpha[10:21, 6:16] = 255  # centre 10.5 -> 4.5 -> 4, 16.5 -> 16
    assert object_crop_box(alpha) == (4, 9, 16, 21)


def test_half_pixel_centre_image_matches_reference():
    img = synthetic_rgba(90, 70, (20, 11, 57, 48), soft=False)
    a = np.array(img)
    a[:, :, 3] = 0
    a[11:40, 20:58, 3] = 255  # x 20..57 -> centre 38.5
    img = Image.fromarray(a, "RGBA")
    np.testing.assert_array_equal(np.array(preprocess_rgba(img)), np.array(trellis_reference(img)))


def test_alpha_threshold_is_strictly_above_204():
    a = np.zeros((40, 40, 4), np.uint8)
    a[5:35, 5:35] = 204  # all below the threshold ...
    a[10:20, 12:18] = 205  # ... except this block, which alone sets the box
    img = Image.fromarray(a, "RGBA")
    assert object_crop_box(a[:, :, 3]) == object_crop_box((a[:, :, 3] == 205).astype(np.uint8) * 255)
    np.testing.assert_array_equal(np.array(preprocess_rgba(img)), np.array(trellis_reference(img)))


def test_empty_alpha_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.png"
    Image.fromarray(np.zeros((20, 20, 4), np.uint8), "RGBA").save(path)
    with pytest.raises(ImageInputError, match=r"empty\.png: no pixel has alpha > 0\.8\*255"):
        preprocess_image(path)


def test_rgba_file_roundtrip_uses_its_alpha(tmp_path):
    img = synthetic_rgba(*CASES["touches_left_top"][:2], CASES["touches_left_top"][2])
    img.save(tmp_path / "a.png")
    np.testing.assert_array_equal(np.array(preprocess_image(tmp_path / "a.png")), np.array(trellis_reference(img)))


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])  # RGBA with alpha all 255 counts as "no alpha"
def test_rgb_without_mask_or_background_says_what_to_provide(tmp_path, mode):
    path = tmp_path / f"photo_{mode}.png"
    Image.new(mode, (32, 32), (10, 20, 30, 255)[: len(mode)]).save(path)
    with pytest.raises(ImageInputError) as e:
        preprocess_image(path)
    msg = str(e.value)
    assert str(path) in msg and "--background" in msg and "alpha" in msg and "\n" not in msg
    assert "--mask" not in msg  # no CLI has such a flag


def test_rgb_with_mask_file_equals_rgba_with_that_alpha(tmp_path):
    rgba = synthetic_rgba(200, 150, (30, 20, 170, 140))
    rgba.convert("RGB").save(tmp_path / "img.png")
    rgba.getchannel("A").save(tmp_path / "mask.png")
    got = preprocess_image(tmp_path / "img.png", mask_path=tmp_path / "mask.png")
    np.testing.assert_array_equal(np.array(got), np.array(trellis_reference(rgba)))


def test_mask_of_another_size_is_rejected(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "img.png")
    Image.new("L", (30, 40)).save(tmp_path / "mask.png")
    with pytest.raises(ImageInputError, match="mask.png: mask is 30x40 px"):
        preprocess_image(tmp_path / "img.png", mask_path=tmp_path / "mask.png")


def test_large_rgb_is_downscaled_to_1024_before_masking_like_trellis(tmp_path):
    rgba = synthetic_rgba(1500, 900, (400, 200, 1100, 800), soft=False)
    rgba.convert("RGB").save(tmp_path / "big.png")
    rgba.getchannel("A").save(tmp_path / "big_mask.png")
    rgb = rgba.convert("RGB").resize((1024, 614), Image.Resampling.LANCZOS)
    alpha = rgba.getchannel("A").resize((1024, 614), Image.Resampling.LANCZOS)
    expected = trellis_reference(Image.merge("RGBA", (*rgb.split(), alpha)))
    got = preprocess_image(tmp_path / "big.png", mask_path=tmp_path / "big_mask.png")
    np.testing.assert_array_equal(np.array(got), np.array(expected))


def test_background_colour_is_keyed_out(tmp_path):
    a = np.full((120, 160, 3), 250, np.uint8)  # near-white background (within tolerance of white)
    a[30:90, 40:100] = (200, 30, 30)
    Image.fromarray(a).save(tmp_path / "white_bg.png")
    alpha = np.zeros((120, 160), np.uint8)
    alpha[30:90, 40:100] = 255
    expected = trellis_reference(Image.fromarray(np.dstack([a, alpha]), "RGBA"))
    got = preprocess_image(tmp_path / "white_bg.png", background=parse_color("white"))
    np.testing.assert_array_equal(np.array(got), np.array(expected))


def test_parse_color():
    assert parse_color("255,255,255") == parse_color("#ffffff") == parse_color("white") == (255, 255, 255)
    with pytest.raises(ValueError, match="background colour"):
        parse_color("1,2")


def test_load_images_records_bad_files_and_continues(tmp_path):
    good = [tmp_path / "g0.png", tmp_path / "g1.png"]
    synthetic_rgba(100, 80, (10, 10, 60, 70), seed=0).save(good[0])
    synthetic_rgba(64, 64, (-10, 5, 40, 50), seed=1).save(good[1])
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    Image.new("RGB", (20, 20)).save(tmp_path / "rgb.png")
    paths = [good[0], tmp_path / "missing.png", tmp_path / "corrupt.png", good[1], tmp_path / "rgb.png"]
    batch, errors = load_images(paths)
    assert batch.shape == (2, 518, 518, 3) and batch.dtype == np.uint8
    assert set(errors) == {str(tmp_path / n) for n in ("missing.png", "corrupt.png", "rgb.png")}
    assert all(path in reason for path, reason in errors.items())
    np.testing.assert_array_equal(batch[1], np.array(trellis_reference(Image.open(good[1]))))
