"""Real encoded images for the tests, made with PIL."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def texture(kind: int, size: int = 32, seed: int = 0) -> Image.Image:
    """Images like the synthetic training set: stripes (0 horizontal, 1 vertical, 2 checker)."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[0:size, 0:size] // 2
    pattern = [r % 2, c % 2, (r + c) % 2][kind % 3]
    return Image.fromarray((pattern * 150 + rng.integers(0, 70, (size, size))).clip(0, 255).astype(np.uint8), "L")


def noise(size: int = 32, seed: int = 0, mode: str = "L") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, len(mode))
    return Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8), mode)


def png(seed: int = 0, size: int = 32) -> bytes:
    return encode(texture(seed, size, seed))


def pixel_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny PNG whose header declares width x height (the data would inflate to 400 MB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * width
    compressor = zlib.compressobj(9)
    data = compressor.compress(row * 64) + compressor.flush()  # only a few rows: it is the header that bites
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def animated_gif() -> bytes:
    frames = [noise(32, s).convert("P") for s in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def cmyk_jpeg() -> bytes:
    return encode(texture(1).convert("CMYK"), "JPEG", quality=95)


def png16() -> bytes:
    arr = (np.asarray(texture(2), dtype=np.uint16) * 257)
    return encode(Image.fromarray(arr))  # uint16 -> mode "I;16"


def rgba_png() -> bytes:
    im = texture(0).convert("RGBA")
    im.putalpha(200)
    return encode(im)


def palette_png() -> bytes:
    return encode(texture(1).convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16))


def exif_rotated_jpeg(upright: Image.Image) -> bytes:
    """The upright image stored rotated, with EXIF orientation 6 (rotate 90° CW to display)."""
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=100, exif=exif.tobytes())
