"""The Open Inference Protocol (v2 REST) beside our API: the same engine, limits and metrics.

Spec: kserve/open-inference-protocol `specification/protocol/inference_rest.md`, with Triton's
binary tensor data and classification extensions. An infer request goes through named steps:
read the body -> parse the JSON header -> read the input tensors -> read the parameters and the
requested outputs -> the pipeline's resolve and infer (one call per distinct row budget) -> encode
-> columns -> the reply. Errors are `{"error": "..."}` with the status codes of our own API.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import re
import struct
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response

from service.api.deps import runtime_of
from service.api.pipeline import Answer, Order, encode, infer, resolve
from service.api.routes import RequestOnlyRoute
from service.endpoints import V2, V2_INFER
from service.engine.limits import check_request_pixels
from service.engine.registry import ServedModel
from service.engine.runtime import Runtime
from service.errors import BadOptions, ServiceError, Unavailable, UnknownModel, error_body
from service.numbers import parse_int
from service.record import record_of
from service.schemas import MODEL_NAME, ClassifyOptions, ClassifyReply

HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary tensor data extension
PREFIX = "erde_"  # request parameters are our /classify options under this prefix, as the spec advises
OPTIONS = sorted(set(ClassifyOptions.model_fields) - {"model"})  # the path names the model
EXTENSIONS = ["binary_tensor_data", "classification"]
PLATFORM = "pytorch_erde"
INPUTS = {"image": "BYTES", "budget": "FP32"}  # name -> datatype; both of shape [N]
OUTPUTS = {"label": "BYTES", "class_id": "INT64", "probabilities": "FP32", "exit": "INT32", "macs": "INT64",
           "expected_accuracy": "FP32"}  # name -> datatype; probabilities is [N, K], the others [N]
BINARY = {"FP32": "<f4", "INT32": "<i4", "INT64": "<i8"}  # the binary form: little-endian, row major
MAX_ID = 256  # characters of a request's `id`, which the reply echoes
# JSON structure (`[`, `{`, `,` and `:`) in one request header, counted before it is parsed: 64 rows of
# images and budgets with every output and parameter take about 400. orjson holds the GIL, so an 8 MB body
# of 2.7 million empty arrays in an ignored parameter stalled every request for a second while it parsed.
MAX_JSON_TOKENS = 4096


class MalformedInference(ServiceError):
    status, code = 400, "malformed_request"


class OipRoute(RequestOnlyRoute):
    """A bare-Request route whose domain errors take the protocol's shape, `{"error": message}`,
    with our status codes and Retry-After (the app's handler would give our own shape)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def protocol_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as exc:
                record_of(request.scope).reason = exc.reason
                headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
                body = error_body(exc.code, exc.text, record_of(request.scope).request_id, oip=True)
                return Response(orjson.dumps(body), exc.status, headers, media_type="application/json")

        return protocol_errors


router = APIRouter(route_class=OipRoute, tags=["Open Inference Protocol"])
SERVER, LIVE, READY, MODEL, MODEL_VERSION, MODEL_READY, MODEL_VERSION_READY = V2.paths
INFER, INFER_VERSION = V2_INFER.paths


@dataclass(frozen=True)
class Requested:
    """One output the reply carries, and how."""

    name: str
    binary: bool  # in the binary tail rather than the JSON `data`
    classification: int | None = None  # Triton's extension: top-k "score:index:label" strings


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    images: list[bytes]
    budgets: list[str] | None  # per row, as FP32 text (rows that share one share an infer call)
    options: dict[str, str]  # our /classify options, from the erde_* parameters
    outputs: list[Requested]


def _json(payload: object) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json")


def served_model(runtime: Runtime, request: Request) -> ServedModel:
    """The model the path names, at the version it names if any: 404 for anything not served."""
    name = request.path_params["name"]
    if not re.fullmatch(MODEL_NAME, name):
        raise UnknownModel(f"unknown model; available: {', '.join(runtime.registry.names)}", reason="unknown_model")
    served = runtime.registry.get(name)
    record_of(request.scope).model = served.name  # the metrics' model label, from the registry
    version = request.path_params.get("version")
    if version is not None and version != served.artifact.version:
        raise UnknownModel(f"model {served.name!r} serves version {served.artifact.version!r} only",
                           reason="unknown_version")
    return served


def _tensor(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


def model_metadata(served: ServedModel) -> dict[str, Any]:
    per_class = [-1, len(served.artifact.classes)]
    return {"name": served.name, "versions": [served.artifact.version], "platform": PLATFORM,
            "inputs": [_tensor(n, d, [-1]) for n, d in INPUTS.items()],
            "outputs": [_tensor(n, d, per_class if n == "probabilities" else [-1]) for n, d in OUTPUTS.items()]}


# --- reading a request: each step takes and returns plain data ---

async def read_body(request: Request) -> tuple[bytes, memoryview]:
    """The JSON header and the binary tensor data after it (`Inference-Header-Content-Length`)."""
    body = await request.body()
    if HEADER_LENGTH not in request.headers:
        return body, memoryview(b"")
    declared = parse_int(request.headers[HEADER_LENGTH])
    if declared is None or not 0 < declared <= len(body):
        raise MalformedInference(f"{HEADER_LENGTH} must be the JSON header's length, at most the body's")
    return body[:declared], memoryview(body)[declared:]


def parse_header(raw: bytes) -> dict[str, Any]:
    """The JSON header, refused unparsed when it holds more structure than a request needs (its cost
    in orjson grows with the values, not the bytes: strings parse at memory speed)."""
    if sum(map(raw.count, (b"[", b"{", b",", b":"))) > MAX_JSON_TOKENS:
        raise MalformedInference(f"the inference request holds more than {MAX_JSON_TOKENS} JSON values")
    try:
        header = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise MalformedInference("the inference request is not valid JSON") from None
    if not isinstance(header, dict):
        raise MalformedInference("the inference request must be a JSON object")
    return header


def _dict(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadOptions(f"{where} must be an object")
    return value


def _unpack_bytes(blob: memoryview, count: int, name: str) -> list[bytes]:
    """BYTES in binary form: each element a 4-byte little-endian length, then its bytes."""
    elements, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(blob) or offset + 4 + (size := struct.unpack_from("<I", blob, offset)[0]) > len(blob):
            raise MalformedInference(f"{name}: the binary data holds fewer elements than its shape says")
        elements.append(bytes(blob[offset + 4:offset + 4 + size]))
        offset += 4 + size
    if offset != len(blob):
        raise MalformedInference(f"{name}: the binary data holds more than its shape says")
    return elements


def tensor_parameters(spec: dict[str, Any], name: str) -> dict[str, Any]:
    """An input's or output's own parameters. Ours (`erde_*`) are the request's only: on a tensor they were
    ignored, and a request that gave its budget there was served at the default budget without a word."""
    parameters = _dict(spec.get("parameters"), f"{name}: parameters")
    ours = sorted(key for key in parameters if key.startswith(PREFIX))
    if ours:
        raise BadOptions(f"{name}: {', '.join(ours)} belong to the request's parameters, not to a tensor's")
    return parameters


def _tensor_values(spec: dict[str, Any], name: str, count: int, tail: memoryview, offset: int) -> tuple[list, int]:
    """One input's elements, from its JSON `data` or from the binary tail at `offset`; the new offset."""
    size = tensor_parameters(spec, name).get("binary_data_size")
    if size is None:
        data = spec.get("data")
        if not isinstance(data, list) or len(data) != count:
            raise BadOptions(f"{name}: data must be a flat list of {count} elements (its shape)")
        return data, offset
    if "data" in spec:
        raise BadOptions(f"{name}: give data or binary_data_size, not both")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(tail) - offset:
        raise MalformedInference(f"{name}: binary_data_size runs past the end of the body")
    blob = tail[offset:offset + size]
    if INPUTS[name] == "BYTES":
        return _unpack_bytes(blob, count, name), offset + size
    if size != 4 * count:
        raise MalformedInference(f"{name}: {count} FP32 elements take {4 * count} bytes, not {size}")
    return np.frombuffer(blob, "<f4").tolist(), offset + size


def read_inputs(header: dict[str, Any], tail: memoryview, max_images: int) -> dict[str, list]:
    """Input name -> its elements in order; every input [N], named and typed as the metadata says.
    N is checked against `max_images` before any element is read."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadOptions("inputs: a list with the 'image' input (BYTES [N]) is required", code="missing_image")
    found: dict[str, list] = {}
    offset = 0
    for spec in inputs:
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str) or name not in INPUTS or name in found:
            raise BadOptions("inputs: each of 'image' (BYTES [N]) and 'budget' (FP32 [N]) at most once, no others")
        if spec.get("datatype") != INPUTS[name]:
            raise BadOptions(f"{name}: datatype must be {INPUTS[name]}")
        shape = spec.get("shape")
        if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int) and shape[0] > 0):
            raise BadOptions(f"{name}: shape must be [N], one row per image, N > 0")
        if shape[0] > max_images:
            raise BadOptions(f"at most {max_images} images per request", code="too_many_images")
        found[name], offset = _tensor_values(spec, name, shape[0], tail, offset)
    if offset != len(tail):
        raise MalformedInference("the binary data after the JSON header is longer than the inputs declare")
    if "image" not in found:
        raise BadOptions("inputs: the 'image' input (BYTES [N]) is required", code="missing_image")
    return found


def image_rows(elements: list, max_images: int) -> list[bytes]:
    """Encoded images: raw bytes from binary data, base64 strings from JSON (KServe's convention)."""
    if len(elements) > max_images:
        raise BadOptions(f"at most {max_images} images per request", code="too_many_images")
    images = []
    for index, element in enumerate(elements):
        if isinstance(element, bytes):
            images.append(element)
            continue
        try:
            images.append(base64.b64decode(element, validate=True))
        except (binascii.Error, TypeError, ValueError):
            raise MalformedInference(f"image {index}: not a base64 string") from None
    return images


def budget_rows(elements: list | None, rows: int, options: dict[str, str]) -> list[str] | None:
    """Each row's budget as FP32 text; refused beside a request-wide one."""
    if elements is None:
        return None
    if len(elements) != rows:
        raise BadOptions(f"budget: {len(elements)} budgets for {rows} images")
    if "budget" in options:
        raise BadOptions("give erde_budget or the budget input, not both")
    if not all(isinstance(b, int | float) and not isinstance(b, bool) for b in elements):
        raise BadOptions("budget: elements must be numbers")
    return [str(np.float32(b)) for b in elements]


def read_options(parameters: dict[str, Any]) -> dict[str, str]:
    """Our /classify options from the `erde_*` request parameters; other parameters are not ours."""
    options = {}
    for key, value in parameters.items():
        if not key.startswith(PREFIX):
            continue
        if key.removeprefix(PREFIX) not in OPTIONS:
            raise BadOptions(f"unknown erde_ parameter; known: {', '.join(PREFIX + o for o in OPTIONS)}")
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise BadOptions(f"{key}: must be a number")
        options[key.removeprefix(PREFIX)] = str(value)
    return options


def read_outputs(header: dict[str, Any], top_k: str | None) -> list[Requested]:
    """The outputs asked for (all of them if none), each JSON or binary as Triton decides it:
    the output's `binary_data`, else the request's `binary_data_output`, else JSON."""
    binary_default = _dict(header.get("parameters"), "parameters").get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise BadOptions("binary_data_output must be true or false")
    asked = header.get("outputs")
    if asked is None:
        asked = [{"name": name} for name in OUTPUTS]
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise BadOptions("outputs must be a list of objects")
    names = [o.get("name") for o in asked]
    if not all(isinstance(n, str) and n in OUTPUTS for n in names) or len(set(names)) != len(names):
        raise BadOptions(f"outputs: each at most once, of {', '.join(OUTPUTS)}")
    outputs = []
    for name, spec in zip(names, asked, strict=True):
        parameters = tensor_parameters(spec, name)
        binary = parameters.get("binary_data", binary_default)
        classification = parameters.get("classification", top_k if name == "probabilities" else None)
        if not isinstance(binary, bool):
            raise BadOptions(f"{name}: binary_data must be true or false")
        if classification is not None and name != "probabilities":
            raise BadOptions("classification applies to the probabilities output only")
        outputs.append(Requested(name, binary, None if classification is None else _count(classification)))
    return outputs


def _count(value: Any) -> int:
    if isinstance(value, str):
        count = parse_int(value)
    else:
        count = value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
    if count is None:
        raise BadOptions("classification (and erde_top_k) must be a whole number of classes")
    return count


def read_request(header: dict[str, Any], tail: memoryview, max_images: int) -> InferRequest:
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadOptions("id must be a string")
    if request_id is not None and len(request_id) > MAX_ID:
        raise BadOptions(f"id: at most {MAX_ID} characters (the reply echoes it)")
    options = read_options(_dict(header.get("parameters"), "parameters"))
    outputs = read_outputs(header, options.pop("top_k", None))
    # the policy checks the classification count as it checks /classify's top_k
    options["top_k"] = str(next((o.classification for o in outputs if o.classification is not None), 1))
    inputs = read_inputs(header, tail, max_images)
    images = image_rows(inputs["image"], max_images)
    return InferRequest(request_id, images, budget_rows(inputs.get("budget"), len(images), options), options,
                        outputs)


# --- running it: the pipeline's own steps ---

async def _infer_rows(order: Order, images: list[bytes], rows: list[int], whole: int) -> list[Answer]:
    try:
        return await infer(order, [images[i] for i in rows])
    except ServiceError as exc:
        if len(rows) < whole and not isinstance(exc, Unavailable):  # a row's refusal, numbered in the request
            raise exc.at(rows[exc.image or 0]) from None
        raise


async def classify_rows(runtime: Runtime, request: Request, name: str, req: InferRequest,
                        arrived: float, started: float) -> list[ClassifyReply]:
    """Every row's /classify reply, in order; rows with the same budget share one infer call, and
    every option is checked before any image is queued (`arrived`: monotonic, `started`: perf_counter)."""
    groups: dict[str | None, list[int]] = {}
    for row, budget in enumerate(req.budgets or [None] * len(req.images)):
        groups.setdefault(budget, []).append(row)
    plans = []
    raw_probabilities = any(o.name == "probabilities" and o.classification is None for o in req.outputs)
    for budget, rows in groups.items():
        fields = {**req.options, "model": name, **({"budget": budget} if budget is not None else {})}
        order = resolve(runtime, request, fields, arrived)
        if raw_probabilities:  # every class's probability, not the top k
            top_k = len(order.served.artifact.classes)
            order = dataclasses.replace(order, decision=dataclasses.replace(order.decision, top_k=top_k))
        plans.append((order, rows))
    check_request_pixels(req.images, runtime.registry.limits)  # the request's pixel budget, as on /classify
    results = await asyncio.gather(*(_infer_rows(order, req.images, rows, len(req.images)) for order, rows in plans))
    replies: list[ClassifyReply | None] = [None] * len(req.images)
    for (order, rows), answers in zip(plans, results, strict=True):
        for row, answer in zip(rows, answers, strict=True):
            replies[row] = encode(order.served, answer, started)
    record_of(request.scope).exits = [r.exit for r in replies]
    return replies


# --- the reply ---

def column(output: Requested, replies: list[ClassifyReply], num_classes: int) -> tuple[str, list[int], list]:
    """One output tensor from the /classify replies: datatype, shape, elements (row major, flat)."""
    n = len(replies)
    if output.classification is not None:
        k = output.classification  # at most the number of classes: the policy checked it as top_k
        return "BYTES", [n, k], [f"{t.probability:f}:{t.class_id}:{t.label}" for r in replies for t in r.top_k[:k]]
    if output.name == "probabilities":
        rows = [[0.0] * num_classes for _ in replies]
        for row, reply in zip(rows, replies, strict=True):
            for t in reply.top_k:
                row[t.class_id] = t.probability
        return "FP32", [n, num_classes], [p for row in rows for p in row]
    return OUTPUTS[output.name], [n], [getattr(r, output.name) for r in replies]


def to_binary(datatype: str, elements: list) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(e)) + e for e in (s.encode() for s in elements))
    return np.asarray(elements, dtype=BINARY[datatype]).tobytes()


def inference_reply(served: ServedModel, req: InferRequest, replies: list[ClassifyReply]) -> Response:
    """JSON alone, or JSON then the binary outputs in order (`Inference-Header-Content-Length`)."""
    header: dict[str, Any] = {"model_name": served.name, "model_version": served.artifact.version, "outputs": []}
    if req.id is not None:
        header["id"] = req.id
    tail = []
    for output in req.outputs:
        datatype, shape, elements = column(output, replies, len(served.artifact.classes))
        tensor: dict[str, Any] = {"name": output.name, "datatype": datatype, "shape": shape}
        if output.binary:
            tail.append(to_binary(datatype, elements))
            tensor["parameters"] = {"binary_data_size": len(tail[-1])}
        else:
            tensor["data"] = elements
        header["outputs"].append(tensor)
    head = orjson.dumps(header)
    if not tail:
        return Response(head, media_type="application/json")
    return Response(head + b"".join(tail), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(head))})


# --- routes ---

def _check_ready(runtime: Runtime) -> None:
    refusal = runtime.readiness_refusal()
    if refusal is not None:
        raise refusal


@router.get(SERVER)
async def server_metadata(request: Request) -> Response:
    """Server metadata: name, version, supported extensions."""
    return _json({"name": "erde-serving", "version": request.app.version, "extensions": EXTENSIONS})


@router.get(LIVE)
async def server_live(_: Request) -> Response:
    """Live: the process answers."""
    return _json({"live": True})


@router.get(READY)
async def server_ready(request: Request) -> Response:
    """Ready: models loaded and warmed, and not draining (else 503 with Retry-After)."""
    _check_ready(runtime_of(request))
    return _json({"ready": True})


@router.get(MODEL)
@router.get(MODEL_VERSION)
async def model_metadata_route(request: Request) -> Response:
    """A model's inputs and outputs, with datatypes and shapes (-1: the batch)."""
    return _json(model_metadata(served_model(runtime_of(request), request)))


@router.get(MODEL_READY)
@router.get(MODEL_VERSION_READY)
async def model_ready(request: Request) -> Response:
    """Ready to infer with this model (404 if it is not served, 503 while not ready)."""
    runtime = runtime_of(request)
    served = served_model(runtime, request)
    _check_ready(runtime)
    return _json({"name": served.name, "ready": True})


_INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
}}}


@router.post(INFER, openapi_extra=_INFER_BODY)
@router.post(INFER_VERSION, openapi_extra=_INFER_BODY)
async def model_infer(request: Request) -> Response:
    """Classify the `image` input's rows under the request's (or each row's) budget."""
    arrived, started = time.monotonic(), time.perf_counter()
    runtime = runtime_of(request)
    served = served_model(runtime, request)
    header, tail = await read_body(request)
    req = read_request(parse_header(header), tail, runtime.settings.max_batch_images)
    replies = await classify_rows(runtime, request, served.name, req, arrived, started)
    return inference_reply(served, req, replies)
