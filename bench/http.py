"""HTTP throughput and latency over loopback, with wrk (one client thread) as the load generator.

For concurrency 1, 16 and 64: the service at budgets 1.0, 0.5 and 0.25, and the transport floor (the
same app stack and multipart parsing answering a constant), with the CPU the server process (the
event loop, not the inference process) spends per reply. Each run is bounded in time and in
requests; the uploads are real Fashion-MNIST test images encoded as PNG, cycled.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from bench.common import STORE, default_artifact, table
from bench.load import launch, lua, require_wrk, server_port, stop, write_bodies, wrk_with_cpu

CONCURRENCY = (1, 16, 64)
SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
MAX_REQUESTS = int(os.environ.get("BENCH_MAX_REQUESTS", "200000"))
STARTUP_TIMEOUT_S = 60


def main() -> None:
    require_wrk()
    art = default_artifact()
    tmp = Path(tempfile.mkdtemp(prefix="erde-bench-"))
    env = {**os.environ, "ERDE_STORE": str(STORE), "ERDE_DEFAULT_MODEL": art.name, "ERDE_HOST": "127.0.0.1"}
    rows = []
    service_port, floor_port = server_port(), server_port()
    service, _ = launch([sys.executable, "-m", "service"], service_port, env, tmp / "service.log", STARTUP_TIMEOUT_S)
    floor, _ = launch([sys.executable, "-m", "bench.floor", str(floor_port)], floor_port, env, tmp / "floor.log",
                      STARTUP_TIMEOUT_S)
    try:
        floor_script = lua(tmp, write_bodies(tmp, {}, art.spec.size), "floor", MAX_REQUESTS)
        targets = [("floor (constant)", floor_port, floor_script)]
        for budget in ("1.0", "0.5", "0.25"):
            script = lua(tmp, write_bodies(tmp, {"budget": budget}, art.spec.size), f"budget{budget}", MAX_REQUESTS)
            targets.append((f"service budget {budget}", service_port, script))
        for concurrency in CONCURRENCY:
            for name, port, script in targets:
                pid = (floor if port == floor_port else service).pid
                r = wrk_with_cpu(pid, port, script, concurrency, SECONDS)
                rows.append([name, concurrency, f"{r['rps']:,.0f}", f"{r['p50']:.2f}", f"{r['p99']:.2f}",
                             f"{r['cpu_per_reply_us']:.0f}", r["errors"]])
    finally:
        for proc in (service, floor):
            stop(proc)
    print(f"# HTTP over loopback: {art.name}/{art.version}, wrk 1 thread, {SECONDS} s per run, "
          f"Fashion-MNIST PNG uploads (one server process, uvloop + httptools, and its inference process)\n")
    print("Written by `make bench` (`.venv/bin/python -m bench.http`).\n")
    print(table(["server", "concurrency", "requests/s", "p50 ms", "p99 ms", "loop CPU µs/reply", "non-2xx"], rows))


if __name__ == "__main__":
    main()
