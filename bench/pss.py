"""Memory of the running service under load: PSS, RSS and peak RSS of each of its processes.

PSS (proportional set size, /proc/<pid>/smaps_rollup) splits every shared page between the
processes that share it, so the processes' PSS add up to what the service really holds; RSS and
peak RSS (VmHWM, what reports/benchmarks.md sums) count a page that forked processes share once
per process. Starts `python -m service` on the default model, loads it with wrk at full depth for
a few seconds, and keeps each process's largest PSS seen.

Usage: .venv/bin/python -m bench.pss [--seconds 6] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import STORE, children, default_artifact, memory_kb, table
from bench.load import launch, lua, require_wrk, server_port, stop, write_bodies, wrk


def service_processes(server: int) -> dict[int, str]:
    """Every process of a running service, pid -> what it is."""
    roles = {}
    for pid in children(server):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if pid == server:
            roles[pid] = "server (event loop)"
        elif "resource_tracker" in cmdline:
            roles[pid] = "multiprocessing resource tracker"
        elif "forkserver" in cmdline:  # the inference processes are forked from the forkserver
            roles[pid] = "forkserver" if parent == server else "inference process"
        else:
            roles[pid] = cmdline[:60]
    return roles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds of wrk load")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    require_wrk()
    art = default_artifact()
    tmp = Path(tempfile.mkdtemp(prefix="erde-pss-"))
    env = {**os.environ, "ERDE_STORE": str(STORE), "ERDE_DEFAULT_MODEL": art.name, "ERDE_HOST": "127.0.0.1"}
    port = server_port()
    proc, _ = launch([sys.executable, "-m", "service"], port, env, tmp / "service.log", 120)
    peak: dict[int, dict[str, int]] = {}
    loaded = threading.Event()

    def sample() -> None:
        while not loaded.is_set():
            for pid in children(proc.pid):
                for key, kb in memory_kb(pid).items():
                    peak.setdefault(pid, {})[key] = max(kb, peak.get(pid, {}).get(key, 0))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample)
    try:
        sampler.start()
        script = lua(tmp, write_bodies(tmp, {"threshold": "0"}, art.spec.size), "full", 10_000_000)
        result = wrk(port, script, args.concurrency, args.seconds)
        loaded.set()
        sampler.join()
        roles = service_processes(proc.pid)
    finally:
        loaded.set()
        stop(proc)
    rows = [[roles.get(pid, "exited"), pid, f"{m.get('Pss', 0) / 1024:,.0f}", f"{m.get('Rss', 0) / 1024:,.0f}",
             f"{m.get('VmHWM', 0) / 1024:,.0f}"] for pid, m in sorted(peak.items())]
    total = {k: sum(m.get(k, 0) for m in peak.values()) / 1024 for k in ("Pss", "Rss", "VmHWM")}
    rows.append(["**total**", "", f"**{total['Pss']:,.0f}**", f"{total['Rss']:,.0f}", f"{total['VmHWM']:,.0f}"])
    print(f"# Service memory under load: {art.name}/{art.version}, wrk c={args.concurrency} full depth for "
          f"{args.seconds:g} s ({result['rps']:,.0f} requests/s), largest value seen per process, MB\n")
    print(table(["process", "pid", "PSS", "RSS", "peak RSS (VmHWM)"], rows))


if __name__ == "__main__":
    main()
