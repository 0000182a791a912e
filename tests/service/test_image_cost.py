"""The second security review (issue 20), findings 1 and 2: images within the pixel limits whose
structure costs seconds, and work on the event loop in proportion to what a client sends.

Each probe is the review's, scaled down to the test server's 1 MiB upload limit; `contained`
checks the sender's bounds, /healthz within 100 ms and a bystander's 200 meanwhile. The
full-size requests are in bench/security.py.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from bench import probes
from bench.probes import BOUNDARY, exchange, request
from service.engine import imagescan
from service.errors import UnsupportedImage
from tests.service import images
from tests.service.conftest import Server, start_server
from tests.service.contained import contained

PNG = images.png()


def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def classify(server: Server, data: bytes, **settings) -> httpx.Response:
    with server.client() as c:
        return c.post("/classify", files={"image": ("x", data, "application/octet-stream")})


BOMBS = {  # name -> (image, code); each took 0.3-0.7 s of Pillow before the scan, a bystander waiting behind it
    "progressive JPEG, 5,000 empty scans": (lambda: probes.progressive_jpeg(scans=5000), "image_too_complex"),
    "JPEG, 50,000 APP markers": (lambda: probes.jpeg_app_markers(50_000), "image_too_complex"),
    "PNG, 50,000 empty ancillary chunks": (lambda: probes.png_chunks(50_000), "image_too_complex"),
    "TIFF, 6,000 chained IFDs": (lambda: probes.tiff_ifds(6000), "animated_image"),  # 2.4 s: quadratic
    "GIF, 100,000 empty extensions": (lambda: probes.gif_extensions(100_000), "image_too_complex"),
}


@pytest.mark.parametrize("name", BOMBS)
def test_a_decode_time_bomb_is_refused_by_the_structural_scan(server: Server, name: str) -> None:
    make, code = BOMBS[name]
    data = make()
    reply = contained(server, lambda: classify(server, data), seconds=1.0)
    assert reply.status_code == 415 and reply.json()["error"]["code"] == code, reply.text


def test_real_images_pass_the_structural_scan() -> None:
    """The limits leave room for what encoders write: every format, progressive, with metadata."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 896, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 1
    files = {
        "baseline JPEG with EXIF and a 200 KB ICC profile": images.encode(rgb, "JPEG", exif=exif.tobytes(),
                                                                          icc_profile=b"\0" * 200_000),
        "progressive JPEG": images.encode(rgb, "JPEG", progressive=True),
        "grey progressive JPEG": images.encode(rgb.convert("L"), "JPEG", progressive=True),
        "PNG": images.encode(rgb), "palette PNG": images.encode(rgb.convert("P")),
        "GIF": images.encode(rgb.convert("P"), "GIF"), "TIFF": images.encode(rgb, "TIFF"),
        "LZW TIFF": images.encode(rgb, "TIFF", compression="tiff_lzw"), "WebP": images.encode(rgb, "WEBP"),
        "lossless WebP": images.encode(rgb, "WEBP", lossless=True), "BMP": images.encode(rgb, "BMP"),
    }
    for name, data in files.items():
        layout = imagescan.scan(data)
        assert layout is not None and (layout.width, layout.height) == Image.open(io.BytesIO(data)).size, name
        assert imagescan.size_of(data) == layout, name


def test_the_scan_takes_any_bytes() -> None:
    """Cut and corrupted files: a layout, None (the decoder decides), or a client error; never a crash."""
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    files = [images.encode(rgb, fmt) for fmt in ("JPEG", "PNG", "GIF", "TIFF", "WEBP", "BMP")]
    files += [probes.progressive_jpeg(64, 3), probes.tiff_ifds(2), probes.rle_bmp(16), images.animated_gif()]
    for data in files:
        for cut in range(0, len(data), max(1, len(data) // 200)):
            mutated = bytearray(data)
            mutated[rng.integers(0, len(data))] = rng.integers(0, 256)
            for candidate in (data[:cut], bytes(mutated)):
                for walk in (imagescan.scan, imagescan.size_of):
                    with contextlib.suppress(UnsupportedImage):
                        walk(candidate)


def slow_webp(side: int, seed: int = 0) -> bytes:
    """Lossy WebP of noise: within the pixel limits, about 20 ms to decode at 512x512 (the toy model's limit)."""
    noise = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return images.encode(Image.fromarray(noise), "WEBP", quality=90)


def replaced(server: Server) -> bool:
    return "replacing it" in server.log.read_text()


def largest_side(server: Server) -> int:
    with server.client() as c:
        size = c.get("/models/toy").json()["input"]["size"]
    return math.isqrt(1024 * size * size)  # the default pixel ratio


@pytest.fixture(scope="module")
def roomy(toy_store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with the default settings (the shared one takes 1 MiB uploads, the default is 8 MiB)."""
    srv = start_server(toy_store, tmp_path_factory.mktemp("roomy"))
    yield srv
    srv.stop()


def test_an_image_the_scan_cannot_see_is_stopped_by_the_decode_budget(roomy: Server) -> None:
    """An RLE BMP of 2,000,000 no-op moves (8 MB): about 1.5 s of CPU in Pillow's Python RLE decoder,
    six times the default budget; before the budget it was answered 200 after 2 s."""
    data = probes.rle_bmp(64, noops=2_000_000)
    reply = contained(roomy, lambda: classify(roomy, data), seconds=1.5)
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "decode_too_slow", reply.text


def test_a_batch_holding_a_bomb_answers_the_others_and_the_watchdog_never_fires(make_server) -> None:
    """A 2 MB RLE BMP (about a second to decode) in one micro-batch with three good images: without the
    budget it holds the process past the 0.4 s watchdog, which replaces it and answers all four 503."""
    server = make_server(decode_timeout_ms=50, hang_timeout_s=0.4, max_batch_size=4, max_batch_delay_ms=500,
                         slo_ms=10_000)
    bomb = probes.rle_bmp(64, noops=500_000)
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda data: classify(server, data), [bomb, PNG, PNG, PNG]))
    assert [r.status_code for r in replies] == [413, 200, 200, 200], [r.text for r in replies]
    assert replies[0].json()["error"]["code"] == "decode_too_slow"
    assert not replaced(server), "the watchdog replaced the inference process"


def test_a_batch_of_slow_admissible_images_is_progress_not_a_hang(make_server) -> None:
    """24 images of 1024x1024 (about 80 ms each), decoded in one batch: past a 1 s watchdog together,
    each within the budget. The process says it is still decoding between rows, so none is taken for
    a hang (the watchdog's margin, 0.8 s, is for a machine busy with other work)."""
    server = make_server(hang_timeout_s=1.0, max_pixels_ratio=4096, max_batch_size=24, max_batch_delay_ms=500,
                         max_upload_bytes=16 * 1024 * 1024, slo_ms=10_000)  # an inference slot holds one upload's bytes
    slow = [slow_webp(1024)] * 24  # decoded once per row all the same
    with ThreadPoolExecutor(24) as pool:
        replies = list(pool.map(lambda data: classify(server, data), slow))
    assert [r.status_code for r in replies] == [200] * 24, [r.text for r in replies if r.status_code != 200]
    assert not replaced(server), "the watchdog replaced the inference process"


# ---- 2. nothing in proportion to the client's bytes on the event loop ----

def batch_body(parts: list[bytes]) -> bytes:
    return b"".join(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="x"\r\n\r\n'.encode()
                    + data + b"\r\n" for data in parts) + f"--{BOUNDARY}--\r\n".encode()


@pytest.mark.parametrize(("make", "code"), [
    (lambda: probes.png_chunks(35_000), "image_too_complex"),  # 420 KB each: the review sent two of 4 MB
    (lambda: probes.jpeg_app_markers(100_000), "image_too_complex"),
], ids=["PNGs of empty chunks", "JPEGs of APP markers"])
def test_a_batch_of_costly_headers_does_not_stall_the_loop(server: Server, make, code: str) -> None:
    """The request's pixel total used to open every header with Pillow on the event loop."""
    body = batch_body([make(), make()])
    payload = request("POST", "/classify/batch", {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}, body)
    reply = contained(server, lambda: exchange(port_of(server), payload), seconds=1.0)
    assert reply.status == 415 and code.encode() in reply.body, reply.body


def test_an_oip_body_of_empty_arrays_is_refused_unparsed(server: Server) -> None:
    """1 MB of empty arrays in an ignored parameter: orjson holds the GIL while it builds them."""
    body = probes.oip_json_bomb(1_000_000, PNG)
    payload = request("POST", "/v2/models/toy/infer", {"Content-Type": "application/json"}, body)
    reply = contained(server, lambda: exchange(port_of(server), payload), seconds=1.0)
    assert reply.status == 400 and b"JSON values" in reply.body, reply.body


def test_binary_oip_elements_are_counted_before_they_are_unpacked(roomy: Server) -> None:
    """The review's 2 million zero-length images (8 MB, under the default upload limit): unpacked on the
    event loop before the image count was checked, a 0.8 s stall."""
    server = roomy
    body, header = probes.oip_binary_elements(2_000_000)
    payload = request("POST", "/v2/models/toy/infer", {"Inference-Header-Content-Length": str(header)}, body)
    reply = contained(server, lambda: exchange(port_of(server), payload), seconds=1.0)
    assert reply.status == 422 and re.search(rb"at most \d+ images", reply.body), reply.body
