"""The inference process: one per served model, running micro-batches the server sends it.

Why a process and not a thread: a thread running torch hands the GIL back and forth with the
event loop at every operator (torch releases it around each kernel), and under load each
hand-back waits for the interpreter's switch interval. Measured here: one batch-1 pass took
0.93 ms alone and 196 ms beside a busy Python thread. In its own process the network never
waits for the event loop, and the two use two cores.

Wire format (over two one-way pipes; images never cross them, they go through shared memory):
  server -> process  B: a batch in slot `slot`, with per-row θ, cap, top_k and enqueue times
                     S: stop
  process -> server  R: ready (model loaded, backends chosen, warmed up)
                     E: rows that left at one exit, with entropy, queue time and top-k
                     D: the batch is finished and its slot is free
                     F: the batch failed (its unreleased rows get an error)
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import signal
import struct
from multiprocessing.connection import Connection

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from erde.nets import EarlyExitResNet, NetConfig, build_model, fuse_for_inference
from service.engine.batcher import Job
from service.engine.compute import ExitResult, choose_stage_backends, run_batch

log = logging.getLogger("erde.service")

BATCH = struct.Struct("<cIII")  # kind, batch id, slot, rows
EXITED = struct.Struct("<cIIId")  # kind, batch id, exit, rows, inference seconds
ID = struct.Struct("<cI")  # kind, batch id (D and F)
READY, STOP = b"R", b"S"


@dataclasses.dataclass(frozen=True)
class ModelBlob:
    """A network as plain data for the process: its config and safetensors bytes (never pickle)."""

    config: dict
    weights: bytes

    @classmethod
    def of(cls, model: EarlyExitResNet) -> ModelBlob:
        return cls(dataclasses.asdict(model.config), save_tensors(model.state_dict()))

    def build(self) -> EarlyExitResNet:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in self.config.items()}
        model = build_model(NetConfig(**fields))
        model.load_state_dict(load_tensors(self.weights))
        return model.eval()


def slot_view(buffer: mmap.mmap, slots: int, max_rows: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """(slots, max_rows, C, H, W) float32 over the shared buffer, the same layout on both sides."""
    return torch.frombuffer(buffer, dtype=torch.float32).view(slots, max_rows, *shape)


def encode_batch(batch_id: int, slot: int, jobs: list[Job]) -> bytes:
    theta = np.array([j.threshold for j in jobs], dtype=np.float64)
    enqueued = np.array([j.enqueued for j in jobs], dtype=np.float64)
    cap = np.array([j.cap for j in jobs], dtype=np.int64)
    top_k = np.array([j.top_k for j in jobs], dtype=np.int64)
    return b"".join([BATCH.pack(b"B", batch_id, slot, len(jobs)), theta.tobytes(), enqueued.tobytes(),
                     cap.tobytes(), top_k.tobytes()])


def decode_batch(message: bytes, rows: torch.Tensor) -> tuple[int, int, list[Job]]:
    """(batch id, slot, jobs) with each job's input a view of the shared slot (`rows`: (slot, max_rows, ...))."""
    _, batch_id, slot, n = BATCH.unpack_from(message)
    arrays = np.frombuffer(message, dtype=np.float64, count=2 * n, offset=BATCH.size).reshape(2, n)
    ints = np.frombuffer(message, dtype=np.int64, count=2 * n, offset=BATCH.size + 16 * n).reshape(2, n)
    jobs = [Job(rows[slot, i], t, c, k, e) for i, (t, e, c, k) in
            enumerate(zip(arrays[0].tolist(), arrays[1].tolist(), ints[0].tolist(), ints[1].tolist(), strict=True))]
    return batch_id, slot, jobs


def encode_exited(batch_id: int, rows: list[int], results: list[ExitResult]) -> bytes:
    """Rows that left at one exit; top-k lists are concatenated (the server knows each row's k)."""
    first = results[0]
    return b"".join([
        EXITED.pack(b"E", batch_id, first.exit, len(rows), first.inference_s),
        np.array(rows, dtype=np.int64).tobytes(),
        np.array([r.entropy for r in results], dtype=np.float64).tobytes(),
        np.array([r.queue_s for r in results], dtype=np.float64).tobytes(),
        np.array([c for r in results for c in r.top_ids], dtype=np.int64).tobytes(),
        np.array([p for r in results for p in r.top_probs], dtype=np.float64).tobytes(),
    ])


def decode_exited(message: bytes, top_k: list[int]) -> tuple[int, list[tuple[int, ExitResult]]]:
    """(batch id, [(row, result)]); `top_k` gives each row's k, by row index in the batch."""
    _, batch_id, exit_index, n, inference_s = EXITED.unpack_from(message)
    offset = EXITED.size
    rows = np.frombuffer(message, dtype=np.int64, count=n, offset=offset).tolist()
    entropy = np.frombuffer(message, dtype=np.float64, count=n, offset=offset + 8 * n).tolist()
    queue_s = np.frombuffer(message, dtype=np.float64, count=n, offset=offset + 16 * n).tolist()
    total = sum(top_k[r] for r in rows)
    ids = np.frombuffer(message, dtype=np.int64, count=total, offset=offset + 24 * n).tolist()
    probs = np.frombuffer(message, dtype=np.float64, count=total, offset=offset + 24 * n + 8 * total).tolist()
    out, at = [], 0
    for row, ent, queued in zip(rows, entropy, queue_s, strict=True):
        k = top_k[row]
        out.append((row, ExitResult(exit_index, ent, probs[at:at + k], ids[at:at + k], queued, inference_s)))
        at += k
    return batch_id, out


def serve(requests: Connection, replies: Connection, blob: ModelBlob, buffer_path: str, slots: int,
          max_rows: int, threads: int) -> None:
    """The process's main: load, choose backends, warm up, then run batches until told to stop."""
    # The server drains on SIGTERM and then stops this process; a signal to the whole process
    # group must not kill it first. It also ends when the server's end of the pipe closes.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    model = fuse_for_inference(blob.build())
    backends = choose_stage_backends(model, max_rows)
    cfg = model.config
    with open(buffer_path, "r+b") as f:
        buffer = mmap.mmap(f.fileno(), 0)
    rows = slot_view(buffer, slots, max_rows, (cfg.in_channels, cfg.input_size, cfg.input_size))
    warm = [Job(rows[0, 0], 0.0, model.num_exits - 1, 1, 0.0) for _ in range(2)]
    run_batch(model, warm, lambda *_: None, mkldnn=backends)
    replies.send_bytes(READY)
    while True:
        try:
            message = requests.recv_bytes()
        except (EOFError, OSError):
            return
        if message[:1] == STOP:
            return
        batch_id, _, jobs = decode_batch(message, rows)
        index = {id(j): i for i, j in enumerate(jobs)}

        def release(done: list[Job], results: list[ExitResult], batch_id: int = batch_id,
                    index: dict = index) -> None:
            replies.send_bytes(encode_exited(batch_id, [index[id(j)] for j in done], results))

        try:
            run_batch(model, jobs, release, mkldnn=backends)
            replies.send_bytes(ID.pack(b"D", batch_id))
        except Exception:  # a bug must not kill the process or strand the clients
            log.exception("inference failed for a batch of %d", len(jobs))
            replies.send_bytes(ID.pack(b"F", batch_id))
