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
the workers keep their own queues, deadlines and refusals (docs/architecture.md).

Wire format (the encoded images go through shared memory, one arena per slot of each worker):
  server -> process  H: hello, on a shared process's connection only: the worker's arena (bytes per slot,
                        file path)
                     B: a batch in slot `slot`: per row θ, enqueue time, cap, top_k, and where its
                        bytes lie in the slot's arena
                     S: stop (a shared process: this worker is done)
  process -> server  R: ready (model loaded, backends chosen, warmed up); a shared process adds its pid
                     X: one row's image was refused by the decoder (HTTP status, code, reason, message)
                     P: still decoding the batch (sent between rows at most every HEARTBEAT_S: a batch of
                        slow but admissible images is progress, not a hang, to the watchdog)
                     E: rows that left at one exit, with entropy, queue and decode time and top-k
                     W: a batch's shadow rows, run on to the last exit once the batch was done and while
                        no other batch waited: the exit each answered at, every exit's entropy and
                        prediction (docs/budgets.md)
                     D: the batch is finished and its slot is free, with the seconds it took here, the
                        device memory in use and the seconds each stage that ran took
                     F: the batch failed (its unreleased rows get an error), with the same
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
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
from collections.abc import Callable
from multiprocessing.connection import Connection, wait

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from erde.data import InputSpec
from erde.nets import EarlyExitResNet, NetConfig, build_model, fuse_for_inference
from service.engine.compute import ExitResult, Sample, Shadows, choose_stage_backends, finish_shadows, run_batch
from service.engine.decode import DecodeTooSlow, ImageLimits, decode_budget, decode_image, too_slow
from service.errors import ServiceError

log = logging.getLogger("erde.service")

BATCH = struct.Struct("<cIII")  # kind, batch id, slot, rows
EXITED = struct.Struct("<cIIId")  # kind, batch id, exit, rows, inference seconds
REFUSED = struct.Struct("<cIIH")  # kind, batch id, row, HTTP status; then code, reason, message
ID = struct.Struct("<cI")  # kind, batch id (P)
DONE = struct.Struct("<cIdQB")  # kind, batch id, seconds spent on it, device bytes in use, stages; then per stage s
WITNESSED = struct.Struct("<cII")  # kind, rows, exits
SHADOW_CREDIT_MAX_S = 1.0  # most shadow work an idle spell may save up (seconds)
# Batches of shadow rows waiting for idle time (`keep_witness`). The evidence is about today's images only if it
# is fresh: with 64 kept, a student stream at budget 0.25, whose shadow work outgrew the process's idle time, was
# witnessed 1,000-2,000 replies late, and every change of images showed that late.
SHADOWS_KEPT = 4
READY, STOP = b"R", b"S"
HELLO = struct.Struct("<cQ")  # kind, bytes per slot of the worker's arena; then the arena file's path
PID = struct.Struct("<Q")
HELLO_TIMEOUT_S = 1.0  # a worker sends its hello as it connects; the process serves no one meanwhile
CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
ADDRESS_TAKEN = 3  # a shared process's exit code when another already holds its address
PR_SET_NAME = 15
WARM_UP_S = 2.0  # most of a load spent running each batch size once (`warm_up`)
HEARTBEAT_S = 0.1  # at most this long between messages while a batch decodes: well under any hang timeout


@dataclasses.dataclass(frozen=True)
class ModelBlob:
    """A network as plain data for the process: its config and safetensors bytes (never pickle)."""

    config: dict
    weights: bytes

    @classmethod
    def of(cls, model: EarlyExitResNet) -> ModelBlob:
        return cls(dataclasses.asdict(model.config), save_tensors(model.state_dict()))

    def build(self) -> EarlyExitResNet:
        model = build_model(NetConfig.from_dict(self.config))
        model.load_state_dict(load_tensors(self.weights))
        return model.eval()


@dataclasses.dataclass(frozen=True)
class Row:
    """One image of a batch as the process receives it: its rule and where its bytes are."""

    threshold: float
    enqueued: float
    cap: int
    top_k: int
    offset: int  # in the slot's arena
    size: int
    shadow: int = 0  # 1: run on to the last exit after its answer (a shadow pass)


def encode_batch(batch_id: int, slot: int, rows: list[Row]) -> bytes:
    floats = np.array([[r.threshold for r in rows], [r.enqueued for r in rows]], dtype=np.float64)
    ints = np.array([[r.cap for r in rows], [r.top_k for r in rows], [r.offset for r in rows],
                     [r.size for r in rows], [r.shadow for r in rows]], dtype=np.int64)
    return BATCH.pack(b"B", batch_id, slot, len(rows)) + floats.tobytes() + ints.tobytes()


def decode_batch(message: bytes) -> tuple[int, int, list[Row]]:
    _, batch_id, slot, n = BATCH.unpack_from(message)
    floats = np.frombuffer(message, dtype=np.float64, count=2 * n, offset=BATCH.size).reshape(2, n).tolist()
    ints = np.frombuffer(message, dtype=np.int64, count=5 * n, offset=BATCH.size + 16 * n).reshape(5, n).tolist()
    return batch_id, slot, [Row(*r) for r in zip(*floats, *ints, strict=True)]


def encode_refused(batch_id: int, row: int, error: ServiceError) -> bytes:
    text = "\0".join([error.code, error.reason, error.message]).encode()
    return REFUSED.pack(b"X", batch_id, row, error.status) + text


def decode_refused(message: bytes) -> tuple[int, int, ServiceError]:
    _, batch_id, row, status = REFUSED.unpack_from(message)
    code, reason, text = message[REFUSED.size:].decode().split("\0", 2)
    return batch_id, row, ServiceError(text, code=code, status=status, reason=reason)


def encode_exited(batch_id: int, rows: list[int], results: list[ExitResult], decode_s: list[float]) -> bytes:
    """Rows that left at one exit; top-k lists are concatenated (the server knows each row's k)."""
    first = results[0]
    return b"".join([
        EXITED.pack(b"E", batch_id, first.exit, len(rows), first.inference_s),
        np.array(rows, dtype=np.int64).tobytes(),
        np.array([[r.entropy for r in results], [r.queue_s for r in results], decode_s], dtype=np.float64).tobytes(),
        np.array([c for r in results for c in r.top_ids], dtype=np.int64).tobytes(),
        np.array([p for r in results for p in r.top_probs], dtype=np.float64).tobytes(),
    ])


def decode_exited(message: bytes, top_k: list[int]) -> tuple[int, list[tuple[int, ExitResult]]]:
    """(batch id, [(row, result)]); `top_k` gives each row's k, by row index in the batch."""
    _, batch_id, exit_index, n, inference_s = EXITED.unpack_from(message)
    offset = EXITED.size
    rows = np.frombuffer(message, dtype=np.int64, count=n, offset=offset).tolist()
    entropy, queue_s, decode_s = np.frombuffer(message, dtype=np.float64, count=3 * n,
                                               offset=offset + 8 * n).reshape(3, n).tolist()
    total = sum(top_k[r] for r in rows)
    ids = np.frombuffer(message, dtype=np.int64, count=total, offset=offset + 32 * n).tolist()
    probs = np.frombuffer(message, dtype=np.float64, count=total, offset=offset + 32 * n + 8 * total).tolist()
    out, at = [], 0
    for row, ent, queued, decoded in zip(rows, entropy, queue_s, decode_s, strict=True):
        k = top_k[row]
        out.append((row, ExitResult(exit_index, ent, probs[at:at + k], ids[at:at + k], queued, inference_s,
                                    decoded)))
        at += k
    return batch_id, out


def encode_witnessed(answered: list[int], entropy: np.ndarray, prediction: np.ndarray) -> bytes:
    return b"".join([WITNESSED.pack(b"W", *entropy.shape), np.array(answered, dtype=np.int64).tobytes(),
                     entropy.astype(np.float64).tobytes(), prediction.astype(np.int64).tobytes()])


def decode_witnessed(message: bytes) -> Witnessed:
    _, n, exits = WITNESSED.unpack_from(message)
    if len(message) != WITNESSED.size + 8 * n * (1 + 2 * exits):
        raise ProtocolError(f"a shadow message of {len(message)} bytes for {n} rows and {exits} exits")
    answered = np.frombuffer(message, dtype=np.int64, count=n, offset=WITNESSED.size).tolist()
    at = WITNESSED.size + 8 * n
    entropy = np.frombuffer(message, dtype=np.float64, count=n * exits, offset=at).reshape(n, exits)
    prediction = np.frombuffer(message, dtype=np.int64, count=n * exits, offset=at + 8 * n * exits).reshape(n, exits)
    return Witnessed(answered, entropy, prediction)


@dataclasses.dataclass(frozen=True)
class Witnessed:
    """Shadow rows run to the last exit: the exit each answered at, every exit's entropy and prediction."""

    answered: list[int]
    entropy: np.ndarray  # (rows, exits)
    prediction: np.ndarray


@dataclasses.dataclass(frozen=True)
class Exited:
    """Rows of a batch that left at one exit."""

    batch_id: int
    results: list[tuple[int, ExitResult]]  # (row in the batch, its result)


@dataclasses.dataclass(frozen=True)
class Refused:
    """One row whose image the decoder refused."""

    batch_id: int
    row: int
    error: ServiceError


@dataclasses.dataclass(frozen=True)
class Finished:
    """The batch is over and its slot free; `failed`: its unreleased rows get an error."""

    batch_id: int
    failed: bool
    busy_s: float = 0.0  # what the batch cost this process, not counting the server's wait to read the reply
    device_bytes: int = 0  # the device memory torch holds for this process (0 on the CPU)
    stage_s: list[float] = dataclasses.field(default_factory=list)  # each stage that ran, on the device


def encode_finished(kind: bytes, batch_id: int, busy_s: float, device_bytes: int = 0,
                    stage_s: list[float] | None = None) -> bytes:
    stage_s = stage_s or []
    return DONE.pack(kind, batch_id, busy_s, device_bytes, len(stage_s)) + np.array(stage_s, np.float64).tobytes()


@dataclasses.dataclass(frozen=True)
class Progress:
    """The process is still decoding the batch."""

    batch_id: int


class ProtocolError(Exception):
    """A message from the process that the server does not understand: the process is not trusted further."""


def decode_reply(message: bytes,
                 top_k: Callable[[int], list[int]]) -> Exited | Refused | Finished | Progress | Witnessed:
    """One message from the process, typed; `top_k(batch_id)` gives each row's k for that batch."""
    kind = message[:1]
    if kind == b"E":
        batch_id = EXITED.unpack_from(message)[1]
        return Exited(*decode_exited(message, top_k(batch_id)))
    if kind == b"X":
        return Refused(*decode_refused(message))
    if kind == b"W":
        return decode_witnessed(message)
    if kind in (b"D", b"F") and len(message) >= DONE.size:
        _, batch_id, busy_s, device_bytes, stages = DONE.unpack_from(message)
        if len(message) != DONE.size + 8 * stages:
            raise ProtocolError(f"a finished message of {len(message)} bytes for {stages} stages")
        stage_s = np.frombuffer(message, dtype=np.float64, count=stages, offset=DONE.size).tolist()
        return Finished(batch_id, kind == b"F", busy_s, device_bytes, stage_s)
    if kind == b"P" and len(message) == ID.size:
        return Progress(ID.unpack(message)[1])
    raise ProtocolError(f"unknown reply kind {kind!r}")


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
        where = torch.device(device)
        model = fuse_for_inference(blob.build()).to(where)
        backends = choose_stage_backends(model, max_rows) if where.type == "cpu" else None
        rows = warm_rows or max_rows
        warmed = warm_up(model, spec, backends, where, rows)
        if warmed < rows:
            log.warning("warmed %d of %d batch sizes within %.0f s; the others run cold once", warmed, rows, WARM_UP_S)
        return cls(model, backends, spec, limits, where, shadow_cpu)


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
    """The main of a worker's own process: load, then serve that worker on its pipes until it stops or goes."""
    engine = Engine.load(blob, spec, limits, threads, max_rows, shadow_cpu, device)
    client = Client(requests, replies, map_arena(arena_path), arena_bytes)  # before READY: then the file goes
    replies.send_bytes(READY)
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
    engine = Engine.load(blob, spec, limits, threads, max_rows, shadow_cpu, device,
                         warm_rows=max_rows * sharers)  # a run merges a batch from each worker
    run_clients(engine, [], listener)


def abstract(address: str) -> str:
    """A name in Linux's abstract socket namespace: no file to leave behind, gone when its holder exits."""
    return "\0" + address


def accept(listener: socket.socket) -> Client | None:
    """A worker that connected: its hello names its arena (HELLO, then the arena file's path); answered with
    READY and this process's id (the worker's watchdog kills a hung process by it)."""
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
        conn.send_bytes(READY + PID.pack(os.getpid()))
    except (EOFError, OSError, ValueError, struct.error) as exc:  # ValueError: an empty arena, a NUL in its path
        log.error("a worker's connection was dropped before it was served: %s", exc)
        conn.close()
        return None
    return Client(conn, conn, arena, arena_bytes)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket, as the kernel saw it connect."""
    return CREDENTIALS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, CREDENTIALS.size))


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
                client = accept(listener)
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
