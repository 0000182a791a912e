"""The server's side of a model's inference process: a bounded queue, batches out, exits back.

Everything here runs on the event loop (no thread touches the GIL per batch): `submit` queues
jobs (encoded images) and forms a batch when the process can take one; the batch's bytes are
written into a shared-memory slot and announced on a pipe; the process decodes and runs them,
and its replies are read by the loop itself (`add_reader`), resolving each row's future as soon
as its exit is known (or its image is refused). Two slots let the next full batch wait inside
the process while the current one runs.

Faults: a process that dies, or that holds work without answering for `hang_timeout_s` (the
watchdog), is killed and replaced; its in-flight rows get 503 and queued rows wait for the new
process (each until its own deadline). A process that cannot be restarted is retried with
back-off; after `RESTART_TRIES` failures the model is down: queued and new rows get 503 and
`live` is False (so /readyz says which model). `close` refuses new jobs, answers the queued
ones, then stops the process.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import json
import logging
import math
import mmap
import multiprocessing
import os
import signal
import socket
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection

import numpy as np

from erde.artifact import InputSpec
from service.engine import forkserver, wire
from service.engine.batcher import Job, put_back, take_batch
from service.engine.limits import ImageLimits
from service.engine.sojourn import IntervalLow, Queue, RowCost, Wait, WaitLaw, measured, retry_after, seen, standing
from service.engine.sojourn import late as is_late
from service.engine.sojourn import refusal as wait_refusal
from service.errors import PayloadTooLarge, Unavailable
from service.record import RequestRecord
from service.settings import ENGINE_GROUP

log = logging.getLogger("erde.service")

SLOTS = 2  # batches in the process at once: the one running and the next (full) one
# An event loop later than this on its 5 ms timer (LoopLag) is busy enough that the CPU a shadow pass takes
# would delay it: no shadow passes then (docs/budgets.md).
SPARE_LAG_S = 0.002
RESTART_TRIES = 3  # failed restarts in a row before the model is reported down (retries go on)
MAX_BACKOFF_S = 30.0
_context = forkserver.context  # inference processes are forked from a process that imported torch once
_running: weakref.WeakSet[ModelWorker] = weakref.WeakSet()


@atexit.register  # runs before multiprocessing's own exit hook (registered earlier), which joins children
def _end_processes() -> None:
    """At interpreter exit, close the pipes: each process sees EOF and ends (it ignores SIGTERM, so that
    a signal to the whole process group cannot cut a drain short)."""
    for worker in list(_running):
        if worker._requests is not None:
            worker._requests.close()


class LoopLag:
    """How late the event loop runs a timer: about what a request that became readable now waits before
    the loop reads it (under overload, requests wait in the kernel, where nothing else sees them).
    Sampled every PERIOD_S, as a running mean over a few samples."""

    PERIOD_S = 0.005

    def __init__(self) -> None:
        self.lag_s = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due = 0.0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._due = time.perf_counter() + self.PERIOD_S  # uvloop's own clock has millisecond resolution
        loop.call_later(self.PERIOD_S, self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        late = max(0.0, now - self._due)
        self.lag_s += 0.3 * (late - self.lag_s)
        self._due = now + self.PERIOD_S
        self._loop.call_later(self.PERIOD_S, self._tick)


class Steering:
    """What the worker tells the rest of the service, and asks it, about one model: the one object through
    which the load-adaptive budgets, the drift guard and the metrics see the queue (the registry builds
    it: service/engine/registry.py). This base steers nothing: the worker then serves the rules as asked."""

    def adjust(self, jobs: list[Job], now: float, spare: bool, waited_s: float = 0.0) -> None:
        """Set each job's `used` rule (and `shadow`) just before it is sent; `spare`: nothing else is queued;
        `waited_s`: how long the oldest row left in the queue has waited (0: none is left)."""

    def on_full(self, now: float) -> None:
        """The queue refused rows for lack of room."""

    def absorb(self, wait_s: float, now: float) -> bool:
        """Whether degrading takes rows predicted `wait_s` late (True: admit them)."""
        return False

    def on_batch(self, size: int) -> None:
        """A batch of `size` rows was sent."""

    def on_depth(self, depth: int) -> None:
        """The queue holds `depth` rows now."""

    def on_finished(self, stage_s: list[float], device_bytes: int) -> None:
        """A batch is done: the seconds each stage that ran took, the device memory in use (0 on the CPU)."""

    def witness(self, answered: list[int], entropy: np.ndarray, prediction: np.ndarray) -> None:
        """Shadow rows came back: the exit each answered at, every exit's entropy and prediction ((rows, exits))."""


class ModelWorker:
    def __init__(self, blob: wire.ModelBlob, spec: InputSpec, limits: ImageLimits, *, max_batch_size: int,
                 max_batch_delay_s: float, queue_size: int, max_image_bytes: int, retry_after: int = 1,
                 name: str = "model", threads: int = 1, hang_timeout_s: float = 2.0,
                 law: WaitLaw | None = None, lag: LoopLag | None = None, steer: Steering | None = None,
                 shadow_cpu: float = 0.0, device: str = "cpu", address: str | None = None, sharers: int = 1) -> None:
        self.blob = blob
        self.spec = spec
        self.limits = limits
        self.arena_bytes = max_image_bytes  # per slot: any one image fits; a batch takes what fits
        self.name = name
        self.threads = threads
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.queue_size = queue_size
        self.retry_after = retry_after
        self.hang_timeout_s = hang_timeout_s
        self.law = law  # admission by expected waiting time (None: refused only when the queue is full)
        self.lag = lag
        self.steer = steer or Steering()
        self.shadow_cpu = shadow_cpu  # of the process's batch time, at most, for shadow passes (docs/budgets.md)
        self.device = device  # ERDE_DEVICE for the process (erde/device.py): "auto", "cpu", "cuda" or "cuda:N"
        self.placed = {"device": device, "description": device}  # where the process said it runs, once started
        self.address = address  # of the process every worker shares (`shared_address`); None: one of its own
        self.sharers = sharers  # workers that may share it: a run merges a batch from each (its warm-up's sizes)
        self._pending: deque[Job] = deque()
        self._inflight: dict[int, tuple[int, list[Job]]] = {}  # batch id -> (slot, jobs by row)
        self._running = 0  # rows in the process
        self._reserved = 0  # requests admitted from their head whose rows are not queued yet (`reserve`)
        self._cost = RowCost()  # what a row costs the inference process (service/engine/sojourn.py)
        self._low = IntervalLow()  # the fewest rows queued over the last interval: the standing queue
        self._free_slots = list(range(SLOTS))
        self._batch_ids = iter(range(1, 2**32))
        self._timer: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._progress_at = 0.0  # monotonic time of the process's last sign of work
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None  # this worker's own process (None: shared)
        self._pid = 0  # the process serving this worker, own or shared
        self._requests: Connection | None = None
        self._replies: Connection | None = None
        self._arena: memoryview | None = None  # SLOTS x arena_bytes, shared with the process
        self._closed = False
        self._down = False  # restarts failed RESTART_TRIES times in a row; still retried with back-off
        self._stop = threading.Event()  # ends the restart thread's back-off early on close
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
        self._stop.set()
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
        if proc is None:  # shared: STOP said this worker is done (or, cut short, exit closes the connection)
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

    @property
    def live(self) -> bool:
        """A process is attached: false between a crash (or a hang) and its replacement."""
        return self._requests is not None

    def _spawn(self) -> Callable[[], None]:
        """Start a process (or, shared, connect to the one serving every worker), wait for it to be ready;
        returns the step that attaches it to the loop."""
        size = SLOTS * self.arena_bytes
        fd, path = tempfile.mkstemp(prefix=f"erde-{self.name}-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        try:
            os.ftruncate(fd, size)
            buffer = mmap.mmap(fd, size)
            if self.address is None:
                proc, requests_w, replies_r, pid = self._start_own(path)
            else:
                proc, (requests_w, pid) = None, self._join_shared(path)
                replies_r = requests_w
        except (EOFError, OSError, RuntimeError) as exc:
            raise RuntimeError(f"the inference process for {self.name} did not start: {exc}") from None
        finally:
            os.close(fd)
            os.unlink(path)  # both sides hold their mapping; the name is no longer needed
        arena = memoryview(buffer)

        def attach() -> None:
            if self._closed and not self._pending:  # closed while it started: nothing left for it
                requests_w.send_bytes(wire.STOP)
                requests_w.close()
                replies_r.close()
                return
            self._proc, self._pid, self._requests, self._replies, self._arena = proc, pid, requests_w, replies_r, arena
            self._free_slots = list(range(SLOTS))
            self._down = False
            _running.add(self)
            self._loop.add_reader(replies_r.fileno(), self._on_replies)
            self._schedule_watchdog()
            log.info("inference process %d serves %s%s", pid, self.name, "" if proc else " (shared)")
            self._dispatch()

        return attach

    def _start_own(self, path: str) -> tuple[multiprocessing.process.BaseProcess, Connection, Connection, int]:
        """Start this worker's own process on two pipes, its arena at `path`; wait until it is ready."""
        requests_r, requests_w = _context.Pipe(duplex=False)
        replies_r, replies_w = _context.Pipe(duplex=False)
        proc = _context.Process(target=wire.run, name=f"erde-{self.name}", daemon=True,
                                args=("serve", requests_r, replies_w, self.blob, self.spec, self.limits, path,
                                      self.arena_bytes, self.threads, self.max_batch_size, self.shadow_cpu,
                                      self.device))
        proc.start()
        requests_r.close()
        replies_w.close()
        try:
            if not replies_r.poll(wire.START_TIMEOUT_S):
                raise RuntimeError("no ready signal")
            self.placed = ready(replies_r.recv_bytes())
        except (EOFError, OSError, RuntimeError, ValueError):
            if proc.is_alive():
                proc.kill()
            raise
        return proc, requests_w, replies_r, proc.pid

    def _join_shared(self, path: str) -> tuple[Connection, int]:
        """Connect to the process every worker shares (starting it if none listens at its address), hand it
        this worker's arena at `path`, and wait until it is ready; returns the connection and the process's
        id. Workers that need it at once take turns to start it: the one holding the address's start claim
        (a socket of its own, freed when it closes or dies) starts it, the others wait to connect, so one
        process starts (and one forkserver: a worker that loses the race starts none). The process outlives
        the worker that started it while other workers use it."""
        deadline = time.monotonic() + wire.START_TIMEOUT_S
        starts = 0
        while (conn := connect(self.address)) is None:
            if time.monotonic() > deadline or starts == RESTART_TRIES:
                raise RuntimeError(f"nothing listens at the shared process's address {self.address!r}")
            claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                claim.bind(wire.abstract(f"{self.address}-start"))
            except OSError:  # another worker is starting it
                claim.close()
                time.sleep(0.01)
                continue
            with claim:
                starts += 1
                proc = _context.Process(target=wire.run, name=f"erde-{self.name}", daemon=True,
                                        args=("serve_shared", self.address, self.blob, self.spec, self.limits,
                                              self.threads, self.max_batch_size, self.shadow_cpu, self.device,
                                              self.sharers))
                proc.start()
                # Not this worker's to wait for at exit: multiprocessing's exit hook joins its children, and
                # this one serves the other workers as long as they live (a review found a worker's exit
                # hung so). Its parent is the forkserver, which reaps it. CPython's private set (3.11).
                multiprocessing.process._children.discard(proc)
                while (conn := connect(self.address)) is None and proc.is_alive():
                    time.sleep(0.01)
            if conn is not None:
                break
        try:
            with socket.socket(fileno=os.dup(conn.fileno())) as sock:
                pid, uid, _ = wire.peer_credentials(sock)
            if uid != os.getuid():  # an abstract name anyone may bind: only a process of our own user
                raise RuntimeError(f"the process at {self.address!r} runs as user {uid}, not {os.getuid()}")
            conn.send_bytes(wire.HELLO.pack(b"H", self.arena_bytes) + path.encode())
            if not conn.poll(wire.START_TIMEOUT_S):
                raise RuntimeError("no ready signal")
            self.placed = ready(conn.recv_bytes(), wire.PID.size)
        except BaseException:
            conn.close()
            raise
        return conn, pid  # the kernel's word for the pid, not the reply's: the watchdog kills by it

    # ---- the event loop's side -----------------------------------------------------------------------------

    def submit(self, jobs: list[Job], time_s: float = math.inf) -> None:
        """Queue jobs, all or none; a closing, down or full queue, or one that cannot answer them within
        `time_s`, answers 503 at once. On the loop thread."""
        if any(len(j.image) > self.arena_bytes for j in jobs):
            raise PayloadTooLarge(f"an image is larger than {self.arena_bytes} bytes")
        refusal = self.refusal(len(jobs), time_s)
        if refusal is not None:
            raise refusal
        self._pending.extend(jobs)
        self._dispatch()

    def refusal(self, rows: int = 1, time_s: float = math.inf) -> Unavailable | None:
        """Why `rows` more rows cannot be queued now (closing, down, full) or answered within `time_s`
        seconds, or None. Cheap: the server asks it from the request's headers, before reading the body.
        Full counts the rows held for admitted heads (`reserve`) as queued, but for those the process's free
        slots will take: heads read together by an idle model were refused "queue full" otherwise."""
        if self._closed:
            return Unavailable("the model is being replaced or the service is shutting down; retry",
                               retry_after=self.retry_after, reason="draining")
        if self._down:
            return Unavailable(f"model {self.name!r} has no live inference process; it is being restarted",
                               code="model_unavailable", retry_after=self.retry_after, reason="worker_down")
        if len(self._pending) + self._held_waiting() + rows > self.queue_size:
            self.steer.on_full(time.monotonic())
            return Unavailable("the inference queue is full; retry shortly", code="overloaded",
                               retry_after=self.retry_after, reason="queue_full")
        wait = self.wait(rows, time_s)
        if wait is None or (wait.answer_s <= wait.time_s and self.steer.absorb(wait.answer_s, time.monotonic())):
            return None  # in time, or late by the headroom only: degrading the rows ahead absorbs it
        return Unavailable(wait_message(wait), code="overloaded", retry_after=retry_after(wait, self.retry_after),
                           reason="queue_wait")

    def _held_waiting(self) -> int:
        """Held rows (`reserve`) beyond what the free process slots take, next to the rows already queued."""
        free = len(self._free_slots) * self.max_batch_size - len(self._pending) if self._requests is not None else 0
        return max(self._reserved - max(free, 0), 0)

    def wait(self, rows: int, time_s: float) -> Wait | None:
        """Why `rows` more rows would be answered too late (service/engine/sojourn.py), or None."""
        law = self.law
        if law is None:
            return None
        lag = self.lag.lag_s if self.lag else 0.0
        return wait_refusal(law, self._cost, Queue(len(self._pending) + self._reserved, self._running), rows, lag,
                            law.slo_s if math.isinf(time_s) else time_s, standing(self._low))

    def reserve(self, record: RequestRecord) -> None:
        """Hold a row for a request admitted from its head until its rows are queued (`release`). Admission
        counts these as rows ahead: the requests one read of the sockets admits all start after it, and
        without them each would be admitted against the same queue and most refused later, at `submit`,
        after the app had read and parsed them (docs/architecture.md, "Admission holds a row")."""
        release(record)
        record.reserved = self
        self._reserved += 1

    def withdraw(self, jobs: list[Job]) -> None:
        """Forget jobs nobody waits for any more (their deadline passed): out of the queue if still
        there; if already sent, their results are dropped when they come back."""
        for job in jobs:
            with contextlib.suppress(ValueError):
                self._pending.remove(job)
        self.steer.on_depth(len(self._pending))
        self._check_drained()

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
            now = time.monotonic()
            newest_first = self._newest_first()
            ready = take_batch(self._pending, now, self.max_batch_size, delay, newest_first)
            if not isinstance(ready, list):
                self._timer = self._loop.call_later(ready, self._dispatch)
                break
            self._send(ready, newest_first)
        if self.law is not None:
            self._low = seen(self.law.interval_s, self._low, len(self._pending), time.monotonic())
        self.steer.on_depth(len(self._pending))

    def _spare(self) -> bool:
        """Whether the machine has room for shadow passes: nothing else queued for this model, and an event
        loop that keeps up (on shared cores, a shadow pass takes CPU the loop would need)."""
        return not self._pending and (self.lag is None or self.lag.lag_s < SPARE_LAG_S)

    def _newest_first(self) -> bool:
        """A standing queue is served newest first (adaptive LIFO: service/engine/sojourn.py)."""
        return self.law is not None and self.law.adaptive_lifo and standing(self._low) > 0

    def _send(self, jobs: list[Job], newest_first: bool = False) -> None:
        """Write the batch's images into a free slot's arena (the ones that do not fit go back to the
        end of the queue they were taken from: `put_back`) and announce it. Rows nobody waits for any
        more are dropped here."""
        now = time.monotonic()
        late = [j for j in jobs if is_late(self._cost, self._running, len(jobs), now, j.enqueued, j.answer_by)]
        if late:
            _fail(late, Unavailable("the request waited in the queue past the time it had; retry", code="overloaded",
                                    retry_after=self.retry_after, reason="expired"))
        jobs = [j for j in jobs if j.future is None or not j.future.done()]
        if not jobs:
            return
        waited_s = now - self._pending[0].enqueued if self._pending else 0.0
        self.steer.adjust(jobs, now, spare=self._spare(), waited_s=waited_s)
        slot = self._free_slots.pop()
        base, at, rows = slot * self.arena_bytes, 0, []
        for i, job in enumerate(jobs):
            size = len(job.image)
            if at + size > self.arena_bytes:
                put_back(self._pending, jobs[i:], newest_first)
                jobs = jobs[:i]
                break
            self._arena[base + at:base + at + size] = job.image
            rule = job.rule
            rows.append(wire.Row(rule.threshold, job.enqueued, rule.cap, rule.top_k, at, size, int(job.shadow)))
            at += size
        if not self._inflight:
            self._progress_at = now  # the watchdog's clock starts when an idle process gets work
        batch_id = next(self._batch_ids)
        self._inflight[batch_id] = (slot, jobs)
        self._running += len(jobs)
        self._requests.send_bytes(wire.encode_batch(batch_id, slot, rows))
        self.steer.on_batch(len(jobs))

    def _on_replies(self) -> None:
        replies = self._replies
        try:
            while replies.poll():
                self._handle(replies.recv_bytes())
        except (EOFError, OSError):
            self._lost()
        except (wire.ProtocolError, KeyError):
            log.exception("the inference process for %s sent a reply the server cannot place; replacing it",
                          self.name)
            self._kill()

    def _handle(self, message: bytes) -> None:
        self._progress_at = time.monotonic()
        reply = wire.decode_reply(message, self._top_k)
        if isinstance(reply, wire.Exited):
            jobs = self._inflight[reply.batch_id][1]
            for row, result in reply.results:
                future = jobs[row].future
                if future is not None and not future.done():
                    future.set_result(result)
        elif isinstance(reply, wire.Refused):
            future = self._inflight[reply.batch_id][1][reply.row].future
            if future is not None and not future.done():
                future.set_exception(reply.error)
        elif isinstance(reply, wire.Progress):
            pass  # its arrival is the progress the watchdog looks for
        elif isinstance(reply, wire.Witnessed):  # after its batch's Finished: not a sign of work either
            self.steer.witness(reply.answered, reply.entropy, reply.prediction)
        else:
            slot, jobs = self._inflight.pop(reply.batch_id)
            self._running -= len(jobs)
            if 2 * len(jobs) >= self.max_batch_size or 2 * self._cost.rows < self.max_batch_size:  # see RowCost
                self._cost = measured(self._cost, len(jobs), reply.busy_s)  # the process's own clock: no loop lag
            self._free_slots.append(slot)
            self.steer.on_finished(reply.stage_s, reply.device_bytes)
            if reply.failed:
                _fail(jobs, RuntimeError("inference failed"))
            self._dispatch()
            self._check_drained()

    def _top_k(self, batch_id: int) -> list[int]:
        return [j.rule.top_k for j in self._inflight[batch_id][1]]

    def _schedule_watchdog(self) -> None:
        self._watchdog = self._loop.call_later(max(0.05, self.hang_timeout_s / 4), self._watch)

    def _watch(self) -> None:
        """Kill a process that holds work and has shown no progress for `hang_timeout_s` (a hang, a
        stopped process, a livelock): its rows are answered 503 now instead of at their deadlines."""
        self._watchdog = None
        if self._requests is None:
            return
        self._on_replies()  # read what the process sent first: after a stall of the loop, timers run before I/O
        if self._requests is None:
            return
        stalled = time.monotonic() - self._progress_at
        if self._inflight and stalled > self.hang_timeout_s:
            log.error("inference process %d for %s made no progress for %.1f s with %d rows; replacing it",
                      self._pid, self.name, stalled, self._running)
            self._kill()
            return
        self._schedule_watchdog()

    def _kill(self) -> None:
        """SIGKILL the process (it ends a stopped one too). A shared one serves every worker: each sees it end
        and fails what it held there, and the first to reconnect starts the next."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, signal.SIGKILL)
        self._lost()

    def _lost(self) -> None:
        """The process ended (or was killed): fail what it held; start another unless we are closing."""
        if self._requests is None:
            return
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._loop.remove_reader(self._replies.fileno())
        self._replies.close()
        self._requests.close()
        self._requests = self._replies = None
        for _, jobs in self._inflight.values():
            _fail(jobs, Unavailable("the inference process was replaced; retry", retry_after=self.retry_after,
                                    reason="worker_restart"))
        self._inflight.clear()
        self._running = 0
        if self._closed:
            self._check_drained()
            return
        log.error("inference process %d for %s ended; starting another", self._pid, self.name)
        threading.Thread(target=self._restart, args=(self._proc,), name=f"erde-restart-{self.name}",
                         daemon=True).start()

    def _restart(self, old: multiprocessing.process.BaseProcess | None) -> None:
        """Start a replacement, with exponential back-off between failed tries; never gives up while open."""
        if old is not None:
            old.join(5)
        failures, backoff = 0, float(self.retry_after)
        while not self._stop.is_set():
            try:
                attach = self._spawn()
            except (RuntimeError, ValueError):
                failures += 1
                log.exception("could not restart the inference process for %s (try %d)", self.name, failures)
                if failures == RESTART_TRIES:
                    self._loop.call_soon_threadsafe(self._give_up)
                self._stop.wait(backoff)
                backoff = min(2 * backoff, MAX_BACKOFF_S)
                continue
            self._loop.call_soon_threadsafe(attach)
            return

    def _give_up(self) -> None:
        """Restarts keep failing: say so to every queued and new row instead of letting them wait."""
        self._down = True
        log.error("model %s is down: its inference process could not be restarted %d times; still retrying",
                  self.name, RESTART_TRIES)
        _fail(list(self._pending), Unavailable(f"model {self.name!r} has no live inference process",
                                               code="model_unavailable", retry_after=self.retry_after,
                                               reason="worker_down"))
        self._pending.clear()
        self.steer.on_depth(0)
        self._check_drained()

    def _begin_close(self) -> None:
        self._closed = True
        if self._requests is None:  # no process to answer the queue: say so rather than wait
            _fail(list(self._pending), Unavailable("the model is being replaced or the service is shutting down; "
                                                   "retry", retry_after=self.retry_after, reason="draining"))
            self._pending.clear()
        self._dispatch()
        self._check_drained()

    def _check_drained(self) -> None:
        if not self._closed or self._pending or self._inflight:
            return
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._requests is not None:
            self._requests.send_bytes(wire.STOP)
        self._drained.set()


def shared_address(store: str, name: str, version: str, device: str) -> str:
    """Where the process one model version shares with every worker of this service listens: the same for
    each worker (the supervisor names the service in ERDE_ENGINE_GROUP), another for a new version."""
    group = os.environ.get(ENGINE_GROUP) or str(os.getpid())
    key = hashlib.sha256("\0".join([group, store, name, version, device]).encode()).hexdigest()[:24]
    return f"erde-engine-{key}"


def ready(reply: bytes, skip: int = 0) -> dict[str, str]:
    """A process's first message: READY, `skip` bytes, then where it runs ({"device", "description"}). One
    that could not load the model says why (ValueError, with its reason: the registry refuses that version
    and logs it)."""
    if reply[:1] == wire.LOAD_FAILED:
        raise ValueError(f"the inference process could not load it: {reply[1:].decode(errors='replace')}")
    try:
        if reply[:1] != wire.READY:
            raise ValueError
        placed = json.loads(reply[1 + skip:])
        return {"device": str(placed["device"]), "description": str(placed["description"])}
    except (ValueError, KeyError, TypeError):
        raise RuntimeError(f"a ready signal of {len(reply)} bytes") from None


def connect(address: str) -> Connection | None:
    """A connection to the shared process at `address`, or None when nothing listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(wire.abstract(address))
    except (ConnectionRefusedError, FileNotFoundError):
        sock.close()
        return None
    return Connection(sock.detach())


def wait_message(wait: Wait) -> str:
    if wait.held:
        return (f"the inference queue has stood above its {wait.allowed_s * 1e3:.0f} ms target; this request "
                f"would be answered in about {wait.answer_s * 1e3:.0f} ms; retry shortly")
    return (f"this request would be answered in about {wait.answer_s * 1e3:.0f} ms, past the "
            f"{wait.allowed_s * 1e3:.0f} ms it may take; retry shortly or allow more with timeout_ms")


def release(record: RequestRecord) -> None:
    """Give back the row `ModelWorker.reserve` held for a request: its rows are about to be queued, or it
    ended without any. Idempotent."""
    worker = record.reserved
    if worker is not None:
        record.reserved = None
        worker._reserved -= 1


def _fail(jobs: list[Job], error: Exception) -> None:
    for job in jobs:
        if job.future is not None and not job.future.done():
            job.future.set_exception(error)
