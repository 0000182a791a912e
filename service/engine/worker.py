"""The server's side of a model's inference process: a bounded queue, batches out, exits back.

Everything here runs on the event loop (no thread touches the GIL per batch): `submit` queues
jobs (encoded images) and forms a batch when the process can take one; the batch's bytes are
written into a shared-memory slot and announced on a pipe; the process decodes and runs them,
and its replies are read by the loop itself (`add_reader`), resolving each row's future as soon
as its exit is known (or its image is refused). Two slots let the next full batch wait inside
the process while the current one runs.

If the process dies, its in-flight rows get 503 and a new process is started; queued rows wait
for it. `close` refuses new jobs, answers the queued ones, then stops the process.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import mmap
import multiprocessing
import os
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection

from erde.data import InputSpec
from erde.nets import EarlyExitResNet
from service.decode import ImageLimits
from service.engine import process
from service.engine.batcher import Job, take_batch
from service.errors import PayloadTooLarge, Unavailable

log = logging.getLogger("erde.service")

SLOTS = 2  # batches in the process at once: the one running and the next (full) one
START_TIMEOUT_S = 300.0
# Inference processes are forked from a server process that has imported torch once, not spawned
# afresh (seconds each) and not forked from the server itself (threads, event loop, sockets).
_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(["service.engine.process"])
_running: weakref.WeakSet[ModelWorker] = weakref.WeakSet()


@atexit.register  # runs before multiprocessing's own exit hook (registered earlier), which joins children
def _end_processes() -> None:
    """At interpreter exit, close the pipes: each process sees EOF and ends (it ignores SIGTERM, so that
    a signal to the whole process group cannot cut a drain short)."""
    for worker in list(_running):
        if worker._requests is not None:
            worker._requests.close()


class ModelWorker:
    def __init__(self, model: EarlyExitResNet, spec: InputSpec, limits: ImageLimits, *, max_batch_size: int,
                 max_batch_delay_s: float, queue_size: int, max_image_bytes: int, retry_after: int = 1,
                 name: str = "model", threads: int = 1, on_batch: Callable[[int], None] = lambda size: None,
                 on_depth: Callable[[int], None] = lambda depth: None) -> None:
        self.blob = process.ModelBlob.of(model)
        self.spec = spec
        self.limits = limits
        self.arena_bytes = max_image_bytes  # per slot: any one image fits; a batch takes what fits
        self.name = name
        self.threads = threads
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.queue_size = queue_size
        self.retry_after = retry_after
        self.on_batch = on_batch  # metrics hooks: rows per batch, queue depth after each change
        self.on_depth = on_depth
        self._pending: deque[Job] = deque()
        self._inflight: dict[int, tuple[int, list[Job]]] = {}  # batch id -> (slot, jobs by row)
        self._free_slots = list(range(SLOTS))
        self._batch_ids = iter(range(1, 2**32))
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._requests: Connection | None = None
        self._replies: Connection | None = None
        self._arena: memoryview | None = None  # SLOTS x arena_bytes, shared with the process
        self._closed = False
        self._drained = threading.Event()

    # ---- lifecycle (any thread) ----------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the process and wait until it has loaded and warmed the model; then serve on `loop`."""
        self._loop = loop
        attach = self._spawn()
        loop.call_soon_threadsafe(attach)

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new jobs, answer the queued ones, stop the process; True when done within `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        loop = self._loop
        if loop is None or loop.is_closed():
            self._closed = True
            self._drained.set()
        else:
            try:
                loop.call_soon_threadsafe(self._begin_close)
            except RuntimeError:  # the loop closed meanwhile
                self._drained.set()
        drained = self._drained.wait(timeout)
        proc = self._proc
        if proc is None:
            return drained
        proc.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(5)
            return False
        return drained

    @property
    def depth(self) -> int:
        return len(self._pending)

    def _spawn(self) -> Callable[[], None]:
        """Start a process, wait for it to be ready; returns the step that attaches it to the loop."""
        size = SLOTS * self.arena_bytes
        fd, path = tempfile.mkstemp(prefix=f"erde-{self.name}-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        proc = None
        try:
            os.ftruncate(fd, size)
            buffer = mmap.mmap(fd, size)
            requests_r, requests_w = _context.Pipe(duplex=False)
            replies_r, replies_w = _context.Pipe(duplex=False)
            proc = _context.Process(target=process.serve, name=f"erde-infer-{self.name}", daemon=True,
                                    args=(requests_r, replies_w, self.blob, self.spec, self.limits, path,
                                          self.arena_bytes, self.threads, self.max_batch_size))
            proc.start()
            requests_r.close()
            replies_w.close()
            if not replies_r.poll(START_TIMEOUT_S) or replies_r.recv_bytes() != process.READY:
                raise RuntimeError("no ready signal")
        except (EOFError, OSError, RuntimeError) as exc:
            if proc is not None and proc.is_alive():
                proc.kill()
            raise RuntimeError(f"the inference process for {self.name} did not start: {exc}") from None
        finally:
            os.close(fd)
            os.unlink(path)  # both sides hold their mapping; the name is no longer needed
        arena = memoryview(buffer)

        def attach() -> None:
            self._proc, self._requests, self._replies, self._arena = proc, requests_w, replies_r, arena
            self._free_slots = list(range(SLOTS))
            _running.add(self)
            self._loop.add_reader(replies_r.fileno(), self._on_replies)
            log.info("inference process %d serves %s", proc.pid, self.name)
            self._dispatch()

        return attach

    # ---- the event loop's side -----------------------------------------------------------------------------

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs (`x`: an encoded image), all or none; a full or closing queue answers 503 at
        once. On the loop thread."""
        if any(len(j.x) > self.arena_bytes for j in jobs):
            raise PayloadTooLarge(f"an image is larger than {self.arena_bytes} bytes")
        if self._closed:
            raise Unavailable("the model is being replaced or the service is shutting down; retry",
                              retry_after=self.retry_after, reason="draining")
        if len(self._pending) + len(jobs) > self.queue_size:
            raise Unavailable("the inference queue is full; retry shortly", code="overloaded",
                              retry_after=self.retry_after, reason="queue_full")
        self._pending.extend(jobs)
        self._dispatch()

    def _dispatch(self) -> None:
        """Send batches while the process has a free slot: any batch when it is idle, only a full
        one when it is busy (a small batch sent early would just wait there, and stay small)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._requests is not None and self._free_slots and self._pending:
            if self._inflight and len(self._pending) < self.max_batch_size:
                break
            delay = 0.0 if self._closed else self.max_batch_delay_s  # draining: no point waiting
            ready = take_batch(self._pending, time.monotonic(), self.max_batch_size, delay)
            if not isinstance(ready, list):
                self._timer = self._loop.call_later(ready, self._dispatch)
                break
            self._send(ready)
        self.on_depth(len(self._pending))

    def _send(self, jobs: list[Job]) -> None:
        """Write the batch's images into a free slot's arena (the ones that do not fit go back to the
        head of the queue) and announce it."""
        slot = self._free_slots.pop()
        base, at, offsets = slot * self.arena_bytes, 0, []
        for i, job in enumerate(jobs):
            if at + len(job.x) > self.arena_bytes:
                self._pending.extendleft(reversed(jobs[i:]))
                jobs = jobs[:i]
                break
            self._arena[base + at:base + at + len(job.x)] = job.x
            offsets.append(at)
            at += len(job.x)
        batch_id = next(self._batch_ids)
        self._inflight[batch_id] = (slot, jobs)
        self._requests.send_bytes(process.encode_batch(batch_id, slot, jobs, offsets))
        self.on_batch(len(jobs))

    def _on_replies(self) -> None:
        replies = self._replies
        try:
            while replies.poll():
                self._handle(replies.recv_bytes())
        except (EOFError, OSError):
            self._lost(replies)

    def _handle(self, message: bytes) -> None:
        kind = message[:1]
        if kind == b"E":
            batch_id = process.EXITED.unpack_from(message)[1]
            jobs = self._inflight[batch_id][1]
            for row, result in process.decode_exited(message, [j.top_k for j in jobs])[1]:
                future = jobs[row].future
                if future is not None and not future.done():
                    future.set_result(result)
            return
        if kind == b"X":
            batch_id, row, error = process.decode_refused(message)
            future = self._inflight[batch_id][1][row].future
            if future is not None and not future.done():
                future.set_exception(error)
            return
        _, batch_id = process.ID.unpack_from(message)
        slot, jobs = self._inflight.pop(batch_id)
        self._free_slots.append(slot)
        if kind == b"F":
            _fail(jobs, RuntimeError("inference failed"))
        self._dispatch()
        self._check_drained()

    def _lost(self, replies: Connection) -> None:
        """The process ended: fail what it held; start another unless we are closing."""
        self._loop.remove_reader(replies.fileno())
        replies.close()
        self._requests.close()
        self._requests = self._replies = None
        for _, jobs in self._inflight.values():
            _fail(jobs, Unavailable("the inference process restarted; retry", retry_after=self.retry_after,
                                    reason="worker_restart"))
        self._inflight.clear()
        if self._closed:
            self._check_drained()
            return
        log.error("inference process %d for %s ended; starting another", self._proc.pid, self.name)
        threading.Thread(target=self._restart, name=f"erde-restart-{self.name}", daemon=True).start()

    def _restart(self) -> None:
        try:
            attach = self._spawn()
        except RuntimeError:
            log.exception("could not restart the inference process for %s", self.name)
            self._loop.call_soon_threadsafe(self._give_up)
            return
        self._loop.call_soon_threadsafe(attach)

    def _give_up(self) -> None:
        self._closed = True
        _fail(list(self._pending), Unavailable("the model's inference process is down", retry_after=self.retry_after,
                                                reason="worker_down"))
        self._pending.clear()
        self._check_drained()

    def _begin_close(self) -> None:
        self._closed = True
        self._dispatch()
        self._check_drained()

    def _check_drained(self) -> None:
        if not self._closed or self._pending or self._inflight:
            return
        if self._requests is not None:
            self._requests.send_bytes(process.STOP)
        self._drained.set()


def _fail(jobs: list[Job], error: Exception) -> None:
    for job in jobs:
        if job.future is not None and not job.future.done():
            job.future.set_exception(error)
