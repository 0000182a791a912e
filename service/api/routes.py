"""Thin routes: each calls the pipeline's steps and shapes the reply."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from service import metrics
from service.api.deps import RuntimeDep, runtime_of
from service.api.pipeline import classify
from service.endpoints import CLASSIFY, CLASSIFY_BATCH, ENDPOINTS, HEALTHZ, METRICS, MODELS, READYZ
from service.errors import error_response
from service.record import record_of
from service.schemas import BatchReply, ClassifyOptions, ClassifyReply, ErrorReply, ModelInfo


class RequestOnlyRoute(APIRoute):
    """A route whose endpoint takes the bare Request and returns a Response: documented in OpenAPI
    like any other, but called without FastAPI's dependency solving and response serialisation,
    which cost about 30 µs a request on the hot path (reports/service-profile.md)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            return await endpoint(request)

        return handler


Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class WorkDispatch:
    """The innermost middleware: a POST to a work endpoint goes straight to its `RequestOnlyRoute`'s
    handler, past Starlette's exception middleware, FastAPI's exit stack and the router, which took
    about an eighth of the event loop's CPU per request (docs/architecture.md, "Work past the
    framework"). The endpoint comes from the table the accounting matched (service/endpoints.py), the
    handler and its errors' replies from the route and the app's own handlers (`errors.HANDLERS`).
    Every other request takes the framework's way."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.handlers: dict[str, Handler] = {}
        for route in routes:
            if isinstance(route, RequestOnlyRoute) and "POST" in (route.methods or ()):
                endpoint = next(e for e in ENDPOINTS if route.path in e.paths)
                if endpoint.work:  # one handler per endpoint: its paths differ only in their parameters
                    self.handlers.setdefault(endpoint.label, route.get_route_handler())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            record = record_of(scope)
            handler = self.handlers.get(record.endpoint.label)
            if handler is not None:
                scope["path_params"] = record.path_params
                request = Request(scope, receive, send)
                try:
                    response = await handler(request)
                except Exception as exc:
                    response = await error_response(request, exc)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


router = APIRouter()
classify_router = APIRouter(route_class=RequestOnlyRoute)  # the hot path: /classify and /classify/batch

_OPTIONS = {k: v for k, v in ClassifyOptions.model_json_schema()["properties"].items()}
_ERRORS = {code: {"model": ErrorReply} for code in (404, 413, 415, 422, 503)}


def _body(multiple: bool) -> dict:
    image = {"type": "array", "items": {"type": "string", "format": "binary"}} if multiple else \
        {"type": "string", "format": "binary"}
    form = {"type": "object", "required": ["image"], "properties": {"image": image, **_OPTIONS}}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": form},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    }}}


def _json(payload: object) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json")


@classify_router.post(CLASSIFY.path, response_model=ClassifyReply, responses=_ERRORS, openapi_extra=_body(False))
async def classify_one(request: Request) -> Response:
    """Classify one image under a per-request compute budget (multipart, or a raw image body)."""
    return _json((await classify(runtime_of(request), request, max_images=1))[0])


@classify_router.post(CLASSIFY_BATCH.path, response_model=BatchReply, responses=_ERRORS, openapi_extra=_body(True))
async def classify_batch(request: Request) -> Response:
    """Classify several `image` parts with the same options; results in the order sent."""
    runtime = runtime_of(request)
    return _json({"results": await classify(runtime, request, runtime.settings.max_batch_images)})


@router.get(MODELS.paths[0], response_model=list[ModelInfo])
async def models(runtime: RuntimeDep) -> Response:
    """Every served model: version, classes, input spec, MACs per exit, calibration curve."""
    return _json([runtime.registry.get(n).info().model_dump() for n in runtime.registry.names])


@router.get(MODELS.paths[1], response_model=ModelInfo, responses={404: {"model": ErrorReply}})
async def model(name: str, runtime: RuntimeDep) -> Response:
    """One served model by name."""
    return _json(runtime.registry.get(name).info().model_dump())


@router.get(HEALTHZ.path)
async def healthz() -> dict[str, str]:
    """Alive: the process answers."""
    return {"status": "ok"}


@router.get(READYZ.path, responses={503: {"model": ErrorReply}})
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    """Ready: models loaded and warmed, and not draining."""
    refusal = runtime.readiness_refusal()
    if refusal is not None:
        raise refusal
    return JSONResponse({"status": "ready", "models": runtime.registry.names})


@router.get(METRICS.path, include_in_schema=False)
async def prometheus_metrics() -> Response:
    """Prometheus exposition."""
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
