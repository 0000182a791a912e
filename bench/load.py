"""The one load generator for every HTTP benchmark: wrk (one client thread, loopback), bounded in
seconds and requests, cycling real Fashion-MNIST test images sent as PNG multipart bodies."""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path

from bench.common import sample_images

BOUNDARY = "erdebenchboundary"
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


def lua(folder: Path, listing: Path, name: str, max_requests: int) -> Path:
    path = folder / f"{name}.lua"
    path.write_text(LUA % {"max": max_requests, "list": listing, "boundary": BOUNDARY, "path": "/classify"})
    return path


def wrk(port: int, script: Path, concurrency: int, seconds: float) -> dict[str, float]:
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "--latency",
           "-s", str(script), f"http://127.0.0.1:{port}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout

    def latency_ms(label: str) -> float:
        found = re.search(rf"\s{label}%\s+([\d.]+)(us|ms|s)\b", out)
        return float(found.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[found.group(2)] if found else float("nan")

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return {"rps": float(rps.group(1)) if rps else 0.0, "p50": latency_ms("50"), "p99": latency_ms("99"),
            "errors": (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)}
