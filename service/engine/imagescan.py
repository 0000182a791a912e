"""A structural pre-scan of an encoded image, read from its bytes without decoding anything.

The pixel limits bound the work of decoding the pixels, not of walking a file's structure, and
some structures cost far more than their pixels: a progressive JPEG's decoder passes over every
block once per scan (about 48 µs a scan at 896x896, so a 1 MB file of empty scans took seconds),
Pillow reads a PNG chunk or a JPEG marker in Python (2.5 µs each: a 4 MB file of empty chunks is
1.5 s), and counting a TIFF's frames walks its IFD chain once per frame (quadratic). So before
Pillow sees an image, its structure is counted here against limits that follow from what a real
image of the model's input needs, with room to spare:

- JPEG: 64 scans (libjpeg's progressive script has 10 for colour, 6 for grey) and 256 markers,
  restart markers not counted (a photo has a dozen: APPn, DQT, SOF, DHT, SOS, EOI; a large ICC
  profile or XMP packet splits into a few APPn more).
- PNG: 64 chunks besides IDAT (IHDR, PLTE, tRNS, gAMA, iCCP, eXIf and a few tEXt are about ten),
  and 64 IDAT chunks plus one per KiB of file (encoders write 8 KiB, libpng, or 64 KiB, Pillow).
- GIF: one frame (more is `animated_image`), 64 extension blocks (a still GIF has one or two),
  and 64 data sub-blocks plus one per 128 bytes of file (encoders fill them to 255 bytes).
- TIFF: one IFD in the main chain (more is `animated_image`), 512 entries in it (a TIFF has 10-40
  tags), 4096 strips or tiles (896x896 in 8 KiB strips is 300).
- WebP: no animation flag (`animated_image`), 64 RIFF chunks (VP8X, ICCP, EXIF, XMP, the image).

The walk stops at the first limit it passes. `size_of` walks only to the image's size (at most
the markers, chunks or entries above, whatever the file's size): cheap enough for the event loop,
where the request's pixel total is checked. `scan` walks everything, in the inference process
before decoding; what grows there with the file is the search for a JPEG's markers through its
entropy-coded data, in C (about 5 ms per MB at worst). BMP is read for its size
only; what the scan cannot see is bounded by the decode-time budget (service/engine/decode.py).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from service.errors import UnsupportedImage

JPEG_MAX_SCANS = 64
JPEG_MAX_MARKERS = 256
PNG_MAX_CHUNKS = 64  # besides IDAT
PNG_IDAT_PER_KIB = 1  # IDAT chunks allowed per KiB of file, on top of PNG_MAX_CHUNKS
GIF_MAX_EXTENSIONS = 64
GIF_BYTES_PER_SUBBLOCK = 128  # sub-blocks allowed: 64 plus one per this many bytes of file
TIFF_MAX_ENTRIES = 512
TIFF_MAX_STRIPS = 4096
WEBP_MAX_CHUNKS = 64

# A marker: 0xFF then a code that is neither stuffing (0x00), fill (0xFF: the match starts at the run's
# last byte), nor a restart marker (RSTn sit inside entropy-coded data). No repetition: linear, no backtracking.
_JPEG_MARKER = re.compile(rb"\xff([^\x00\xff\xd0-\xd7])")
_STANDALONE = frozenset({0xD8, 0xD9, 0x01})  # SOI, EOI, TEM: no length field
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start of frame (DHT, JPG and DAC share the range)


@dataclass(frozen=True)
class Layout:
    format: str
    width: int
    height: int


def too_complex(what: str) -> UnsupportedImage:
    return UnsupportedImage(f"the image's structure is more than a still image needs: {what}",
                            code="image_too_complex")


def size_of(data: bytes) -> Layout | None:
    """The image's format and size from its header, or None for a file the scan does not know (the
    decoder decides about it). Raises on a structure past the limits met on the way to the size."""
    return _walk(data, full=False)


def scan(data: bytes) -> Layout | None:
    """`size_of`, after walking the whole structure against the limits (the module's table)."""
    return _walk(data, full=True)


def _walk(data: bytes, full: bool) -> Layout | None:
    try:
        if data.startswith(b"\xff\xd8\xff"):
            return _jpeg(data, full)
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            return _png(data, full)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return _gif(data, full)
        if data[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
            return _tiff(data)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp(data)
        if data[:2] == b"BM":
            return _bmp(data)
    except (struct.error, IndexError):  # cut short: the decoder gives its own error
        return None
    return None


def _jpeg(data: bytes, full: bool) -> Layout | None:
    size, markers, scans, pos = None, 0, 0, 2
    while (match := _JPEG_MARKER.search(data, pos)) is not None:
        code, pos = match[1][0], match.end()
        markers += 1
        if markers > JPEG_MAX_MARKERS:
            raise too_complex(f"a JPEG with more than {JPEG_MAX_MARKERS} markers")
        if code == 0xD9:
            break
        if code in _STANDALONE:
            continue
        (length,) = struct.unpack_from(">H", data, pos)
        if code in _SOF and size is None:
            height, width = struct.unpack_from(">HH", data, pos + 3)
            size = Layout("JPEG", width, height)
            if not full:
                return size
        elif code == 0xDA:
            scans += 1
            if scans > JPEG_MAX_SCANS:
                raise too_complex(f"a JPEG with more than {JPEG_MAX_SCANS} scans")
        pos += length  # the next search skips a scan's entropy-coded data
    return size


def _png(data: bytes, full: bool) -> Layout | None:
    length, kind = struct.unpack_from(">I4s", data, 8)
    if kind != b"IHDR":
        return None
    size = Layout("PNG", *struct.unpack_from(">II", data, 16))
    if not full:
        return size
    others, idats, pos = 0, 0, 8
    max_idats = PNG_MAX_CHUNKS + PNG_IDAT_PER_KIB * len(data) // 1024
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IDAT":
            idats += 1
            if idats > max_idats:
                raise too_complex(f"a PNG with more than {max_idats} IDAT chunks")
        else:
            others += 1
            if others > PNG_MAX_CHUNKS:
                raise too_complex(f"a PNG with more than {PNG_MAX_CHUNKS} chunks besides IDAT")
            if kind == b"IEND":
                break
        pos += 12 + length
    return size


def _gif(data: bytes, full: bool) -> Layout | None:
    width, height, flags = struct.unpack_from("<HHB", data, 6)
    size = Layout("GIF", width, height)
    if not full:
        return size
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global colour table
    frames = extensions = blocks = 0
    max_blocks = GIF_MAX_EXTENSIONS + len(data) // GIF_BYTES_PER_SUBBLOCK
    while pos < len(data):
        introducer = data[pos]
        if introducer == 0x3B:  # trailer
            break
        if introducer == 0x21:
            extensions += 1
            if extensions > GIF_MAX_EXTENSIONS:
                raise too_complex(f"a GIF with more than {GIF_MAX_EXTENSIONS} extension blocks")
            pos += 2  # introducer, label
        elif introducer == 0x2C:
            frames += 1
            if frames > 1:
                raise UnsupportedImage("animated or multi-frame images are not supported; send a single frame",
                                       code="animated_image")
            left, top, w, h, local = struct.unpack_from("<HHHHB", data, pos + 1)
            size = Layout("GIF", max(size.width, left + w), max(size.height, top + h))
            pos += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1  # descriptor, colour table, LZW size
        else:
            return size  # not a block: the decoder says what is wrong
        while pos < len(data) and (count := data[pos]) != 0:  # data sub-blocks, until the empty one
            blocks += 1
            if blocks > max_blocks:
                raise too_complex(f"a GIF with more than {max_blocks} data sub-blocks")
            pos += 1 + count
        pos += 1
    return size


def _tiff(data: bytes) -> Layout | None:
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\0", b"\0+")  # BigTIFF: 8-byte counts and offsets
    word = order + ("Q" if big else "I")
    (offset,) = struct.unpack_from(word, data, 8 if big else 4)
    (entries,) = struct.unpack_from(order + ("Q" if big else "H"), data, offset)
    if entries > TIFF_MAX_ENTRIES:
        raise too_complex(f"a TIFF IFD with more than {TIFF_MAX_ENTRIES} entries")
    first, entry_size = offset + (8 if big else 2), 20 if big else 12
    sides: dict[int, int] = {}
    for entry in range(first, first + entries * entry_size, entry_size):
        tag, kind = struct.unpack_from(order + "HH", data, entry)
        (count,) = struct.unpack_from(word, data, entry + 4)
        if tag in (273, 324) and count > TIFF_MAX_STRIPS:  # StripOffsets, TileOffsets
            raise too_complex(f"a TIFF with more than {TIFF_MAX_STRIPS} strips or tiles")
        if tag in (256, 257) and kind in (3, 4):  # ImageWidth, ImageLength: a SHORT or LONG in the entry
            sides[tag] = struct.unpack_from(order + ("H" if kind == 3 else "I"), data, entry + (12 if big else 8))[0]
    (following,) = struct.unpack_from(word, data, first + entries * entry_size)
    if following:
        raise UnsupportedImage("animated or multi-frame images are not supported; send a single frame",
                               code="animated_image")
    return Layout("TIFF", sides[256], sides[257]) if len(sides) == 2 else None


def _webp(data: bytes) -> Layout | None:
    size, chunks, pos = None, 0, 12
    while pos + 8 <= len(data):
        kind, length = struct.unpack_from("<4sI", data, pos)
        chunks += 1
        if chunks > WEBP_MAX_CHUNKS:
            raise too_complex(f"a WebP with more than {WEBP_MAX_CHUNKS} chunks")
        body = pos + 8
        if kind == b"VP8X":
            if data[body] & 0x02:
                raise UnsupportedImage("animated or multi-frame images are not supported; send a single frame",
                                       code="animated_image")
            width = int.from_bytes(data[body + 4:body + 7], "little") + 1
            height = int.from_bytes(data[body + 7:body + 10], "little") + 1
            size = size or Layout("WEBP", width, height)
        elif kind == b"VP8L" and size is None:
            (bits,) = struct.unpack_from("<I", data, body + 1)
            size = Layout("WEBP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        elif kind == b"VP8 " and size is None:
            width, height = struct.unpack_from("<HH", data, body + 6)
            size = Layout("WEBP", width & 0x3FFF, height & 0x3FFF)
        pos = body + length + (length & 1)  # chunks are padded to an even length
    return size


def _bmp(data: bytes) -> Layout | None:
    (header,) = struct.unpack_from("<I", data, 14)
    if header == 12:  # OS/2 BITMAPCOREHEADER
        return Layout("BMP", *struct.unpack_from("<HH", data, 18))
    width, height = struct.unpack_from("<ii", data, 18)
    return Layout("BMP", abs(width), abs(height))
