"""Domain errors carry their HTTP status and code; one handler turns them into JSON.

Every error reply is `{"error": {"code", "message"}}`; messages never hold paths or internals, and
are cut at MAX_MESSAGE characters, so no client string comes back unbounded. Unexpected errors are
answered (500) and logged with their traceback by the accounting middleware, in one place.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.record import record_of

log = logging.getLogger("erde.service")

MAX_MESSAGE = 1024  # characters of an error message
CLIENT_CLOSED = 499  # nginx's status for a client that went away before its reply: counted, never sent


class ServiceError(Exception):
    """An error a client caused (or must wait out); `status` is the HTTP status."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 retry_after: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.status = status or self.status
        self.retry_after = retry_after
        self.reason = reason or self.code  # bounded label for erde_rejected_total
        self.image: int | None = None  # which image of a request of several it concerns

    def at(self, image: int) -> ServiceError:
        """This error for image `image` of its request, as a copy: one error object may reach the rows
        of several requests (a failing batch), and each must get its own number, never another's."""
        error = copy.copy(self)
        error.image = image
        return error

    @property
    def text(self) -> str:
        """The message as the client reads it: numbered when it concerns one image of several."""
        return self.message if self.image is None else f"image {self.image}: {self.message}"


class BadOptions(ServiceError):
    status, code = 422, "invalid_option"


class PayloadTooLarge(ServiceError):
    status, code = 413, "too_large"


class UnsupportedImage(ServiceError):
    status, code = 415, "unsupported_image"


class UnknownModel(ServiceError):
    status, code = 404, "unknown_model"


class Unavailable(ServiceError):
    status, code = 503, "unavailable"


class DeadlineExceeded(ServiceError):
    status, code = 504, "deadline_exceeded"


class Unsatisfiable(ServiceError):
    """No operating point meets the request's min_accuracy (within its budget); the message says what would."""

    status, code = 422, "unsatisfiable"


def error_body(code: str, message: str, request_id: str, oip: bool = False) -> dict:
    """An error reply's body, in the protocol's shape: ours `{"error": {"code", "message", "request_id"}}`,
    or the Open Inference Protocol's `{"error": message, "request_id"}` (`oip`). The one place either
    shape is written."""
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE - 1] + "…"
    if oip:
        return {"error": message, "request_id": request_id}
    return {"error": {"code": code, "message": message, "request_id": request_id}}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", "invalid"))
    return "; ".join(parts) or "invalid request"


async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
    record_of(request.scope).reason = exc.reason
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    body = error_body(exc.code, exc.text, record_of(request.scope).request_id)
    return JSONResponse(body, status_code=exc.status, headers=headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    record_of(request.scope).reason = "invalid_option"
    return JSONResponse(error_body("invalid_option", _validation_message(exc),
                                   record_of(request.scope).request_id), status_code=422)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
    record_of(request.scope).reason = code
    message = exc.detail if isinstance(exc.detail, str) else "bad request"
    body = error_body(code, message, record_of(request.scope).request_id)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def client_disconnect(request: Request, _: ClientDisconnect) -> JSONResponse:
    """The client left before its request was read: its fault, no traceback, not a 500. The reply
    is counted and never sent; a read timeout (the HTTP protocol's 408) keeps its own reason."""
    record = record_of(request.scope)
    record.reason = record.reason or "client_disconnect"
    return JSONResponse(error_body("client_disconnect", "the client closed the connection", record.request_id),
                        status_code=CLIENT_CLOSED)


# Exception -> its reply; the framework's exception middleware and the work endpoints' direct
# dispatch (service/api/routes.py) both answer from this one table.
HANDLERS: dict[type[Exception], Callable[[Request, Any], Awaitable[Response]]] = {
    ServiceError: service_error, RequestValidationError: validation_error,
    StarletteHTTPException: http_error, ClientDisconnect: client_disconnect,
}


def install_error_handlers(app: FastAPI) -> None:
    for kind, handler in HANDLERS.items():
        app.add_exception_handler(kind, handler)


async def error_response(request: Request, exc: Exception) -> Response:
    """The reply to `exc` from HANDLERS (the nearest class in its MRO, as Starlette looks it up);
    an exception no handler takes is raised again, for the accounting's last-resort 500."""
    for kind in type(exc).__mro__:
        handler = HANDLERS.get(kind)
        if handler is not None:
            return await handler(request, exc)
    raise exc
