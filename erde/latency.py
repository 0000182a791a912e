"""Latency per exit of a network as the service runs it: BN folded (`fuse_for_inference`), each
stage on the convolution backend that is faster for it here, the exit rule's entropies in numpy.

The manifest stores what `exit_latency` measures (`erde export`), and `make bench` compares it
with the MACs per exit (bench/exit_latency.py): a budget saves time only as far as the time curve
tracks the MAC curve.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from erde.exits import exit_scores
from erde.nets import EarlyExitResNet, fuse_for_inference

BATCH_SIZES = (1, 32)  # one image; a full micro-batch of the service's default max_batch_size
SERVING_THREADS = 1  # the service's default torch_threads per inference process


def set_mkldnn(enabled: bool) -> None:
    """Switch oneDNN convolutions on or off (process-wide; only inference threads run convs)."""
    torch.backends.mkldnn.set_flags(_enabled=enabled, _fp32_precision=None)


@torch.inference_mode()
def choose_stage_backends(model: EarlyExitResNet, batch_size: int, repeats: int = 5) -> list[bool]:
    """For each stage, whether oneDNN (mkldnn) convolutions beat torch's native ones, timed here.

    Measured, not assumed: on a CPU, oneDNN loses by 2-3x on a wide early map with few channels
    (our students' first stage) and wins on the narrower, deeper stages.
    """
    cfg = model.config
    h = torch.zeros(batch_size, cfg.in_channels, cfg.input_size, cfg.input_size)
    choice = []
    for i in range(model.num_exits):
        times = {}
        for enabled in (True, False):
            set_mkldnn(enabled)
            model.stage(i, h)  # warm
            runs = []
            for _ in range(repeats):
                started = time.perf_counter()
                model.stage(i, h)
                runs.append(time.perf_counter() - started)
            times[enabled] = sorted(runs)[repeats // 2]
        choice.append(times[True] <= times[False])
        set_mkldnn(choice[-1])
        h = model.stage(i, h)
    set_mkldnn(True)
    return choice


def answer_at(model: EarlyExitResNet, x: torch.Tensor, exit_index: int, backends: list[bool]) -> None:
    """What serving does for a batch whose rows all answer at `exit_index`: every stage and exit up to
    it, each exit's softmax and entropy (the rule needs them), nothing after it."""
    h = x
    for i in range(exit_index + 1):
        set_mkldnn(backends[i])
        h = model.stage(i, h)
        exit_scores(model.exit(i, h))
    set_mkldnn(True)


@torch.inference_mode()
def exit_latency(fused: EarlyExitResNet, backends: list[bool], batch_size: int, repeats: int,
                 clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Median seconds to answer a batch at each exit; the exits take turns, so a load that comes
    and goes during the measurement falls on all of them alike.

    `clock`: wall time by default (what a caller waits); `time.thread_time` counts only this
    thread's CPU time, which a loaded machine disturbs far less (with one torch thread the work
    runs on the calling thread).
    """
    cfg = fused.config
    x = torch.randn(batch_size, cfg.in_channels, cfg.input_size, cfg.input_size,
                    generator=torch.Generator().manual_seed(0))
    samples: list[list[float]] = [[] for _ in range(fused.num_exits)]
    for i in range(fused.num_exits):
        answer_at(fused, x, i, backends)  # warm
    for _ in range(repeats):
        for i in range(fused.num_exits):
            started = clock()
            answer_at(fused, x, i, backends)
            samples[i].append(clock() - started)
    return [statistics.median(s) for s in samples]


def measure(model: EarlyExitResNet, repeats: int = 50, threads: int = SERVING_THREADS,
            batch_sizes: tuple[int, ...] = BATCH_SIZES) -> dict:
    """The manifest's `exit_latency`: milliseconds per exit at each batch size, and where they were measured.

    The network is served fused, with backends chosen at the largest batch (as the service chooses
    them at its max_batch_size), on `threads` torch threads.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused = fuse_for_inference(model)
        backends = choose_stage_backends(fused, max(batch_sizes))
        per_batch = {str(b): [round(s * 1e3, 4) for s in exit_latency(fused, backends, b, repeats)]
                     for b in batch_sizes}
    finally:
        torch.set_num_threads(previous)
    return {"ms": per_batch, "statistic": f"median of {repeats}", "threads": threads,
            "machine": machine_description(), "torch": torch.__version__,
            "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def machine_description() -> str:
    """The CPU model and core count, and the load at the time (a loaded machine's numbers say so)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{model}, {os.cpu_count()} cores, load average {load:.1f}"
