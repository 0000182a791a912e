"""In-process engine throughput: the stage-by-stage loop on pre-decoded tensors, no HTTP.

For budgets 1.0, 0.5 and 0.25 at batch 1 and 32: images/s (median of repeats), mean MACs per
image, and the early-exit bar of the service issue: at budget 0.25,
    images/s >= k x (full MACs / mean MACs) x images/s at full depth,  k = 0.7 (batch 32), 0.5 (batch 1).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from bench.common import default_artifact, sample_images, table
from erde.data import normalize
from erde.nets import fuse_for_inference
from service.engine.compute import Sample, choose_stage_backends, run_batch

BUDGETS = (1.0, 0.5, 0.25)
BAR = {1: 0.5, 32: 0.7}


def measure(model, xs: torch.Tensor, theta: float, batch: int, macs: list[int], backends: list[bool],
            seconds: float = 2.0, repeats: int = 5) -> tuple[float, float]:
    """(median images/s, mean MACs per image) running `xs` in batches of `batch` at θ."""
    cap = model.num_exits - 1
    rates, spent, counted = [], 0, 0
    for _ in range(repeats):
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / repeats:
            start = done % (len(xs) - batch + 1)
            jobs = [Sample(x, theta, cap, 1, 0.0) for x in xs[start:start + batch]]
            exits = run_batch(model, jobs, lambda *_: None, mkldnn=backends)
            spent += sum(macs[e] for e in exits)
            counted += len(exits)
            done += batch
        rates.append(done / (time.perf_counter() - started))
    return statistics.median(rates), spent / counted


def main() -> None:
    torch.set_num_threads(1)
    art = default_artifact()
    spec = art.spec
    pixels = [np.array(im.convert(spec.mode)).reshape(spec.size, spec.size, -1) for im in sample_images(512, spec.size)]
    xs = normalize(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2), spec)  # (N, C, H, W)
    macs = art.macs_per_exit
    model = fuse_for_inference(art.model)  # what the service runs
    backends = choose_stage_backends(model, 32)
    points = {"full depth": 0.0, **{str(b): art.calibration.choose(b)[0].threshold for b in BUDGETS}}
    rows, rate = [], {}
    for batch in (1, 32):
        for label, theta in points.items():
            ips, mean_macs = measure(model, xs, theta, batch, macs, backends)
            rate[batch, label] = (ips, mean_macs)
            rows.append([batch, label, f"{theta:.4f}", f"{ips:,.0f}", f"{mean_macs / 1e6:.3f}",
                         f"{mean_macs / macs[-1]:.3f}", f"{ips / rate[batch, 'full depth'][0]:.2f}x"])
    print(f"# In-process engine: {art.name}/{art.version}, torch threads 1, {len(xs)} images, "
          f"oneDNN per stage {backends}\n")
    print("Written by `make bench` (`.venv/bin/python -m bench.engine`).\n")
    print(table(["batch", "budget", "θ", "images/s", "MMACs/image", "MACs fraction", "vs full depth"], rows))
    print("\nEarly-exit bar at budget 0.25 (images/s >= k x MACs saving x full-depth images/s):")
    bar_rows = []
    for batch, k in BAR.items():
        full_ips, full_macs = rate[batch, "full depth"]
        ips, mean_macs = rate[batch, "0.25"]
        target = k * (full_macs / mean_macs) * full_ips
        bar_rows.append([batch, k, f"{full_macs / mean_macs:.2f}", f"{target:,.0f}", f"{ips:,.0f}",
                         "met" if ips >= target else "MISSED"])
    print(table(["batch", "k", "MACs saving", "target images/s", "measured images/s", "bar"], bar_rows))


if __name__ == "__main__":
    main()
