"""Refusals decided from the request line and headers, before the body is read.

Under a retry storm most requests must be refused, and a refusal that first reads and parses an
upload spends the CPU that should serve the rest: goodput collapses as offered load grows. Here
a classify request is refused (503, Retry-After) when the service drains or the model's queue
cannot take it, at the cost of a header lookup, without parsing the upload; a large body is not
even read (`Connection: close`). While draining, every reply says `Connection: close`, so clients
move to another instance instead of reusing this one's connections.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import Unavailable, error_body
from service.middleware import declared_length, send_json
from service.record import record_of
from service.runtime import Runtime

CLASSIFY_PATHS = frozenset({"/classify", "/classify/batch"})
OIP_INFER = re.compile(r"/v2/models/([^/]+)(?:/versions/[^/]+)?/infer")
CLOSE = (b"connection", b"close")
# Refusing with `Connection: close` makes every retry a new connection, which cost the server more
# than reading a small body: measured here, 161-175 µs of server CPU per refusal closing the
# connection against 77-102 µs reading a 1 kB body and keeping it (bench/collapse.py's refusal row).
KEEP_ALIVE_BODY_BYTES = 64 * 1024


class AdmissionControl:
    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "POST":
            ours = scope["path"] in CLASSIFY_PATHS
            oip = None if ours else OIP_INFER.fullmatch(scope["path"])
            if ours or oip is not None:
                refusal = self.refusal(scope, oip)
                if refusal is not None:
                    await refuse(scope, receive, send, refusal, keep_alive=not self.runtime.draining,
                                 oip=oip is not None)
                    return
        if self.runtime.draining:
            send = closing(send)
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope, oip: re.Match[str] | None) -> Unavailable | None:
        """Why to refuse this classify request (`oip`: its match when it is an OIP infer) now, or None."""
        runtime = self.runtime
        if runtime.draining:
            return Unavailable("the service is shutting down; retry on another instance",
                               retry_after=runtime.settings.retry_after_s, reason="draining")
        if oip is not None:
            name = oip.group(1)
        else:
            query = scope.get("query_string", b"")
            name = parse_qs(query.decode("latin-1")).get("model", [None])[0] if b"model=" in query else None
        served = runtime.registry.find(name)
        if served is None:  # unknown (or not yet loaded): the full path answers it with its own error
            return None
        record_of(scope).model = served.name
        return served.worker.refusal()


async def refuse(scope: Scope, receive: Receive, send: Send, error: Unavailable, keep_alive: bool,
                 oip: bool) -> None:
    """A 503 JSON reply. With `keep_alive`, a small body (already in the socket's buffer, as most uploads
    here are) is read and dropped so the connection can serve the client's retry; a large or unsized one
    is left unread and the connection closed."""
    record_of(scope).reason = error.reason
    length = declared_length(scope)
    keep = keep_alive and length is not None and length <= KEEP_ALIVE_BODY_BYTES
    if keep:
        while (await receive()).get("more_body"):
            pass
    body = {"error": error.message} if oip else error_body(error.code, error.message)  # OIP's shape, or ours
    await send_json(send, error.status, body, retry_after=error.retry_after, close=not keep)


def closing(send: Send) -> Send:
    """`send` with `Connection: close` added to the response head."""

    async def send_closing(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), CLOSE]}
        await send(message)

    return send_closing
