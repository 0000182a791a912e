"""Where the service's CPU goes under load: CPU time per request of each of its processes (and of
the transport floor and of wrk), the mean micro-batch, and a py-spy profile of the event loop and
of the inference process grouped into the parts reports/service-profile.md names.

CPU time comes from /proc/<pid>/stat before and after a wrk run, divided by the requests served;
wrk's own from getrusage of this script's children. The profile samples Python stacks
(`py-spy record --format raw`, busy samples only) and gives each sample to the first part, in the
order listed, whose pattern matches any frame of its stack.

Usage: .venv/bin/python -m bench.profile [--seconds 8] [--concurrency 64] [--revision REV]
       (py-spy from the dev extra; --revision profiles an earlier version, e.g. 4d9015f: the network in a thread)
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import httpx

from bench.ab import checkout
from bench.common import STORE, default_artifact, table
from bench.load import launch, lua, server_port, stop, write_bodies, wrk
from bench.pss import service_processes

TICK = os.sysconf("SC_CLK_TCK")
PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))  # the venv's, off PATH
# Parts of each process, in priority order: a sample goes to the first part whose pattern matches any
# frame of its stack (frames read "Class.function (path/file.py:line)"), else to "other".
EVENT_LOOP_PARTS = [
    ("decode (PIL open + load + normalise)", r"decode_image|PIL/"),
    # The reply's one send(): on loopback the kernel delivers it to the receiver within the call.
    ("the reply's socket write", r"LingeringTransport\.release"),
    ("access log", r"logging/|\baccount \(service/edge/middleware"),
    ("drift guard (live θ and accuracy)", r"service/engine/drift|report_drift"),
    ("reply building + JSON", r"orjson|\bencode \(service/api/pipeline|json/"),
    ("multipart parsing + options",
     r"service/edge/multipart|read_upload|service/engine/policy|service/schemas|pydantic"),
    ("metrics, queueing, reading the inference replies", r"prometheus_client|service/metrics|service/engine/"),
    # Every request runs under the protocol's frames: what no part above took is counted here.
    ("the edge: protocol, accounting, admission, and the rest", r"service/edge/|service/record|service/endpoints"),
    ("framework stack: uvicorn, Starlette and FastAPI, response send", r"uvicorn/|starlette/|fastapi/|asyncio/"),
]
INFERENCE_PARTS = [
    ("waiting for the next batch (pipe read)", r"multiprocessing/connection|selectors"),
    ("decode (PIL open, load, normalise)", r"decode_image|PIL/|service/engine/decode|service/engine/imagescan"),
    ("convolutions", r"conv2d|_conv_forward|convolution"),
    ("exit heads (BN, ReLU, FC)", r"\bexit \(erde/nets"),
    ("rest of the stages (ReLU, residual adds)", r"torch/nn/|erde/nets"),
    ("per-stage exit decisions, row selection, replies", r"service/engine/|erde/exits"),
]


def cpu_seconds(pids: list[int]) -> dict[tuple[int, int], float]:
    """utime + stime of every thread of each process, in seconds: (pid, tid) -> seconds."""
    found = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*") if Path(f"/proc/{pid}/task").is_dir() else []:
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            found[pid, int(task.name)] = (int(fields[11]) + int(fields[12])) / TICK
    return found


def batch_totals(port: int) -> tuple[float, float]:
    """(rows, batches) so far, from the erde_batch_size histogram."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    rows = sum(float(v) for v in re.findall(r"^erde_batch_size_sum\{[^}]*\} (\S+)", text, re.M))
    batches = sum(float(v) for v in re.findall(r"^erde_batch_size_count\{[^}]*\} (\S+)", text, re.M))
    return rows, batches


def cpu_per_request(port: int, server_pid: int, script: Path, args: argparse.Namespace) -> tuple[dict, list]:
    """One wrk run: its result, and (process, µs of CPU per request, share of a core) for each process,
    each of its threads that used 5% of a core or more when it has several such, and wrk."""
    roles = service_processes(server_pid)
    before, wrk_before = cpu_seconds(list(roles)), resource.getrusage(resource.RUSAGE_CHILDREN)
    result = wrk(port, script, args.concurrency, args.seconds)
    after, wrk_after = cpu_seconds(list(roles)), resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = (wrk_after.ru_utime + wrk_after.ru_stime) - (wrk_before.ru_utime + wrk_before.ru_stime)
    used = {key: after[key] - before[key] for key in before if key in after}
    rows = []
    for pid, name in roles.items():
        threads = {tid: cpu for (p, tid), cpu in used.items() if p == pid}
        rows.append((name, sum(threads.values())))
        busy = {tid: cpu for tid, cpu in threads.items() if cpu >= 0.05 * args.seconds}
        if len(busy) > 1:
            rows += [(f"{name}: {'main thread' if tid == pid else f'thread {tid}'}", cpu) for tid, cpu in busy.items()]
    rows.append(("wrk (load generator)", wrk_cpu))
    served = max(result["requests"], 1)
    return result, [(name, cpu / served * 1e6, cpu / args.seconds) for name, cpu in rows if cpu > 0]


def spy(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    return subprocess.Popen([PY_SPY, "record", "--format", "raw", "--rate", "250", "--duration",
                             str(max(1, round(seconds))), "--output", str(out), "--pid", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def shares(raw: Path, parts: list[tuple[str, str]]) -> list[list[str]]:
    """Each part's share of the main thread's samples (helper threads start in threading.py)."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "(threading.py" in stack:
            continue
        part = next((name for name, pattern in parts if re.search(pattern, stack)), "other")
        counts[part] += int(count)
    total = sum(counts.values()) or 1
    return [[name, f"{counts[name] / total:.0%}"] for name, _ in [*parts, ("other", "")] if counts[name]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of wrk load per run")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--spy", choices=["full", "0.25"], default="full",
                        help="the load py-spy profiles: full depth or budget 0.25")
    parser.add_argument("--revision", default=".", help="git revision of the service to profile (bench/ab.py "
                                                        "checks it out); '.' is the working tree")
    args = parser.parse_args()
    for tool in ("wrk", PY_SPY):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed (wrk: apt-get install -y wrk; py-spy: the dev extra)")
    art = default_artifact()
    tmp = Path(tempfile.mkdtemp(prefix="erde-profile-"))
    env = {**os.environ, "ERDE_STORE": str(STORE), "ERDE_DEFAULT_MODEL": art.name, "ERDE_HOST": "127.0.0.1"}
    ports = {"service": server_port(), "floor": server_port()}
    folder = checkout(args.revision)
    service, _ = launch([sys.executable, "-m", "service"], ports["service"], {**env, "PYTHONPATH": str(folder)},
                        tmp / "service.log", 120, cwd=folder)
    floor, _ = launch([sys.executable, "-m", "bench.floor", str(ports["floor"])], ports["floor"], env,
                      tmp / "floor.log", 120)
    targets = [("full depth", "service", service, {"threshold": "0"}),
               ("budget 0.25", "service", service, {"budget": "0.25"}),
               ("transport floor (constant answer)", "floor", floor, {})]
    rows, profiles = [], []
    try:
        for label, name, proc, fields in targets:
            script = lua(tmp, write_bodies(tmp, fields, art.spec.size), label.split()[0], 10_000_000)
            batches = batch_totals(ports[name]) if name == "service" else None
            result, per_process = cpu_per_request(ports[name], proc.pid, script, args)
            if batches:
                rows_now, count_now = batch_totals(ports[name])
                label += f" (mean batch {(rows_now - batches[0]) / max(count_now - batches[1], 1):.1f})"
            rows += [[label, f"{result['rps']:,.0f}", process, f"{us:,.0f}", f"{core:.0%}"]
                     for process, us, core in per_process]
        inference = [p for p, r in service_processes(service.pid).items() if r == "inference process"]
        spied = [("event loop (server process)", service.pid, EVENT_LOOP_PARTS),  # (what, pid, its parts)
                 *(("inference process", pid, INFERENCE_PARTS) for pid in inference[:1])]
        spied_fields = {"threshold": "0"} if args.spy == "full" else {"budget": args.spy}
        script = lua(tmp, write_bodies(tmp, spied_fields, art.spec.size), "spy", 10_000_000)
        spies = [spy(pid, args.seconds, tmp / f"spy-{pid}.txt") for _, pid, _ in spied]
        wrk(ports["service"], script, args.concurrency, args.seconds + 1)
        for s in spies:
            s.wait(60)
        profiles = [(what, shares(tmp / f"spy-{pid}.txt", parts)) for what, pid, parts in spied]
    finally:
        stop(service)
        stop(floor)
    print(f"# Where the CPU goes: service at {args.revision}, {art.name}/{art.version}, wrk 1 thread "
          f"c={args.concurrency}, {args.seconds:g} s per run, on {os.cpu_count()} cores shared with wrk\n")
    print(table(["load", "requests/s", "process", "CPU µs per request", "share of a core"], rows))
    for name, part_rows in profiles:
        load = "full depth" if args.spy == "full" else f"budget {args.spy}"
        print(f"\npy-spy, {name}, {load} (share of its main thread's busy samples):\n")
        print(table(["part", "share"], part_rows))


if __name__ == "__main__":
    main()
