"""The inference worker: one thread per served model, running micro-batches stage by stage.

Each row carries its own θ and cap. After every stage the rows that exit are released at once
(their futures resolved on their event loop) and only the rows still running go on, so cheap
images never wait for expensive ones in the same batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from erde.nets import EarlyExitResNet
from service.engine.batcher import Job, take_batch
from service.errors import Unavailable

log = logging.getLogger("erde.service")


@dataclass(frozen=True)
class ExitResult:
    exit: int
    entropy: float
    top_probs: list[float]  # descending
    top_ids: list[int]
    queue_s: float  # enqueue -> batch start
    inference_s: float  # batch start -> release


def _resolve(pairs: list[tuple[asyncio.Future, ExitResult]]) -> None:
    for future, result in pairs:
        if not future.done():
            future.set_result(result)


def _release(jobs: list[Job], results: list[ExitResult]) -> None:
    """Resolve futures with one hand-off per event loop, not one per row."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for job, result in zip(jobs, results, strict=True):
        if job.future is not None:
            by_loop.setdefault(job.future.get_loop(), []).append((job.future, result))
    for loop, pairs in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: its client is gone
            loop.call_soon_threadsafe(_resolve, pairs)


def _exit_scores(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and entropy per row, in numpy: a few small-array ops cost less there
    than torch's per-op dispatch, and this runs once per stage."""
    z = logits.double().numpy()  # (b, K)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    probs = np.exp(logp)
    return probs, -(probs * logp).sum(axis=1)


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
            _set_mkldnn(enabled)
            model.stage(i, h)  # warm
            runs = []
            for _ in range(repeats):
                started = time.perf_counter()
                model.stage(i, h)
                runs.append(time.perf_counter() - started)
            times[enabled] = sorted(runs)[repeats // 2]
        choice.append(times[True] <= times[False])
        _set_mkldnn(choice[-1])
        h = model.stage(i, h)
    _set_mkldnn(True)
    return choice


def _set_mkldnn(enabled: bool) -> None:
    """Switch oneDNN convolutions on or off (process-wide; only inference threads run convs)."""
    torch.backends.mkldnn.set_flags(_enabled=enabled, _fp32_precision=None)


@torch.inference_mode()
def run_batch(model: EarlyExitResNet, jobs: list[Job], release: Callable[[list[Job], list[ExitResult]], None],
              clock: Callable[[], float] = time.monotonic, mkldnn: list[bool] | None = None) -> list[int]:
    """Run `jobs` stage by stage with per-row θ and caps; returns the exit each row took.

    `mkldnn[i]` picks the convolution backend of stage i (see `choose_stage_backends`).
    """
    started = clock()
    h = torch.stack([j.x for j in jobs])  # (B, C, H, W)
    theta = np.array([j.threshold for j in jobs])  # (B,)
    cap = np.array([min(j.cap, model.num_exits - 1) for j in jobs])  # (B,)
    rows = np.arange(len(jobs))  # original index of each row still running
    exits = [0] * len(jobs)
    for i in range(model.num_exits):
        if mkldnn is not None:
            _set_mkldnn(mkldnn[i])
        h = model.stage(i, h)
        probs, ent = _exit_scores(model.exit(i, h))
        done = (ent < theta) | (cap <= i)
        idx = np.flatnonzero(done)
        if idx.size:
            k = max(jobs[r].top_k for r in rows[idx])
            top_ids = np.argsort(-probs[idx], axis=1, kind="stable")[:, :k]  # (d, k)
            top_probs = np.take_along_axis(probs[idx], top_ids, axis=1)
            now = clock()
            done_jobs, results = [], []
            for r, e, tp, ti in zip(rows[idx].tolist(), ent[idx].tolist(), top_probs.tolist(), top_ids.tolist(),
                                    strict=True):
                job = jobs[r]
                exits[r] = i
                done_jobs.append(job)
                results.append(ExitResult(i, e, tp[:job.top_k], ti[:job.top_k], started - job.enqueued, now - started))
            release(done_jobs, results)
        if idx.size == len(rows):
            break
        keep = np.flatnonzero(~done)  # index, not mask: a boolean mask costs torch a nonzero pass
        h, theta, cap, rows = h.index_select(0, torch.from_numpy(keep)), theta[keep], cap[keep], rows[keep]
    return exits


class ModelWorker:
    """A bounded queue and the thread that drains it in micro-batches."""

    def __init__(self, model: EarlyExitResNet, *, max_batch_size: int, max_batch_delay_s: float, queue_size: int,
                 retry_after: int = 1, name: str = "model", threads: int = 1,
                 on_batch: Callable[[int], None] = lambda size: None,
                 on_depth: Callable[[int], None] = lambda depth: None) -> None:
        self.model = model.eval()
        self.threads = threads
        self.mkldnn = choose_stage_backends(self.model, max_batch_size)
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.queue_size = queue_size
        self.retry_after = retry_after
        self.on_batch = on_batch  # metrics hooks: rows per batch, queue depth after each change
        self.on_depth = on_depth
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"erde-worker-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._pending)

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs, all or none; a full or closing queue answers 503 at once."""
        with self._cond:
            if self._closed:
                raise Unavailable("the model is being replaced or the service is shutting down; retry",
                                  retry_after=self.retry_after, reason="draining")
            if len(self._pending) + len(jobs) > self.queue_size:
                raise Unavailable("the inference queue is full; retry shortly", code="overloaded",
                                  retry_after=self.retry_after, reason="queue_full")
            self._pending.extend(jobs)
            self._cond.notify()
        self.on_depth(len(self._pending))

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new jobs, finish the queued ones; True when the thread ended within `timeout`."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                delay = 0.0 if self._closed else self.max_batch_delay_s  # draining: no point waiting
                ready = take_batch(self._pending, time.monotonic(), self.max_batch_size, delay)
                if isinstance(ready, list):
                    self.on_depth(len(self._pending))
                    return ready
                if self._closed:
                    return None
                self._cond.wait(None if ready == float("inf") else ready)

    def _loop(self) -> None:
        # OpenMP thread counts are per calling thread: set it here, or this thread uses every core
        # and its spinning workers fight the event loop for the CPU.
        torch.set_num_threads(self.threads)
        while (batch := self._next_batch()) is not None:
            self.on_batch(len(batch))
            try:
                run_batch(self.model, batch, _release, mkldnn=self.mkldnn)
            except Exception:  # a bug must not kill the worker or strand the clients
                log.exception("inference failed for a batch of %d", len(batch))
                _fail(batch)


def _fail(jobs: list[Job]) -> None:
    def set_error(futures: list[asyncio.Future]) -> None:
        for f in futures:
            if not f.done():
                f.set_exception(RuntimeError("inference failed"))

    for job in jobs:
        if job.future is not None:
            job.future.get_loop().call_soon_threadsafe(set_error, [job.future])
