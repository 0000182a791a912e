"""Bytes -> network input, with strict limits: bytes, pixels, formats, frames, side.

Each check runs before the work it protects (the pixel count before decoding), and every way an
upload can be wrong maps to one client error: 413 too large, 415 not a supported image,
422 unusable image.

Pixels bound the work, not bytes: an all-black 4000x4000 PNG is 15.6 KB and a WebP of it 0.7 KB,
and each takes tens to hundreds of milliseconds to decode and shrink. So an image may have at most
`pixels_ratio` times the pixels of the model's input (under the server-wide `max_pixels`), and
all the images of one request together at most `request_pixels`, read from their headers before
any is decoded. JPEGs are decoded at a reduced scale (`draft`), and large images are shrunk by
an integer factor first (`reducing_gap`), which Pillow documents as indistinguishable from the
exact resampling at 3.0 (tests/service/test_decode.py checks it).

Pixels do not bound everything: a file's structure (scans, chunks, frames) can cost more than its
pixels, so it is counted first (service/engine/imagescan.py), and what is left is bounded in time: the
inference process decodes each image under `decode_budget`, and an image past it is refused (413
`decode_too_slow`) while the other rows of its batch go on, long before the watchdog would replace
the process.
"""

from __future__ import annotations

import io
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from erde.artifact import InputSpec
from service.engine import imagescan
from service.engine.limits import ImageLimits
from service.errors import BadOptions, PayloadTooLarge, UnsupportedImage

Image.init()  # register every format plugin now, not on the first request

EXIF_ORIENTATION = 0x0112
TRANSPARENT_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
# Transparent pixels are laid on black: Fashion-MNIST and most of our training data have dark backgrounds.
BACKGROUND = (0, 0, 0, 255)


REDUCING_GAP = 3.0  # Pillow: from 3.0 the two-step resize is indistinguishable from the exact one
# Input Pillow hands its decoder per step (its default is 64 KiB). The decode budget is checked between
# steps, and 64 KiB of empty progressive-JPEG scans cost 0.35 s at 896x896; 8 KiB cost 45 ms.
DECODE_STEP = 8 * 1024


def _open(data: bytes, limits: ImageLimits, max_pixels: int) -> Image.Image:
    if not data:
        raise UnsupportedImage("the image file is empty", code="empty_image")
    imagescan.scan(data)  # the structure's cost, bounded before Pillow walks it
    try:  # reads the header only; our pixel limit is checked right after, before any decoding
        im = Image.open(io.BytesIO(data), formats=limits.formats)
    except Image.DecompressionBombError:
        raise PayloadTooLarge(f"the image has more than {max_pixels} pixels", code="too_many_pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise UnsupportedImage(f"not a supported image; send one of: {', '.join(limits.formats)}") from None
    width, height = im.size
    if width * height > max_pixels:
        raise PayloadTooLarge(f"the image is {width}x{height}: more than the {max_pixels} pixels this model "
                              "takes; send it smaller", code="too_many_pixels")
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
    im = _open(data, limits, limits.pixels_for(spec))
    im.decodermaxblock = DECODE_STEP
    try:
        if im.format == "JPEG":
            im.draft(spec.mode, (spec.size, spec.size))  # let libjpeg decode at a reduced scale
        im.load()
        if im.getexif().get(EXIF_ORIENTATION, 1) != 1:
            im = ImageOps.exif_transpose(im)
        im = _to_mode(im, spec.mode)
        if im.size != (spec.size, spec.size):
            im = im.resize((spec.size, spec.size), Image.BILINEAR, reducing_gap=REDUCING_GAP)
    except (OSError, ValueError, SyntaxError, EOFError):
        raise UnsupportedImage("the image data is truncated or corrupt", code="corrupt_image") from None
    table = _normalization_table(spec.mean, spec.std)
    pixels = np.asarray(im)  # (H, W) uint8 or (H, W, 3)
    if pixels.ndim == 2:
        return torch.from_numpy(table[0][pixels][None])
    return torch.from_numpy(np.stack([table[c][pixels[..., c]] for c in range(3)]))


class DecodeTooSlow(BaseException):
    """Raised into a decode that ran past its budget. A BaseException, so that no `except Exception`
    inside Pillow can swallow it."""


class ImageBudget:
    """One image's share of `decode_budget`: `with budget:` around each decode arms the CPU timer and stops
    it. A SIGPROF still pending once the image is done finds the budget disarmed and does nothing."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.armed = False

    def __enter__(self) -> None:
        if self.seconds is not None:
            self.armed = True
            signal.setitimer(signal.ITIMER_PROF, self.seconds)

    def __exit__(self, *exc: object) -> None:
        self.disarm()

    def disarm(self) -> None:
        if self.armed:
            self.armed = False
            signal.setitimer(signal.ITIMER_PROF, 0)

    def expired(self, signum: int, frame: object) -> None:
        if self.armed and signal.getitimer(signal.ITIMER_PROF)[0] == 0:  # this image's timer, not a late one
            self.armed = False
            raise DecodeTooSlow


@contextmanager
def decode_budget(seconds: float | None) -> Iterator[ImageBudget]:
    """Raise DecodeTooSlow into an image's decode (`with budget:`, per image) once it has used `seconds` of
    the process's CPU time, by SIGPROF. CPU time, not wall time: on a machine busy with other work an image
    waiting for a core is not refused (a stall is the watchdog's to see). Pillow decodes in steps of
    DECODE_STEP bytes of input and returns to Python between them, where the signal is handled (a format
    decoded in one call, WebP, is bounded by the pixel limits instead). The handler is set once for all
    the images of a batch: set and restored around each image, it took 9 of the 41 µs a 28x28 PNG took.
    Main thread only (the inference process decodes in its main thread)."""
    budget = ImageBudget(seconds)
    if seconds is None:
        yield budget
        return
    previous = signal.signal(signal.SIGPROF, budget.expired)
    try:
        yield budget
    finally:
        budget.disarm()
        signal.signal(signal.SIGPROF, previous)


def too_slow(seconds: float) -> PayloadTooLarge:
    return PayloadTooLarge(f"the image took more than {seconds * 1000:.0f} ms of CPU to decode; send a simpler file "
                           "(a baseline JPEG or a plain PNG)", code="decode_too_slow")
