"""Two pure ASGI middlewares: request accounting (body limits, in-flight count, request metrics, the
last-resort 500, one structured access-log line per request) and the Host check against DNS rebinding.

A body is limited twice: each request's to `max_upload_bytes` (413), and all of a server process's at
once to `max_upload_bytes_in_flight` (`UploadsInFlight`, 503 with Retry-After). Without the second, 64
uploads of 8 MB sent together were all held at once: the server process grew by 1.26 GB, more than a
pod's memory limit leaves it. (What the protocol buffers itself is apart and small: a body it reads to
refuse, at most 64 KiB a connection, and uvicorn's read buffer.)

Every HTTP request is counted, under a fixed endpoint label (never a raw path) from the one endpoint
table (service/endpoints.py): "other" for anything else, unknown paths included.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Iterable

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.edge import accesslog
from service.endpoints import match
from service.engine.worker import release
from service.errors import PayloadTooLarge, Unavailable, error_body
from service.numbers import parse_int
from service.record import RequestRecord, record_of, request_id

log = logging.getLogger("erde.service")

MAX_LOGGED_PATH = 256  # characters of the path in an access-log line


class UploadsInFlight:
    """Bytes of request bodies a server process holds at once, bounded: a request takes its declared length
    before its body is read (or each chunk of an unsized body as it comes) and gives it back when it ends."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        if size and self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


class RequestAccounting:
    def __init__(self, app: ASGIApp, runtime, max_body: int, max_in_flight: int | None = None,
                 retry_after_s: int = 1, log_requests: bool = True) -> None:
        self.app = app
        self.runtime = runtime
        self.max_body = max_body
        self.uploads = UploadsInFlight(max_in_flight or max_body)
        self.retry_after_s = retry_after_s
        self.log_requests = log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        record = start_record(scope)
        echoed = (b"x-request-id", record.request_id.encode())
        status: int | None = None

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = record.sent = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), echoed]}
            await send(message)

        work = record.endpoint.work
        if work:
            self.runtime.inflight += 1
            metrics.set_inflight(1)
        declared = declared_length(scope)
        hold = [0]  # bytes of the process's uploads this request holds (UploadsInFlight)
        try:
            oip = record.endpoint.protocol == "oip"
            if declared is not None and declared > self.max_body:
                record.reason = "too_large"
                await send_json(send_status, 413, error_body("too_large", self._too_large_message(), record.request_id,
                                                             oip=oip))
            elif declared is None and transfer_coded(scope):  # (llhttp refuses a Content-Length beside one)
                # RFC 9112 section 6.1: 501 for a transfer coding the server does not know. The parser reads only
                # the chunked framing, so a body sent `gzip, chunked` reached the decoder still gzipped and was
                # answered "not a supported image".
                record.reason = "unsupported_transfer_coding"
                body = error_body("unsupported_transfer_coding", "no transfer coding but chunked is supported: "
                                  "send the body as it is, or chunked", record.request_id, oip=oip)
                await send_json(send_status, 501, body)
            elif work and header(scope, b"content-encoding", b"identity").lower() != b"identity":
                # RFC 9110 section 15.5.16: 415, and Accept-Encoding says which codings would do. Parsed as
                # it is, a gzipped form was 400 `malformed_multipart`, which sent the client looking elsewhere.
                record.reason = "unsupported_media_type"
                body = error_body("unsupported_media_type", "compressed request bodies are not supported: send "
                                  "the body as it is (Content-Encoding: identity)", record.request_id, oip=oip)
                await send_json(send_status, 415, body, headers=[(b"accept-encoding", b"identity")])
            elif not self.uploads.take(declared or 0):
                error = self._uploads_full()
                record.reason = error.reason
                await send_json(send_status, 503, error_body(error.code, str(error), record.request_id, oip=oip),
                                retry_after=error.retry_after)
            else:
                hold[0] = declared or 0
                await self.app(scope, self._limited(receive, hold, sized=declared is not None), send_status)
        except Exception:  # a bug, never a client's doing: one traceback, a JSON 500, and serving goes on
            log.exception("unexpected error answering %s %s", scope.get("method"), record.endpoint.label)
            record.reason = "error"
            if status is None:
                await send_json(send_status, 500, error_body("internal", "internal error", record.request_id))
        finally:
            self.uploads.give(hold[0])
            if work:
                self.runtime.inflight -= 1
                metrics.set_inflight(-1)
                release(record)  # admitted, but it ended before its rows were queued
            account(record, scope, record.status or status or 500, time.perf_counter() - started,
                    self.log_requests)

    def _too_large_message(self) -> str:
        return f"the request body is larger than {self.max_body} bytes"

    def _uploads_full(self) -> Unavailable:
        return Unavailable("the server is taking in as many uploads as it can hold at once; retry shortly",
                           code="overloaded", retry_after=self.retry_after_s, reason="uploads_in_flight")

    def _limited(self, receive: Receive, hold: list[int], sized: bool) -> Receive:
        """`receive`, refusing a body past `max_body` (413) as it streams; an unsized (chunked) body takes its
        bytes from the process's uploads as they come (503 once they are full), into `hold`."""
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                seen += size
                if seen > self.max_body:
                    raise PayloadTooLarge(self._too_large_message(), reason="too_large")
                if not sized:
                    if not self.uploads.take(size):
                        raise self._uploads_full()
                    hold[0] += size
            return message

        return limited

def start_record(scope: Scope) -> RequestRecord:
    """The request's record, with what its head says: its endpoint (and the path's parameters) and its id.
    Once per request: the protocol may have started it already."""
    record = record_of(scope)
    if record.request_id:
        return record
    record.endpoint, record.path_params = match(scope["path"])
    record.request_id = request_id(header(scope, b"x-request-id"))
    return record


def account(record: RequestRecord, scope: Scope, status: int, seconds: float, log_requests: bool) -> None:
    """A request's metrics and its access-log line, once its reply has gone (here, or from the protocol)."""
    endpoint = record.endpoint.label
    metrics.observe_request(record.model, endpoint, status, seconds)
    if status >= 400:
        metrics.observe_rejected(record.model, record.reason or "error")
    if log_requests:
        accesslog.write(orjson.dumps({
            "method": scope.get("method"), "path": scope["path"][:MAX_LOGGED_PATH], "endpoint": endpoint,
            "code": status, "model": record.model, "exit": record.exits, "budget": record.budget,
            "threshold": record.threshold, "latency_ms": round(seconds * 1000, 3), "error": record.reason,
            "request_id": record.request_id,
        }).decode())


# RFC 3986's host[:port]: an IP literal in brackets or a name (DNS letters, digits, '.', '-', '_'), then
# `:` and digits. Starlette's TrustedHostMiddleware has such a parser, but private (starlette._utils, not in
# every Starlette our FastAPI range allows), and answers in text/plain with no way to let IP literals pass.
HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::[0-9]{0,5})?")


class AllowedHosts:
    """Answers 400 to a request whose Host header names a host this service is not: the defence
    against DNS rebinding (a web page whose own name now resolves to 127.0.0.1 reading /models or
    /metrics). IP literals always pass, since a rebinding page always sends its own name; names
    must be listed (`*.example.com` for its subdomains, `*` for any). A request without Host passes:
    browsers always send one. Two Host headers, or one outside host[:port], are 400 whatever the
    list (RFC 9112 section 3.2); an absolute-form target's host arrives here as the Host header
    (service/edge/protocol.py)."""

    def __init__(self, app: ASGIApp, names: Iterable[str]) -> None:
        self.app = app
        names = {n.lower().rstrip(".") for n in names}
        self.any = "*" in names
        self.names = frozenset(n for n in names if not n.startswith("*."))
        self.suffixes = tuple(n[1:] for n in names if n.startswith("*."))
        self.passed: set[bytes] = set()  # Host values already allowed, so most requests skip the parsing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            hosts = [value for key, value in scope.get("headers", ()) if key == b"host"]
            host = hosts[0] if hosts else None
            if len(hosts) > 1:
                await self._refuse(scope, send, "a request may carry one Host header")
                return
            if host is not None and host not in self.passed:
                if not self.allowed(host.decode("latin-1")):
                    await self._refuse(scope, send, "this service does not answer to that Host name "
                                                    "(see ERDE_ALLOWED_HOSTS)")
                    return
                if len(self.passed) < 256:  # bounded: IP literals are endless
                    self.passed.add(host)
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, message: str) -> None:
        record = record_of(scope)
        record.reason = "invalid_host"
        await send_json(send, 400, error_body("invalid_host", message, record.request_id))

    def allowed(self, host: str) -> bool:
        """A Host value in the host[:port] grammar, naming an IP literal or (unless any) a listed name."""
        match = HOST.fullmatch(host)
        if match is None:
            return False
        name = match[1]
        if name.startswith("["):
            return _is_ip(name[1:-1], version=6)
        name = name.rstrip(".").lower()
        return _is_ip(name) or self.any or name in self.names or name.endswith(self.suffixes)


def _is_ip(text: str, version: int | None = None) -> bool:
    try:
        return version in (None, ipaddress.ip_address(text).version)
    except ValueError:
        return False


def header(scope: Scope, name: bytes, default: bytes | None = None) -> bytes | None:
    """The first value of a request header (`name` in lower case)."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return default


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, or None when it has none or an unreadable one."""
    return parse_int(header(scope, b"content-length"))


def transfer_coded(scope: Scope) -> bool:
    """Whether the request's Transfer-Encoding lists a coding other than chunked (gzip, compress, deflate)."""
    codings = b",".join(value for name, value in scope["headers"] if name == b"transfer-encoding")
    return any(coding.strip().lower() not in (b"chunked", b"") for coding in codings.split(b","))


async def send_json(send: Send, status: int, body: dict, retry_after: int | None = None, close: bool = True,
                    headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """A whole JSON reply sent straight through ASGI, for answers given before (or instead of) the app."""
    payload = orjson.dumps(body)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *headers]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
