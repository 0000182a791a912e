"""The request path as named steps: read -> options -> enqueue -> await exits -> encode.

Images are decoded in the model's inference process (service/engine/process.py), off the event loop.

Each step takes and returns plain data; the routes only call them in order.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from starlette.requests import Request

from service import metrics
from service.edge.multipart import split_upload
from service.engine.batcher import Job
from service.engine.limits import check_request_pixels
from service.engine.policy import Decision
from service.engine.registry import ServedModel
from service.engine.runtime import Runtime, time_allowed
from service.engine.wire import ExitResult
from service.engine.worker import release
from service.errors import DeadlineExceeded, ServiceError
from service.record import record_of
from service.schemas import ClassifyOptions, ClassifyReply, Latency, TopClass, parse_options


async def read_upload(request: Request, max_images: int) -> tuple[list[bytes], dict[str, str]]:
    """Images and option fields from a multipart form or a raw image/* body (options in the query)."""
    return split_upload(request.headers.get("content-type", ""), await request.body(),
                        request.scope.get("query_string", b""), max_images)


@dataclass(frozen=True)
class Order:
    """What a request asks of a model, once its options are checked."""

    served: ServedModel
    decision: Decision
    deadline: float  # monotonic seconds; past it the request is answered 504
    answer_by: float  # monotonic seconds; admitted only if it can be answered by then, never run after it


@dataclass(frozen=True)
class Answer:
    """One image's exit, and the rule it actually ran under (cheaper than asked under overload)."""

    result: ExitResult
    rule: Decision


def resolve(runtime: Runtime, request: Request, fields: dict[str, str], started: float) -> Order:
    """Options -> model, rule and deadline (`started`: monotonic time the request arrived)."""
    refusal = runtime.draining_refusal()
    if refusal is not None:
        raise refusal
    options: ClassifyOptions = parse_options(fields)
    served = runtime.registry.get(options.model)
    record = record_of(request.scope)
    record.model = served.name
    release(record)  # its rows are queued next (`infer`), and then count as themselves
    decision = served.policy.decide(options)
    record.budget, record.threshold = decision.budget, decision.threshold
    timeout_s, window_s = time_allowed(runtime.settings, options.timeout_ms)
    return Order(served, decision, started + timeout_s, started + window_s)


async def infer(order: Order, images: list[bytes]) -> list[Answer]:
    """Every image's exit by the order's deadline; the first refused image (in the order sent) fails
    the request. Past the deadline the rows are withdrawn (or their results dropped) and it is 504."""
    loop = asyncio.get_running_loop()
    now = time.monotonic()
    jobs = [Job(data, order.decision, now, order.deadline, loop.create_future(), answer_by=order.answer_by)
            for data in images]
    worker = order.served.worker
    worker.submit(jobs, order.answer_by - now)
    try:
        async with asyncio.timeout(max(0.0, order.deadline - now)):
            if len(jobs) == 1:
                results = [await jobs[0].future]
            else:
                results = await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
    except TimeoutError:
        worker.withdraw(jobs)
        for job in jobs:
            job.future.cancel()
        raise DeadlineExceeded(f"no answer within the request's deadline of {(order.deadline - now) * 1e3:.0f} ms",
                               retry_after=worker.retry_after, reason="deadline") from None
    for index, result in enumerate(results):
        if isinstance(result, ServiceError):
            raise result.at(index) if len(jobs) > 1 else result
        if isinstance(result, BaseException):
            raise result
    return [Answer(result, job.rule) for result, job in zip(results, jobs, strict=True)]


def encode(served: ServedModel, answer: Answer, started: float) -> ClassifyReply:
    """One reply (docs/design.md §5), and the per-image metrics that go with it."""
    result, decision = answer.result, answer.rule
    art = served.artifact
    macs = art.macs_per_exit[result.exit]
    classes = art.classes
    metrics.observe_image(served.name, result.exit, macs, served.full_macs, decision.requested_budget,
                          decision.budget, decision.degraded, result.decode_s, result.queue_s, result.inference_s)
    fraction = macs / served.full_macs
    metrics.observe_spent(served.name, decision.requested_budget, fraction)
    estimate = served.drift.observe(decision, fraction)  # service/engine/drift.py
    if decision.quoted is not None:  # a floor's reply quotes the figure the floor was checked against
        estimate = decision.quoted
    return ClassifyReply(
        model=art.name, version=art.version,
        label=classes[result.top_ids[0]], class_id=result.top_ids[0], confidence=result.top_probs[0],
        top_k=[TopClass(classes[c], c, p) for c, p in zip(result.top_ids, result.top_probs, strict=True)],
        exit=result.exit, exits=art.num_exits, entropy=result.entropy,
        threshold=decision.threshold, budget=decision.budget, budget_clamped=decision.clamped,
        max_exit=decision.cap if decision.cap < art.num_exits - 1 else None,
        min_accuracy=decision.min_accuracy, requested_budget=decision.requested_budget,
        degraded=decision.degraded, expected_accuracy=estimate.used,
        expected_accuracy_offline=estimate.offline, expected_accuracy_live=estimate.live,
        accuracy_source=estimate.source, macs=macs, macs_fraction=fraction,
        latency_ms=Latency(result.decode_s * 1e3, result.queue_s * 1e3, result.inference_s * 1e3,
                           (time.perf_counter() - started) * 1e3),
    )


async def classify(runtime: Runtime, request: Request, max_images: int) -> list[ClassifyReply]:
    """The whole path for one request of one or more images."""
    started = time.perf_counter()
    arrived = time.monotonic()
    images, fields = await read_upload(request, max_images)
    order = resolve(runtime, request, fields, arrived)
    check_request_pixels(images, runtime.registry.limits)
    answers = await infer(order, images)
    exits = [a.result.exit for a in answers]
    record_of(request.scope).exits = exits if len(exits) > 1 else exits[0]
    return [encode(order.served, a, started) for a in answers]
