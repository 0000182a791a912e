"""Large uploads sent together: how much memory the server process takes for them.

Each upload is a multipart form whose image part is 8 MB of random bytes (the largest body
ERDE_MAX_UPLOAD_BYTES allows): the server reads it, then answers 415, or refuses it first. Clients send
all of them at once, each on its own connection. For each bound on the bytes a server process holds
at once (ERDE_MAX_UPLOAD_BYTES_IN_FLIGHT: the default, and one no burst reaches, which is how the
service ran before the bound), a fresh server takes bursts of 16 and 64; the table gives the server
process's resident memory before, at its peak (VmHWM) and after, and the replies' statuses.

Usage: .venv/bin/python -m bench.uploads
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

from bench.common import STORE, default_artifact, table
from bench.load import BOUNDARY, launch, server_port, stop
from service.settings import Settings

UPLOAD_BYTES = 8 * 1024 * 1024
BURSTS = (16, 64)
UNBOUNDED = 1 << 40  # no burst here comes near it: the service as it ran before the bound


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak) of a process, in kB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def upload() -> bytes:
    body = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + os.urandom(UPLOAD_BYTES - 4096) + \
        f"\r\n--{BOUNDARY}--\r\n".encode()
    head = (f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}"
            f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


def burst(port: int, payload: bytes, clients: int) -> Counter[str]:
    """`clients` uploads at once; the status each got (or the error that ended it)."""
    statuses: Counter[str] = Counter()
    lock = threading.Lock()

    def one() -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                sock.sendall(payload)
                status = sock.recv(64).split(b" ", 2)[1].decode()
        except (OSError, IndexError) as exc:
            status = type(exc).__name__
        with lock:
            statuses[status] += 1

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def main() -> None:
    art = default_artifact()
    tmp = Path(tempfile.mkdtemp(prefix="erde-uploads-"))
    payload = upload()
    default = Settings().max_upload_bytes_in_flight
    rows = []
    for bound, label in ((UNBOUNDED, "none (before)"), (default, f"{default // 2**20} MiB (default)")):
        for clients in BURSTS:
            env = {**os.environ, "ERDE_STORE": str(STORE), "ERDE_DEFAULT_MODEL": art.name, "ERDE_HOST": "127.0.0.1",
                   "ERDE_ACCESS_LOG": "false", "ERDE_MAX_UPLOAD_BYTES": str(UPLOAD_BYTES),
                   "ERDE_MAX_UPLOAD_BYTES_IN_FLIGHT": str(bound)}
            port = server_port()
            proc, _ = launch([sys.executable, "-m", "service"], port, env, tmp / f"server-{clients}.log", 60)
            try:
                before = memory_kb(proc.pid)
                statuses = burst(port, payload, clients)
                after = memory_kb(proc.pid)
            finally:
                stop(proc)
            rows.append([label, clients, f"{before['VmRSS'] / 1024:,.0f}", f"{after['VmHWM'] / 1024:,.0f}",
                         f"{(after['VmHWM'] - before['VmRSS']) / 1024:,.0f}", f"{after['VmRSS'] / 1024:,.0f}",
                         ", ".join(f"{n} x {s}" for s, n in sorted(statuses.items()))])
    sizes = " and ".join(map(str, BURSTS))
    print(f"# Bursts of {sizes} uploads of {UPLOAD_BYTES // 2**20} MB sent at once (one server process)\n")
    print(table(["bound on bodies held at once", "uploads", "RSS before MB", "peak MB", "growth MB",
                 "RSS after MB", "replies"], rows))


if __name__ == "__main__":
    main()
