"""The security reviews' requests at their full sizes, against a live server on the shipped model:
issue 11's findings 1-4, then issue 20's seven classes. Each one's status, reply time, the server's
peak RSS growth and the slowest /healthz answered meanwhile, and where it matters what a bystander
got (a lone /classify sent behind it, from its own peer address). Also the worst case the image
limits still allow, measured.

    python -m bench.security                    # this checkout
    python -m bench.security --root OTHER_TREE  # another checkout of the project (the "before")
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import math
import os
import re
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import orjson
from PIL import Image

from bench.common import STORE, table
from bench.load import launch, server_port, stop
from bench.probes import (
    BOUNDARY,
    HealthWatch,
    black_png,
    encode,
    exchange,
    gif_extensions,
    jpeg_app_markers,
    long_boundary,
    long_field_name,
    long_header,
    oip_binary_elements,
    oip_json_bomb,
    peak_rss_growth,
    png_chunks,
    progressive_jpeg,
    request,
    rle_bmp,
    tiff_ifds,
)
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def batch_body(images: list[bytes], fmt: str) -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="x.{fmt}"\r\n'
             f"Content-Type: image/{fmt}\r\n\r\n".encode() + data + b"\r\n" for data in images]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def stalled_upload(port: int) -> None:
    """3: an upload that stops after 100 of 1,000 bytes, then the client goes away."""
    payload = request("POST", "/classify", {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
                      b"-" * 100, length=1000)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(payload)
        time.sleep(0.2)


def metric(url: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        head, _, value = line.rpartition(" ")
        if re.match(rf"{name}[{{ ]", line) and all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def probe_row(name: str, port: int, pid: int, payload: bytes) -> list[object]:
    url = f"http://127.0.0.1:{port}"
    with HealthWatch(url).watching() as health, peak_rss_growth(pid) as growth:
        reply = exchange(port, payload)
    return [name, reply.status or "closed", f"{reply.seconds:.3f}", f"{growth[0]:.0f}", f"{health.slowest * 1e3:.0f}",
            ""]


def image_row(name: str, port: int, pid: int, images: list[bytes], fmt: str, png: bytes) -> list[object]:
    """A batch of images, and a lone /classify sent 50 ms behind it (its latency in the last column)."""
    url = f"http://127.0.0.1:{port}"
    body = batch_body(images, fmt)
    payload = request("POST", "/classify/batch", {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}, body)
    lone: list[float] = []

    def send_lone() -> None:
        with httpx.Client(base_url=url, timeout=120) as client:  # made first: a client costs ~50 ms to make
            time.sleep(0.05)
            started = time.perf_counter()
            client.post("/classify", files={"image": ("x.png", png, "image/png")})
            lone.append(time.perf_counter() - started)

    thread = threading.Thread(target=send_lone)
    with peak_rss_growth(pid) as growth:
        thread.start()
        reply = exchange(port, payload, timeout=120)
        thread.join()
    return [name, reply.status or "closed", f"{reply.seconds:.3f}", f"{growth[0]:.0f}", "",
            f"lone /classify behind it: {lone[0] * 1e3:.0f} ms ({len(body) / 1e6:.2f} MB sent)"]


# ---- issue 20: the second review ----

BYSTANDER = "127.0.0.2"  # the bystander's and the health poll's peer address, apart from the probe's
MODEL = "fashion-mnist"


def bystander_client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=120, transport=httpx.HTTPTransport(local_address=BYSTANDER))


def watched_row(name: str, url: str, pid: int, send, png: bytes) -> list[object]:
    """Run `send() -> (status, note)` with /healthz polled and a lone /classify sent 50 ms in."""
    lone: list[str] = []

    def send_lone() -> None:
        with bystander_client(url) as client:
            time.sleep(0.05)
            started = time.perf_counter()
            try:
                status = client.post("/classify", files={"image": ("x.png", png, "image/png")}).status_code
            except httpx.TransportError:
                status = "closed"
            lone.append(f"{status} in {(time.perf_counter() - started) * 1e3:.0f} ms")

    thread = threading.Thread(target=send_lone)
    with HealthWatch(url, local_address=BYSTANDER).watching() as health, peak_rss_growth(pid) as growth:
        started = time.perf_counter()
        thread.start()
        status, note = send()
        seconds = time.perf_counter() - started
        thread.join()
    return [name, status, f"{seconds:.3f}", f"{growth[0]:.0f}", f"{health.slowest * 1e3:.0f}",
            f"bystander /classify: {lone[0]}" + (f"; {note}" if note else "")]


def post_image(url: str, data: bytes, path: str = "/classify", fmt: str = "x"):
    def send() -> tuple[object, str]:
        with httpx.Client(base_url=url, timeout=120) as client:
            if path == "/classify":
                reply = client.post(path, files={"image": (fmt, data, "application/octet-stream")})
            else:
                reply = client.post(path, files=[("image", (fmt, d, "application/octet-stream")) for d in data])
        code = reply.json().get("error", {}) if reply.status_code >= 400 else {}
        return reply.status_code, code.get("code", "") if isinstance(code, dict) else str(code)[:60]
    return send


def raw(port: int, payload: bytes, timeout: float = 30.0):
    def send() -> tuple[object, str]:
        reply = exchange(port, payload, timeout=timeout)
        return reply.status or "closed", f"{len(reply.body):,} bytes of body"
    return send


def oip(url: str, body: bytes, headers: dict[str, str | bytes] | None = None):
    def send() -> tuple[object, str]:
        with httpx.Client(base_url=url, timeout=120) as client:
            reply = client.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers or {})
        return reply.status_code, f"{len(reply.content):,} bytes back: {reply.content[:70]!r}"
    return send


def looping(url: str, data: bytes, seconds: float, png: bytes) -> list[object]:
    """One client sends `data` to /classify in a loop for `seconds`; a bystander sends /classify one
    after another meanwhile: what the bystander got."""
    stop = threading.Event()

    def loop() -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            while not stop.is_set():
                client.post("/classify", files={"image": ("x", data, "application/octet-stream")})

    thread = threading.Thread(target=loop)
    thread.start()
    statuses, times = [], []
    with bystander_client(url) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            statuses.append(client.post("/classify", files={"image": ("x.png", png, "image/png")}).status_code)
            times.append(time.perf_counter() - started)
            time.sleep(0.5)
    stop.set()
    thread.join()
    counts = ", ".join(f"{statuses.count(s)} x {s}" for s in sorted(set(statuses)))
    return [f"1: one client looping the 1 MB progressive JPEG for {seconds:.0f} s", "", "", "", "",
            f"bystander: {counts}, p50 {sorted(times)[len(times) // 2] * 1e3:.0f} ms"]


async def _flood(port: int, count: int, every: float | None, seconds: float) -> dict[object, int]:
    """`count` connections from 127.0.0.1: idle (`every` None) or each sending GET /healthz every `every` s."""
    outcomes: dict[object, int] = {}
    payload = request("GET", "/healthz", {})

    async def one() -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            outcomes["refused"] = outcomes.get("refused", 0) + 1
            return
        end = time.monotonic() + seconds
        try:
            if every is None:  # idle: held to the end, or closed by the server
                try:
                    closed = await asyncio.wait_for(reader.read(1), end - time.monotonic()) == b""
                except TimeoutError:
                    closed = False
                key = "closed by the server" if closed else "held"
                outcomes[key] = outcomes.get(key, 0) + 1
            while every is not None and time.monotonic() < end:  # kept alive: reconnects when closed, as a flood would
                try:
                    writer.write(payload)
                    head = await reader.readuntil(b"\r\n\r\n")
                    status = int(head.split(b" ")[1])
                    await reader.readexactly(int(re.search(rb"content-length: (\d+)", head.lower())[1]))
                    outcomes[status] = outcomes.get(status, 0) + 1
                    reopen = b"connection: close" in head.lower()
                except (OSError, asyncio.IncompleteReadError):
                    outcomes["closed"] = outcomes.get("closed", 0) + 1
                    reopen = True
                if reopen:
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                await asyncio.sleep(every)
        except OSError:
            outcomes["refused"] = outcomes.get("refused", 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(count)))
    return outcomes


def flood_row(name: str, url: str, port: int, count: int, every: float | None, seconds: float,
              png: bytes) -> list[object]:
    """A flood of connections from one address for `seconds`; a bystander from another sends /classify
    one after another from 1 s in: what it got."""
    result: list[dict[object, int]] = []
    thread = threading.Thread(target=lambda: result.append(asyncio.run(_flood(port, count, every, seconds))))
    thread.start()
    time.sleep(1.0)
    statuses, times = [], []
    deadline = time.monotonic() + seconds - 2
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            with bystander_client(url) as client:  # a new connection each time, as a new client would
                statuses.append(client.post("/classify", files={"image": ("x.png", png, "image/png")}).status_code)
        except httpx.TransportError:
            statuses.append("closed")
        times.append(time.perf_counter() - started)
        time.sleep(0.25)
    thread.join()
    counts = ", ".join(f"{statuses.count(s)} x {s}" for s in sorted(set(statuses), key=str))
    flood = ", ".join(f"{v} x {k}" for k, v in sorted(result[0].items(), key=lambda kv: str(kv[0])))
    return [name, "", "", "", "", f"bystander /classify: {counts} (p50 {sorted(times)[len(times) // 2] * 1e3:.0f} ms)"
            f"; the flood got {flood}"]


def pipelined(port: int) -> list[object]:
    good = request("GET", "/healthz", {})
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(good + b"GARBAGE / NOT-HTTP\r\n\r\n")
        data = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                data += chunk
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", data)
    return ["6: GET /healthz then a malformed request, pipelined", "", "", "", "",
            f"replies: {[int(s) for s in statuses]} ({len(data)} bytes)"]


def review_20(url: str, port: int, pid: int, png: bytes) -> list[list[object]]:
    b64 = base64.b64encode(png).decode()
    image = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}
    infer = request("POST", f"/v2/models/{MODEL}/infer", {"Content-Type": "application/json"},
                    orjson.dumps({"inputs": [image]}))
    rows = []
    for size, scans in (("100 KB", 10_000), ("400 KB", 40_000), ("1 MB", 100_000)):
        rows.append(watched_row(f"1: progressive JPEG 896x896, {size} of empty scans", url, pid,
                                post_image(url, progressive_jpeg(896, scans)), png))
    for count in (12_000, 30_000):
        rows.append(watched_row(f"1: TIFF of {count:,} chained IFDs", url, pid, post_image(url, tiff_ifds(count)), png))
    rows.append(watched_row("1: PNG, 4 MB of empty ancillary chunks", url, pid,
                            post_image(url, png_chunks(350_000)), png))
    rows.append(watched_row("1: GIF, 4 MB of empty comment extensions", url, pid,
                            post_image(url, gif_extensions(1_300_000)), png))
    rows.append(watched_row("1: RLE BMP 64x64, 8 MB of no-op moves (the scan cannot see it)", url, pid,
                            post_image(url, rle_bmp(64, 2_000_000)), png))
    rows.append(looping(url, progressive_jpeg(896, 100_000), 15.0, png))
    rows.append(watched_row("2: /classify/batch of two 4 MB PNGs of empty chunks", url, pid,
                            post_image(url, [png_chunks(340_000)] * 2, "/classify/batch"), png))
    rows.append(watched_row("2: /classify/batch of two JPEGs of a million APP markers", url, pid,
                            post_image(url, [jpeg_app_markers(1_000_000)] * 2, "/classify/batch"), png))
    rows.append(watched_row("2: OIP JSON of 8 MB, 2.7 M empty arrays in an ignored parameter", url, pid,
                            oip(url, oip_json_bomb(8_000_000, png)), png))
    body, header = oip_binary_elements(2_000_000)
    rows.append(watched_row("2: OIP binary body of 2 M zero-length BYTES elements", url, pid,
                            oip(url, body, {"Inference-Header-Content-Length": str(header)}), png))
    for name, parameters in (('"erde_top_k": "³"', {"erde_top_k": "³"}), ('"erde_top_k": 5,000 digits',
                                                                        {"erde_top_k": "9" * 5000})):
        rows.append(watched_row(f"3: OIP {name}", url, pid, oip(url, orjson.dumps({"parameters": parameters,
                                                                                   "inputs": [image]})), png))
    classification = {"inputs": [image], "outputs": [{"name": "probabilities", "parameters": {"classification": "²"}}]}
    rows.append(watched_row('3: OIP "classification": "²"', url, pid, oip(url, orjson.dumps(classification)), png))
    rows.append(watched_row("3: OIP Inference-Header-Content-Length: byte 0xB2", url, pid,
                            raw(port, infer.replace(b"Content-Type", b"Inference-Header-Content-Length: \xb2\r\n"
                                                                     b"Content-Type")), png))
    rows.append(flood_row("4: 1,050 idle sockets for 10 s", url, port, 1050, None, 10.0, png))
    rows.append(flood_row("4: 1,000 kept-alive sockets, GET /healthz every 4.5 s, for 15 s", url, port, 1000, 4.5,
                          15.0, png))
    rows.append(watched_row("5: OIP id of 7 MB", url, pid, oip(url, orjson.dumps({"id": "i" * 7_000_000,
                                                                                  "inputs": [image]})), png))
    rows.append(pipelined(port))
    host = request("GET", "/models", {}).replace(b"Host: 127.0.0.1", b"Host: localhost")
    for name, payload in (
            ("7: two Host headers (localhost, evil.com)", host.replace(b"\r\n\r\n", b"\r\nHost: evil.com\r\n\r\n")),
            ("7: Host [::1]evil.com", host.replace(b"Host: localhost", b"Host: [::1]evil.com")),
            ("7: Host [::1]@evil.com", host.replace(b"Host: localhost", b"Host: [::1]@evil.com")),
            ("7: Host localhost:abc", host.replace(b"Host: localhost", b"Host: localhost:abc")),
            ("7: GET http://evil.example/models (Host: localhost)", host.replace(b"GET /models",
                                                                                 b"GET http://evil.example/models")),
            ("7: a bare HTTP/0.9 line, GET /healthz", b"GET /healthz\r\n"),
            ("7: CONNECT localhost:443", b"CONNECT localhost:443 HTTP/1.1\r\nHost: localhost:443\r\n\r\n"),
            ("7: HEAD /healthz", request("HEAD", "/healthz", {"Connection": "close"})),
    ):
        rows.append(watched_row(name, url, pid, raw(port, payload, timeout=15.0), png))
    return rows


def review_11(url: str, port: int, pid: int, log: Path, png: bytes) -> list[list[object]]:
    settings = Settings()
    side = math.isqrt(settings.max_request_pixels // settings.max_batch_images)  # the worst batch still allowed
    rows = [
        probe_row("1: Content-Type boundary of 12,000,000 chars", port, pid, long_boundary(12_000_000)),
        probe_row("1: multipart field name of 7,900,000 chars", port, pid, long_field_name(7_900_000)),
        probe_row("2: GET /healthz with a 100 MB header", port, pid, long_header(100_000_000)),
    ]
    before = {k: metric(url, "erde_requests_total", code=k) for k in ("500", "499")}
    errors = metric(url, "erde_rejected_total", reason="error")
    lines = len(log.read_text().splitlines())
    started = time.perf_counter()
    for _ in range(10):
        stalled_upload(port)
    time.sleep(1.0)  # the accounting is written just after the reply
    tracebacks = sum("Traceback" in line for line in log.read_text().splitlines()[lines:])
    codes = {k: metric(url, "erde_requests_total", code=k) - v for k, v in before.items()}
    rows.append(["3: ten uploads that stop after 100 of 1,000 bytes", "", f"{time.perf_counter() - started:.3f}",
                 "", "", f"500s: {codes['500']:.0f}, 499s: {codes['499']:.0f}, rejected error: "
                         f"{metric(url, 'erde_rejected_total', reason='error') - errors:.0f}, "
                         f"tracebacks: {tracebacks}"])
    rows.append(image_row("4: 64 black 4000x4000 PNGs in one /classify/batch", port, pid,
                          [black_png(4000)] * 64, "png", png))
    webp = encode(Image.new("L", (side, side)), "WEBP", lossless=True)
    rows.append(image_row(f"4: 64 black {side}x{side} lossless WebPs (the worst batch the limits allow)",
                          port, pid, [webp] * 64, "webp", png))
    big_webp = encode(Image.new("L", (4000, 4000)), "WEBP", lossless=True)
    rows.append(image_row("4: 64 black 4000x4000 lossless WebPs", port, pid, [big_webp] * 64, "webp", png))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose service to run")
    parser.add_argument("--review", choices=["11", "20", "all"], default="all", help="whose probes to send")
    args = parser.parse_args()
    port, log = server_port(), Path(tempfile.mkdtemp(prefix="erde-security-")) / "server.log"
    env = {**os.environ, "ERDE_STORE": str(STORE.resolve()), "ERDE_HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1"}
    cmd = ["bash", "-c", f'cd "{args.root}" && exec "{sys.executable}" -m service']
    proc, _ = launch(cmd, port, env, log, 120)
    url = f"http://127.0.0.1:{port}"
    png = encode(Image.new("L", (28, 28), 128), "PNG")
    columns = ["request", "status", "reply s", "peak RSS +MB", "slowest /healthz ms", "note"]
    try:
        first = review_11(url, port, proc.pid, log, png) if args.review in ("11", "all") else None
        second = review_20(url, port, proc.pid, png) if args.review in ("20", "all") else None
    finally:
        stop(proc)
    if first is not None:
        print(f"# Security probes (issue 11), server from {args.root}, shipped model, one server process\n")
        print(table(columns, first))
    if second is not None:
        print(f"\n# The second review's probes (issue 20), server from {args.root}, shipped model, one server "
              "process\n")
        print(table(columns, second))


if __name__ == "__main__":
    main()
