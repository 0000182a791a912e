"""The inference process: one per served model (per server worker, or one shared by all of them),
decoding and running the micro-batches the workers send.

Why a process and not a thread: a thread running torch hands the GIL back and forth with the
event loop at every operator (torch releases it around each kernel), and under load each
hand-back waits for the interpreter's switch interval. Measured here: one batch-1 pass took
0.93 ms alone and 196 ms beside a busy Python thread. In its own process the network never
waits for the event loop, and the two use two cores.

Images are decoded here too, not on the event loop: decoding was the largest single cost of the
server's loop (15-17% of it), and this process has a core of its own.

A process of its own per worker is served over two one-way pipes; a shared process listens on an
abstract Unix socket and serves each worker that connects over its own connection (`serve_shared`).
It takes one batch from every worker that sent one and runs them as one, answering each its own rows:
the workers keep their own queues, deadlines and refusals (docs/architecture.md). What the two sides
say to each other is service/engine/wire.py; the network is built here, from the verified manifest and
weights' bytes the server hands over (docs/architecture.md, "No torch in the server").
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import mmap
import multiprocessing
import os
import signal
import socket
import struct
import sys
import time
from collections import deque
from multiprocessing.connection import Connection, wait

import torch

from erde.artifact import InputSpec
from erde.device import describe, pick_device
from erde.nets import EarlyExitResNet, fuse_for_inference
from erde.store import build_network
from service.engine.compute import Sample, Shadows, choose_stage_backends, finish_shadows, run_batch
from service.engine.decode import DecodeTooSlow, decode_budget, decode_image, too_slow
from service.engine.limits import ImageLimits
from service.engine.wire import (
    ADDRESS_TAKEN,
    HELLO,
    ID,
    LOAD_FAILED,
    PID,
    READY,
    STOP,
    ExitResult,
    ModelBlob,
    Row,
    abstract,
    decode_batch,
    encode_exited,
    encode_finished,
    encode_refused,
    encode_witnessed,
    peer_credentials,
)
from service.errors import ServiceError

log = logging.getLogger("erde.service")

SHADOW_CREDIT_MAX_S = 1.0  # most shadow work an idle spell may save up (seconds)
# Batches of shadow rows waiting for idle time (`keep_witness`). The evidence is about today's images only if it
# is fresh: with 64 kept, a student stream at budget 0.25, whose shadow work outgrew the process's idle time, was
# witnessed 1,000-2,000 replies late, and every change of images showed that late.
SHADOWS_KEPT = 4
HELLO_TIMEOUT_S = 1.0  # a worker sends its hello as it connects; the process serves no one meanwhile
PR_SET_NAME = 15
WARM_UP_S = 2.0  # most of a load spent running each batch size once (`warm_up`)
HEARTBEAT_S = 0.1  # at most this long between messages while a batch decodes: well under any hang timeout


@dataclasses.dataclass(eq=False)
class Client:
    """A server worker this process answers: where its batches come from, where its replies go, the arena its
    images lie in. A worker that is gone is dropped; the others are still answered."""

    requests: Connection
    replies: Connection
    arena: memoryview
    arena_bytes: int
    alive: bool = True

    def send(self, message: bytes) -> None:
        if self.alive:
            try:
                self.replies.send_bytes(message)
            except OSError:
                self.alive = False


@dataclasses.dataclass(frozen=True, eq=False)
class Part:
    """One worker's batch within a run of the network: several workers' batches run as one (a shared process)."""

    client: Client
    batch_id: int
    slot: int
    rows: list[Row]

    @property
    def arena(self) -> memoryview:
        return self.client.arena[self.slot * self.client.arena_bytes:]


@dataclasses.dataclass(frozen=True)
class Witness:
    """A run's shadow rows waiting to be run on, and the worker each one came from."""

    work: Shadows
    clients: list[Client]  # by shadow row

    def report(self) -> None:
        """Send each worker the shadow rows that were its own."""
        for client in dict.fromkeys(self.clients):
            own = [k for k, c in enumerate(self.clients) if c is client]
            client.send(encode_witnessed([self.work.exits[k] for k in own], self.work.entropy[own],
                                         self.work.prediction[own]))


@dataclasses.dataclass
class Engine:
    """A loaded model, its stage backends and its device: what every run needs."""

    model: EarlyExitResNet
    backends: list[bool] | None
    spec: InputSpec
    limits: ImageLimits
    device: torch.device
    shadow_cpu: float

    @classmethod
    def load(cls, blob: ModelBlob, spec: InputSpec, limits: ImageLimits, threads: int, max_rows: int,
             shadow_cpu: float, device: str, warm_rows: int | None = None) -> Engine:
        """Build, fuse and place the model, choose backends, warm up. The server drains on SIGTERM and then
        stops this process; a signal to the whole process group must not kill it first."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        name_process(multiprocessing.current_process().name)
        torch.set_num_threads(threads)
        where = pick_device(device)  # ValueError, saying what is missing, when it is not here
        model = fuse_for_inference(build_network(blob.manifest, blob.weights)).to(where)
        backends = choose_stage_backends(model, max_rows) if where.type == "cpu" else None
        rows = warm_rows or max_rows
        warmed = warm_up(model, spec, backends, where, rows)
        if warmed < rows:
            log.warning("warmed %d of %d batch sizes within %.0f s; the others run cold once", warmed, rows, WARM_UP_S)
        return cls(model, backends, spec, limits, where, shadow_cpu)

    def placed(self) -> bytes:
        """Where the network runs, for the ready message: the device and how /models names it."""
        return json.dumps({"device": str(self.device), "description": describe(self.device)}).encode()


def warm_up(model: EarlyExitResNet, spec: InputSpec, backends: list[bool] | None, device: torch.device,
            max_rows: int, budget_s: float = WARM_UP_S) -> int:
    """Run a batch of every size from 1 to `max_rows` to the last exit, `max_rows` (the size a loaded server
    runs) first, then from the smallest up, until `budget_s` is spent (the batch under way then finishes);
    how many sizes ran. The first run of an input shape is slow (oneDNN builds its primitives per shape):
    1.5-3x a warm run here, and a fresh server's first second of batches, all of new sizes, fell behind a
    load half its capacity, so that 503 `queue_wait` and degraded replies followed (docs/design.md §10,
    "A warm start"). Every stage of a batch of n rows runs on at most n rows, so the sizes up to n cover
    every shape such a batch takes."""
    warm = torch.zeros(spec.channels, spec.size, spec.size)
    deadline = time.monotonic() + budget_s
    for done, rows in enumerate([max_rows, *range(1, max_rows)], 1):
        run_batch(model, [Sample(warm, 0.0, model.num_exits - 1, 1, 0.0)] * rows, lambda *_: None,
                  mkldnn=backends, device=device)
        if time.monotonic() > deadline:
            return done
    return max_rows


def serve(requests: Connection, replies: Connection, blob: ModelBlob, spec: InputSpec, limits: ImageLimits,
          arena_path: str, arena_bytes: int, threads: int, max_rows: int, shadow_cpu: float = 0.0,
          device: str = "cpu") -> None:
    """The main of a worker's own process: load, then serve that worker on its pipes until it stops or goes.
    A model that cannot be loaded is told to the worker, with the reason, and the process ends."""
    try:
        engine = Engine.load(blob, spec, limits, threads, max_rows, shadow_cpu, device)
    except Exception as exc:
        replies.send_bytes(LOAD_FAILED + str(exc).encode())
        quit_or_raise(exc)
    client = Client(requests, replies, map_arena(arena_path), arena_bytes)  # before READY: then the file goes
    replies.send_bytes(READY + engine.placed())
    run_clients(engine, [client])


def serve_shared(address: str, blob: ModelBlob, spec: InputSpec, limits: ImageLimits, threads: int, max_rows: int,
                 shadow_cpu: float = 0.0, device: str = "cpu", sharers: int = 1) -> None:
    """The main of a process shared by every worker of a service (docs/architecture.md, "One inference process
    for every worker"): claim the address, load, then serve whoever connects until the last one has gone.
    Exits with ADDRESS_TAKEN when another process holds the address: the caller connects to that one."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(abstract(address))
    except OSError:
        sys.exit(ADDRESS_TAKEN)
    listener.listen(64)
    try:
        engine = Engine.load(blob, spec, limits, threads, max_rows, shadow_cpu, device,
                             warm_rows=max_rows * sharers)  # a run merges a batch from each worker
    except Exception as exc:
        refuse_clients(listener, LOAD_FAILED + str(exc).encode())
        quit_or_raise(exc)
    run_clients(engine, [], listener)


def quit_or_raise(exc: Exception) -> None:
    """After a failed load has been told: a ValueError (an artifact that does not fit, a device that is not
    there) has said all there is, and the process exits quietly; anything else is raised, its traceback
    logged."""
    if isinstance(exc, ValueError):
        sys.exit(1)
    raise exc


def refuse_clients(listener: socket.socket, message: bytes) -> None:
    """Tell every worker that connects why the model could not be loaded, until none has for HELLO_TIMEOUT_S:
    those waiting for this process then fail with the reason rather than a closed connection."""
    listener.settimeout(HELLO_TIMEOUT_S)
    while True:
        try:
            sock, _ = listener.accept()
        except TimeoutError:
            return
        if peer_credentials(sock)[1] != os.getuid():  # as `accept`: only our own user is answered
            sock.close()
            continue
        with Connection(sock.detach()) as conn, contextlib.suppress(OSError):
            conn.send_bytes(message)


def report_device(name: str, answer: Connection) -> None:
    """The main of a short-lived process that tells the server what ERDE_DEVICE `name` resolves to here, or
    why it is not there (erde/device.py): the server imports no torch to ask."""
    try:
        answer.send_bytes(json.dumps({"device": str(pick_device(name))}).encode())
    except ValueError as exc:
        answer.send_bytes(json.dumps({"error": str(exc)}).encode())


def accept(listener: socket.socket, placed: bytes) -> Client | None:
    """A worker that connected: its hello names its arena (HELLO, then the arena file's path); answered with
    READY, this process's id (the worker's watchdog kills a hung process by it) and where it runs (`placed`)."""
    try:
        sock, _ = listener.accept()
    except OSError as exc:  # the worker left already, or no descriptor is left (EMFILE): it will retry
        log.error("could not accept a worker: %s", exc)
        return None
    if peer_credentials(sock)[1] != os.getuid():  # an abstract socket has no permissions: only our own user is served
        sock.close()
        return None
    conn = Connection(sock.detach())
    try:
        if not conn.poll(HELLO_TIMEOUT_S):
            raise OSError("no hello")
        message = conn.recv_bytes()
        kind, arena_bytes = HELLO.unpack_from(message)
        if kind != b"H":
            raise OSError(f"a hello of kind {kind!r}")
        arena = map_arena(message[HELLO.size:].decode())
        conn.send_bytes(READY + PID.pack(os.getpid()) + placed)
    except (EOFError, OSError, ValueError, struct.error) as exc:  # ValueError: an empty arena, a NUL in its path
        log.error("a worker's connection was dropped before it was served: %s", exc)
        conn.close()
        return None
    return Client(conn, conn, arena, arena_bytes)


def map_arena(path: str) -> memoryview:
    with open(path, "r+b") as f:
        return memoryview(mmap.mmap(f.fileno(), 0))


def run_clients(engine: Engine, clients: list[Client], listener: socket.socket | None = None) -> None:
    """Take one batch from every worker that sent one, run them together, answer each its own rows; then run
    shadow rows on while none waits, within `shadow_cpu` of the time spent on batches (docs/budgets.md).
    Returns once every worker has gone (or, with a listener, when none came within HELLO_TIMEOUT_S * 10)."""
    credit = 0.0  # seconds of shadow work the process may still spend
    waiting: deque[Witness] = deque()  # shadow rows to run on, oldest first
    served = bool(clients)
    while clients or not served:
        sources = readable(clients, listener)
        ready = wait(sources, None if served else HELLO_TIMEOUT_S * 10)
        if not ready and not served:
            log.error("no worker connected to this shared inference process; stopping")
            return
        parts = []
        for source in ready:
            if source is listener:
                client = accept(listener, engine.placed())
                if client is not None:
                    clients.append(client)
                    served = True
                continue
            client = next(c for c in clients if c.requests is source)
            part = take_part(client)
            if part is not None:
                parts.append(part)
        clients = [c for c in clients if c.alive]
        if not parts:
            continue
        started = time.perf_counter()
        stage_s: list[float] = []
        try:
            witness = run_rows(engine, parts, stage_s, clients)
        except Exception:  # a bug must not kill the process or strand the clients
            log.exception("inference failed for a run of %d rows", sum(len(p.rows) for p in parts))
            finish(engine, parts, b"F", time.perf_counter() - started, [])
            continue
        busy_s = time.perf_counter() - started
        finish(engine, parts, b"D", busy_s, stage_s)
        credit = min(credit + engine.shadow_cpu * busy_s, SHADOW_CREDIT_MAX_S)
        if witness is not None:
            keep_witness(waiting, witness)
        if not waiting:
            continue
        # The workers as they are now: one that left during the run has its connection closed, and waiting
        # on a closed connection raises (a review found the process ended so).
        sources = readable(clients, listener)
        try:
            credit -= witness_while_idle(engine, waiting, sources, credit)
        except Exception:  # shadow rows are evidence, never worth the process
            log.exception("a shadow pass failed; its rows are dropped")
            waiting.clear()


def keep_witness(waiting: deque[Witness], witness: Witness) -> None:
    """Queue a run's shadow rows to be run on, unless SHADOWS_KEPT runs wait already: then they are dropped,
    whole and before any is run on, whatever their rows. Dropping the oldest instead dropped the run being
    worked on, and which run that is depends on its rows: one whose rows all went to the last exit is done at
    once, one whose rows answered early has stages left. The evidence kept the rows that had gone deep, the
    hard ones, and the teacher's estimate on clean images read 3.7-4.7 points low (0.895-0.906 against
    0.942), enough to refuse its top floors 422 (docs/budgets.md, "Adaptation of the estimate")."""
    if len(waiting) < SHADOWS_KEPT:
        waiting.append(witness)


def readable(clients: list[Client], listener: socket.socket | None) -> list:
    """What the process waits on: every worker's connection, and the listener of a shared process."""
    return [c.requests for c in clients] + ([listener] if listener is not None else [])


def take_part(client: Client) -> Part | None:
    """The batch a worker sent, or None when it stopped, went, or sent what this process does not understand."""
    try:
        message = client.requests.recv_bytes()
    except (EOFError, OSError):
        message = STOP
    if message[:1] == b"B":
        return Part(client, *decode_batch(message))
    if message[:1] != STOP:
        log.error("unknown message %r from a worker; dropping it", message[:1])
    client.alive = False
    client.requests.close()
    client.replies.close()
    return None


def finish(engine: Engine, parts: list[Part], kind: bytes, busy_s: float, stage_s: list[float]) -> None:
    """Say each batch of a run is over. Each worker is charged the run's time in proportion to its rows, so
    that what it learns a row costs is what a row of the shared run cost; the stage times go to one worker
    only, so that the metrics count each run once."""
    rows = sum(len(p.rows) for p in parts) or 1
    for i, part in enumerate(parts):
        part.client.send(encode_finished(kind, part.batch_id, busy_s * len(part.rows) / rows,
                                         device_memory(engine.device), stage_s if i == 0 else []))


def device_memory(device: torch.device) -> int:
    """Bytes torch holds on `device` for this process; 0 on the CPU (its memory is the process's RSS)."""
    return torch.cuda.memory_reserved(device) if device.type == "cuda" else 0


def witness_while_idle(engine: Engine, waiting: deque[Witness], sources: list, credit: float) -> float:
    """Run the waiting shadow rows on to the last exit, oldest first, while no batch waits and `credit`
    seconds last, and report each run's once all of them got there; returns the seconds spent."""
    started = time.perf_counter()

    def idle() -> bool:
        return time.perf_counter() - started < credit and not wait(sources, 0)

    while waiting and finish_shadows(engine.model, waiting[0].work, engine.backends, idle, engine.device):
        waiting.popleft().report()
    return time.perf_counter() - started


def run_rows(engine: Engine, parts: list[Part], stage_s: list[float] | None = None,
             clients: list[Client] | None = None) -> Witness | None:
    """Decode each row within the decode budget (a refused image is answered at once), then run the rest of
    every part together, stage by stage, answering each worker its own rows; returns the run's shadow rows,
    if any, to be run on once it is done. While it decodes, every worker of `clients` hears that the process
    is at work (a worker whose batch waits for the next run would take the silence for a hang).

    An image's queue time runs until the network starts, so it includes the run's decoding.
    """
    samples: list[Sample] = []
    where: dict[int, tuple[Part, int, float]] = {}  # id(sample) -> (its part, its row there, its decode seconds)
    said = time.perf_counter()  # when the workers last heard from this run
    with decode_budget(engine.limits.decode_timeout_s) as budget:
        for part in parts:
            arena = part.arena
            for i, row in enumerate(part.rows):
                started = time.perf_counter()
                if started - said > HEARTBEAT_S:
                    for client in clients or [p.client for p in parts]:
                        client.send(ID.pack(b"P", 0))
                    said = started
                try:
                    with budget:
                        x = decode_image(bytes(arena[row.offset:row.offset + row.size]), engine.spec, engine.limits)
                except DecodeTooSlow:
                    part.client.send(encode_refused(part.batch_id, i, too_slow(engine.limits.decode_timeout_s)))
                    said = time.perf_counter()
                    continue
                except ServiceError as exc:
                    part.client.send(encode_refused(part.batch_id, i, exc))
                    said = time.perf_counter()
                    continue
                sample = Sample(x, row.threshold, row.cap, row.top_k, row.enqueued, bool(row.shadow))
                where[id(sample)] = (part, i, time.perf_counter() - started)
                samples.append(sample)

    def release(done: list[Sample], results: list[ExitResult]) -> None:
        by_part: dict[Part, list[tuple[int, ExitResult, float]]] = {}
        for sample, result in zip(done, results, strict=True):
            part, row, decode_s = where[id(sample)]
            by_part.setdefault(part, []).append((row, result, decode_s))
        for part, own in by_part.items():
            part.client.send(encode_exited(part.batch_id, [r for r, _, _ in own], [r for _, r, _ in own],
                                           [d for _, _, d in own]))

    shadows: list[Shadows] = []
    if samples:
        run_batch(engine.model, samples, release, mkldnn=engine.backends, witness=shadows.append, stage_s=stage_s,
                  device=engine.device)
    if not shadows:
        return None
    return Witness(shadows[0], [where[id(samples[k])][0].client for k in shadows[0].rows])


def name_process(name: str) -> None:
    """Show the process as `name` in ps and top (Linux's comm, 15 bytes): which model's process it is."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
