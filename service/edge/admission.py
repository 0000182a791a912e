"""Refusals decided from the request line and headers, before the body is read.

Under a retry storm most requests must be refused, and a refusal that first reads and parses an
upload spends the CPU that should serve the rest: goodput collapses as offered load grows. Here
a classify request is refused (503, Retry-After) when the service drains or the model's queue
cannot take it, at the cost of a header lookup, without parsing the upload; a large body is not
even read (`Connection: close`). While draining, every reply says `Connection: close`, so clients
move to another instance instead of reusing this one's connections.

The model is looked up as the pipeline looks it up (`split_upload`: a form field over the query),
so that a request naming an idle model in its form is never refused for the default model's full
queue: when the model the request line points to would refuse, a small multipart body is read and
its fields consulted; if its own model admits it, the body is handed on to the app as read.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.edge.middleware import declared_length, header, send_json
from service.edge.multipart import split_upload
from service.engine.runtime import Runtime
from service.errors import ServiceError, Unavailable, UnknownModel, error_body
from service.record import record_of

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
        record = record_of(scope)
        if record.endpoint.work and scope["method"] == "POST":
            oip = record.endpoint.protocol == "oip"  # its path names the model
            refusal = self.refusal(scope, record.path_params["name"] if oip else query_model(scope))
            if refusal is not None and not oip and refusal.reason != "draining":
                refusal, receive = await self.recheck_form(scope, receive, refusal)
            if refusal is not None:
                await refuse(scope, receive, send, refusal, keep_alive=not self.runtime.draining, oip=oip)
                return
        if self.runtime.draining:
            send = closing(send)
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope, name: str | None) -> Unavailable | None:
        """Why to refuse a classify request for model `name` (None: the default) now, or None."""
        runtime = self.runtime
        refusal = runtime.draining_refusal()
        if refusal is not None:
            return refusal
        try:
            served = runtime.registry.get(name)
        except UnknownModel:  # not served (or not yet loaded): the pipeline answers it with its own error
            return None
        record_of(scope).model = served.name
        return served.worker.refusal()

    async def recheck_form(self, scope: Scope, receive: Receive,
                           refusal: Unavailable) -> tuple[Unavailable | None, Receive]:
        """The refusal for the model a multipart form names, when it names one; and the `receive` that
        hands the body on. A body too large to read here is left to the pipeline, which refuses it
        after parsing if its own model's queue is full."""
        if not header(scope, b"content-type", b"").startswith(b"multipart/form-data"):
            return refusal, receive
        length = declared_length(scope)
        if length is None or length > KEEP_ALIVE_BODY_BYTES:
            return None, receive
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        body = bytes(body)
        if b'name="model"' in body:  # else the form names no model: the request line's refusal stands
            try:
                _, fields = split_upload(header(scope, b"content-type", b"").decode("latin-1"), body,
                                         query_fields(scope), self.runtime.settings.max_batch_images)
            except ServiceError:  # malformed: not refused here, the pipeline answers it with its own error
                return None, replay(body, receive)
            refusal = self.refusal(scope, fields.get("model"))
        return refusal, replay(body, receive)


def query_fields(scope: Scope) -> dict[str, str]:
    query = scope.get("query_string", b"")
    return {k: v[0] for k, v in parse_qs(query.decode("latin-1")).items()} if query else {}


def query_model(scope: Scope) -> str | None:
    """The model the query names (cheap: no parsing when it names none)."""
    return query_fields(scope).get("model") if b"model=" in scope.get("query_string", b"") else None


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the app a body already read, whole, then whatever `receive` says next."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


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
    body = error_body(error.code, error.text, record_of(scope).request_id, oip)
    await send_json(send, error.status, body, retry_after=error.retry_after, close=not keep)


def closing(send: Send) -> Send:
    """`send` with `Connection: close` added to the response head."""

    async def send_closing(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), CLOSE]}
        await send(message)

    return send_closing
