"""Bytes -> network input, with strict limits: bytes, pixels, formats, frames, side.

Each check runs before the work it protects (the pixel count before decoding), and every way an
upload can be wrong maps to one client error: 413 too large, 415 not a supported image,
422 unusable image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from erde.data import InputSpec
from service.errors import BadOptions, PayloadTooLarge, UnsupportedImage

Image.init()  # register every format plugin now, not on the first request

EXIF_ORIENTATION = 0x0112
TRANSPARENT_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
# Transparent pixels are laid on black: Fashion-MNIST and most of our training data have dark backgrounds.
BACKGROUND = (0, 0, 0, 255)


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int
    min_side: int
    formats: tuple[str, ...]


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    if not data:
        raise UnsupportedImage("the image file is empty", code="empty_image")
    try:  # reads the header only; our pixel limit is checked right after, before any decoding
        im = Image.open(io.BytesIO(data), formats=limits.formats)
    except Image.DecompressionBombError:
        raise PayloadTooLarge(f"the image has more than {limits.max_pixels} pixels", code="too_many_pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise UnsupportedImage(f"not a supported image; send one of: {', '.join(limits.formats)}") from None
    width, height = im.size
    if width * height > limits.max_pixels:
        raise PayloadTooLarge(f"the image is {width}x{height}: more than {limits.max_pixels} pixels",
                              code="too_many_pixels")
    if getattr(im, "n_frames", 1) > 1:
        raise UnsupportedImage("animated or multi-frame images are not supported; send a single frame",
                               code="animated_image")
    if min(width, height) < limits.min_side:
        raise BadOptions(f"the image is {width}x{height}: each side must be at least {limits.min_side} pixels",
                         code="image_too_small")
    return im


def _to_mode(im: Image.Image, mode: str) -> Image.Image:
    """Convert any decoded mode to 'L' or 'RGB': 16-bit scaled down, transparency laid on black."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        scale = 257.0 if im.mode != "I" or np.asarray(im).max(initial=0) > 255 else 1.0
        im = Image.fromarray((np.asarray(im, dtype=np.float32) / scale).clip(0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.asarray(im, dtype=np.float32).clip(0, 255).astype(np.uint8), "L")
    if im.mode in TRANSPARENT_MODES or (im.mode == "P" and "transparency" in im.info):
        im = Image.alpha_composite(Image.new("RGBA", im.size, BACKGROUND), im.convert("RGBA"))
    return im if im.mode == mode else im.convert(mode)


@lru_cache(maxsize=32)
def _normalization_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(C, 256) float32: the normalised value of every 8-bit level, so normalising is one lookup."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    return np.stack([(levels - m) / s for m, s in zip(mean, std, strict=True)]).astype(np.float32)


def decode_image(data: bytes, spec: InputSpec, limits: ImageLimits) -> torch.Tensor:
    """Encoded image -> normalised float32 tensor (C, size, size), upright (EXIF applied)."""
    im = _open(data, limits)
    try:
        if im.format == "JPEG":
            im.draft(spec.mode, (spec.size, spec.size))  # let libjpeg decode at a reduced scale
        im.load()
        if im.getexif().get(EXIF_ORIENTATION, 1) != 1:
            im = ImageOps.exif_transpose(im)
        im = _to_mode(im, spec.mode)
        if im.size != (spec.size, spec.size):
            im = im.resize((spec.size, spec.size), Image.BILINEAR)
    except (OSError, ValueError, SyntaxError, EOFError):
        raise UnsupportedImage("the image data is truncated or corrupt", code="corrupt_image") from None
    table = _normalization_table(spec.mean, spec.std)
    pixels = np.asarray(im)  # (H, W) uint8 or (H, W, 3)
    if pixels.ndim == 2:
        return torch.from_numpy(table[0][pixels][None])
    return torch.from_numpy(np.stack([table[c][pixels[..., c]] for c in range(3)]))
