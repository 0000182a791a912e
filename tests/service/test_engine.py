"""The engine without HTTP: batch forming with a fake clock, per-row thresholds, the bounded queue."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_tensors

from erde.artifact import InputSpec
from erde.curve import OperatingPoint
from erde.nets import NetConfig, build_model
from service.engine import process, wire
from service.engine.batcher import Job, put_back, take_batch
from service.engine.compute import Sample, Shadows, finish_shadows, run_batch
from service.engine.decode import decode_image
from service.engine.limits import ImageLimits
from service.engine.policy import Decision
from service.engine.wire import ExitResult, ModelBlob
from service.engine.worker import ModelWorker, Steering
from service.errors import PayloadTooLarge, ServiceError, Unavailable, UnsupportedImage
from tests.service import images

POINT = OperatingPoint(0.0, 1.0, 0.9, [0.0, 0.0, 1.0])


def rule(threshold: float = 0.0, cap: int = 2, top_k: int = 1) -> Decision:
    """A request's rule as the policy decides it for an expert θ."""
    return Decision.expert(threshold, cap, top_k, POINT, server_floor=0.0)


def job(enqueued: float, data: bytes = b"", threshold: float = 0.0, future: asyncio.Future | None = None) -> Job:
    return Job(data, rule(threshold), enqueued, future=future)


def sample(threshold: float = 0.0, cap: int = 2, top_k: int = 1, x: torch.Tensor | None = None,
           shadow: bool = False) -> Sample:
    return Sample(torch.zeros(1, 16, 16) if x is None else x, threshold, cap, top_k, 0.0, shadow)


def test_empty_queue_waits_forever() -> None:
    assert take_batch(deque(), now=5.0, max_size=4, max_delay=0.01) == math.inf


def test_waits_for_the_oldest_jobs_delay() -> None:
    pending = deque([job(1.000), job(1.004)])
    assert take_batch(pending, now=1.006, max_size=4, max_delay=0.010) == pytest.approx(0.004)
    assert len(pending) == 2  # nothing taken while waiting


def test_full_batch_goes_at_once_and_leaves_the_rest() -> None:
    pending = deque(job(1.0 + i * 1e-4) for i in range(6))
    batch = take_batch(pending, now=1.0006, max_size=4, max_delay=1.0)
    assert isinstance(batch, list) and [j.enqueued for j in batch] == pytest.approx([1.0, 1.0001, 1.0002, 1.0003])
    assert len(pending) == 2


def test_overdue_partial_batch_goes() -> None:
    pending = deque([job(1.0), job(1.5)])
    batch = take_batch(pending, now=2.0, max_size=8, max_delay=0.5)
    assert isinstance(batch, list) and len(batch) == 2 and not pending


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(NetConfig(depth=8, widths=(4, 8, 8), input_size=16, num_classes=4)).eval()


def test_rows_keep_their_own_threshold_and_cap(model) -> None:
    released: list[list[tuple[Sample, int]]] = []
    jobs = [sample(0.0), sample(1e9), sample(0.0, cap=1), sample(1e9, top_k=3), sample(0.0, cap=0)]
    exits = run_batch(model, jobs, lambda js, rs: released.append([(j, r.exit) for j, r in zip(js, rs, strict=True)]))
    assert exits == [2, 0, 1, 0, 0]
    # Released stage by stage: the rows done at exit 0 come out first, in one hand-off.
    assert [[e for _, e in group] for group in released] == [[0, 0, 0], [1], [2]]
    assert [j for j, _ in released[0]] == [jobs[1], jobs[3], jobs[4]]


def test_batched_rows_answer_like_single_rows(model) -> None:
    torch.manual_seed(1)
    xs = [torch.randn(1, 16, 16) for _ in range(6)]
    thresholds = [0.0, 0.5, 1.0, 1.2, 1e9, 0.8]
    alone = []
    for x, t in zip(xs, thresholds, strict=True):
        got: list = []
        run_batch(model, [sample(t, top_k=4, x=x)], lambda js, rs, got=got: got.extend(rs))
        alone.append(got[0])
    together = {}
    batch = [sample(t, top_k=4, x=x) for x, t in zip(xs, thresholds, strict=True)]
    run_batch(model, batch, lambda js, rs: together.update({id(j): r for j, r in zip(js, rs, strict=True)}))
    for j, single in zip(batch, alone, strict=True):
        r = together[id(j)]
        assert r.exit == single.exit and r.top_ids == single.top_ids
        assert r.top_probs == pytest.approx(single.top_probs, abs=1e-5)


def test_a_shadow_row_is_answered_at_its_exit_and_run_on_to_the_last_exit_after(model) -> None:
    """A shadow pass changes no answer and no release; finished, it holds what full depth would have shown."""
    torch.manual_seed(2)
    xs = [torch.randn(1, 16, 16) for _ in range(5)]
    thresholds = [1e9, 0.0, 1e9, 0.8, 1e9]
    shadows = [True, False, False, True, True]
    plain, shadowed, witnessed = [], [], []
    exits = run_batch(model, [sample(t, top_k=2, x=x) for x, t in zip(xs, thresholds, strict=True)],
                      lambda js, rs: plain.append([r.exit for r in rs]))
    batch = [sample(t, top_k=2, x=x, shadow=s) for x, t, s in zip(xs, thresholds, shadows, strict=True)]
    where = {id(j): i for i, j in enumerate(batch)}
    assert run_batch(model, batch, lambda js, rs: shadowed.append([(where[id(j)], r.exit) for j, r in
                                                                   zip(js, rs, strict=True)]),
                     witness=witnessed.append) == exits
    assert [[e for _, e in group] for group in shadowed] == plain  # the same releases, in the same order
    (work,) = witnessed
    assert work.rows == [0, 3, 4] and work.exits == [exits[i] for i in work.rows] and work.exits[0] == 0
    assert not finish_shadows(model, work, idle=lambda: False)  # a batch waits: nothing run yet
    once = iter([True, False])
    assert not finish_shadows(model, work, idle=lambda: next(once))  # one stage, then a batch waits: paused
    assert work.reached == [1 if e == 0 else e for e in work.exits]  # the rows that left at exit 0 ran stage 1
    assert work.entropy[0, 2] == 0  # and not yet stage 2
    assert finish_shadows(model, work)  # resumed where it paused
    assert work.reached == [2, 2, 2]
    with torch.inference_mode():
        for k, i in enumerate(work.rows):
            logits = model.forward_all(xs[i][None])
            assert list(work.prediction[k]) == [int(lg.argmax()) for lg in logits]
    last: list = []
    run_batch(model, [sample(0.0, x=xs[i]) for i in work.rows], lambda js, rs: last.extend(rs))  # θ = 0: full depth
    assert work.entropy[:, -1] == pytest.approx([r.entropy for r in last], abs=1e-5)


SPEC = InputSpec("L", 16, (0.5,), (0.25,))
LIMITS = ImageLimits(max_pixels=10_000, min_side=8, formats=("PNG",))


def blob_of(model) -> ModelBlob:
    """The model as its process receives it: what the build checks of a manifest, and safetensors bytes."""
    manifest = {"net": model.config.to_dict(), "input": SPEC.to_dict(), "macs_per_exit": [1] * model.num_exits,
                "classes": [str(c) for c in range(model.config.num_classes)]}
    return ModelBlob(manifest, save_tensors(model.state_dict()))


def make_worker(model, **kwargs) -> ModelWorker:
    settings = {"max_batch_size": 4, "max_batch_delay_s": 0.0, "queue_size": 64, "max_image_bytes": 4096} | kwargs
    return ModelWorker(blob_of(model), SPEC, LIMITS, **settings)


def upload(seed: int) -> bytes:
    return images.encode(images.noise(16, seed=seed))


def test_full_queue_refuses_at_once_and_all_or_nothing(model) -> None:
    worker = make_worker(model, max_batch_size=2, queue_size=3)  # not started: nothing drains
    worker.submit([job(0.0, upload(0)), job(0.0, upload(1))])
    assert worker.refusal() is None  # room for one more
    with pytest.raises(Unavailable) as refused:
        worker.submit([job(0.0, upload(2)), job(0.0, upload(3))])
    assert refused.value.status == 503 and refused.value.retry_after == 1
    assert worker.depth == 2  # the refused pair left nothing behind
    with pytest.raises(PayloadTooLarge):  # larger than a slot's arena: refused before it is queued
        worker.submit([job(0.0, b"x" * 4097)])


def test_worker_answers_and_drains_on_close(model) -> None:
    async def main() -> list:
        loop = asyncio.get_running_loop()
        worker = make_worker(model, max_batch_size=8, max_batch_delay_s=0.05, queue_size=16)
        await loop.run_in_executor(None, worker.start, loop)
        jobs = [job(0.0, upload(i), t, loop.create_future()) for i, t in enumerate((0.0, 1e9, 0.0))]
        worker.submit(jobs)
        closed = loop.run_in_executor(None, worker.close, 5.0)  # close while they wait: they still get answers
        results = await asyncio.gather(*(j.future for j in jobs))
        assert await closed
        with pytest.raises(Unavailable):
            worker.submit([job(0.0, upload(0))])
        return [r.exit for r in results]

    assert asyncio.run(main()) == [2, 0, 2]


def test_wire_format_round_trips_batches_refusals_and_exits() -> None:
    sent_rows = [wire.Row(0.5, 1.25, 2, 1, 0, 5), wire.Row(0.0, 2.5, 0, 3, 5, 7, 1),
                 wire.Row(1e9, 3.75, 1, 2, 12, 9)]
    batch_id, slot, rows = wire.decode_batch(wire.encode_batch(7, 1, sent_rows))
    assert (batch_id, slot, rows) == (7, 1, sent_rows)
    refused = UnsupportedImage("not a supported image", code="corrupt_image")
    batch_id, row, error = wire.decode_refused(wire.encode_refused(7, 2, refused))
    assert (batch_id, row, error.status, error.code, error.reason, error.message) == \
        (7, 2, 415, "corrupt_image", "corrupt_image", "not a supported image")
    sent = [ExitResult(1, 0.25, [0.7, 0.2, 0.1], [4, 0, 9], 0.01, 0.002), ExitResult(1, 0.5, [0.6, 0.3], [2, 1], 0.02,
                                                                                    0.002)]
    reply = wire.decode_reply(wire.encode_exited(7, [1, 2], sent, [0.003, 0.004]),
                                 lambda batch: [r.top_k for r in sent_rows])
    assert reply == wire.Exited(7, [(1, replace(sent[0], decode_s=0.003)), (2, replace(sent[1], decode_s=0.004))])
    finished = wire.encode_finished(b"F", 7, 0.25, 4096, [0.001, 0.0025])
    assert wire.decode_reply(finished, list) == wire.Finished(7, True, 0.25, 4096, [0.001, 0.0025])
    with pytest.raises(wire.ProtocolError, match="finished message"):  # its stage times cut short
        wire.decode_reply(finished[:-8], list)
    entropy, prediction = np.array([[1.5, 0.5, 0.25], [2.0, 1.0, 0.125]]), np.array([[3, 1, 1], [0, 2, 9]])
    witnessed = wire.decode_reply(wire.encode_witnessed([2, 0], entropy, prediction), list)
    assert isinstance(witnessed, wire.Witnessed) and witnessed.answered == [2, 0]
    assert (witnessed.entropy == entropy).all() and (witnessed.prediction == prediction).all()
    with pytest.raises(wire.ProtocolError, match="shadow message"):  # a truncated one is refused
        wire.decode_reply(wire.encode_witnessed([2, 0], entropy, prediction)[:-8], list)
    with pytest.raises(wire.ProtocolError):  # an unknown message is an error, never a silent "done"
        wire.decode_reply(wire.ID.pack(b"Z", 7), list)


def test_process_decodes_and_answers_every_row_with_its_own_top_k(model) -> None:
    thresholds = [0.0, 1e9, 0.7, 0.0, 1.1, 0.9, 0.0, 1e9, 0.3, 1.2]
    uploads = [upload(i) for i in range(len(thresholds))]
    uploads[4] = b"not an image"

    async def main() -> list:
        loop = asyncio.get_running_loop()
        worker = make_worker(model)
        await loop.run_in_executor(None, worker.start, loop)
        try:
            jobs = [Job(data, rule(t, top_k=k), 0.0, future=loop.create_future())
                    for data, t, k in zip(uploads, thresholds, [1, 2, 3, 4] * 3, strict=False)]
            for j in jobs:  # one at a time, as requests arrive: batches form while the process is busy
                worker.submit([j])
            return await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
        finally:
            assert await loop.run_in_executor(None, worker.close, 10.0)

    results = asyncio.run(main())
    assert isinstance(results[4], ServiceError) and results[4].status == 415  # refused alone
    expected: dict[int, ExitResult] = {}
    jobs = [sample(t, top_k=k, x=decode_image(data, SPEC, LIMITS))
            for data, t, k in zip(uploads, thresholds, [1, 2, 3, 4] * 3, strict=False) if data != uploads[4]]
    run_batch(model, jobs, lambda js, rs: expected.update({id(j): r for j, r in zip(js, rs, strict=True)}))
    got = [r for i, r in enumerate(results) if i != 4]
    for j, r in zip(jobs, got, strict=True):
        want = expected[id(j)]
        assert (r.exit, r.top_ids) == (want.exit, want.top_ids) and len(r.top_ids) == j.top_k
        assert r.top_probs == pytest.approx(want.top_probs, abs=1e-5)
        assert r.decode_s > 0
    assert {0, 2} <= {r.exit for r in got}  # θ=0 runs to the last exit, θ=1e9 leaves at the first


class Shadowing(Steering):
    """Every row a shadow pass; keeps what comes back."""

    def __init__(self) -> None:
        self.witnessed: list[tuple[list[int], np.ndarray, np.ndarray]] = []

    def adjust(self, jobs: list[Job], now: float, spare: bool, waited_s: float = 0.0) -> None:
        for j in jobs:
            j.shadow = True

    def witness(self, answered: list[int], entropy: np.ndarray, prediction: np.ndarray) -> None:
        self.witnessed.append((answered, entropy, prediction))


@pytest.mark.parametrize("shadow_cpu", [1.0, 0.0])
def test_the_inference_process_runs_shadow_rows_on_after_answering_them(model, shadow_cpu: float) -> None:
    """Through the real process and pipes: answers as without shadows, then every exit's outputs come back,
    within the process's shadow time (none: nothing comes back)."""
    steer = Shadowing()

    async def main() -> list:
        loop = asyncio.get_running_loop()
        worker = make_worker(model, steer=steer, shadow_cpu=shadow_cpu)
        await loop.run_in_executor(None, worker.start, loop)
        try:
            jobs = [Job(upload(i), rule(t), 0.0, future=loop.create_future()) for i, t in enumerate((1e9, 0.0, 1e9))]
            worker.submit(jobs)
            results = await asyncio.gather(*(j.future for j in jobs))
            await asyncio.sleep(0.5)  # the shadow rows run after the batch
            return results
        finally:
            assert await loop.run_in_executor(None, worker.close, 10.0)

    results = asyncio.run(main())
    assert [r.exit for r in results] == [0, 2, 0]
    if not shadow_cpu:
        assert steer.witnessed == []
        return
    ((answered, entropy, prediction),) = steer.witnessed
    assert answered == [0, 2, 0] and entropy.shape == prediction.shape == (3, 3)
    for k, result in enumerate(results):
        assert entropy[k, result.exit] == pytest.approx(result.entropy, abs=1e-6)  # the exit it answered at
        assert prediction[k, result.exit] == result.top_ids[0]


def test_loading_a_model_runs_every_batch_size_to_the_last_exit_once(model, monkeypatch) -> None:
    """A fresh process's first batch of each size builds the backends' kernels for its shape (1.5-3x a warm
    run): loading runs them all, so that no request waits for it (docs/design.md §10, "A warm start")."""
    ran = []
    real = process.run_batch

    def counted(net, jobs, *args, **kwargs):
        ran.append((len(jobs), {job.cap for job in jobs}, {job.threshold for job in jobs}))
        return real(net, jobs, *args, **kwargs)

    monkeypatch.setattr(process, "run_batch", counted)
    monkeypatch.setattr(process, "name_process", lambda name: None)
    monkeypatch.setattr(process.signal, "signal", lambda *args: None)  # the test runner keeps its own handlers
    process.Engine.load(blob_of(model), SPEC, LIMITS, threads=1, max_rows=6, shadow_cpu=0.0,
                        device="cpu")
    assert ran == [(rows, {model.num_exits - 1}, {0.0}) for rows in (6, 1, 2, 3, 4, 5)]  # the loaded size first


def test_warming_up_stops_once_its_time_is_spent(model, monkeypatch) -> None:
    assert process.warm_up(model, SPEC, None, torch.device("cpu"), max_rows=64, budget_s=0.0) == 1
    assert process.warm_up(model, SPEC, None, torch.device("cpu"), max_rows=3) == 3
    ran = []
    monkeypatch.setattr(process, "run_batch", lambda net, jobs, *args, **kwargs: ran.append(len(jobs)))
    monkeypatch.setattr(process, "name_process", lambda name: None)
    monkeypatch.setattr(process.signal, "signal", lambda *args: None)
    process.Engine.load(blob_of(model), SPEC, LIMITS, threads=1, max_rows=4, shadow_cpu=0.0,
                        device="cpu", warm_rows=8)  # a shared process: a run merges a batch from each of 2 workers
    assert ran == [8, 1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("newest_first", [False, True])
def test_rows_that_do_not_fit_go_back_where_they_were_taken_from(newest_first: bool) -> None:
    """Under adaptive LIFO the batch is the newest rows; those that do not fit the arena went back to the oldest
    end, where the overload controller read their short wait as the oldest row's, and they were served last."""
    pending = deque(job(1.0 + i * 1e-3) for i in range(6))
    before = list(pending)
    batch = take_batch(pending, now=2.0, max_size=4, max_delay=0.0, newest_first=newest_first)
    assert isinstance(batch, list)
    for sent in batch:  # what the send chose: a cheaper rule, a shadow pass
        sent.used, sent.shadow = rule(threshold=1.5), True
    put_back(pending, batch[2:], newest_first)  # two fitted, two did not
    assert list(pending) == [j for j in before if j not in batch[:2]]
    assert all(j.used is None and not j.shadow for j in batch[2:])  # chosen again at their next send


def test_a_batch_of_shadow_rows_that_finds_the_wait_full_is_dropped_not_the_one_being_run_on(model) -> None:
    """Which batch of shadow rows goes must not depend on its rows. The oldest is the one being run on, and it
    is still there because its rows answered early (a batch whose rows all went to the last exit is done at
    once): dropping it kept the hard rows, and the teacher's clean estimate read 4 points low."""
    def witness(exit_: int) -> process.Witness:
        work = Shadows([0], [exit_], [torch.zeros(1)], np.zeros((1, 3)), np.zeros((1, 3), dtype=np.int64))
        return process.Witness(work, [None])

    waiting = deque()
    started = witness(0)  # answered at the first exit: two stages left to run
    for w in [started, *(witness(2) for _ in range(process.SHADOWS_KEPT - 1))]:
        process.keep_witness(waiting, w)
    process.keep_witness(waiting, witness(0))
    assert len(waiting) == process.SHADOWS_KEPT and waiting[0] is started
