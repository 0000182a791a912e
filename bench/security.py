"""The security review's requests (issue 11, findings 1-4) at their full sizes, against a live
server on the shipped model: each one's status, reply time, the server's peak RSS growth and the
slowest /healthz answered meanwhile, and for the image findings the latency of a lone /classify
sent behind them. Also the worst case the image limits still allow, measured.

    python -m bench.security                    # this checkout
    python -m bench.security --root OTHER_TREE  # another checkout of the project (the "before")
"""

from __future__ import annotations

import argparse
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
from PIL import Image

from bench.common import STORE, table
from bench.load import launch, server_port, stop
from bench.probes import (
    BOUNDARY,
    HealthWatch,
    black_png,
    encode,
    exchange,
    long_boundary,
    long_field_name,
    long_header,
    peak_rss_growth,
    request,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose service to run")
    args = parser.parse_args()
    port, log = server_port(), Path(tempfile.mkdtemp(prefix="erde-security-")) / "server.log"
    env = {**os.environ, "ERDE_STORE": str(STORE.resolve()), "ERDE_HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1"}
    cmd = ["bash", "-c", f'cd "{args.root}" && exec "{sys.executable}" -m service']
    proc, _ = launch(cmd, port, env, log, 120)
    url = f"http://127.0.0.1:{port}"
    settings = Settings()
    side = math.isqrt(settings.max_request_pixels // settings.max_batch_images)  # the worst batch still allowed
    png = encode(Image.new("L", (28, 28), 128), "PNG")
    try:
        rows = [
            probe_row("1: Content-Type boundary of 12,000,000 chars", port, proc.pid, long_boundary(12_000_000)),
            probe_row("1: multipart field name of 7,900,000 chars", port, proc.pid, long_field_name(7_900_000)),
            probe_row("2: GET /healthz with a 100 MB header", port, proc.pid, long_header(100_000_000)),
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
        rows.append(image_row("4: 64 black 4000x4000 PNGs in one /classify/batch", port, proc.pid,
                              [black_png(4000)] * 64, "png", png))
        webp = encode(Image.new("L", (side, side)), "WEBP", lossless=True)
        rows.append(image_row(f"4: 64 black {side}x{side} lossless WebPs (the worst batch the limits allow)",
                              port, proc.pid, [webp] * 64, "webp", png))
        big_webp = encode(Image.new("L", (4000, 4000)), "WEBP", lossless=True)
        rows.append(image_row("4: 64 black 4000x4000 lossless WebPs", port, proc.pid, [big_webp] * 64, "webp", png))
    finally:
        stop(proc)
    print(f"# Security probes (issue 11), server from {args.root}, shipped model, one server process\n")
    print(table(["request", "status", "reply s", "peak RSS +MB", "slowest /healthz ms", "note"], rows))


if __name__ == "__main__":
    main()
