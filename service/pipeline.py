"""The request path as named steps: read -> options -> enqueue -> await exits -> encode.

Images are decoded in the model's inference process (service/engine/process.py), off the event loop.

Each step takes and returns plain data; the routes only call them in order.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.requests import Request

from service import metrics
from service.engine.batcher import Job
from service.engine.compute import ExitResult
from service.errors import BadOptions, ServiceError, Unavailable, UnsupportedImage
from service.multipart import boundary_of, parse_multipart
from service.policy import Decision
from service.registry import ServedModel
from service.runtime import Runtime
from service.schemas import ClassifyOptions, parse_options

MAX_FIELDS = 16  # option fields a multipart request may carry besides its images


async def read_upload(request: Request, max_images: int) -> tuple[list[bytes], dict[str, str]]:
    """Images and option fields from a multipart form or a raw image/* body (options in the query)."""
    content_type = request.headers.get("content-type", "")
    fields = dict(request.query_params)
    if content_type.startswith("image/"):
        return [await request.body()], fields
    if not content_type.startswith("multipart/form-data"):
        raise UnsupportedImage("send multipart/form-data with an 'image' file field, or a raw image/* body",
                               code="unsupported_media_type")
    boundary = boundary_of(content_type)
    images = []
    for part in parse_multipart(await request.body(), boundary, max_parts=max_images + MAX_FIELDS):
        if part.name != "image":
            fields[part.name] = part.data.decode("utf-8", errors="replace") if part.filename is None else ""
        elif part.filename is not None:
            images.append(part.data)
        else:
            raise BadOptions("image: must be a file part, not a text field", code="missing_image")
    if not images:
        raise BadOptions("image: a file field named 'image' is required", code="missing_image")
    if len(images) > max_images:
        raise BadOptions(f"at most {max_images} images per request", code="too_many_images")
    return images, fields


def resolve(runtime: Runtime, request: Request, fields: dict[str, str]) -> tuple[ServedModel, Decision]:
    if runtime.draining:
        raise Unavailable("the service is shutting down; retry on another instance",
                          retry_after=runtime.settings.retry_after_s, reason="draining")
    options: ClassifyOptions = parse_options(fields)
    served = runtime.registry.get(options.model)
    request.state.erde_model = served.name
    decision = served.policy.decide(options)
    request.state.erde_budget = decision.budget
    request.state.erde_threshold = decision.threshold
    return served, decision


async def infer(served: ServedModel, decision: Decision, images: list[bytes]) -> list[ExitResult]:
    """Every image's exit; the first refused image (in the order sent) fails the request."""
    loop = asyncio.get_running_loop()
    now = time.monotonic()
    jobs = [Job(data, decision.threshold, decision.cap, decision.top_k, now, loop.create_future()) for data in images]
    served.worker.submit(jobs)
    if len(jobs) == 1:
        return [await jobs[0].future]
    results = await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
    for index, result in enumerate(results):
        if isinstance(result, ServiceError):
            result.message = f"image {index}: {result.message}"
        if isinstance(result, BaseException):
            raise result
    return results


def encode(served: ServedModel, decision: Decision, result: ExitResult, started: float) -> dict[str, Any]:
    """One reply (DESIGN section 5), and the per-image metrics that go with it."""
    art = served.artifact
    macs = art.macs_per_exit[result.exit]
    classes = art.classes
    metrics.observe_image(served.name, result.exit, macs, served.full_macs, decision.budget,
                          result.decode_s, result.queue_s, result.inference_s)
    return {
        "model": art.name, "version": art.version,
        "label": classes[result.top_ids[0]], "class_id": result.top_ids[0], "confidence": result.top_probs[0],
        "top_k": [{"label": classes[c], "class_id": c, "probability": p}
                  for c, p in zip(result.top_ids, result.top_probs, strict=True)],
        "exit": result.exit, "exits": art.model.num_exits, "entropy": result.entropy,
        "threshold": decision.threshold, "budget": decision.budget, "budget_clamped": decision.clamped,
        "max_exit": decision.cap if decision.cap < art.model.num_exits - 1 else None,
        "expected_accuracy": decision.expected.accuracy,
        "macs": macs, "macs_fraction": macs / served.full_macs,
        "latency_ms": {"decode": result.decode_s * 1e3, "queue": result.queue_s * 1e3,
                       "inference": result.inference_s * 1e3, "total": (time.perf_counter() - started) * 1e3},
    }


async def classify(runtime: Runtime, request: Request, max_images: int) -> list[dict[str, Any]]:
    """The whole path for one request of one or more images."""
    started = time.perf_counter()
    images, fields = await read_upload(request, max_images)
    served, decision = resolve(runtime, request, fields)
    results = await infer(served, decision, images)
    request.state.erde_exits = [r.exit for r in results] if len(results) > 1 else results[0].exit
    return [encode(served, decision, r, started) for r in results]
