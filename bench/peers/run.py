"""Our service against general model servers, serving the same artifact, measured side by side.

Servers: the service (`python -m service`, project venv) and one minimal idiomatic server per peer
(`bench/peers/<peer>_server.py`, each in its own venv under .bench/peers/<peer>/, made by
`bench/peers/venvs.sh`). For each server, one at a time: start it, check its answers against the
in-process engine, warm it up, then wrk (one client thread, loopback, the same Fashion-MNIST PNG
multipart bodies for all, bounded in seconds and requests) at concurrency 1, 16 and 64, at full
depth (`threshold=0`) and at budget 0.25; then the same stack answering a constant for the same
upload (its transport floor). The whole round runs twice, servers in the same order (A/B/A/B),
and each cell is the median of the rounds, so that drift in machine speed cancels. The
in-process ceiling (measured in every round, median) is our engine on pre-decoded tensors
(bench.engine.run_for), batch min(concurrency, max batch size). Peak RSS: VmHWM summed over the server's process tree.

Run from the repo root with the project venv: `.venv/bin/python -m bench.peers.run` (or
`make bench-peers`). Environment: BENCH_SECONDS (per run, default 4), BENCH_MAX_REQUESTS,
BENCH_ROUNDS (default 2), BENCH_PEERS (comma list, default all), ERDE_STORE / ERDE_DEFAULT_MODEL.
"""

from __future__ import annotations

import datetime
import io
import os
import platform
import re
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from bench.common import STORE, children, default_artifact, sample_images, table
from bench.engine import run_for
from bench.load import launch, lua, require_wrk, server_port, stop, write_bodies, wrk
from erde.data import normalize
from erde.nets import fuse_for_inference
from service.engine.compute import Sample, choose_stage_backends, run_batch
from service.engine.decode import decode_image
from service.engine.limits import ImageLimits
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PEER_VENVS = ROOT / ".bench" / "peers"
REPORT = ROOT / "reports" / "benchmarks.md"
SECONDS = float(os.environ.get("BENCH_SECONDS", "4"))
WARM_SECONDS = float(os.environ.get("BENCH_WARM_SECONDS", "1"))
MAX_REQUESTS = int(os.environ.get("BENCH_MAX_REQUESTS", "100000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))
CONCURRENCY = (1, 16, 64)
MAX_BATCH = Settings().max_batch_size  # the service's default; the peers batch up to the same (serving.py)
BUDGETS = {"full": {"threshold": "0"}, "0.25": {"budget": "0.25"}}  # threshold=0: full depth on every server
STARTUP_TIMEOUT_S = 180
CHECK_IMAGES = 8


@dataclass
class Server:
    name: str
    python: Path
    model_cmd: list[str]  # after the python executable; PORT is replaced
    floor_cmd: list[str]
    peer: str | None = None  # venv name under .bench/peers, None for ours
    note: str = ""
    cells: dict[tuple, list[dict]] = field(default_factory=dict)  # (kind, budget, c) -> one result per round
    rss_mb: list[float] = field(default_factory=list)
    startup_s: list[float] = field(default_factory=list)
    check: str = ""
    failed: list[str] = field(default_factory=list)  # one line per round that failed

    def command(self, floor: bool, port: int) -> list[str]:
        args = self.floor_cmd if floor else self.model_cmd
        return [str(self.python), *(str(port) if a == "PORT" else a for a in args)]


def servers() -> list[Server]:
    ours = Server("erde (ours)", ROOT / ".venv" / "bin" / "python", ["-m", "service"], ["-m", "bench.floor", "PORT"])
    peers = [("fastapi", "FastAPI (naive)"), ("litserve", "LitServe"), ("bentoml", "BentoML"), ("ray", "Ray Serve")]
    wanted = os.environ.get("BENCH_PEERS")
    chosen = [ours]
    for peer, name in peers:
        if wanted is not None and peer not in wanted.split(","):
            continue
        script = f"bench/peers/{peer}_server.py"
        chosen.append(Server(name, PEER_VENVS / peer / "bin" / "python", [script, "PORT"],
                             [script, "PORT", "--constant"], peer=peer))
    return chosen


# ---- processes -------------------------------------------------------------------------------------------------

def peak_rss_mb(pid: int) -> float:
    total = 0
    for p in children(pid):
        try:
            m = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{p}/status").read_text())
        except OSError:
            continue
        total += int(m.group(1)) if m else 0
    return total / 1024


def start(server: Server, floor: bool, port: int, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, float]:
    return launch(server.command(floor, port), port, env, log, STARTUP_TIMEOUT_S)


# ---- load ------------------------------------------------------------------------------------------------------


# ---- correctness -----------------------------------------------------------------------------------------------

def expected_answers(art, pngs: list[bytes]) -> dict[str, list[tuple[int, int]]]:
    """(class_id, exit) per check image from the in-process engine, for each budget row."""
    net = fuse_for_inference(art.model)
    backends = choose_stage_backends(net, MAX_BATCH)
    s = Settings()
    limits = ImageLimits(s.max_pixels, s.min_image_side, s.image_formats)
    thetas = {"full": 0.0, "0.25": art.calibration.choose(0.25)[0].threshold}
    out = {}
    for budget, theta in thetas.items():
        answers = []
        for png in pngs:
            got: list = []
            run_batch(net, [Sample(decode_image(png, art.spec, limits), theta, net.num_exits - 1, 1, 0.0)],
                      lambda _, r, got=got: got.extend(r), mkldnn=backends)
            answers.append((got[0].top_ids[0], got[0].exit))
        out[budget] = answers
    return out


def check(port: int, pngs: list[bytes], expected: dict[str, list[tuple[int, int]]]) -> str:
    """'' when every answer matches the engine's class_id (exits compared too), else what differs."""
    problems, exit_diffs = [], 0
    with httpx.Client(timeout=30) as client:
        deadline = time.monotonic() + 60  # a readiness probe may answer before every worker is up
        while client.post(f"http://127.0.0.1:{port}/classify", data=BUDGETS["full"],
                          files={"image": ("x.png", pngs[0], "image/png")}).status_code != 200:
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for budget, fields in BUDGETS.items():
            for i, png in enumerate(pngs):
                r = client.post(f"http://127.0.0.1:{port}/classify", data=fields,
                                files={"image": ("x.png", png, "image/png")})
                if r.status_code != 200:
                    problems.append(f"{budget} image {i}: HTTP {r.status_code} {r.text[:200]}")
                    continue
                body = r.json()
                want_class, want_exit = expected[budget][i]
                if body.get("class_id") != want_class:
                    problems.append(f"{budget} image {i}: class_id {body.get('class_id')} != {want_class}")
                if body.get("exit") != want_exit:
                    exit_diffs += 1
    if problems:
        return "; ".join(problems[:4])
    return f"exit differs on {exit_diffs} of {2 * len(pngs)}" if exit_diffs else ""


# ---- one round -------------------------------------------------------------------------------------------------

def run_server(server: Server, scripts: dict[str, Path], floor_script: Path, env: dict[str, str], tmp: Path,
               pngs: list[bytes], expected: dict, round_no: int) -> None:
    port = server_port()
    proc, startup = start(server, False, port, env, tmp / f"{server.peer or 'ours'}-{round_no}.log")
    try:
        server.startup_s.append(startup)
        problem = check(port, pngs, expected)
        if "class_id" in problem or "HTTP" in problem:
            raise RuntimeError(f"wrong answers: {problem}")
        server.check = problem or "same class_id and exit as the engine"
        for script in scripts.values():
            wrk(port, script, 16, WARM_SECONDS)  # warm-up, not recorded
        for c in CONCURRENCY:
            for budget, script in scripts.items():
                server.cells.setdefault(("model", budget, c), []).append(wrk(port, script, c, SECONDS))
        server.rss_mb.append(peak_rss_mb(proc.pid))
    finally:
        stop(proc)
    port = server_port()
    proc, _ = start(server, True, port, env, tmp / f"{server.peer or 'ours'}-floor-{round_no}.log")
    try:
        wrk(port, floor_script, 16, WARM_SECONDS)
        for c in CONCURRENCY:
            server.cells.setdefault(("floor", "-", c), []).append(wrk(port, floor_script, c, SECONDS))
    finally:
        stop(proc)


def median_cell(results: list[dict]) -> dict[str, float]:
    """Median over rounds; `spread` is the rounds' images/s range as a fraction of the median (drift)."""
    rps = [r["rps"] for r in results]
    mid = statistics.median(rps)
    return {k: statistics.median(r[k] for r in results) for k in ("rps", "p50", "p99")} | \
        {"errors": sum(r["errors"] for r in results), "spread": (max(rps) - min(rps)) / mid if mid else 0.0}


def ceiling(art) -> dict[tuple[str, int], float]:
    """In-process images/s of our engine on pre-decoded tensors, per budget and batch."""
    torch.set_num_threads(Settings().torch_threads)
    net = fuse_for_inference(art.model)
    backends = choose_stage_backends(net, MAX_BATCH)  # as the service's worker does at load
    spec = art.spec
    pixels = [np.array(im.convert(spec.mode)).reshape(spec.size, spec.size, -1) for im in sample_images(512, spec.size)]
    xs = normalize(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2), spec)
    thetas = {"full": 0.0, "0.25": art.calibration.choose(0.25)[0].threshold}
    out = {}
    for budget, theta in thetas.items():
        for c in CONCURRENCY:
            batch = min(c, MAX_BATCH)
            out[budget, c] = run_for(net, xs, theta, batch, art.macs_per_exit, backends, seconds=1.5)[0]
    return out


# ---- report ----------------------------------------------------------------------------------------------------

def machine() -> str:
    models = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    cpu = models[0].strip() if models else platform.processor()
    mem = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    return f"{cpu}, nproc {os.cpu_count()}, {int(mem.group(1)) / 1024 ** 2:.0f} GiB RAM, Linux {platform.release()}"


def versions(server: Server) -> str:
    names = {"fastapi", "starlette", "uvicorn", "litserve", "bentoml", "ray", "torch", "pillow", "numpy", "uvloop",
             "httptools", "pydantic"}
    if server.peer is None:
        out = subprocess.run([str(server.python), "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    else:
        freeze = PEER_VENVS / server.peer / "freeze.txt"
        out = freeze.read_text() if freeze.is_file() else ""
    found = [line.split("==") for line in out.splitlines() if "==" in line]
    return ", ".join(f"{n} {v}" for n, v in found if n.lower().split("[")[0] in names)


def fmt(x: float, digits: int = 0) -> str:
    return "-" if x != x else f"{x:,.{digits}f}"


def build_report(art, ran: list[Server], left_out: list[Server], ceil: dict, started: float, commands: str) -> str:
    ours = ran[0]
    rows = []
    for budget in BUDGETS:
        for c in CONCURRENCY:
            for s in ran:
                if ("model", budget, c) not in s.cells:
                    continue
                m = median_cell(s.cells["model", budget, c])
                floor = median_cell(s.cells["floor", "-", c])["rps"] if ("floor", "-", c) in s.cells else float("nan")
                rows.append([budget, c, s.name, fmt(m["rps"]), f"{100 * m['spread']:.0f}%", fmt(m["p50"], 2),
                             fmt(m["p99"], 2), fmt(m["rps"] / floor, 2), fmt(m["rps"] / ceil[budget, c], 2),
                             m["errors"]])
    main_table = table(["budget", "conc.", "server", "images/s", "round spread", "p50 ms", "p99 ms", "÷ own floor",
                        "÷ ceiling", "errors"], rows)
    floor_rows = []
    for s in ran:
        cells = [median_cell(s.cells["floor", "-", c]) if ("floor", "-", c) in s.cells else None for c in CONCURRENCY]
        floor_rows.append([s.name, *(fmt(x["rps"]) if x else "-" for x in cells),
                           *(fmt(x["p99"], 2) if x else "-" for x in cells[-1:]),
                           fmt(max(s.rss_mb, default=float("nan"))), fmt(statistics.median(s.startup_s) if s.startup_s
                                                                           else float("nan"), 1)])
    floor_table = table(["server", "floor req/s c=1", "c=16", "c=64", "floor p99 ms c=64", "peak RSS MB",
                         "start s"], floor_rows)
    ceil_table = table(["budget", *(f"batch {min(c, MAX_BATCH)} (for c={c})" for c in CONCURRENCY)],
                       [[b, *(fmt(ceil[b, c]) for c in CONCURRENCY)] for b in BUDGETS])
    verdicts = []
    for budget, factor in (("full", 1.5), ("0.25", 2.0)):
        peers = [s for s in ran[1:] if ("model", budget, 64) in s.cells]
        if ("model", budget, 64) not in ours.cells or ("floor", "-", 64) not in ours.cells:
            verdicts.append(f"- budget {budget}: no complete measurement of our service")
            continue
        mine = median_cell(ours.cells["model", budget, 64])
        if peers:
            best = max(peers, key=lambda s: median_cell(s.cells["model", budget, 64])["rps"])
            b = median_cell(best.cells["model", budget, 64])
            ok = mine["rps"] >= factor * b["rps"] and mine["p99"] <= b["p99"]
            verdicts.append(f"- budget {budget}, c=64: ours {fmt(mine['rps'])} images/s = "
                            f"{mine['rps'] / b['rps']:.2f}× the best peer ({best.name}, {fmt(b['rps'])}; "
                            f"target ≥ {factor}×); p99 {mine['p99']:.1f} ms vs {b['p99']:.1f} ms: "
                            f"**{'met' if ok else 'MISSED'}**")
        floor = median_cell(ours.cells["floor", "-", 64])["rps"]
        bound = min(floor, ceil[budget, 64])
        verdict = "met" if mine["rps"] >= 0.8 * bound else "MISSED"
        verdicts.append(f"- budget {budget}, c=64: ours ÷ min(floor {fmt(floor)}, ceiling {fmt(ceil[budget, 64])}) = "
                        f"{mine['rps'] / bound:.2f} (target ≥ 0.8): **{verdict}**")
    notes = [f"- {s.name}: {s.check}" + "".join(f"; **{f}**" for f in s.failed) for s in ran]
    notes += [f"- **{s.name} left out**: {' / '.join(s.failed)}" for s in left_out]
    vers = [f"- {s.name}: {versions(s)}" for s in ran]
    toy = "" if art.name == "fashion-mnist" else \
        f"\n> **Toy model** ({art.name}): these numbers only show that the harness works; not the shipped student.\n"
    theta = art.calibration.choose(0.25)[0].threshold
    now = datetime.datetime.now(datetime.UTC)
    header = [
        f"- Date: {now:%Y-%m-%d %H:%M UTC}; the measurement took {time.monotonic() - started:.0f} s",
        f"- Machine: {machine()}",
        f"- Artifact: `{STORE}/{art.name}/{art.version}` ({art.model.num_exits} exits, input {art.spec.mode} "
        f"{art.spec.size}×{art.spec.size}, {art.macs_per_exit[-1] / 1e6:.2f} MMACs at full depth); "
        f"θ at budget 0.25 = {theta:.4f}",
        f"- Load: wrk, 1 client thread, loopback, {SECONDS:g} s or {MAX_REQUESTS} requests per run (warm-up "
        f"{WARM_SECONDS:g} s per body excluded), 64 Fashion-MNIST test images as PNG multipart bodies, cycled, "
        "identical for every server; full depth = form field `threshold=0`, budget 0.25 = `budget=0.25`",
        f"- {ROUNDS} rounds, servers in the same order each round (A/B/A/B), one server running at a time; every "
        "cell is the median over rounds",
        "- Floor: each stack answering a constant after reading the same upload (ours: `bench/floor.py`; peers: "
        "`--constant`)",
        f"- Ceiling: our engine in-process on pre-decoded tensors, batch min(concurrency, {MAX_BATCH}), 1 torch "
        "thread, measured at the start of every round (median)",
    ]
    return f"""# Benchmarks against peers: the same artifact behind five servers

{chr(10).join(header)}
{toy}
## Commands

```
{commands}
```

## Images/s and latency (median of {ROUNDS} rounds)

{main_table}

## Transport floor, memory and start-up

{floor_table}

## In-process ceiling (images/s)

{ceil_table}

## Targets (issue 6)

{chr(10).join(verdicts)}

The ceiling is one core running nothing but the network; the floor is one event loop answering a
constant. The service needs both at once, plus decode and the reply, on the same two cores as the
load generator: the CPU per request summed over its two processes and wrk bounds it, not either
process alone. Where the time goes, and what each change bought, is in
[service-profile.md](service-profile.md).

## Checks and notes

Before timing, each server classified {CHECK_IMAGES} images at both budgets; compared with the in-process engine:
{chr(10).join(notes)}

Every server runs the same network (the BN-folded copy the service serves), the same decode
(`service.engine.decode.decode_image`) and the same stage-by-stage loop (`service.engine.compute.run_batch`)
on one torch thread; peers batch up to {MAX_BATCH} rows (LitServe `batch_timeout` and Ray Serve
`batch_wait_timeout_s` {float(os.environ.get('PEER_BATCH_WAIT_MS', '2')):g} ms, BentoML adaptive batching with
`max_latency_ms` {os.environ.get('PEER_BENTOML_MAX_LATENCY_MS', '1000')}). Our service runs with its defaults
(one server process with one inference process, access log on, metrics on). The replies differ: ours is
the full documented reply (top-3, latencies, MACs...), the peers return label, class_id, exit and confidence.

Per peer: FastAPI is a sync `UploadFile` endpoint (Starlette's thread pool), no batching. LitServe: HTTP
server process + one inference worker process (`fast_queue=True`, ZeroMQ), decode in the worker's
`decode_request`. BentoML: two services, `Classifier` (HTTP, decode) calling `Model` (batchable API) in
its own process; bentoml_server.py works around a BentoML 1.4.40 bug (the dependency client closes its
HTTP session every 100 requests while other requests are in flight on it: ~20% HTTP 500 at c=64).
Ray Serve: local Ray (proxy actor + one replica actor), FastAPI ingress, `@serve.batch`,
`max_ongoing_requests` {2 * MAX_BATCH} (Ray's default of 5 would cap batches at 5). Peak RSS sums VmHWM
over each server's process tree (Ray's GCS, raylet and actors; BentoML's supervisor and workers;
LitServe's API and inference processes).

## Versions

{chr(10).join(vers)}
"""


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (a stopped job, `kill`) unwinds like Ctrl-C, so the `finally` blocks stop the servers."""
    raise KeyboardInterrupt


def main() -> None:
    require_wrk()
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    art = default_artifact()
    (PEER_VENVS / "runs").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{datetime.datetime.now():%Y%m%d-%H%M%S}-", dir=PEER_VENVS / "runs"))
    env = {**os.environ, "ERDE_STORE": str(STORE.resolve()), "ERDE_DEFAULT_MODEL": art.name, "ERDE_HOST": "127.0.0.1",
           "PYTHONPATH": str(ROOT), "BENTOML_DO_NOT_TRACK": "true", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONUNBUFFERED": "1"}
    scripts = {budget: lua(tmp, write_bodies(tmp, fields, art.spec.size), f"budget-{budget}", MAX_REQUESTS)
               for budget, fields in BUDGETS.items()}
    floor_script = scripts["full"]
    pngs = []
    for im in sample_images(CHECK_IMAGES, art.spec.size):  # the first bodies' images
        buf = io.BytesIO()
        im.save(buf, "PNG")
        pngs.append(buf.getvalue())
    expected = expected_answers(art, pngs)

    candidates = servers()
    for s in candidates:
        if not s.python.exists():
            s.failed.append(f"no venv at {s.python.parent.parent.relative_to(ROOT)} (bench/peers/venvs.sh failed; "
                            f"see .bench/peers/{s.peer}.install.log)")
    ceilings = []
    for round_no in range(1, ROUNDS + 1):
        ceilings.append(ceiling(art))  # in every round, beside the servers, so it drifts with them
        print(f"round {round_no}: ceiling (in-process engine on {art.name}/{art.version}) measured", flush=True)
        for s in candidates:
            if not s.python.exists() or any("wrong answers" in f for f in s.failed):
                continue
            t0 = time.monotonic()
            try:
                run_server(s, scripts, floor_script, env, tmp, pngs, expected, round_no)
            except (RuntimeError, subprocess.SubprocessError) as exc:
                s.failed.append(f"round {round_no}: {exc}".strip()[:1500])
                print(f"{s.name} FAILED: {s.failed[-1]}", flush=True)
                continue
            m = s.cells["model", "full", 64][-1]
            print(f"round {round_no}: {s.name} done in {time.monotonic() - t0:.0f} s "
                  f"(full depth c=64 {m['rps']:,.0f} images/s)", flush=True)
    if not candidates[0].cells:
        raise SystemExit(f"our service failed: {candidates[0].failed}")
    ran = [s for s in candidates if s.cells]
    left_out = [s for s in candidates if not s.cells]
    commands = "\n".join([
        "make bench-peers   # = bash bench/peers/venvs.sh && .venv/bin/python -m bench.peers.run",
        f"# env: ERDE_STORE={STORE} ERDE_DEFAULT_MODEL={art.name} BENCH_SECONDS={SECONDS:g} BENCH_ROUNDS={ROUNDS}",
        "# servers (cwd = repo root, PYTHONPATH = repo root, ERDE_HOST=127.0.0.1 ERDE_PORT=PORT):",
        *(f"{s.python.relative_to(ROOT)} {' '.join(s.model_cmd)}   # floor: {' '.join(s.floor_cmd)}"
          for s in candidates),
        "wrk -t1 -cC -dSs --timeout 10s --latency -s budget-<b>.lua http://127.0.0.1:PORT   # C in 1 16 64",
    ])
    ceil = {key: statistics.median(c[key] for c in ceilings) for key in ceilings[0]}
    report = build_report(art, ran, left_out, ceil, started, commands)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(report)
    print(report)
    for body in tmp.glob("body-*.bin"):
        body.unlink()
    print(f"written {REPORT.relative_to(ROOT)}; server logs in {tmp.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
