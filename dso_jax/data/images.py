"""TRELLIS's inference image preprocessing: object crop, 518 px LANCZOS resize, premultiply on black.

``preprocess_rgba`` follows ``TrellisImageTo3DPipeline.preprocess_image`` for inputs that carry alpha:
bounding box of alpha > 0.8*255, square crop of int(1.2 * max side) around the box centre (Pillow's
crop rounds the float box half-to-even and fills outside the image with transparent black), LANCZOS
to 518x518, RGB multiplied by alpha in float32, truncated back to uint8.

TRELLIS removes the background of RGB inputs with rembg (a model download). Instead we take either a
mask file (``mask_path``, used as alpha; library only) or a background colour to key out (the CLIs'
``--background``); without either, RGB inputs are rejected with a message saying what to provide. As in TRELLIS, RGB inputs are first downscaled with LANCZOS so
the longer side is at most 1024 px (mask resized to match), and EXIF orientation is not applied.
"""

from __future__ import annotations

import glob
import os
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageColor

COND_SIZE = 518
ALPHA_THRESHOLD = 0.8 * 255  # object pixels: alpha > 204
CROP_SCALE = 1.2
MAX_RGB_SIDE = 1024
DEFAULT_TOLERANCE = 16  # max per-channel distance (0..255) for a pixel to count as background

Color = tuple[int, int, int]
PathLike = Union[str, os.PathLike]


class ImageInputError(ValueError):
    """An input image cannot be preprocessed; the message names the file and the reason."""


def expand_images(pattern_or_paths) -> list[str]:
    """Sorted files of a glob (or of several globs / paths); raises naming the patterns if nothing matches."""
    patterns = [pattern_or_paths] if isinstance(pattern_or_paths, str) else list(pattern_or_paths)
    paths = sorted({p for pat in patterns for p in (glob.glob(pat) or ([pat] if os.path.isfile(pat) else []))})
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise FileNotFoundError(f"no image files match {patterns}")
    return paths


def has_alpha(img: Image.Image) -> bool:
    """TRELLIS's test: an RGBA image with some alpha below 255 (fully opaque RGBA counts as no alpha)."""
    return img.mode == "RGBA" and bool(np.any(np.asarray(img)[:, :, 3] != 255))


def object_crop_box(alpha: np.ndarray) -> tuple[int, int, int, int]:
    """Integer (left, upper, right, lower) of TRELLIS's square crop around the pixels with alpha > 204.

    The box may extend past the image. Rounding is Python's half-to-even ``round``, as Pillow's crop does.
    """
    ys, xs = np.nonzero(alpha > ALPHA_THRESHOLD)
    if xs.size == 0:
        raise ImageInputError("no pixel has alpha > 0.8*255, so there is no object to crop")
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = int(max(x1 - x0, y1 - y0) * CROP_SCALE) // 2
    if half == 0:
        raise ImageInputError(f"object is too small to crop (bounding box {x1 - x0 + 1}x{y1 - y0 + 1} px)")
    return tuple(int(round(v)) for v in (cx - half, cy - half, cx + half, cy + half))  # type: ignore[return-value]


def crop_padded(arr: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """(H, W, C) crop to an integer box; the parts outside the image are zeros (transparent black)."""
    x0, y0, x1, y1 = box
    h, w = arr.shape[:2]
    out = np.zeros((y1 - y0, x1 - x0) + arr.shape[2:], arr.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = arr[sy0:sy1, sx0:sx1]
    return out


def premultiply_on_black(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3) uint8: RGB * alpha in float32, truncated like TRELLIS's astype."""
    x = rgba.astype(np.float32) / 255
    return (x[:, :, :3] * x[:, :, 3:4] * 255).astype(np.uint8)


def preprocess_rgba(img: Image.Image) -> Image.Image:
    """RGBA image with an object mask in alpha -> 518x518 RGB conditioning image (TRELLIS inference)."""
    if img.mode != "RGBA":
        raise ImageInputError(f"preprocess_rgba needs an RGBA image, got mode {img.mode}")
    arr = np.asarray(img)  # (H, W, 4)
    crop = crop_padded(arr, object_crop_box(arr[:, :, 3]))
    resized = Image.fromarray(crop, "RGBA").resize((COND_SIZE, COND_SIZE), Image.Resampling.LANCZOS)
    return Image.fromarray(premultiply_on_black(np.asarray(resized)), "RGB")


def parse_color(text: str) -> Color:
    """'255,255,255', '#ffffff' or a CSS name such as 'white' -> (r, g, b)."""
    try:
        if "," in text:
            rgb = tuple(int(v) for v in text.split(","))
            if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                raise ValueError
            return rgb  # type: ignore[return-value]
        return ImageColor.getrgb(text)[:3]  # type: ignore[return-value]
    except ValueError:
        raise ValueError(f"cannot parse background colour {text!r}; use R,G,B (0-255), #rrggbb or a name") from None


def key_out_background(rgb: np.ndarray, background: Color, tolerance: int = DEFAULT_TOLERANCE) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) uint8 alpha: 0 where every channel is within ``tolerance`` of ``background``."""
    dist = np.abs(rgb.astype(np.int16) - np.asarray(background, np.int16)).max(axis=-1)
    return np.where(dist <= tolerance, 0, 255).astype(np.uint8)


def _open(path: PathLike) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
        return img
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageInputError(f"{path}: cannot read image ({e})") from None


def _downscale_rgb(img: Image.Image) -> Image.Image:
    """TRELLIS's pre-rembg step: LANCZOS so the longer side is at most 1024 px."""
    img = img.convert("RGB")
    scale = min(1, MAX_RGB_SIDE / max(img.size))
    if scale < 1:
        img = img.resize((int(img.width * scale), int(img.height * scale)), Image.Resampling.LANCZOS)
    return img


def _with_alpha(rgb: Image.Image, alpha: np.ndarray) -> Image.Image:
    return Image.fromarray(np.dstack([np.asarray(rgb), alpha]), "RGBA")


def _object_rgba(img: Image.Image, path, mask_path, background, tolerance) -> Image.Image:
    """The RGBA image whose alpha marks the object (see ``preprocess_image`` for the order of sources)."""
    if mask_path is not None:
        mask = _open(mask_path)
        if mask.size != img.size:
            raise ImageInputError(
                f"{mask_path}: mask is {mask.size[0]}x{mask.size[1]} px, image {path} is {img.size[0]}x{img.size[1]} px"
            )
        mask = mask.getchannel("A") if mask.mode in ("RGBA", "LA") else mask.convert("L")
        rgb = _downscale_rgb(img)
        if mask.size != rgb.size:
            mask = mask.resize(rgb.size, Image.Resampling.LANCZOS)
        return _with_alpha(rgb, np.asarray(mask))
    if img.mode in ("LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    if has_alpha(img):
        return img
    if background is not None:
        rgb = _downscale_rgb(img)
        return _with_alpha(rgb, key_out_background(np.asarray(rgb), background, tolerance))
    raise ImageInputError(
        f"{path}: image has no alpha channel (or alpha is all 255); give it an alpha cut-out of the object "
        "(RGBA), or pass the plain background colour to key out (--background R,G,B)"
    )


def preprocess_image(
    path: PathLike,
    mask_path: Optional[PathLike] = None,
    background: Optional[Color] = None,
    tolerance: int = DEFAULT_TOLERANCE,
) -> Image.Image:
    """Image file -> 518x518 RGB conditioning image.

    The object mask comes from, in order: ``mask_path`` (greyscale, or the alpha of an RGBA/LA mask;
    same size as the image), the image's own alpha (RGBA, LA, or palette transparency, not all 255),
    or keying out ``background`` (an RGB colour, within ``tolerance`` per channel).
    """
    rgba = _object_rgba(_open(path), path, mask_path, background, tolerance)
    try:
        return preprocess_rgba(rgba)
    except ImageInputError as e:
        raise ImageInputError(f"{path}: {e}") from None


def load_images(
    paths: Sequence[PathLike],
    mask_paths: Optional[Sequence[Optional[PathLike]]] = None,
    background: Optional[Color] = None,
    tolerance: int = DEFAULT_TOLERANCE,
) -> tuple[np.ndarray, dict[str, str]]:
    """Preprocess many files -> (uint8 (B, 518, 518, 3), {path: reason} for the files that failed).

    Rows follow ``paths`` with failed files skipped; a bad file never stops the others.
    """
    if mask_paths is not None and len(mask_paths) != len(paths):
        raise ValueError(f"{len(mask_paths)} mask paths for {len(paths)} images")
    images, errors = [], {}
    for i, path in enumerate(paths):
        mask = mask_paths[i] if mask_paths is not None else None
        try:
            images.append(np.asarray(preprocess_image(path, mask, background, tolerance)))
        except ImageInputError as e:
            errors[str(path)] = str(e)
    batch = np.stack(images) if images else np.zeros((0, COND_SIZE, COND_SIZE, 3), np.uint8)
    return batch, errors
