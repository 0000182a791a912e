"""Refusals decided from the request line and headers, before the body is read.

Under a retry storm most requests must be refused, and a refusal that first reads and parses an
upload spends the CPU that should serve the rest: goodput collapses as offered load grows. Here
a classify request is refused (503, Retry-After) when the service drains or the model's queue
cannot take it, at the cost of a header lookup; the unread body is not waited for
(`Connection: close`). While draining, every reply says `Connection: close`, so clients move to
another instance instead of reusing this one's connections.
"""

from __future__ import annotations

from urllib.parse import parse_qs

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import Unavailable, error_body
from service.record import record_of
from service.runtime import Runtime

CLASSIFY_PATHS = frozenset({"/classify", "/classify/batch"})
CLOSE = (b"connection", b"close")


class AdmissionControl:
    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] in CLASSIFY_PATHS and scope["method"] == "POST":
            refusal = self.refusal(scope)
            if refusal is not None:
                await refuse(scope, send, refusal)
                return
        if self.runtime.draining:
            send = closing(send)
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> Unavailable | None:
        runtime = self.runtime
        if runtime.draining:
            return Unavailable("the service is shutting down; retry on another instance",
                               retry_after=runtime.settings.retry_after_s, reason="draining")
        query = scope.get("query_string", b"")
        name = parse_qs(query.decode("latin-1")).get("model", [None])[0] if b"model=" in query else None
        served = runtime.registry.find(name)
        if served is None:  # unknown (or not yet loaded): the full path answers it with its own error
            return None
        record_of(scope).model = served.name
        return served.worker.refusal()


async def refuse(scope: Scope, send: Send, error: Unavailable) -> None:
    """A 503 JSON reply that closes the connection (the request's body is left unread)."""
    record_of(scope).reason = error.reason
    payload = orjson.dumps(error_body(error.code, error.message))
    await send({"type": "http.response.start", "status": error.status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
        (b"retry-after", str(error.retry_after).encode()), CLOSE]})
    await send({"type": "http.response.body", "body": payload})


def closing(send: Send) -> Send:
    """`send` with `Connection: close` added to the response head."""

    async def send_closing(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), CLOSE]}
        await send(message)

    return send_closing
