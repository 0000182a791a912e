"""The requests of the security review (issue 11), and what bounds each one's cost: raw HTTP
exchanges that can send what no HTTP client library would, the server's peak RSS growth during a
probe, and the slowest /healthz answered meanwhile. Used by bench/security.py at the review's
full sizes and by tests/service/test_security.py, scaled down where a test must stay fast.
"""

from __future__ import annotations

import base64
import io
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
from PIL import Image

BOUNDARY = "probe"


@dataclass
class Reply:
    status: int | None  # None: the server closed the connection without a reply
    seconds: float  # from the first byte sent to the reply's head (or the close)
    head: bytes = b""  # status line and headers
    body: bytes = b""
    closed: bool = False  # the server closed the connection after the reply


def exchange(port: int, payload: bytes, *, timeout: float = 60.0, linger: float = 0.0) -> Reply:
    """Send `payload` (from a thread, so a server that answers early is heard) and read one reply;
    `linger` > 0: keep the connection open that long after sending (a client that stalls)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def send() -> None:
        with suppress(OSError):
            sock.sendall(payload)

    sender = threading.Thread(target=send, daemon=True)
    started = time.perf_counter()
    sender.start()
    data, seconds = b"", None
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        seconds = time.perf_counter() - started
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        # A reply that keeps the connection open would block this read until the keep-alive timeout.
        closed = b"connection: close" in head.lower() and sock.recv(1) == b""
    except OSError:  # reset: the server closed with our bytes unread
        seconds = seconds or time.perf_counter() - started
        head, body, closed = data.partition(b"\r\n\r\n")[0], b"", True
    finally:
        sock.close()
        sender.join(timeout)
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else None
    return Reply(status, seconds, head, body, closed)


def request(method: str, path: str, headers: dict[str, str], body: bytes = b"", length: int | None = None) -> bytes:
    """One HTTP/1.1 request; `length`: the Content-Length to declare, when not the body's (a stalled upload)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    if body or length is not None or method == "POST":
        lines.append(f"Content-Length: {len(body) if length is None else length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# ---- the review's requests, by finding ----

def long_boundary(chars: int) -> bytes:
    """1: `boundary="bbb…"` of `chars` characters in the Content-Type header, and a 4-byte body."""
    return request("POST", "/classify", {"Content-Type": f'multipart/form-data; boundary="{"b" * chars}"'}, b"abcd")


def long_field_name(chars: int) -> bytes:
    """1: a multipart part whose `name="…"` has `chars` characters, in the body."""
    body = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{"n" * chars}"\r\n\r\n1\r\n'
            f"--{BOUNDARY}--\r\n").encode()
    return request("POST", "/classify", {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}, body)


def long_header(size: int) -> bytes:
    """2: GET /healthz with one `X:` header of `size` bytes."""
    return request("GET", "/healthz", {"X": "x" * size})


def black_png(side: int) -> bytes:
    """4: an all-black PNG, tiny on the wire (15.6 KB at 4000x4000) and costly to decode."""
    return encode(Image.new("L", (side, side)), "PNG")


def encode(im: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


# ---- what a probe costs the server ----

def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no {field_name} for {pid}")


@contextmanager
def peak_rss_growth(pid: int) -> Iterator[list[float]]:
    """Yields a list that holds, afterwards, how far the process's peak RSS rose above its RSS at
    the start (MB). Resets the kernel's peak first (clear_refs 5), so earlier peaks do not count."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = rss_mb(pid)
    growth: list[float] = []
    yield growth
    growth.append(rss_mb(pid, "VmHWM") - before)


@dataclass
class HealthWatch:
    """Polls /healthz on its own connection while a probe runs: the slowest answer, in seconds."""

    url: str
    local_address: str | None = None  # the source address to poll from (a peer apart from the probe's)
    slowest: float = 0.0
    answered: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        transport = httpx.HTTPTransport(local_address=self.local_address)
        with httpx.Client(base_url=self.url, timeout=30, transport=transport) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                with suppress(httpx.TransportError):  # a failed poll counts as slow, never as answered
                    if client.get("/healthz").status_code == 200:
                        self.answered += 1
                self.slowest = max(self.slowest, time.perf_counter() - started)
                time.sleep(0.005)

    @contextmanager
    def watching(self) -> Iterator[HealthWatch]:
        """Polling from before the probe (one answer first) to after it (one more answer)."""
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        self._wait_for(1)
        try:
            yield self
        finally:
            self._wait_for(self.answered + 1)
            self._stop.set()
            thread.join(30)

    def _wait_for(self, answers: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.answered < answers and time.monotonic() < deadline:
            time.sleep(0.002)


# ---- the second review's images (issue 20): within the pixel limits, costly in their structure ----

def _segments(jpeg: bytes) -> list[tuple[int, bytes]]:
    """A JPEG's marker segments in order (a scan's entropy-coded data stays with its SOS), without EOI."""
    segments, pos = [], 2
    while jpeg[pos + 1] != 0xD9:
        code, length = jpeg[pos + 1], struct.unpack_from(">H", jpeg, pos + 2)[0]
        end = pos + 2 + length
        if code == 0xDA:
            end = re.compile(rb"\xff[^\x00\xd0-\xd7]").search(jpeg, end).start()
        segments.append((code, jpeg[pos:end]))
        pos = end
    return segments


def progressive_jpeg(side: int = 896, scans: int = 0) -> bytes:
    """A grey progressive JPEG with `scans` empty scans appended (a copy of its last scan's header,
    with no data): each costs libjpeg a pass over every block (about 50 µs at 896x896)."""
    jpeg = encode(Image.new("L", (side, side), 128), "JPEG", progressive=True)
    last = [segment for code, segment in _segments(jpeg) if code == 0xDA][-1]
    header = last[:2 + struct.unpack_from(">H", last, 2)[0]]
    return jpeg[:-2] + header * scans + b"\xff\xd9"


def jpeg_app_markers(count: int, side: int = 64) -> bytes:
    """A baseline JPEG with `count` empty APP1 segments after SOI (Pillow reads each in Python)."""
    jpeg = encode(Image.new("L", (side, side), 128), "JPEG")
    return jpeg[:2] + b"\xff\xe1\x00\x02" * count + jpeg[2:]


def _png_chunk(kind: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_chunks(count: int, side: int = 64) -> bytes:
    """A PNG with `count` empty ancillary chunks before its image data."""
    png = encode(Image.new("L", (side, side), 128), "PNG")
    return png[:33] + _png_chunk(b"teXt") * count + png[33:]  # after the signature and IHDR


def tiff_ifds(count: int, side: int = 64) -> bytes:
    """A little-endian TIFF whose image is described by `count` chained IFDs (Pillow counts the frames
    by walking the chain from its start for each one: quadratic)."""
    pixels = bytes(side * side)
    entries = [(256, 3, 1, side), (257, 3, 1, side), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 3, 1, side), (279, 4, 1, len(pixels))]
    ifd_size = 2 + 12 * len(entries) + 4
    first = 8 + len(pixels)
    ifds = []
    for index in range(count):
        following = first + (index + 1) * ifd_size if index + 1 < count else 0
        ifds.append(struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries)
                    + struct.pack("<I", following))
    return b"II*\0" + struct.pack("<I", first) + pixels + b"".join(ifds)


def gif_extensions(count: int, side: int = 64) -> bytes:
    """A still GIF with `count` empty comment extensions before its image."""
    gif = encode(Image.new("L", (side, side), 128), "GIF")
    start = 13 + (3 << ((gif[10] & 7) + 1) if gif[10] & 0x80 else 0)
    return gif[:start] + b"\x21\xfe\x00" * count + gif[start:]


def oip_json_bomb(size: int, image: bytes) -> bytes:
    """An OIP infer body of about `size` bytes whose ignored `parameters` hold empty arrays."""
    arrays = ",".join(["[]"] * (size // 3))
    return (f'{{"parameters": {{"ignored": [{arrays}]}}, "inputs": [{{"name": "image", "datatype": "BYTES", '
            f'"shape": [1], "data": ["{base64.b64encode(image).decode()}"]}}]}}').encode()


def oip_binary_elements(count: int) -> tuple[bytes, int]:
    """An OIP infer body declaring `count` images in binary form, each zero bytes long; and its JSON length."""
    header = orjson.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [count],
                                       "parameters": {"binary_data_size": 4 * count}}]})
    return header + bytes(4 * count), len(header)


def rle_bmp(side: int, noops: int = 0) -> bytes:
    """An 8-bit RLE BMP of side x side, runs of one pixel each, after `noops` moves by (0, 0): Pillow
    decodes RLE in Python, an instruction at a time (about 1 µs each), and the structural scan reads a
    BMP's size only, so only the decode-time budget stops this."""
    row = b"\x01\x07" * side + b"\x00\x00"  # runs of one pixel of colour 7, then end of line
    data = b"\x00\x02\x00\x00" * noops + row * side + b"\x00\x01"  # delta moves, the rows, end of bitmap
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 8, 1, len(data), 2835, 2835, 256, 0)  # BI_RLE8
    return b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset) + info + palette + data
