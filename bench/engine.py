"""In-process engine throughput: the stage-by-stage loop on pre-decoded tensors, no HTTP.

For full depth and budgets 1.0, 0.5 and 0.25 at batch 1 and 32: images/s and mean MACs per image,
measured in interleaved rounds (every round runs every point once, so drift in the machine's load
falls on all of them; single runs moved 30% between identical settings) and reported as medians,
with each point's speed over full depth as the median of its per-round ratios. Two bars at budget 0.25:
- the service issue's: images/s >= k x (full MACs / mean MACs) x full-depth images/s,
  k = 0.7 (batch 32), 0.5 (batch 1);
- issue 14's: time saved >= 0.7 of the MACs saved at batch 32, time saved = 1 - 1 / speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from bench.common import default_artifact, sample_images, table
from erde.data import normalize
from erde.nets import fuse_for_inference
from service.engine.compute import CPU, Sample, choose_stage_backends, run_batch

BUDGETS = (1.0, 0.5, 0.25)
SPEED_BAR = {1: 0.5, 32: 0.7}
TIME_SAVED_BAR = 0.7  # of the MACs saved, at batch 32


def run_for(model, xs: torch.Tensor, theta: float, batch: int, macs: list[int], backends: list[bool] | None,
            seconds: float, device: torch.device = CPU) -> tuple[float, int, int]:
    """Run `xs` in batches of `batch` at θ for `seconds`: (images/s, MACs spent, images run)."""
    cap = model.num_exits - 1
    done, spent, started = 0, 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        start = done % (len(xs) - batch + 1)
        exits = run_batch(model, [Sample(x, theta, cap, 1, 0.0) for x in xs[start:start + batch]],
                          lambda *_: None, mkldnn=backends, device=device)
        spent += sum(macs[e] for e in exits)
        done += batch
    return done / (time.perf_counter() - started), spent, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.4, help="per point and round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    art = default_artifact()
    spec = art.spec
    pixels = [np.array(im.convert(spec.mode)).reshape(spec.size, spec.size, -1) for im in sample_images(512, spec.size)]
    xs = normalize(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2), spec)  # (N, C, H, W)
    macs = art.macs_per_exit
    model = fuse_for_inference(art.model)  # what the service runs
    backends = choose_stage_backends(model, 32)
    points = {"full depth": 0.0, **{str(b): art.calibration.choose(b)[0].threshold for b in BUDGETS}}
    cells = [(batch, label) for batch in (1, 32) for label in points]
    rates: dict[tuple[int, str], list[float]] = {cell: [] for cell in cells}
    spent = dict.fromkeys(cells, 0)
    counted = dict.fromkeys(cells, 0)
    for _ in range(args.rounds):
        for batch, label in cells:
            ips, used, images = run_for(model, xs, points[label], batch, macs, backends, args.seconds)
            rates[batch, label].append(ips)
            spent[batch, label] += used
            counted[batch, label] += images

    def speedup(batch: int, label: str) -> float:
        full = rates[batch, "full depth"]
        return statistics.median(r / f for r, f in zip(rates[batch, label], full, strict=True))

    def macs_fraction(batch: int, label: str) -> float:
        return spent[batch, label] / counted[batch, label] / macs[-1]

    rows = [[batch, label, f"{points[label]:.4f}", f"{statistics.median(rates[batch, label]):,.0f}",
             f"{min(rates[batch, label]):,.0f}-{max(rates[batch, label]):,.0f}",
             f"{macs_fraction(batch, label):.3f}", f"{speedup(batch, label):.2f}x"] for batch, label in cells]
    print(f"# In-process engine: {art.name}/{art.version}, torch threads 1, {len(xs)} images, "
          f"oneDNN per stage {backends}, {args.rounds} interleaved rounds of {args.seconds:g} s per point\n")
    print("Written by `make bench` (`.venv/bin/python -m bench.engine`).\n")
    print(table(["batch", "budget", "θ", "images/s (median)", "range", "MACs fraction", "vs full depth (median)"],
                rows))
    print("\nAt budget 0.25:")
    bar_rows = []
    for batch, k in SPEED_BAR.items():
        speed, fraction = speedup(batch, "0.25"), macs_fraction(batch, "0.25")
        time_saved, macs_saved = 1 - 1 / speed, 1 - fraction
        ratio = time_saved / macs_saved
        bar_rows.append([batch, f"{speed:.2f}x", f"{1 / fraction:.2f}x",
                         f"{'met' if speed >= k / fraction else 'MISSED'} (k = {k})",
                         f"{time_saved:.3f}", f"{macs_saved:.3f}", f"{ratio:.2f}",
                         ("met" if ratio >= TIME_SAVED_BAR else "MISSED") if batch == 32 else "-"])
    print(table(["batch", "speed-up", "MACs saving", "speed bar", "time saved", "MACs saved",
                 "time / MACs saved", f"issue 14 bar (>= {TIME_SAVED_BAR})"], bar_rows))


if __name__ == "__main__":
    main()
