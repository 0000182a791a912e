"""The overload benchmark (issue 12): goodput and accuracy under open-loop load, `degrade` vs `reject`.

Per model: real labelled Fashion-MNIST test images, each request with a floor from a fixed mix
(none, and two floors on the model's curve). First its capacities, on the `reject` server: C_full,
the highest offered rate at budget 1.0 whose answered p99 stays under the 100 ms SLO with at most
1% refused, and C_floor, the same with every row at its floor's operating point (min_accuracy
alone). Then 0.5, 0.8, 1, 1.5, 2 and 3 x C_full for a fixed time each, on a `degrade` and a
`reject` server (both running throughout, used in turn, the order alternating per rate). The load
generator (bench/openloop.py) runs in its own process and reports whether it kept up.

Per phase it also reads the server process's CPU time (its event loop: the inference processes are
not its own), and per model and mode fits that CPU to a·answered + b·refused over the phases: b is
what a refusal costs the loop, a what a served request does (issue 23: refusals must be cheap).

`python -m bench.overload` writes reports/overload.md and reports/overload.png; `--quick` is a
smoke run of the harness (under a minute, one model, nothing written to reports/).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.common import table
from bench.load import BOUNDARY, ROOT, launch, multipart, server_port, stop
from bench.openloop import NOT_SENT, Outcome, Phase, generate
from erde.artifact import list_versions
from erde.data import load_fashion_mnist
from erde.store import read_artifact
from service.settings import Settings

SLO_S = 0.100  # the p99 latency target
STUDENT, TEACHER = "fashion-mnist", "fashion-mnist-teacher"
# The floor mix of the student (the issue's; None: no min_accuracy, so ERDE_MIN_ACCURACY applies when
# degraded). Other models get floors at the same places on their own curve (floor_mix).
STUDENT_FLOORS = (None, 0.88, 0.91)
STARTUP_TIMEOUT_S = 120
MAX_REFUSED = 0.01  # a capacity trial fails above this share of non-200 answers


@dataclass(frozen=True)
class Plan:
    models: list[str]
    phase_s: float  # seconds per (mode, rate) phase
    trial_s: float  # seconds per capacity trial
    multiples: tuple[float, ...]  # offered loads, in units of C_full
    images: int  # distinct test images sent (cycled)
    refine: int  # bisection steps of each capacity search
    start_rate: float  # first rate a capacity search tries
    cooldown_s: float  # pause between phases: the queue drains, the controller sees no delay


@dataclass(frozen=True)
class Workload:
    """Whole HTTP requests, with what the harness must know of each: its image's label and its floor."""

    requests: list[bytes]
    labels: list[int]
    floors: list[float | None]


@dataclass
class Summary:
    """One phase or trial, as the report shows it."""

    label: str
    offered: float  # requests/s offered
    sent: float  # requests/s the generator actually sent
    lag_p99_ms: float  # how late the sends were
    generator_cpu: float  # share of one core the generator used
    goodput: float  # 200s within the SLO, per second of offered load
    p50_ms: float
    p99_ms: float  # of the answered (200) requests
    refused: float  # share answered 503
    failed: float  # share with another status (not 422), no answer, or not sent
    unsatisfiable: float  # share answered 422: a floor no operating point met (the live accuracy estimate's doing)
    degraded: float  # share of the answered that were degraded
    expected: float  # mean expected accuracy of the answered
    measured: float  # measured accuracy of the answered, against the labels
    measured_top_floor: float  # the same, for the requests with the highest floor of the mix
    below_floor: int  # answered below their floor (must be 0)
    answered: int = 0  # 200s
    refusals: int = 0  # 503s
    server_cpu_s: float = 0.0  # CPU the server process (its event loop) used during the phase
    top_floor_hits: list[bool] = field(default_factory=list, repr=False)
    # Where the answered (200) requests' time went, p50 and p99 in ms: before the app (all but the app's own, from the
    # scheduled send: the send lag, the socket buffers, the loop's backlog, the way back), in the app (the reply's own
    # latency_ms.total), and the inference queue within it.
    before_app_ms: tuple[float, float] = (math.nan, math.nan)
    in_app_ms: tuple[float, float] = (math.nan, math.nan)
    queue_ms: tuple[float, float] = (math.nan, math.nan)


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def http_request(body: bytes) -> bytes:
    return (f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}"
            f"\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def accuracy_range(model: str) -> tuple[float, float]:
    """(expected accuracy of the cheapest operating point, the best one's) of the served version."""
    art = read_artifact(ROOT / "model_store" / model / list_versions(ROOT / "model_store")[model][-1])
    cheapest = min(art.calibration.points, key=lambda p: (p.macs_fraction, -p.accuracy))
    return cheapest.accuracy, max(p.accuracy for p in art.calibration.points)


def floor_mix(model: str) -> tuple[float | None, ...]:
    """The student's mix; for another model, the floors at the same fractions of the way from its
    cheapest point's accuracy to its best (rounded down to 0.001, so that each stays on offer)."""
    if model == STUDENT:
        return STUDENT_FLOORS
    low, high = accuracy_range(STUDENT)
    own_low, own_high = accuracy_range(model)
    return tuple(None if f is None else math.floor((own_low + (f - low) / (high - low) * (own_high - own_low)) * 1e3)
                 / 1e3 for f in STUDENT_FLOORS)


def workload(model: str, mix: tuple[float | None, ...], pngs: list[bytes], labels: list[int], at_floor: bool,
             server_floor: float) -> Workload:
    """Image i carries the mix's floor i mod 3. Asked: budget 1.0 plus the floor; at_floor: the floor
    alone (the server floor for rows without one), i.e. the cheapest point meeting it."""
    requests, floors = [], []
    for i, png in enumerate(pngs):
        floor = mix[i % len(mix)]
        fields = {"model": model}
        if at_floor:
            fields["min_accuracy"] = str(server_floor if floor is None else floor)
        else:
            fields["budget"] = "1.0"
            if floor is not None:
                fields["min_accuracy"] = str(floor)
        requests.append(http_request(multipart(png, fields)))
        floors.append(floor)
    return Workload(requests, labels, floors)


def summarise(label: str, rate: float, seconds: float, outcomes: list[Outcome], spread: float, cpu: float,
              load: Workload, server_floor: float, server_cpu_s: float = 0.0) -> Summary:
    n = len(outcomes)
    ok = [o for o in outcomes if o.status == 200]
    latencies = np.array([o.latency for o in ok]) if ok else np.array([math.inf])
    top = max(f for f in load.floors if f is not None)
    hits = [o.reply["class_id"] == load.labels[o.body] for o in ok]
    top_hits = [h for o, h in zip(ok, hits, strict=True) if load.floors[o.body] == top]
    below = 0
    for o in ok:
        floor = load.floors[o.body]
        limit = floor if floor is not None else (server_floor if o.reply["degraded"] else 0.0)
        below += o.reply["expected_accuracy"] < limit - 1e-9
    sent = [o for o in outcomes if o.status != NOT_SENT]
    in_app = np.array([o.reply["latency_ms"]["total"] for o in ok]) if ok else np.array([math.nan])
    queue = np.array([o.reply["latency_ms"]["queue"] for o in ok]) if ok else np.array([math.nan])
    before_app = latencies * 1e3 - in_app
    return Summary(
        label, rate, (len(sent) - 1) / spread if spread > 0 else 0.0,
        float(np.percentile([o.lag for o in sent], 99)) * 1e3 if sent else math.inf, cpu / seconds,
        sum(1 for o in ok if o.latency <= SLO_S) / seconds,
        float(np.percentile(latencies, 50)) * 1e3, float(np.percentile(latencies, 99)) * 1e3,
        sum(1 for o in outcomes if o.status == 503) / n,
        sum(1 for o in outcomes if o.status not in (200, 503, 422)) / n,
        sum(1 for o in outcomes if o.status == 422) / n,
        sum(1 for o in ok if o.reply["degraded"]) / len(ok) if ok else 0.0,
        float(np.mean([o.reply["expected_accuracy"] for o in ok])) if ok else math.nan,
        float(np.mean(hits)) if ok else math.nan, float(np.mean(top_hits)) if top_hits else math.nan,
        below, len(ok), sum(1 for o in outcomes if o.status == 503), server_cpu_s, top_hits,
        p50_p99(before_app), p50_p99(in_app), p50_p99(queue))


def p50_p99(values: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def others(outcomes: list[Outcome]) -> str:
    """The answers that were neither 200 nor 503, by status (0: none, -1: not sent), when there are any."""
    counts = Counter(o.status for o in outcomes if o.status not in (200, 503))
    return f" other {dict(counts)}" if counts else ""


def settle(port: int, cooldown_s: float, limit_s: float = 60.0) -> None:
    """Wait until the server holds no request (the backlog of an overloaded phase is answered or gone),
    then `cooldown_s` more: the controller sees no delay, and the next phase starts from idle."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except httpx.HTTPError:
            time.sleep(0.5)
            continue
        busy = [line for line in text.splitlines() if line.startswith(("erde_inflight_requests ", "erde_queue_depth{"))]
        if all(float(line.rsplit(" ", 1)[1]) == 0 for line in busy):
            break
        time.sleep(0.5)
    time.sleep(cooldown_s)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (its own threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def offer(server: tuple[int, int], load: Workload, rate: float, seconds: float, label: str,
          server_floor: float) -> Summary:
    """One phase against `server` (port, pid)."""
    port, pid = server
    order = [int(i) for i in np.random.default_rng(0).permutation(len(load.requests))]
    before = cpu_seconds(pid)
    outcomes, spread, cpu = generate(Phase("127.0.0.1", port, rate, seconds, order), load.requests)
    summary = summarise(label, rate, seconds, outcomes, spread, cpu, load, server_floor, cpu_seconds(pid) - before)
    print(f"  {label:>22} offered {rate:8.1f}/s sent {summary.sent:8.1f}/s goodput {summary.goodput:8.1f}/s "
          f"p99 {summary.p99_ms:8.1f} ms 503 {summary.refused:6.1%} degraded {summary.degraded:6.1%}"
          f"{others(outcomes)}", flush=True)
    return summary


def capacity(server: tuple[int, int], load: Workload, plan: Plan, name: str,
             server_floor: float) -> tuple[float, list[Summary]]:
    """The highest rate whose answered p99 is under the SLO with at most MAX_REFUSED refused: from the
    start rate, x1.5 while trials pass (or /2 while they fail) until the first change, then bisected
    (geometrically) `plan.refine` times."""
    trials: list[Summary] = []

    def passes(rate: float) -> bool:
        s = offer(server, load, rate, plan.trial_s, f"{name} {rate:.0f}/s", server_floor)
        trials.append(s)
        settle(server[0], plan.cooldown_s)
        return s.p99_ms < SLO_S * 1e3 and s.refused + s.failed <= MAX_REFUSED

    good, bad, rate = 0.0, math.inf, plan.start_rate
    while good == 0 or math.isinf(bad):
        if rate < 1:
            raise SystemExit(f"{name}: even 1 request/s misses the SLO; is the machine that busy?")
        if passes(rate):
            good, rate = rate, rate * 1.5
        else:
            bad, rate = rate, rate / 2
    for _ in range(plan.refine):
        middle = math.sqrt(good * bad)
        if passes(middle):
            good = middle
        else:
            bad = middle
    return good, trials


def servers(models: list[str], log_dir: Path) -> dict[str, tuple[subprocess.Popen, int]]:
    """One server per overload mode, both serving the store throughout (started side by side)."""
    env = {**os.environ, "ERDE_STORE": str(ROOT / "model_store"), "ERDE_HOST": "127.0.0.1", "ERDE_ACCESS_LOG": "false",
           "ERDE_DEFAULT_MODEL": models[0]}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    modes = ("degrade", "reject")
    ports = [server_port() for _ in modes]
    with ThreadPoolExecutor(len(modes)) as pool:
        started = list(pool.map(lambda mode, port: launch([sys.executable, "-m", "service"], port,
                                                          {**env, "ERDE_OVERLOAD": mode}, log_dir / f"{mode}.log",
                                                          STARTUP_TIMEOUT_S), modes, ports))
    for mode, port, (_, ready_s) in zip(modes, ports, started, strict=True):
        print(f"{mode} server on port {port}, ready in {ready_s:.1f} s", flush=True)
    return {mode: (proc, port) for mode, port, (proc, _) in zip(modes, ports, started, strict=True)}


def run_model(model: str, plan: Plan, ports: dict[str, tuple[int, int]], test_images: np.ndarray,
              test_labels: list[int], server_floor: float, known: tuple[float, float] | None = None) -> dict:
    """One model's capacities (searched, or `known` from an earlier run: the same offered rates for two
    builds side by side) and its phases."""
    pngs = [encode_png(im) for im in test_images[:plan.images]]
    labels = test_labels[:plan.images]
    mix = floor_mix(model)
    asked = workload(model, mix, pngs, labels, False, server_floor)
    at_floor = workload(model, mix, pngs, labels, True, server_floor)
    if known is not None:
        (c_full, c_floor), full_trials, floor_trials = known, [], []
    else:
        print(f"# {model}: capacities on the reject server", flush=True)
        c_full, full_trials = capacity(ports["reject"], asked, plan, "C_full", server_floor)
        c_floor, floor_trials = capacity(ports["reject"], at_floor, plan, "C_floor", server_floor)
    print(f"# {model}: C_full {c_full:.0f}/s, C_floor {c_floor:.0f}/s", flush=True)
    phases: dict[tuple[str, float], Summary] = {}
    for i, multiple in enumerate(plan.multiples):
        modes = ("degrade", "reject") if i % 2 == 0 else ("reject", "degrade")
        for mode in modes:
            label = f"{mode} {multiple:g}C"
            phases[mode, multiple] = offer(ports[mode], asked, multiple * c_full, plan.phase_s, label, server_floor)
            settle(ports[mode][0], plan.cooldown_s)
    return {"model": model, "floors": mix, "c_full": c_full, "c_floor": c_floor,
            "trials": full_trials + floor_trials, "phases": phases}


def refusal_cost(phases: list[Summary]) -> tuple[float, float]:
    """(server CPU µs per answered request, per refusal): a least-squares fit of each phase's server CPU
    to idle + a·answered + b·refused (NaN where the phases cannot tell them apart)."""
    if len(phases) < 3 or not any(s.refusals for s in phases):
        return math.nan, math.nan
    design = np.array([[1.0, s.answered, s.refusals] for s in phases])
    (_, a, b), *_ = np.linalg.lstsq(design, np.array([s.server_cpu_s for s in phases]), rcond=None)
    return a * 1e6, b * 1e6


def targets(result: dict) -> list[tuple[str, bool, str]]:
    """The issues' targets for one model: (what, met, the numbers)."""
    phases, c_full, c_floor = result["phases"], result["c_full"], result["c_floor"]
    out = []
    slo_ms = SLO_S * 1e3
    for multiple in (1.5, 2.0, 3.0):
        if ("degrade", multiple) not in phases:
            continue
        degrade, reject = phases["degrade", multiple], phases["reject", multiple]
        need = 0.8 * min(degrade.offered, c_floor)
        out.append((f"{multiple:g}C: degrade goodput >= 0.8 x min(offered, C_floor)", degrade.goodput >= need,
                    f"{degrade.goodput:.0f}/s vs {need:.0f}/s"))
        out.append((f"{multiple:g}C: reject goodput >= 0.8 x C_full", reject.goodput >= 0.8 * c_full,
                    f"{reject.goodput:.0f}/s vs {0.8 * c_full:.0f}/s"))
        out.append((f"{multiple:g}C: p99 of the answered <= {slo_ms:.0f} ms, both modes",
                    max(degrade.p99_ms, reject.p99_ms) <= slo_ms,
                    f"degrade {degrade.p99_ms:.1f} ms, reject {reject.p99_ms:.1f} ms"))
    light = [(key, s) for key, s in phases.items() if key[1] <= 0.8]
    if light:
        refused = max(s.refused + s.failed for _, s in light)
        out.append(("<= 0.8 C_full: nothing refused, both modes", refused == 0, f"at most {refused:.2%} not answered"))
        worst = max(s.p99_ms for _, s in light)
        out.append((f"<= 0.8 C_full: p99 <= {slo_ms:.0f} ms", worst <= slo_ms, f"at most {worst:.1f} ms"))
    below = sum(s.below_floor for s in phases.values())
    out.append(("no answered request below its floor", below == 0, f"{below} below"))
    top = max(f for f in result["floors"] if f is not None)
    hits = [h for (mode, _), s in phases.items() if mode == "degrade" for h in s.top_floor_hits]
    accuracy = float(np.mean(hits)) if hits else math.nan
    out.append((f"floor-{top:g} requests (degrade): measured accuracy >= {top - 0.01:.2f}",
                accuracy >= top - 0.01, f"{accuracy:.4f} over {len(hits)} answers"))
    low = [s for (mode, m), s in phases.items() if mode == "degrade" and m <= 0.5]
    if low:
        share = max(s.degraded for s in low)
        out.append(("<= 0.5 C_full: nothing degraded", share == 0, f"{share:.2%} degraded"))
    return out


def row(model: str, mode: str, multiple: float, s: Summary) -> list[object]:
    return [model, mode, f"{multiple:g}", f"{s.offered:.0f}", f"{s.sent:.0f}", f"{s.goodput:.0f}", f"{s.p50_ms:.1f}",
            f"{s.p99_ms:.1f}", f"{s.refused:.1%}", f"{s.failed:.1%}", f"{s.unsatisfiable:.1%}", f"{s.degraded:.1%}",
            f"{s.expected:.4f}",
            f"{s.measured:.4f}", f"{s.measured_top_floor:.4f}", s.below_floor, f"{s.lag_p99_ms:.1f}",
            f"{s.generator_cpu:.0%}", f"{s.server_cpu_s / max(s.answered + s.refusals, 1) * 1e6:.0f}"]


HEADERS = ["model", "mode", "x C_full", "offered/s", "sent/s", "goodput/s", "p50 ms", "p99 ms", "503", "other", "422",
           "degraded", "expected acc", "measured acc", "top-floor acc", "below floor", "send lag p99 ms", "gen CPU",
           "server µs/req"]


def in_order(result: dict) -> list[tuple[tuple[str, float], Summary]]:
    """A model's phases by offered load, then mode."""
    return sorted(result["phases"].items(), key=lambda kv: (kv[0][1], kv[0][0]))


def report(results: list[dict], plan: Plan, notes: list[str], plot: Path | None) -> str:
    load = os.getloadavg()
    lines = [f"# Overload: `degrade` vs `reject` under open-loop load ({time.strftime('%Y-%m-%d')})", "",
             f"{os.cpu_count()} CPU cores, load average {load[0]:.1f} at the end; {plan.phase_s:g} s per phase, "
             f"{plan.images} Fashion-MNIST test images cycled, SLO p99 {SLO_S * 1e3:.0f} ms. Generated by "
             f"`{' '.join(['python -m bench.overload', *sys.argv[1:]])}` (bench/overload.py; `make bench-overload`).",
             ""]
    lines += [f"- {n}" for n in notes]
    lines += ["", "## Capacities (reject server; given with --capacity, or searched)", ""]
    lines.append(table(["model", "floor mix", "C_full /s", "C_floor /s"],
                       [[r["model"], ", ".join("none" if f is None else f"{f:g}" for f in r["floors"]),
                         f"{r['c_full']:.0f}", f"{r['c_floor']:.0f}"] for r in results]))
    lines += ["", "## Phases", "",
              "goodput: 200s within the SLO per second; p50/p99 of the 200s; 503, other (other status, no answer "
              "or not sent) and 422 (a floor no point met: the live accuracy estimate moved the floors; not "
              "counted against a capacity trial) as shares of all requests; degraded, expected and measured accuracy "
              "over the 200s; "
              "top-floor acc: measured accuracy of the requests with the mix's highest floor.", ""]
    lines.append(table(HEADERS, [row(r["model"], mode, m, s) for r in results for (mode, m), s in in_order(r)]))
    lines += ["", "## Where the answered requests waited", "",
              "For the 200s, p50 / p99 in ms: before the app (the whole time from the scheduled send less the "
              "app's own: the send lag, the socket buffers and the event loop's backlog, which no admission law "
              "sees, and the reply's way back), in the app (the reply's `latency_ms.total`), and in the inference "
              "queue (part of the app's); the server's event loop as a share of one core over the phase.", ""]
    lines.append(table(["model", "mode", "x C_full", "answered/s", "before the app", "in the app", "queue",
                        "event loop"],
                       [[r["model"], mode, f"{m:g}", f"{s.answered / plan.phase_s:.0f}",
                         *(f"{a:.1f} / {b:.1f}" for a, b in (s.before_app_ms, s.in_app_ms, s.queue_ms)),
                         f"{s.server_cpu_s / plan.phase_s:.0%}"]
                        for r in results for (mode, m), s in in_order(r)]))
    lines += ["", "## What a refusal costs the server", "",
              "Server-process CPU (its event loop) per request, fitted over each model and mode's phases as "
              "idle + a·answered + b·refused.", ""]
    costs = []
    for r in results:
        for mode in ("degrade", "reject"):
            a, b = refusal_cost([s for (md, _), s in r["phases"].items() if md == mode])
            costs.append([r["model"], mode, f"{a:.0f}", f"{b:.0f}", f"{b / a:.2f}" if a > 0 else "n/a"])
    lines.append(table(["model", "mode", "µs per answered", "µs per refusal", "refusal / answered"], costs))
    behind = [f"{r['model']} {s.label}" for r in results for s in [*r["trials"], *r["phases"].values()]
              if s.sent < 0.97 * s.offered]
    lines += ["", f"The generator fell behind (sent under 97% of the offered rate) in: {', '.join(behind)}." if behind
              else "The generator kept up (sent at least 97% of the offered rate) in every trial and phase."]
    lines += ["", "## Targets", ""]
    for r in results:
        for what, met, numbers in targets(r):
            lines.append(f"- {r['model']}: {what}: **{'met' if met else 'missed'}** ({numbers})")
    if plot is not None:
        lines += ["", f"![goodput and measured accuracy vs offered load]({plot.name})"]
    return "\n".join(lines) + "\n"


def draw(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 4 * len(results)), squeeze=False)
    for (goodput_ax, accuracy_ax), r in zip(axes, results, strict=True):
        for mode, style in (("degrade", "o-"), ("reject", "s--")):
            points = sorted((m * r["c_full"], s) for (md, m), s in r["phases"].items() if md == mode)
            offered = [o for o, _ in points]
            goodput_ax.plot(offered, [s.goodput for _, s in points], style, label=mode)
            accuracy_ax.plot(offered, [s.measured for _, s in points], style, label=mode)
        goodput_ax.axhline(r["c_floor"], color="grey", lw=0.8, ls=":", label="C_floor")
        goodput_ax.set(title=f"{r['model']}: goodput (200 within {SLO_S * 1e3:.0f} ms)", xlabel="offered requests/s",
                       ylabel="requests/s")
        accuracy_ax.set(title=f"{r['model']}: measured accuracy of the answered", xlabel="offered requests/s",
                        ylabel="accuracy")
        for ax in (goodput_ax, accuracy_ax):
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: the student, short phases, no report files")
    parser.add_argument("--phase-s", type=float, help="seconds per phase (default 10, quick 1.5)")
    parser.add_argument("--capacity", action="append", default=[], metavar="MODEL=C_FULL:C_FLOOR",
                        help="a model's capacities from an earlier run, instead of searching them")
    parser.add_argument("--out", type=Path, help="report path (default reports/overload.md; quick: a temp folder)")
    parser.add_argument("--model", action="append", default=[], help="measure only this model (repeatable)")
    parser.add_argument("--multiples", help="offered loads in units of C_full, comma-separated "
                        "(default 0.5,0.8,1,1.5,2,3)")
    args = parser.parse_args()
    served = list_versions(ROOT / "model_store")
    notes = []
    models = [m for m in (args.model or [STUDENT, TEACHER]) if m in served]
    if TEACHER not in served:
        notes.append(f"{TEACHER} is not in model_store/: the student alone was measured.")
    if args.quick:
        plan = Plan([STUDENT], args.phase_s or 1.5, 1.0, (0.5, 2.0), 300, 0, 400.0, 0.5)
    else:
        multiples = tuple(map(float, args.multiples.split(","))) if args.multiples else (0.5, 0.8, 1.0, 1.5, 2.0, 3.0)
        plan = Plan(models, args.phase_s or 10.0, 5.0, multiples, 3000, 3, 200.0, 3.0)
    out = args.out or (Path(tempfile.mkdtemp(prefix="erde-overload-")) / "overload.md" if args.quick
                       else ROOT / "reports" / "overload.md")
    server_floor = Settings().min_accuracy
    test = load_fashion_mnist("test")
    images, labels = test.images[:, 0].numpy(), test.labels.tolist()
    log_dir = Path(tempfile.mkdtemp(prefix="erde-overload-logs-"))
    procs = servers(plan.models, log_dir)
    try:
        ports = {mode: (port, proc.pid) for mode, (proc, port) in procs.items()}
        known = {name: tuple(map(float, rates.split(":"))) for name, rates in
                 (item.split("=") for item in args.capacity)}
        results = [run_model(m, plan, ports, images, labels, server_floor, known.get(m)) for m in plan.models]
    finally:
        for proc, _ in procs.values():
            stop(proc)
    plot = out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    draw(results, plot)
    text = report(results, plan, notes, plot)
    out.write_text(text)
    print("\n" + text)
    print(f"wrote {out} and {plot}")


if __name__ == "__main__":
    main()
