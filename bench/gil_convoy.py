"""The GIL convoy, without HTTP: one batch-1 full-depth pass of the served network (`run_batch`, one
torch thread) in the main thread, in a second thread, and in a second thread while the main thread
runs Python, at several switch intervals.

Why the network runs in its own process (reports/service-profile.md, section 1): torch releases the
GIL around every operator, and a thread that wants it back while another thread runs Python waits
for the interpreter's switch interval (5 ms) before it may force a switch.

Usage: .venv/bin/python -m bench.gil_convoy [--passes 20]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import numpy as np
import torch

from bench.common import default_artifact, sample_images, table
from erde.data import normalize
from erde.nets import fuse_for_inference
from service.engine.compute import Sample, choose_stage_backends, run_batch


def passes(run_one, count: int) -> tuple[float, float]:
    """(wall, CPU) seconds per pass of `count` passes run in the calling thread."""
    run_one()  # warm
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(count):
        run_one()
    return (time.perf_counter() - wall) / count, (time.thread_time() - cpu) / count


def in_thread(run_one, count: int, busy_main: bool) -> tuple[float, float]:
    """`passes` in a second thread; the main thread waits, or runs Python until the thread is done."""
    result: list[tuple[float, float]] = []
    worker = threading.Thread(target=lambda: result.append(passes(run_one, count)))
    worker.start()
    spins = 0
    while busy_main and worker.is_alive():
        spins += 1  # pure Python: holds the GIL except at the switch interval
    worker.join()
    return result[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=20, help="passes per row (a convoyed pass takes ~200 ms)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    art = default_artifact()
    spec = art.spec
    pixels = np.array(sample_images(1, spec.size)[0].convert(spec.mode)).reshape(1, spec.size, spec.size, -1)
    x = normalize(torch.from_numpy(pixels).permute(0, 3, 1, 2), spec)[0]  # (C, H, W)
    model = fuse_for_inference(art.model)
    backends = choose_stage_backends(model, 1)
    cap = model.num_exits - 1

    def run_one() -> None:
        run_batch(model, [Sample(x, 0.0, cap, 1, 0.0)], lambda *_: None, mkldnn=backends)  # θ = 0: full depth

    default_interval = sys.getswitchinterval()
    cases = [  # (row, in a second thread, main thread running Python, switch interval, passes)
        ("the main thread, nothing else running", False, False, default_interval, args.passes * 10),
        ("a second thread, main thread idle", True, False, default_interval, args.passes * 10),
        ("a second thread, main thread running Python", True, True, default_interval, args.passes),
        *((f"same, `sys.setswitchinterval({i:g})`", True, True, i, args.passes * 4) for i in (1e-3, 2e-4, 5e-5)),
    ]
    rows = []
    for label, threaded, busy, interval, count in cases:
        sys.setswitchinterval(interval)
        wall, cpu = in_thread(run_one, count, busy) if threaded else passes(run_one, count)
        sys.setswitchinterval(default_interval)
        rows.append([label, f"{wall * 1e3:.2f} ms", f"{cpu * 1e3:.2f} ms"])
    print(f"# GIL convoy: {art.name}/{art.version}, run_batch, batch 1, full depth, torch threads 1, "
          f"switch interval {default_interval * 1e3:g} ms by default\n")
    print(table(["where the pass runs", "wall per pass", "CPU per pass"], rows))


if __name__ == "__main__":
    main()
