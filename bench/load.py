"""Servers under load, for every HTTP benchmark: starting and stopping them, and the one load
generator, wrk (one client thread, loopback), bounded in seconds and requests, cycling real
Fashion-MNIST test images sent as PNG multipart bodies."""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from bench.common import children, sample_images

ROOT = Path(__file__).resolve().parents[1]

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


def require_wrk() -> None:
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install -y wrk")


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
    total = re.search(r"(\d+) requests in", out)
    requests, refused = int(total.group(1)) if total else 0, int(non2xx.group(1)) if non2xx else 0
    rate = float(rps.group(1)) if rps else 0.0
    return {"rps": rate, "p50": latency_ms("50"), "p99": latency_ms("99"), "requests": requests,
            "ok_rps": rate * (requests - refused) / requests if requests else 0.0,
            "errors": refused + (sum(map(int, sock.groups())) if sock else 0)}


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (not its children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def wrk_with_cpu(pid: int, port: int, script: Path, concurrency: int, seconds: float) -> dict[str, float]:
    """`wrk`'s result, with the CPU time process `pid` spent per reply meanwhile (`cpu_per_reply_us`):
    for the server process, the event loop's cost of a request (its inference process is not counted)."""
    before = cpu_seconds(pid)
    result = wrk(port, script, concurrency, seconds)
    result["cpu_per_reply_us"] = (cpu_seconds(pid) - before) / max(result["requests"], 1) * 1e6
    return result


def server_port() -> int:
    """A free port outside the kernel's ephemeral range (32768-60999) and Ray's worker ports (10002-19999):
    Ray and BentoML start helpers that bind random ephemeral ports, which could take a port picked by
    binding port 0 before the server binds it ("Failed to bind to address")."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def launch(cmd: list[str], port: int, env: dict[str, str], log: Path,
           timeout_s: float, cwd: Path = ROOT) -> tuple[subprocess.Popen, float]:
    """Start a server in its own session (cwd: the repo root, or another checkout) and wait for /readyz;
    (process, seconds to ready)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**env, "ERDE_PORT": str(port)}, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    while time.monotonic() - started < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log.read_text()[-1500:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc, time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop(proc)
    raise RuntimeError(f"not ready after {timeout_s} s: {log.read_text()[-1500:]}")


def stop(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left of its tree (our processes only)."""
    tree = children(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace_s)
    for pid in tree:  # Ray's actors sit in their own process groups
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        print(f"warning: server {proc.pid} still not gone 60 s after SIGKILL", flush=True)
