"""Image shifts for the drift benchmark and tests (issue 19): uint8 (N, 28, 28) grey images in, same out.

Two disjoint sets. `SEEN` are the five shifts the issue measured; the tests use them. `UNSEEN` are
the ones `make bench-drift` checks the service on, which no test and no parameter was tuned on.
Every shift is deterministic given its seed.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

Shift = Callable[[np.ndarray, int], np.ndarray]


def _per_image(fn: Callable[[Image.Image], Image.Image]) -> Shift:
    def apply(images: np.ndarray, seed: int) -> np.ndarray:
        return np.stack([np.asarray(fn(Image.fromarray(im, "L")), dtype=np.uint8) for im in images])
    return apply


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def noise(images: np.ndarray, seed: int, sigma: float = 40.0) -> np.ndarray:
    return _clip(images + np.random.default_rng(seed).normal(0, sigma, images.shape))


def contrast(images: np.ndarray, seed: int, factor: float = 0.35) -> np.ndarray:
    return _clip(128 + (images.astype(np.float64) - 128) * factor)


def brightness(images: np.ndarray, seed: int, factor: float = 0.45) -> np.ndarray:
    return _clip(images * factor)


blur = _per_image(lambda im: im.filter(ImageFilter.GaussianBlur(1.2)))


def mix(images: np.ndarray, seed: int) -> np.ndarray:
    """Each image gets one of the four shifts above, in turn."""
    out = images.copy()
    for k, shift in enumerate((noise, contrast, blur, brightness)):
        out[k::4] = shift(images[k::4], seed + k)
    return out


def jpeg(images: np.ndarray, seed: int, quality: int = 8) -> np.ndarray:
    def one(im: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(im, "L").save(buf, "JPEG", quality=quality)
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"), dtype=np.uint8)
    return np.stack([one(im) for im in images])


def salt_pepper(images: np.ndarray, seed: int, share: float = 0.06) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = images.copy()
    hit = rng.random(images.shape) < share
    out[hit] = np.where(rng.random(int(hit.sum())) < 0.5, 0, 255).astype(np.uint8)
    return out


def gamma(images: np.ndarray, seed: int, power: float = 2.5) -> np.ndarray:
    return _clip(255 * (images / 255.0) ** power)


downscale = _per_image(lambda im: im.resize((12, 12), Image.BILINEAR).resize(im.size, Image.BILINEAR))


def motion_blur(images: np.ndarray, seed: int, length: int = 5) -> np.ndarray:
    """A horizontal box blur of `length` pixels (a camera moving sideways)."""
    padded = np.pad(images.astype(np.float64), ((0, 0), (0, 0), (length // 2, length // 2)), mode="edge")
    return _clip(sum(padded[:, :, k:k + images.shape[2]] for k in range(length)) / length)


SEEN: dict[str, Shift] = {"noise": noise, "low contrast": contrast, "blur": blur, "darker": brightness, "mix": mix}
UNSEEN: dict[str, Shift] = {"jpeg q8": jpeg, "salt & pepper 6%": salt_pepper, "gamma 2.5": gamma,
                            "downscale 12px": downscale, "motion blur 5px": motion_blur}
