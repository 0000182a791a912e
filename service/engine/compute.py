"""The network's stage-by-stage pass with per-row θ and caps: pure torch and numpy, no threads or I/O.

Shared by the inference process (service.engine.process), the in-process benchmarks and the peers'
servers, so every one of them runs exactly the same loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from erde.exits import exit_scores, last_exit, stops
from erde.latency import choose_stage_backends  # noqa: F401  (one backend choice for serving and `erde export`)
from erde.latency import set_mkldnn as _set_mkldnn
from erde.nets import EarlyExitResNet
from service.engine.wire import ExitResult

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Sample:
    """One decoded image in a batch, with its own exit rule (the inference side of a queued Job)."""

    x: torch.Tensor  # (C, H, W) normalised input
    threshold: float  # θ: stop at the first exit with entropy below it
    cap: int  # last exit this image may reach (max_exit, or the model's last)
    top_k: int  # how many classes the reply lists
    enqueued: float  # monotonic seconds when it entered the server's queue
    shadow: bool = False  # run on to the last exit after its answer is released (docs/budgets.md)


@dataclass(frozen=True)
class Shadows:
    """A batch's shadow rows, released at their exits: to run on to the last exit while the process is idle."""

    rows: list[int]  # index in the batch
    exits: list[int]  # the exit each one answered at
    hidden: list[torch.Tensor]  # its features after the last stage run for it (at first: its exit's)
    entropy: np.ndarray  # (rows, exits): known up to each row's exit, the rest filled by `finish_shadows`
    prediction: np.ndarray
    reached: list[int] = field(default_factory=list)  # the last stage run for each row (at first: its exit)

    def __post_init__(self) -> None:
        if not self.reached:
            self.reached.extend(self.exits)


@torch.inference_mode()
def run_batch(model: EarlyExitResNet, jobs: list[Sample],
              release: Callable[[list[Sample], list[ExitResult]], None],
              clock: Callable[[], float] = time.monotonic, mkldnn: list[bool] | None = None,
              witness: Callable[[Shadows], None] = lambda work: None,
              stage_s: list[float] | None = None, device: torch.device = CPU) -> list[int]:
    """Run `jobs` stage by stage with per-row θ and caps; returns the exit each row took.

    Shadow rows are released and leave the batch like the others; `witness` then gets them (if any) with
    their features at their exits, for `finish_shadows` to run on when the process is idle.

    On a `device` (the model's: the caller knows it, asking the model costs 8 µs a batch), the batch is
    assembled in pinned host memory and copied once; the stages
    and the gathering of the rows that go on run there, and the host reads each stage's logits once
    (`exit_scores`): one sync per stage, and the exit rule's own float64 arithmetic.
    `mkldnn[i]` picks the convolution backend of stage i (see `choose_stage_backends`; CPU only); `stage_s`
    gets the seconds each stage that ran took, its logits read (so on a device, its device time).
    """
    started = clock()
    h = torch.stack([j.x for j in jobs])  # (B, C, H, W)
    if device.type != "cpu":
        h = h.pin_memory().to(device, non_blocking=True)
    theta = np.array([j.threshold for j in jobs])  # (B,)
    cap = np.array([last_exit(j.cap, model.num_exits) for j in jobs])  # (B,)
    rows = np.arange(len(jobs))  # original index of each row still running
    exits = [0] * len(jobs)
    shadowing = any(j.shadow for j in jobs)
    if shadowing:
        shadow = np.array([j.shadow for j in jobs])
        seen = np.zeros((len(jobs), model.num_exits)), np.zeros((len(jobs), model.num_exits), dtype=np.int64)
        hidden: dict[int, torch.Tensor] = {}
    for i in range(model.num_exits):
        if mkldnn is not None:
            _set_mkldnn(mkldnn[i])
        stage_started = time.perf_counter()
        h = model.stage(i, h)
        probs, ent = exit_scores(model.exit(i, h))
        if stage_s is not None:
            stage_s.append(time.perf_counter() - stage_started)
        done = stops(ent, theta, cap, i)
        if shadowing:
            watched = shadow[rows]
            seen[0][rows[watched], i] = ent[watched]
            seen[1][rows[watched], i] = probs[watched].argmax(axis=1)
            for local in np.flatnonzero(done & watched).tolist():
                hidden[int(rows[local])] = h[local]
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
        h, theta, cap, rows = h.index_select(0, torch.from_numpy(keep).to(device)), theta[keep], cap[keep], rows[keep]
    if shadowing:
        watched = np.flatnonzero(shadow).tolist()
        witness(Shadows(watched, [exits[r] for r in watched], [hidden[r] for r in watched], seen[0][watched],
                        seen[1][watched]))
    return exits


@torch.inference_mode()
def finish_shadows(model: EarlyExitResNet, work: Shadows, mkldnn: list[bool] | None = None,
                   idle: Callable[[], bool] = lambda: True, device: torch.device = CPU) -> bool:
    """Run the shadow rows on towards the last exit, a stage at a time while `idle()` says the process has
    nothing else to do; fills `work.entropy` and `work.prediction`. False: paused for a waiting batch, with
    the progress kept in `work` for the next call. Pausing, never dropping, keeps the evidence unbiased: a
    row that answered early needs more stages than one that went deep, and would be dropped more often."""
    for j in range(min(work.reached) + 1, model.num_exits):
        if not idle():
            return False
        members = [k for k, r in enumerate(work.reached) if r < j]  # in order, every one of them is at j - 1
        if mkldnn is not None:
            _set_mkldnn(mkldnn[j])
        h = model.stage(j, torch.stack([work.hidden[k] for k in members]).to(device))
        probs, ent = exit_scores(model.exit(j, h))
        for n, k in enumerate(members):
            work.hidden[k], work.reached[k] = h[n], j
        work.entropy[members, j] = ent
        work.prediction[members, j] = probs.argmax(axis=1)
    return True
