"""Inference processes of their own per worker, or one per model shared by every worker (ERDE_ENGINE):
throughput and memory with 1 and 2 workers, side by side.

Each round starts the service once per setting (both shipped models loaded, wrk on the default one),
loads it with wrk at full depth and at budget 0.25, and samples the PSS of its whole process tree
(bench/pss.py: shared pages split between the processes that share them, so the sum is what the
service holds). The settings take turns within a round; the table gives medians over rounds.

Usage: .venv/bin/python -m bench.sharing [--rounds 2] [--seconds 6] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import STORE, children, default_artifact, inference_processes, memory_kb, table
from bench.load import launch, lua, require_wrk, server_port, stop, write_bodies, wrk

SETTINGS = [(1, "own"), (1, "shared"), (2, "own"), (2, "shared")]
LOADS = {"full depth": {"threshold": "0"}, "budget 0.25": {"budget": "0.25"}}


def measure(workers: int, engine: str, scripts: dict[str, Path], args: argparse.Namespace, log: Path) -> dict:
    env = {**os.environ, "ERDE_STORE": str(STORE), "ERDE_DEFAULT_MODEL": default_artifact().name,
           "ERDE_HOST": "127.0.0.1", "ERDE_WORKERS": str(workers), "ERDE_ENGINE": engine}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    port = server_port()
    proc, _ = launch([sys.executable, "-m", "service"], port, env, log, 180)
    peak_kb = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_kb
        while not done.is_set():
            peak_kb = max(peak_kb, sum(memory_kb(pid).get("Pss", 0) for pid in children(proc.pid)))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample)
    try:
        time.sleep(2)  # every worker's models loaded (readyz answers as soon as one worker is ready)
        processes = len(inference_processes(proc.pid))
        sampler.start()
        rps = {load: wrk(port, script, args.concurrency, args.seconds)["ok_rps"] for load, script in scripts.items()}
    finally:
        done.set()
        if sampler.is_alive():
            sampler.join()
        stop(proc)
    return {"processes": processes, "pss_mb": peak_kb / 1024, **rps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds of wrk load per load and setting")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    require_wrk()
    art = default_artifact()
    tmp = Path(tempfile.mkdtemp(prefix="erde-sharing-"))
    scripts = {load: lua(tmp, write_bodies(tmp, fields, art.spec.size), load.replace(" ", "-"), 10_000_000)
               for load, fields in LOADS.items()}
    runs: dict[tuple[int, str], list[dict]] = {s: [] for s in SETTINGS}
    for r in range(args.rounds):
        for workers, engine in SETTINGS:
            result = measure(workers, engine, scripts, args, tmp / f"service-{workers}-{engine}-{r}.log")
            runs[(workers, engine)].append(result)
            print(f"round {r + 1}: {workers} worker(s), {engine}: {result}", file=sys.stderr, flush=True)
    rows = []
    for (workers, engine), results in runs.items():
        median = {k: statistics.median(x[k] for x in results) for k in results[0]}
        rows.append([workers, engine, f"{median['processes']:.0f}",
                     *(f"{median[load]:,.0f}" for load in LOADS), f"{median['pss_mb']:,.0f}"])
    print(f"# Inference processes per worker or shared: {STORE.name}/ (both models loaded), wrk c={args.concurrency} "
          f"on {art.name}/{art.version}, {args.seconds:g} s per load, median of {args.rounds} rounds\n")
    print(table(["workers", "ERDE_ENGINE", "inference processes", *(f"{load} req/s" for load in LOADS),
                 "PSS of the whole service, MB"], rows))


if __name__ == "__main__":
    main()
