"""The failures issue 10 measured, measured again on the shipped model (its "after" column):

1. the inference process frozen (SIGSTOP) for 8 s under load at c=32, clients with a 6 s timeout:
   requests lost (no reply in time), replies by status, what /readyz said meanwhile;
2. ERDE_WORKERS=2: seconds from SIGHUP (after a new version landed) until every reply is the new
   version; then SIGTERM under load at c=32: requests without a reply;
3. 900 connections that send headers and 4 bytes of a 100 kB body: how many are still open 2 s
   after the read timeout.

The retry storm (the fourth failure) is bench/collapse.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.common import STORE, default_artifact, sample_images, table
from bench.load import launch, server_port, stop

CLIENTS = 32
READ_TIMEOUT_S = 3


class Load:
    """`CLIENTS` threads posting real images in a closed loop; every outcome is counted."""

    def __init__(self, url: str, png: bytes, timeout: float) -> None:
        self.url, self.png, self.timeout = url, png, timeout
        self.outcomes: Counter[str] = Counter()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(CLIENTS)]

    def client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout) as client:
            while not self.stop.is_set():
                try:
                    reply = client.post("/classify", files={"image": ("a.png", self.png, "image/png")})
                    outcome = str(reply.status_code)
                except httpx.ConnectError:
                    time.sleep(0.05)
                    continue
                except httpx.HTTPError as exc:
                    outcome = f"lost ({type(exc).__name__})"
                with self.lock:
                    self.outcomes[outcome] += 1
                if outcome == "503":
                    time.sleep(0.2)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(self.timeout + 5)

    def snapshot(self) -> Counter[str]:
        with self.lock:
            return Counter(self.outcomes)


def frozen(tmp: Path, env: dict[str, str], png: bytes) -> list[list[object]]:
    port = server_port()
    proc, _ = launch([sys.executable, "-m", "service"], port, env, tmp / "frozen.log", 60)
    url = f"http://127.0.0.1:{port}"
    try:
        pid = int(re.findall(r"inference process (\d+) serves", (tmp / "frozen.log").read_text())[0])
        with Load(url, png, timeout=6.0) as load:
            time.sleep(2)
            before = load.snapshot()
            os.kill(pid, signal.SIGSTOP)
            ready: Counter[int] = Counter()
            until = time.monotonic() + 8
            while time.monotonic() < until:
                ready[httpx.get(f"{url}/readyz", timeout=6).status_code] += 1
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):  # the watchdog replaced it
                os.kill(pid, signal.SIGCONT)
            time.sleep(7)  # every request sent during the freeze has had its 6 s
            during = load.snapshot() - before
    finally:
        stop(proc)
    return [["frozen 8 s, c=32, 6 s client timeout", _fmt(during),
             ", ".join(f"{k}: {v}" for k, v in sorted(ready.items()))]]


def workers(tmp: Path, env: dict[str, str], png: bytes) -> list[list[object]]:
    store = tmp / "store"
    art = default_artifact()
    for version in ("1", "2"):  # the shipped artifact, as version 1 now and as a new version 2 later
        shutil.copytree(STORE / art.name / art.version, tmp / "versions" / version)
        manifest = tmp / "versions" / version / "manifest.json"
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": version}))
    shutil.copytree(tmp / "versions" / "1", store / art.name / "1")
    port = server_port()
    proc, _ = launch([sys.executable, "-m", "service"], port, {**env, "ERDE_STORE": str(store), "ERDE_WORKERS": "2"},
                     tmp / "workers.log", 120)
    url = f"http://127.0.0.1:{port}"
    rows: list[list[object]] = []
    try:
        shutil.copytree(tmp / "versions" / "2", store / art.name / "2")
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGHUP)
        swapped = None
        while time.monotonic() - started < 60:
            versions = {httpx.post(f"{url}/classify", files={"image": ("a.png", png, "image/png")},
                                   timeout=10).json().get("version") for _ in range(8)}
            if versions == {"2"}:
                swapped = time.monotonic() - started
                break
        rows.append(["2 workers: SIGHUP after version 2 landed",
                     f"every reply version 2 after {swapped:.1f} s" if swapped else "still version 1 after 60 s", ""])
        with Load(url, png, timeout=30.0) as load:
            time.sleep(2)
            before = load.snapshot()
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(60)
            time.sleep(1)
            rows.append(["2 workers: SIGTERM under load, c=32", _fmt(load.snapshot() - before), ""])
    finally:
        stop(proc)
    return rows


def stalled_uploads(tmp: Path, env: dict[str, str]) -> list[list[object]]:
    port = server_port()
    proc, _ = launch([sys.executable, "-m", "service"], port, {**env, "ERDE_READ_TIMEOUT_S": str(READ_TIMEOUT_S)},
                     tmp / "stalled.log", 60)
    head = (f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            f"Content-Length: 100000\r\n\r\n--x\r").encode()
    socks = []
    try:
        for _ in range(900):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(head)
            socks.append(s)
        time.sleep(READ_TIMEOUT_S + 2)
        still_open = statuses = 0
        for s in socks:
            s.settimeout(0.01)
            try:
                data = s.recv(65536)
                statuses += data.startswith(b"HTTP/1.1 408")
                s.settimeout(0.5)
                while data:
                    data = s.recv(65536)  # the reply, then the close
            except TimeoutError:
                still_open += 1
            except OSError:
                pass
    finally:
        for s in socks:
            s.close()
        stop(proc)
    closed = f"{900 - still_open} closed ({statuses} with 408)"
    return [[f"900 stalled uploads, {READ_TIMEOUT_S} s read timeout",
             f"{closed}, {still_open} still open {READ_TIMEOUT_S + 2} s later", ""]]


def _fmt(outcomes: Counter[str]) -> str:
    lost = sum(v for k, v in outcomes.items() if k.startswith("lost"))
    return f"{lost} lost; " + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()))


def main() -> None:
    art = default_artifact()
    tmp = Path(tempfile.mkdtemp(prefix="erde-faults-"))
    buf = io.BytesIO()
    sample_images(1, art.spec.size)[0].save(buf, "PNG")
    png = buf.getvalue()
    env = {**os.environ, "ERDE_STORE": str(STORE), "ERDE_DEFAULT_MODEL": art.name, "ERDE_HOST": "127.0.0.1",
           "ERDE_ACCESS_LOG": "false"}
    rows = frozen(tmp, env, png) + workers(tmp, env, png) + stalled_uploads(tmp, env)
    print(f"# Faults under load: {art.name}/{art.version} (issue 10's measurements, after)\n")
    print(table(["fault", "requests and replies", "/readyz meanwhile"], rows))


if __name__ == "__main__":
    main()
