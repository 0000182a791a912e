"""Retry storms: does goodput hold when far more clients come than the queue can take?

wrk keeps `c` connections busy (closed loop: a refused client asks again at once, the retry storm
of issue 10), at budget 1.0 with a short queue (ERDE_QUEUE_SIZE=32). For c = 64, 256 and 512 it
prints replies/s, successful replies/s and their ratio to c=64 (target: >= 0.9, no collapse).

Then what one refusal costs against one served request, in CPU time of the server process
(the event loop; the inference process is not counted): served requests at c=16 on an idle
queue, and refusals at c=512 on a server whose one-row queue is held full by requests that take 600 s
(at c=64 the backoff's pauses left the loop idle most of the time, and its idle work was counted
against fewer than 700 refusals a second).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from pathlib import Path

import httpx

from bench.common import STORE, default_artifact, table
from bench.load import launch, lua, require_wrk, server_port, stop, write_bodies, wrk_with_cpu

SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
MAX_REQUESTS = int(os.environ.get("BENCH_MAX_REQUESTS", "1000000"))
CONCURRENCY = (64, 256, 512)


def measured(pid: int, port: int, script: Path, concurrency: int) -> dict[str, float]:
    return wrk_with_cpu(pid, port, script, concurrency, SECONDS)


def hold_queue(port: int, body: bytes, rows: int) -> list[threading.Thread]:
    """Requests that occupy the inference process and its queue (each batch takes 600 s there)."""
    def send() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the server is stopped under it at the end
            httpx.post(f"http://127.0.0.1:{port}/classify", content=body, timeout=700,
                       headers={"Content-Type": "multipart/form-data; boundary=erdebenchboundary"})

    threads = [threading.Thread(target=send, daemon=True) for _ in range(rows)]
    for thread in threads:
        thread.start()
    return threads


def main() -> None:
    require_wrk()
    art = default_artifact()
    tmp = Path(tempfile.mkdtemp(prefix="erde-collapse-"))
    env = {**os.environ, "ERDE_STORE": str(STORE), "ERDE_DEFAULT_MODEL": art.name, "ERDE_HOST": "127.0.0.1",
           "ERDE_QUEUE_SIZE": "32", "ERDE_MAX_BATCH_SIZE": "32", "ERDE_ACCESS_LOG": "false"}
    script = lua(tmp, write_bodies(tmp, {"budget": "1.0"}, art.spec.size), "budget1", MAX_REQUESTS)
    port = server_port()
    service, _ = launch([sys.executable, "-m", "service"], port, env, tmp / "service.log", 60)
    storm = {}
    try:
        served = measured(service.pid, port, script, 16)
        for concurrency in CONCURRENCY:
            storm[concurrency] = measured(service.pid, port, script, concurrency)
    finally:
        stop(service)
    held_port = server_port()
    held_env = {**env, "ERDE_QUEUE_SIZE": "1", "ERDE_MAX_BATCH_SIZE": "1", "SLOW_BATCH_MS": "600000",
                "ERDE_HANG_TIMEOUT_S": "600", "ERDE_REQUEST_TIMEOUT_S": "600"}
    held, _ = launch([sys.executable, "-m", "bench.slow_service"], held_port, held_env, tmp / "held.log", 60)
    try:
        body = Path(tmp / "body-1.0-0.bin").read_bytes()
        hold_queue(held_port, body, 3)  # two batch slots in the process, one row in the queue
        refused = measured(held.pid, held_port, script, 512)
    finally:
        stop(held)

    base = storm[64]["ok_rps"]
    rows = [[c, f"{r['rps']:,.0f}", f"{r['ok_rps']:,.0f}", f"{r['ok_rps'] / base:.2f}",
             f"{1 - r['ok_rps'] / r['rps']:.0%}" if r["rps"] else "-", f"{r['p50']:.1f}", f"{r['p99']:.1f}",
             "met" if r["ok_rps"] >= 0.9 * base else "missed"] for c, r in storm.items()]
    print(f"# Retry storm: {art.name}/{art.version}, budget 1.0, ERDE_QUEUE_SIZE=32, wrk closed loop, "
          f"{SECONDS} s per run\n")
    print(table(["concurrency", "replies/s", "200/s", "200/s vs c=64", "refused", "p50 ms", "p99 ms",
                 ">= 0.9x c=64"], rows))
    print("\n# CPU time of the server process per reply (event loop only)\n")
    print(table(["reply", "CPU µs per reply", "replies"], [
        ["served (200, c=16)", f"{served['cpu_per_reply_us']:.0f}", f"{served['requests']:,}"],
        ["refused from the headers (503, c=512)", f"{refused['cpu_per_reply_us']:.0f}", f"{refused['requests']:,}"],
    ]))
    print(f"\nA refusal costs {refused['cpu_per_reply_us'] / served['cpu_per_reply_us']:.2f}x a served request's "
          "CPU in the server process.")


if __name__ == "__main__":
    main()
