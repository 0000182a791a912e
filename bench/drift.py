"""`make bench-drift` (issue 19): what budgets spend and what replies promise on shifted images, before
(ERDE_DRIFT=off: θ as calibrated, the calibrated accuracy quoted) and after (the drift guard on).

Both shipped models over real HTTP, on the shifts no test and no parameter was tuned on
(bench/shifts.py UNSEEN). Per model and server, one stream with the budgets 0.25 and 0.5 mixed
(alternate 32-image batch requests): clean images, then each shift of the same test images followed
by clean images again (the return), and clean images at the end. Each segment is measured after the
stated adaptation length (docs/budgets.md); the labels are known here, never to the server.
Writes reports/drift.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench import shifts
from bench.common import table
from bench.load import ROOT, launch, server_port, stop
from erde.artifact import list_versions
from erde.data import load_fashion_mnist
from erde.estimator import AccuracyEstimator
from erde.store import read_artifact
from service.engine.drift import DriftGuard, DriftLaw
from service.engine.policy import BudgetPolicy
from service.engine.registry import report_drift
from service.schemas import ClassifyOptions

MODELS = ("fashion-mnist", "fashion-mnist-teacher")
# The budgets; the teacher's cheapest point costs 0.353 of its MACs, so 0.25 is below it (clamped).
BUDGETS = {"fashion-mnist": (0.25, 0.5), "fashion-mnist-teacher": (0.4, 0.5)}
ROWS = 32
KEPT = ("macs_fraction", "right", "expected_accuracy", "expected_accuracy_offline", "expected_accuracy_live",
        "accuracy_source", "threshold")
ADAPT = 200  # replies per budget after a change of images before a segment is measured (docs/budgets.md)
# The live estimate at a segment's end covers the last ERDE_DRIFT_WINDOW (400) shadow rows, 1/0.15 replies
# apart over both budgets: about 1,330 replies per budget. Its truth: the last 1,000 replies at that budget.
TRUE_OVER = 1000
RETRIES = 30  # times a refused batch is sent again before the run gives up


@dataclass
class Segment:
    name: str
    pictures: np.ndarray
    labels: np.ndarray


def png(picture: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(picture, "L").save(buf, "PNG")
    return buf.getvalue()


def shadow_share(url: str, model: str) -> float:
    """The MACs the server spent on shadow passes for `model`, as a share of those its answers spent."""
    text = httpx.get(f"{url}/metrics").text
    def total(name: str) -> float:
        found = re.search(rf'^{name}{{model="{re.escape(model)}"}} (\S+)$', text, re.M)
        return float(found[1]) if found else 0.0
    return total("erde_shadow_macs_total") / total("erde_macs_total")


def post_until_taken(client: httpx.Client, fields: dict[str, str], files: list) -> httpx.Response:
    """One batch request, sent again after its Retry-After while the server refuses it (503): on a machine
    whose cores the load generator shares, the overload law may refuse a batch; the stream's order stays."""
    for _ in range(RETRIES):
        r = client.post("/classify/batch", data=fields, files=files)
        if r.status_code != 503:
            break
        time.sleep(float(r.headers.get("retry-after", "1")))
    r.raise_for_status()
    return r


def run_stream(url: str, model: str, segments: list[Segment]) -> dict[tuple[str, float], list[dict]]:
    """Every segment's images at both budgets, interleaved batch by batch; replies per (segment, budget)."""
    out: dict[tuple[str, float], list[dict]] = {}
    with httpx.Client(base_url=url, timeout=60) as client:
        for seg in segments:
            pngs = [png(p) for p in seg.pictures]
            for at in range(0, len(pngs), ROWS):
                for budget in BUDGETS[model]:
                    files = [("image", (f"{i}.png", d, "image/png")) for i, d in enumerate(pngs[at:at + ROWS])]
                    r = post_until_taken(client, {"budget": str(budget), "model": model}, files)
                    for reply, label in zip(r.json()["results"], seg.labels[at:at + ROWS], strict=True):
                        reply["right"] = reply["class_id"] == int(label)
                        out.setdefault((seg.name, budget), []).append(reply)
    return out


def adapted_after(replies: list[dict], budget: float) -> int | None:
    """Replies until the mean MACs fraction of the next 500, and of all the rest, is at most 1.05 × the budget
    (a window of 500 replies: at budget 0.25 one reply's cost varies so much that a 200-reply mean moves by
    ±6% at a fixed θ)."""
    spent = np.array([r["macs_fraction"] for r in replies])
    for start in range(0, len(spent) - 500 + 1, 25):
        if spent[start:start + 500].mean() <= 1.05 * budget and spent[start:].mean() <= 1.05 * budget:
            return start
    return None


def summarise(replies: list[dict], budget: float, drift: bool) -> dict:
    measured = replies[ADAPT:]
    last = replies[-1]
    offline = float(np.mean([r["expected_accuracy_offline"] for r in measured]))
    return {"spent": float(np.mean([r["macs_fraction"] for r in measured])),
            "accuracy": float(np.mean([r["right"] for r in measured])),
            "expected": float(np.mean([r["expected_accuracy"] for r in measured])) if drift else offline,
            "live": last["expected_accuracy_live"], "source": last["accuracy_source"],
            "theta": last["threshold"], "peak": max(np.mean([r["macs_fraction"] for r in replies[k:k + 100]])
                                                   for k in range(0, len(replies) - 99, 25)),
            "true_recent": float(np.mean([r["right"] for r in replies[-TRUE_OVER:]]))}


def controller_cost(model: str, repeats: int = 20000) -> float:
    """Microseconds of drift-guard work per reply, in process: θ for the row, the law's step, the live
    shift for floors and the metrics, and a shadow row every 1/shadow_fraction replies (which renews the
    accuracy estimate over the evidence), as the service does them."""
    art = read_artifact(ROOT / "model_store" / model / list_versions(ROOT / "model_store")[model][-1])
    policy = BudgetPolicy(art.calibration, art.model.num_exits, len(art.classes), 0.5, 100)
    law = DriftLaw()
    guard = DriftGuard(art.calibration, AccuracyEstimator.from_manifest(art.manifest.get("estimator"), art.calibration),
                       law, enabled=True)
    guard.on_change = lambda point, budget, cell: report_drift(model, guard, policy, budget, cell)  # as served
    decision = policy.decide(ClassifyOptions(budget=0.25))
    rng = np.random.default_rng(0)
    exits = rng.integers(0, art.model.num_exits, repeats)
    fractions = (np.array(art.macs_per_exit)[exits] / art.macs_per_exit[-1]).tolist()
    entropy = rng.random((repeats, art.model.num_exits)) * 2
    prediction = rng.integers(0, len(art.classes), (repeats, art.model.num_exits))
    every = round(1 / law.shadow_fraction)
    started = time.perf_counter()
    for i, f in enumerate(fractions):
        guard.theta(decision)
        if i % every == 0:
            guard.witness(entropy[i:i + 1], prediction[i:i + 1])
        guard.observe(decision, f)
    return (time.perf_counter() - started) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1500, help="test images per shifted segment")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "drift.md")
    parser.add_argument("--save", type=Path, help="also write the replies' figures here (JSON)")
    parser.add_argument("--load", type=Path, help="write the report from replies saved by --save, serving nothing")
    args = parser.parse_args()
    test = load_fashion_mnist("test")
    pictures, labels = test.images[:, 0].numpy(), test.labels.numpy()
    n = args.images
    base, base_labels = pictures[:n], labels[:n]
    segments = [Segment("clean", pictures[n:2 * n], labels[n:2 * n])]
    for i, (name, shift) in enumerate(shifts.UNSEEN.items()):
        segments.append(Segment(name, shift(base, 100 + i), base_labels))
        at = 2 * n + i * 600
        segments.append(Segment(f"return after {name}", pictures[at:at + 600], labels[at:at + 600]))
    segments.append(Segment("clean, at the end", pictures[n:2 * n], labels[n:2 * n]))
    if args.load:
        saved = json.loads(args.load.read_text())
        results = {(m, mode): {(seg, float(b)): replies for seg, b, replies in streams}
                   for m, mode, streams in saved["streams"]}
        shadows = saved["shadow"]
    else:
        results, shadows = serve_and_stream(segments)
    if args.save:
        args.save.write_text(json.dumps({"streams": [[m, mode, [[seg, b, [{k: r[k] for k in KEPT} for r in replies]]
                                                                for (seg, b), replies in streams.items()]]
                                                     for (m, mode), streams in results.items()],
                                         "shadow": shadows}))
    args.out.write_text(report(results, segments, {m: controller_cost(m) for m in MODELS}, shadows, n))
    print(args.out.read_text())


def serve_and_stream(segments: list[Segment]) -> tuple[dict[tuple[str, str], dict], dict[str, float]]:
    """Both servers (ERDE_DRIFT off, then on), every model's stream through each; and the share of MACs
    each model spent on shadow passes with the drift guard on."""
    env = {**os.environ, "ERDE_STORE": str(ROOT / "model_store"), "ERDE_HOST": "127.0.0.1",
           "ERDE_ACCESS_LOG": "false", "ERDE_QUEUE_SIZE": "1024", "ERDE_OVERLOAD": "reject"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    results: dict[tuple[str, str], dict] = {}
    shadows: dict[str, float] = {}
    logs = Path(tempfile.mkdtemp(prefix="erde-bench-drift-"))
    for mode in ("off", "on"):
        port = server_port()
        proc, ready = launch([sys.executable, "-m", "service"], port, {**env, "ERDE_DRIFT": mode},
                             logs / f"{mode}.log", 300)
        print(f"ERDE_DRIFT={mode}: ready in {ready:.1f} s", flush=True)
        try:
            for model in MODELS:
                started = time.monotonic()
                results[(model, mode)] = run_stream(f"http://127.0.0.1:{port}", model, segments)
                if mode == "on":
                    shadows[model] = shadow_share(f"http://127.0.0.1:{port}", model)
                print(f"  {model}: {time.monotonic() - started:.0f} s", flush=True)
        finally:
            stop(proc)
    return results, shadows


def targets(model: str, results: dict, segments: list[Segment]) -> list[tuple[str, bool]]:
    """Each done-when target of the issue, per segment and budget, from the same figures as the table."""
    out = []
    for seg in segments:
        for budget in BUDGETS[model]:
            b, a = (summarise(results[(model, m)][(seg.name, budget)], budget, m == "on") for m in ("off", "on"))
            where = f"{seg.name}, budget {budget}"
            out.append((f"{where}: spent {a['spent'] / budget:.2f} × budget ≤ 1.05", a["spent"] <= 1.05 * budget))
            # The rule (docs/budgets.md): at least 0.9 × the budget, or what the calibrated θ spends when that
            # is less (the calibration's most accurate point within the budget: more depth bought nothing).
            floor = min(0.9 * budget, 0.95 * b["spent"])
            out.append((f"{where}: spent {a['spent']:.3f} ≥ {floor:.3f} (0.9 × budget, or 0.95 × the calibrated "
                        "θ's spend when less)", a["spent"] >= floor))
            if seg.name.startswith("clean"):
                out.append((f"{where}: accuracy {a['accuracy']:.1%} at most 0.3 points below today's "
                            f"{b['accuracy']:.1%}", a["accuracy"] >= b["accuracy"] - 0.003 - 1e-9))
                out.append((f"{where}: compute {a['spent']:.3f} ≤ today's {b['spent']:.3f}",
                            a["spent"] <= b["spent"] + 1e-9))
            elif not seg.name.startswith("return") and a["live"] is not None:
                out.append((f"{where}: live estimate {a['live']:.1%} within 5 points of the true "
                            f"{a['true_recent']:.1%}", abs(a["live"] - a["true_recent"]) <= 0.05))
    return out


def report(results: dict, segments: list[Segment], cost_us: dict[str, float], shadows: dict[str, float],
           n: int) -> str:
    lines = ["# Budgets under drift (issue 19)", "",
             f"`make bench-drift` ({time.strftime('%Y-%m-%d')}): both shipped models over HTTP, two budgets "
             f"mixed in one stream (the student's 0.25 and 0.5; the teacher's 0.4 and 0.5, as its cheapest point "
             f"costs 0.353), {n} test images per shifted segment (the same images under each "
             "shift), 600 clean images after each shift (the return). Shifts: "
             + ", ".join(shifts.UNSEEN) + " (bench/shifts.py; none is used by a test). Every figure is over the "
             f"replies after the first {ADAPT} of a segment at that budget (the stated adaptation length); "
             "*before* is ERDE_DRIFT=off (θ as calibrated, the calibrated accuracy quoted: today's service), "
             "*after* the drift guard with its defaults (docs/budgets.md). ERDE_OVERLOAD=reject on both, so "
             "that the load-adaptive budgets (a batch of 32 waits longer than their 20 ms target on 2 cores) "
             "do not mix cheaper points into the figures.", ""]
    for model in MODELS:
        lines += [f"## {model}", ""]
        rows, estimates, adapt = [], [], []
        for seg in segments:
            for budget in BUDGETS[model]:
                b, a = (summarise(results[(model, m)][(seg.name, budget)], budget, m == "on") for m in ("off", "on"))
                rows.append([seg.name, budget, f"{b['spent']:.3f}", f"{b['spent'] / budget:.2f}",
                             f"{b['accuracy']:.1%}", f"{b['expected']:.1%}", f"{a['spent']:.3f}",
                             f"**{a['spent'] / budget:.2f}**", f"{a['accuracy']:.1%}", f"{a['expected']:.1%}",
                             f"{a['peak'] / budget:.2f}", f"{a['theta']:.3f}"])
                if not seg.name.startswith("return"):
                    live = a["live"]
                    estimates.append([seg.name, budget, f"{a['true_recent']:.1%}",
                                      "n/a" if live is None else f"{live:.1%}",
                                      "n/a" if live is None else f"{(live - a['true_recent']) * 100:+.1f}",
                                      a["source"], f"{(b['expected'] - b['accuracy']) * 100:+.1f}"])
                replies = results[(model, "on")][(seg.name, budget)]
                if seg.name != "clean":
                    adapt.append([seg.name, budget, adapted_after(replies, budget)])
        lines += ["Targets (issue 19), after the adaptation length:", "",
                  *(f"- {'met' if ok else '**missed**'}: {what}" for what, ok in targets(model, results, segments)), ""]
        lines += ["| images | budget | before: spent | ÷ budget | accuracy | expected | after: spent | ÷ budget | "
                  "accuracy | expected | after: peak ÷ budget (100 replies) | after: θ at the end |",
                  "|" + "---|" * 12, *("| " + " | ".join(str(c) for c in r) + " |" for r in rows), "",
                  "Live accuracy estimate (shadow passes: agreement with the last exit and its ATC threshold, "
                  "docs/budgets.md) at the end of each segment against the true accuracy of the segment's last "
                  f"{TRUE_OVER:,} replies at that budget; *quoted* is the figure the last reply quoted (live once "
                  "the evidence contradicts the calibration); the last column is the error of today's "
                  "calibrated figure for comparison:", "",
                  table(["images", "budget", "true", "live estimate", "error (points)", "quoted",
                         "today's error (points)"],
                        estimates), "",
                  "Replies per budget until the next 500, and all the rest of the segment, spend at most "
                  "1.05 × the budget (measured on the stream):", "",
                  table(["segment", "budget", "replies"], adapt), "",
                  f"Controller work per reply (in process: θ for the row, the law's step, the live shift and the "
                  f"metrics, the estimate renewed after each shadow row): {cost_us[model]:.1f} µs. "
                  f"Shadow passes cost {shadows[model]:.1%} of the MACs the answers spent (erde_shadow_macs_total "
                  "over erde_macs_total, this stream; taken only while nothing else is queued).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
