"""The inference process: one per served model, decoding and running the micro-batches the server sends.

Why a process and not a thread: a thread running torch hands the GIL back and forth with the
event loop at every operator (torch releases it around each kernel), and under load each
hand-back waits for the interpreter's switch interval. Measured here: one batch-1 pass took
0.93 ms alone and 196 ms beside a busy Python thread. In its own process the network never
waits for the event loop, and the two use two cores.

Images are decoded here too, not on the event loop: decoding was the largest single cost of the
server's loop (15-17% of it), and this process has a core of its own.

Wire format (over two one-way pipes; the encoded images go through shared memory, one arena per slot):
  server -> process  B: a batch in slot `slot`: per row θ, enqueue time, cap, top_k, and where its
                        bytes lie in the slot's arena
                     S: stop
  process -> server  R: ready (model loaded, backends chosen, warmed up)
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

import dataclasses
import logging
import mmap
import signal
import struct
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from erde.data import InputSpec
from erde.nets import EarlyExitResNet, NetConfig, build_model, fuse_for_inference
from service.engine.compute import CPU, ExitResult, Sample, Shadows, choose_stage_backends, finish_shadows, run_batch
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
# Batches of shadow rows waiting for idle time; past it the oldest go. The evidence is about today's images
# only if it is fresh: with 64 kept, a student stream at budget 0.25, whose shadow work outgrew the process's
# idle time, was witnessed 1,000-2,000 replies late, and every change of images showed that late.
SHADOWS_KEPT = 4
READY, STOP = b"R", b"S"
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


def serve(requests: Connection, replies: Connection, blob: ModelBlob, spec: InputSpec, limits: ImageLimits,
          arena_path: str, arena_bytes: int, threads: int, max_rows: int, shadow_cpu: float = 0.0,
          device: str = "cpu") -> None:
    """The process's main: load, choose backends, warm up, then decode and run batches until told to stop.

    After a batch is done, its shadow rows run on while no other batch waits, within `shadow_cpu` of the
    time the process spent on batches (docs/budgets.md)."""
    # The server drains on SIGTERM and then stops this process; a signal to the whole process
    # group must not kill it first. It also ends when the server's end of the pipe closes.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    where = torch.device(device)
    model = fuse_for_inference(blob.build()).to(where)
    backends = choose_stage_backends(model, max_rows) if where.type == "cpu" else None
    warm = torch.zeros(spec.channels, spec.size, spec.size)
    run_batch(model, [Sample(warm, 0.0, model.num_exits - 1, 1, 0.0)] * 2, lambda *_: None, mkldnn=backends,
              device=where)
    with open(arena_path, "r+b") as f:
        arena = memoryview(mmap.mmap(f.fileno(), 0))
    replies.send_bytes(READY)
    credit = 0.0  # seconds of shadow work the process may still spend
    waiting: deque[Shadows] = deque(maxlen=SHADOWS_KEPT)  # shadow rows to run on, oldest first
    while True:
        try:
            message = requests.recv_bytes()
        except (EOFError, OSError):
            return
        if message[:1] == STOP:
            return
        if message[:1] != b"B":
            log.error("unknown message %r from the server; stopping", message[:1])
            return
        batch_id, slot, rows = decode_batch(message)
        started = time.perf_counter()
        stage_s: list[float] = []
        try:
            shadows = run_rows(model, backends, spec, limits, batch_id, rows, arena[slot * arena_bytes:], replies,
                               stage_s, where)
            busy_s = time.perf_counter() - started
            replies.send_bytes(encode_finished(b"D", batch_id, busy_s, device_memory(where), stage_s))
            credit = min(credit + shadow_cpu * busy_s, SHADOW_CREDIT_MAX_S)
            if shadows is not None:
                waiting.append(shadows)
            if waiting:
                credit -= witness_while_idle(model, backends, waiting, requests, replies, credit, where)
        except (EOFError, OSError):
            return  # the server is gone
        except Exception:  # a bug must not kill the process or strand the clients
            log.exception("inference failed for a batch of %d", len(rows))
            replies.send_bytes(encode_finished(b"F", batch_id, time.perf_counter() - started, device_memory(where)))


def device_memory(device: torch.device) -> int:
    """Bytes torch holds on `device` for this process; 0 on the CPU (its memory is the process's RSS)."""
    return torch.cuda.memory_reserved(device) if device.type == "cuda" else 0


def witness_while_idle(model: EarlyExitResNet, backends: list[bool] | None, waiting: deque[Shadows],
                       requests: Connection, replies: Connection, credit: float, device: torch.device) -> float:
    """Run the waiting shadow rows on to the last exit, oldest first, while no batch waits and `credit`
    seconds last, and report each batch's once all of them got there; returns the seconds spent."""
    started = time.perf_counter()

    def idle() -> bool:
        return time.perf_counter() - started < credit and not requests.poll()

    while waiting and finish_shadows(model, waiting[0], backends, idle, device):
        work = waiting.popleft()
        replies.send_bytes(encode_witnessed(work.exits, work.entropy, work.prediction))
    return time.perf_counter() - started


def run_rows(model: EarlyExitResNet, backends: list[bool] | None, spec: InputSpec, limits: ImageLimits,
             batch_id: int, rows: list[Row], arena: memoryview, replies: Connection,
             stage_s: list[float] | None = None, device: torch.device = CPU) -> Shadows | None:
    """Decode each row within the decode budget (a refused image is answered at once), then run the
    rest stage by stage; returns the batch's shadow rows, if any, to be run on once it is done.

    An image's queue time runs until the network starts, so it includes the batch's decoding.
    """
    samples: list[Sample] = []
    where: dict[int, tuple[int, float]] = {}  # id(sample) -> (its row in the batch, its decode seconds)
    said = time.perf_counter()  # when the server last heard from this batch
    with decode_budget(limits.decode_timeout_s) as budget:
        for i, row in enumerate(rows):
            started = time.perf_counter()
            if started - said > HEARTBEAT_S:
                replies.send_bytes(ID.pack(b"P", batch_id))
                said = started
            try:
                with budget:
                    x = decode_image(bytes(arena[row.offset:row.offset + row.size]), spec, limits)
            except DecodeTooSlow:
                replies.send_bytes(encode_refused(batch_id, i, too_slow(limits.decode_timeout_s)))
                said = time.perf_counter()
                continue
            except ServiceError as exc:
                replies.send_bytes(encode_refused(batch_id, i, exc))
                said = time.perf_counter()
                continue
            sample = Sample(x, row.threshold, row.cap, row.top_k, row.enqueued, bool(row.shadow))
            where[id(sample)] = (i, time.perf_counter() - started)
            samples.append(sample)

    def release(done: list[Sample], results: list[ExitResult]) -> None:
        placed = [where[id(s)] for s in done]
        replies.send_bytes(encode_exited(batch_id, [r for r, _ in placed], results, [d for _, d in placed]))

    shadows: list[Shadows] = []
    if samples:
        run_batch(model, samples, release, mkldnn=backends, witness=shadows.append, stage_s=stage_s,
                  device=device)
    return shadows[0] if shadows else None
