"""HTTP throughput and latency over loopback, with wrk (one client thread) as the load generator.

For concurrency 1, 16 and 64: the service at budgets 1.0 and 0.25, and the transport floor (the
same app stack and multipart parsing answering a constant). Each run is bounded in time and in
requests; the uploads are real Fashion-MNIST test images encoded as PNG, cycled.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import STORE, default_artifact, sample_images, table

BOUNDARY = "erdebenchboundary"
CONCURRENCY = (1, 16, 64)
SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
MAX_REQUESTS = int(os.environ.get("BENCH_MAX_REQUESTS", "200000"))
LUA = """
local bodies, n, sent, done, max = {}, 0, 0, 0, %(max)d
for line in io.lines("%(list)s") do
  local f = io.open(line, "rb"); n = n + 1; bodies[n] = f:read("*all"); f:close()
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=%(boundary)s"
request = function()
  sent = sent + 1
  return wrk.format(nil, "%(path)s", nil, bodies[(sent %% n) + 1])
end
response = function(status, headers, body)
  done = done + 1
  if done >= max then wrk.thread:stop() end
end
"""


def multipart(png: bytes, fields: dict[str, str]) -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode() + png + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server did not start: {log.read_text()[-2000:]}")


def wrk(port: int, script: Path, concurrency: int) -> dict[str, float]:
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{SECONDS}s", "--latency", "-s", str(script),
                          f"http://127.0.0.1:{port}"], capture_output=True, text=True, check=True).stdout
    def latency_ms(label: str) -> float:
        value, unit = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": latency_ms("50"),
            "p99": latency_ms("99"), "errors": int(errors.group(1)) if errors else 0}


def write_bodies(folder: Path, fields: dict[str, str], size: int) -> Path:
    paths = []
    for i, im in enumerate(sample_images(64, size)):
        buf = io.BytesIO()
        im.save(buf, "PNG")
        path = folder / f"body-{'-'.join(fields.values()) or 'none'}-{i}.bin"
        path.write_bytes(multipart(buf.getvalue(), fields))
        paths.append(str(path))
    listing = folder / f"bodies-{'-'.join(fields.values()) or 'none'}.txt"
    listing.write_text("\n".join(paths) + "\n")
    return listing


def script(folder: Path, listing: Path, name: str) -> Path:
    path = folder / f"{name}.lua"
    path.write_text(LUA % {"max": MAX_REQUESTS, "list": listing, "boundary": BOUNDARY, "path": "/classify"})
    return path


def main() -> None:
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    art = default_artifact()
    tmp = Path(tempfile.mkdtemp(prefix="erde-bench-"))
    env = {**os.environ, "ERDE_STORE": str(STORE), "ERDE_DEFAULT_MODEL": art.name, "ERDE_HOST": "127.0.0.1"}
    rows = []
    service_port, floor_port = free_port(), free_port()
    service = start([sys.executable, "-m", "service"], service_port, {**env, "ERDE_PORT": str(service_port)},
                    tmp / "service.log")
    floor = start([sys.executable, "-m", "bench.floor", str(floor_port)], floor_port, env, tmp / "floor.log")
    try:
        targets = [("floor (constant)", floor_port, script(tmp, write_bodies(tmp, {}, art.spec.size), "floor"))]
        for budget in ("1.0", "0.25"):
            lua = script(tmp, write_bodies(tmp, {"budget": budget}, art.spec.size), f"budget{budget}")
            targets.append((f"service budget {budget}", service_port, lua))
        for concurrency in CONCURRENCY:
            for name, port, lua in targets:
                r = wrk(port, lua, concurrency)
                rows.append([name, concurrency, f"{r['rps']:,.0f}", f"{r['p50']:.2f}", f"{r['p99']:.2f}", r["errors"]])
    finally:
        for proc in (service, floor):
            proc.terminate()
            proc.wait(20)
    print(f"# HTTP over loopback: {art.name}/{art.version}, wrk 1 thread, {SECONDS} s per run, "
          f"Fashion-MNIST PNG uploads (one server process, uvloop + httptools)\n")
    print(table(["server", "concurrency", "requests/s", "p50 ms", "p99 ms", "non-2xx"], rows))


if __name__ == "__main__":
    main()
