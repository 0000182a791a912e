"""Latency per exit against MACs per exit, for every student candidate (issue 14, item 4).

Each candidate runs as the service runs it (BN folded, per-stage convolution backend chosen at
batch 32, one torch thread; erde.latency). Per exit and batch size (1, 32): the median time to
answer there, its fraction of full depth, and the MACs fraction (erde.macs). A budget saves time
only as far as the time fraction follows the MACs fraction.

The issue's metric, at budget 0.25 and batch 32: time saved / MACs saved, for the exit mix that
budget gives. Untrained candidates have no exit mix of their own, so the proxy borrows the served
model's calibration curve (its per-θ exit histograms and validation accuracies, i.e. how often
images leave at each exit) and re-costs every point with the candidate's own MACs per exit; the
budget rule (erde.calibrate.CalibrationCurve.choose) then picks the point for 0.25. A batch of 32
rows capped at their exits in that mix runs through the serving loop (service run_batch), against
the same 32 rows at full depth. For the served model's own architecture the mix is its real one.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from bench.common import default_artifact, table
from erde.curve import CalibrationCurve, OperatingPoint
from erde.latency import choose_stage_backends, exit_latency, machine_description
from erde.macs import macs_per_exit
from erde.nets import build_model, fuse_for_inference, model_config
from service.engine.compute import Sample, run_batch

CANDIDATES = ("resnet8-slim", "resnet8-slim-gp", "resnet8-narrow", "resnet8-s2", "resnet14-s2")
BUDGET, BATCH = 0.25, 32
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def mix_at_budget(curve: CalibrationCurve, macs: list[int], budget: float) -> OperatingPoint:
    """The operating point `budget` picks on `curve`'s exit histograms, costed with `macs` per exit."""
    points = [OperatingPoint(p.threshold, sum(h * m for h, m in zip(p.exit_histogram, macs, strict=True)) / macs[-1],
                             p.accuracy, p.exit_histogram) for p in curve.points]
    return CalibrationCurve(points, macs).choose(budget)[0]


def rows_per_exit(histogram: list[float], rows: int) -> list[int]:
    """`rows` split across exits in proportion to `histogram` (largest remainders), summing to `rows`."""
    exact = [h * rows for h in histogram]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[:rows - sum(counts)]:
        counts[i] += 1
    return counts


def tracking_gap(macs: list[int], seconds: list[float]) -> float:
    """Mean over the intermediate exits of (time fraction - MACs fraction) of full depth."""
    gaps = [t / seconds[-1] - m / macs[-1] for m, t in zip(macs[:-1], seconds[:-1], strict=True)]
    return sum(gaps) / len(gaps)


@torch.inference_mode()
def batch_times(fused, backends: list[bool], caps: list[list[int]], repeats: int,
                clock: Callable[[], float]) -> list[float]:
    """Median seconds of one served batch per entry of `caps`, whose row r stops at exit caps[k][r]
    (θ = 0: only its cap stops a row); the batches take turns, so a passing load falls on all alike."""
    cfg = fused.config
    x = torch.randn(len(caps[0]), cfg.in_channels, cfg.input_size, cfg.input_size)
    jobs = [[Sample(x[r], 0.0, cap, 1, 0.0) for r, cap in enumerate(row_caps)] for row_caps in caps]
    times: list[list[float]] = [[] for _ in caps]
    for k in range(-1, repeats):  # -1: warm
        for batch, spent in zip(jobs, times, strict=True):
            started = clock()
            run_batch(fused, batch, lambda *_: None, mkldnn=backends)
            if k >= 0:
                spent.append(clock() - started)
    return [statistics.median(t) for t in times]


def measure(arch: str, spec, num_classes: int, curve: CalibrationCurve, repeats: int,
            clock: Callable[[], float]) -> dict:
    model = build_model(model_config(arch, in_channels=spec.channels, input_size=spec.size, num_classes=num_classes))
    macs = macs_per_exit(model)
    fused = fuse_for_inference(model)
    backends = choose_stage_backends(fused, BATCH)
    latency = {b: exit_latency(fused, backends, b, repeats, clock) for b in (1, BATCH)}
    point = mix_at_budget(curve, macs, BUDGET)
    counts = rows_per_exit(point.exit_histogram, BATCH)
    caps = [i for i, n in enumerate(counts) for _ in range(n)]
    mixed, full = batch_times(fused, backends, [caps, [len(macs) - 1] * BATCH], repeats, clock)
    macs_fraction = sum(n * m for n, m in zip(counts, macs, strict=True)) / (BATCH * macs[-1])
    return {"macs": macs, "latency": latency, "counts": counts, "macs_fraction": macs_fraction,
            "reached": macs_fraction <= BUDGET + 1e-9, "time_fraction": mixed / full,
            "ratio": (1 - mixed / full) / (1 - macs_fraction)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=40, help="timed runs per exit and batch size (median)")
    parser.add_argument("--arch", nargs="+", default=list(CANDIDATES), help="architectures to measure")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall: what a caller waits; cpu: this thread's CPU time (steadier on a loaded machine)")
    args = parser.parse_args()
    clock = CLOCKS[args.clock]
    torch.set_num_threads(1)
    served = default_artifact()
    results = {arch: measure(arch, served.spec, len(served.classes), served.calibration, args.repeats, clock)
               for arch in args.arch}
    print(f"# Latency per exit vs MACs per exit (student candidates)\n\nMeasured on {machine_description()}; "
          f"torch {torch.__version__}, 1 thread, median of {args.repeats}, {args.clock} clock. "
          f"Exit mix for budget {BUDGET}: "
          f"{served.name}/{served.version}'s calibration curve, re-costed with each candidate's MACs "
          f"(see bench/exit_latency.py).\n")
    rows = []
    for arch, r in results.items():
        for i, m in enumerate(r["macs"]):
            t1, t32 = (r["latency"][b][i] for b in (1, BATCH))
            rows.append([arch, i, f"{m / 1e6:.2f}", f"{m / r['macs'][-1]:.3f}", f"{t1 * 1e3:.3f}",
                         f"{t1 / r['latency'][1][-1]:.3f}", f"{t32 * 1e3:.2f}", f"{t32 / r['latency'][BATCH][-1]:.3f}"])
    print(table(["arch", "exit", "MMACs", "MACs fraction", "ms b1", "time fraction b1", "ms b32",
                 "time fraction b32"], rows))
    print(f"\n## Budget {BUDGET}, batch {BATCH}: time saved / MACs saved (target >= 0.7)\n")
    print(table(["arch", "rows per exit", "MACs fraction", "time fraction", "time saved / MACs saved",
                 "tracking gap b1 / b32"],
                [[arch, " / ".join(map(str, r["counts"])),
                  f"{r['macs_fraction']:.3f}" + ("" if r["reached"] else " (cheapest: budget out of reach)"),
                  f"{r['time_fraction']:.3f}", f"{r['ratio']:.2f}",
                  " / ".join(f"{tracking_gap(r['macs'], r['latency'][b]):+.3f}" for b in (1, BATCH))]
                 for arch, r in results.items()]))
    print("\nTracking gap: time fraction minus MACs fraction, averaged over the exits before the last "
          "(0 = time follows MACs; above 0 = an early exit costs more time than its MACs say).")


if __name__ == "__main__":
    main()
