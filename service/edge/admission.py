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
its fields consulted; if its own model admits it, the body is handed on to the app as read. So is
its time: a request is refused when it cannot be answered within its timeout_ms, else the SLO
(service/engine/sojourn.py), and a form (or an OIP parameter) may give it more time than the query.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.edge.middleware import declared_length, header, send_json
from service.edge.multipart import ABSENT, boundary_of, query_fields, simple_field, split_upload
from service.engine.runtime import Runtime, time_allowed
from service.errors import ServiceError, Unavailable, UnknownModel, error_body
from service.numbers import parse_decimal
from service.record import record_of

CLOSE = (b"connection", b"close")
# Refusing with `Connection: close` makes every retry a new connection, which cost the server more
# than reading a small body: measured here, 161-175 µs of server CPU per refusal closing the
# connection against 77-102 µs reading a 1 kB body and keeping it (bench/collapse.py's refusal row).
KEEP_ALIVE_BODY_BYTES = 64 * 1024


class Admission:
    """Whether to refuse a classify request, from its head and, when a form may name its model, its body.

    Asked by the HTTP protocol before any ASGI task exists (`service/edge/protocol.py`), and by
    `AdmissionControl` for the requests that reach the app (pipelined behind another, say)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def at_head(self, scope: Scope) -> tuple[Unavailable, bool] | None:
        """The refusal for a classify request (None: admit it), and whether a multipart form's `model`
        field may still overturn it, which only its body can tell (`after_body`)."""
        if not is_work(scope):
            return None
        record = record_of(scope)
        oip = record.endpoint.protocol == "oip"  # its path names the model
        query = query_fields(scope.get("query_string", b""))
        named = record.path_params["name"] if oip else query.get("model")
        refusal = self.refusal(scope, named, query.get("timeout_ms"))
        if refusal is None:
            return None
        if refusal.reason == "draining":
            return refusal, False
        timed = refusal.reason == "queue_wait" and "timeout_ms" not in query  # the body may give it more time
        if oip:
            return refusal, timed
        formed = header(scope, b"content-type", b"").startswith(b"multipart/form-data")
        return refusal, formed and (named is None or timed)

    def refusal(self, scope: Scope, name: str | None, timeout_ms: str | None = None) -> Unavailable | None:
        """Why to refuse a classify request for model `name` (None: the default) with `timeout_ms` (as
        sent; None: the SLO) now, or None."""
        runtime = self.runtime
        refusal = runtime.draining_refusal()
        if refusal is not None:
            return refusal
        timeout = parse_decimal(timeout_ms)
        if timeout_ms is not None and (timeout is None or timeout <= 0):
            return None  # the pipeline answers 422 for it
        try:
            served = runtime.registry.get(name)
        except UnknownModel:  # not served (or not yet loaded): the pipeline answers it with its own error
            return None
        record = record_of(scope)
        record.model = served.name
        refusal = served.worker.refusal(1, time_allowed(runtime.settings, timeout)[1])
        if refusal is None:
            served.worker.reserve(record)
        return refusal

    def after_body(self, scope: Scope, body: bytes, refusal: Unavailable) -> Unavailable | None:
        """The refusal for the model and the time the form names (the head's `refusal` when it names
        neither). An OIP body with its own timeout goes to the pipeline, which reads its parameters."""
        if record_of(scope).endpoint.protocol == "oip":
            return None if b"erde_timeout_ms" in body else refusal
        content_type = header(scope, b"content-type", b"").decode("latin-1")
        try:
            boundary = boundary_of(content_type)
            model, timeout = (simple_field(body, boundary, name) for name in ("model", "timeout_ms"))
            if model == ABSENT and timeout == ABSENT:
                return refusal  # the form names neither: the request line's refusal stands
            query = scope.get("query_string", b"")
            if model is None or timeout is None:  # unsure: only the whole form can tell
                _, fields = split_upload(content_type, body, query, self.runtime.settings.max_batch_images)
            else:  # a form field over the query, as split_upload has it
                fields = query_fields(query)
                fields.update({k: v for k, v in (("model", model), ("timeout_ms", timeout)) if v != ABSENT})
        except ServiceError:  # malformed: not refused here, the pipeline answers it with its own error
            return None
        return self.refusal(scope, fields.get("model"), fields.get("timeout_ms"))


def is_work(scope: Scope) -> bool:
    """A POST to a work endpoint (its record started from the head): what admission weighs."""
    return record_of(scope).endpoint.work and scope["method"] == "POST"


def keeps_alive(scope: Scope, draining: bool) -> bool:
    """Whether a refusal keeps the connection: not while draining, and only when the body is small
    enough to read and drop (most uploads here are, and already in the socket's buffer); a large or
    unsized one is left unread and the connection closed. So is one whose client waits for `100 Continue`
    before sending it (RFC 9110 section 10.1.1): held for its body, its refusal would wait for a body that
    never comes, until the read timeout answered 408."""
    length = declared_length(scope)
    return (not draining and length is not None and length <= KEEP_ALIVE_BODY_BYTES
            and not any(key == b"expect" and value.lower() == b"100-continue" for key, value in scope["headers"]))


class AdmissionControl:
    """`Admission` for the requests that reach the app; while draining, every reply closes."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime
        self.admission = Admission(runtime)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        verdict = None if record_of(scope).admitted else self.admission.at_head(scope)
        if verdict is not None:
            refusal, overturnable = verdict
            if overturnable and keeps_alive(scope, False):
                body = await read_body(receive)
                refusal, receive = self.admission.after_body(scope, body, refusal), replay(body, receive)
            elif overturnable:  # too large to read here: the pipeline refuses it if its own model is full
                refusal = None
            if refusal is not None:
                await refuse(scope, receive, send, refusal, draining=self.runtime.draining,
                             oip=record_of(scope).endpoint.protocol == "oip")
                return
        if self.runtime.draining:
            send = closing(send)
        await self.app(scope, receive, send)


async def read_body(receive: Receive) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if message["type"] != "http.request" or not message.get("more_body"):
            return bytes(body)


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


async def refuse(scope: Scope, receive: Receive, send: Send, error: Unavailable, draining: bool,
                 oip: bool) -> None:
    """A 503 JSON reply; the connection is kept as `keeps_alive` says, its small body read and dropped."""
    record_of(scope).reason = error.reason
    keep = keeps_alive(scope, draining)
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
