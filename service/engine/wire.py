"""What the server and an inference process say to each other, and the data they pass: no torch.

The server imports this module and never the process's own (service/engine/process.py), which needs
torch: docs/architecture.md, "No torch in the server". A process is started by naming its entry point
(`run`); the fork server has imported the process module already, so the child finds it loaded.

Wire format (the encoded images go through shared memory, one arena per slot of each worker):
  server -> process  H: hello, on a shared process's connection only: the worker's arena (bytes per slot,
                        file path)
                     B: a batch in slot `slot`: per row θ, enqueue time, cap, top_k, and where its
                        bytes lie in the slot's arena
                     S: stop (a shared process: this worker is done)
  process -> server  R: ready (model loaded, backends chosen, warmed up); a shared process adds its pid;
                        then where the network runs (JSON: the device and how /models names it)
                     L: the model could not be loaded (the reason, as text); the process then exits
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
import importlib
import socket
import struct
from collections.abc import Callable

import numpy as np

from erde.artifact import StoredArtifact
from service.errors import ServiceError

BATCH = struct.Struct("<cIII")  # kind, batch id, slot, rows
EXITED = struct.Struct("<cIIId")  # kind, batch id, exit, rows, inference seconds
REFUSED = struct.Struct("<cIIH")  # kind, batch id, row, HTTP status; then code, reason, message
ID = struct.Struct("<cI")  # kind, batch id (P)
DONE = struct.Struct("<cIdQB")  # kind, batch id, seconds spent on it, device bytes in use, stages; then per stage s
WITNESSED = struct.Struct("<cII")  # kind, rows, exits
READY, STOP, LOAD_FAILED = b"R", b"S", b"L"
START_TIMEOUT_S = 300.0  # for a process to load, place and warm its model (or say why it cannot)
HELLO = struct.Struct("<cQ")  # kind, bytes per slot of the worker's arena; then the arena file's path
PID = struct.Struct("<Q")
CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
ADDRESS_TAKEN = 3  # a shared process's exit code when another already holds its address


def run(entry: str, *args: object) -> None:
    """An inference process's main: `entry` of service/engine/process.py, which the fork server preloaded."""
    getattr(importlib.import_module("service.engine.process"), entry)(*args)


@dataclasses.dataclass(frozen=True)
class ModelBlob:
    """A model as plain data for its process: the verified manifest and the weights' safetensors bytes
    (never pickle). The process builds the network from them (erde.store.build_network), which refuses
    weights that do not fit; the server never needs torch for it."""

    manifest: dict
    weights: bytes

    @classmethod
    def of(cls, stored: StoredArtifact) -> ModelBlob:
        return cls(stored.manifest, stored.weights())


@dataclasses.dataclass(frozen=True)
class ExitResult:
    """One row's answer at the exit it took, as its process reports it."""

    exit: int
    entropy: float
    top_probs: list[float]  # descending
    top_ids: list[int]
    queue_s: float  # enqueue -> batch start
    inference_s: float  # batch start -> release
    decode_s: float = 0.0  # this image's decode, in the inference process


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


def abstract(address: str) -> str:
    """A name in Linux's abstract socket namespace: no file to leave behind, gone when its holder exits."""
    return "\0" + address


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket, as the kernel saw it connect."""
    return CREDENTIALS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, CREDENTIALS.size))
