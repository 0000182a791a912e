"""How uvicorn speaks HTTP for this service: the options every server process is started with, and
the HTTP protocol that holds the limits an exposed server needs (issues 10 and 11).

`LimitedHttpProtocol` is uvicorn's httptools protocol with these changes:
- **Request head** (request line and headers) of at most `max_head_bytes`: beyond it 431 and the
  connection closed, after at most that many bytes and one more read. httptools has no limit of its
  own and grows a header by concatenation (quadratic: a 100 MB header took 13.9 s and the memory
  of many copies), so the protocol counts every read while a head is incomplete.
- **Read timeout**: a request's head and body must arrive within `read_timeout_s` of its first
  byte, else 408 and the connection closed; a connection that never sends a byte is closed then too.
  (Between requests, uvicorn's keep-alive timeout closes idle connections.)
- **Connection cap**: beyond `max_connections` open connections (or requests in progress) a request
  is answered 503 with Retry-After, as uvicorn's `limit_concurrency` does, but in JSON. A health or
  readiness probe (`/healthz`, `/readyz`) is answered still: see `Endpoint.probe`.
- **Lingering close** (`LingeringTransport`): a connection closed after a reply is half-closed and
  read, with what arrives dropped, until the client closes too, for at most `LINGER_S` and
  `max_linger_bytes`. Closed at once, a request body still arriving (a client sends the head and the
  body in two writes; a refusal goes out before the body is read) makes the kernel reset the
  connection, and the reset throws away the reply the client has not read yet: 44% of the requests
  a pool of kept-alive clients sent through a drain were lost so. nginx's `lingering_close`.
- **A half-close is not an abort** (`eof_received`): a client that sends its request and then a FIN
  (`nc`, some HTTP/1.0 clients) gets its reply, and the connection closes after it.
- **Refusals before the app**: a classify request that admission (`service/edge/admission.py`)
  refuses from its head (draining, its model's queue full) is answered here, 503 with
  Retry-After, before any ASGI task exists: its small body is read and dropped by the parser and
  the 503 sent once it is in, on the kept-alive connection (closed after it for a client that keeps
  none alive: HTTP/1.0, `Connection: close`); a large one is not read, and the
  connection closes, as does one whose client waits for `100 Continue` before sending it. When a
  multipart form may name another model, the body decides (such a client is told to go on). Counted
  and logged like every request (`middleware.account`). The Host check does not run first: a 503
  carries nothing a rebinding page could want.
- **A backoff for a connection refused again and again** (`refusal_backoff`): a kept-alive
  connection answered 503 is read again at once after its first refusal, then, while its requests
  keep being refused, after a pause that doubles from 1 ms to at most 0.1 s (and its Retry-After); any
  other reply ends the run. Every 503 itself goes out at once. A pause after every refusal made a
  pooled client's next, new request late under an open loop (issue 23); none let 512 clients
  retrying in a tight loop fill every turn of the event loop with refusals, so that the requests it
  admitted waited behind them and it admitted almost none (bench/collapse.py). Runs of refusals are
  short for a client whose requests are independent, and long only for one that retries regardless.
- **Requests parsed before a refusal are answered first** (issue 20): a malformed request
  pipelined behind good ones is refused only once their replies are sent, then the connection
  is closed (RFC 9112 section 9.3.2).
- **HTTP/1.x only**: an HTTP/0.9 request line and CONNECT get 400 (`malformed_http`); an
  absolute-form target (`GET http://host/path`) stands for the Host header, as RFC 9112
  section 3.2.2 says, so the Host check (service/edge/middleware.py) checks its host.
- **A fair share of the cap** (service/edge/fairness.py): as open connections near the cap, the ones
  idle longest are closed, and one peer address past its share is refused first.
- **Every reply is JSON**: the protocol's own refusals (400 not HTTP, 408, 431, 503) carry the
  service's error body, never text/plain, and no reply says `server: uvicorn`.

A refusal made before the app saw the request is counted in `erde_rejected_total` here (model
"unknown"); one made while the app holds the request (a 408 on a stalled body) goes into the
request's record, and the accounting middleware counts it with the request.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import struct
import termios
import time
import weakref
from dataclasses import dataclass
from typing import Any

import httptools
import orjson
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from service import metrics
from service.edge.admission import Admission, is_work, keeps_alive
from service.edge.fairness import ConnectionShare
from service.edge.middleware import RequestAccounting, account, send_json, start_record
from service.engine.runtime import Runtime
from service.errors import Unavailable, error_body
from service.record import UNKNOWN_MODEL, record_of, request_id
from service.settings import Settings


@dataclass(frozen=True)
class HttpLimits:
    max_head_bytes: int  # request line + headers
    read_timeout_s: float  # from a request's first byte to its last
    max_connections: int  # open connections, and requests in progress, per server process
    retry_after_s: int  # Retry-After of the 503 past the connection cap
    max_linger_bytes: int  # bytes read and dropped after a closing reply, before the socket closes


# nginx lingers 30 s at most (lingering_time); a refused body on the same network arrives in milliseconds.
LINGER_S = 2.0
FIRST_REQUEST_S = 2.0  # at shutdown, how long a connection that has sent nothing yet may still send its request
BACKOFF_FIRST_S = 0.001  # the pause after a connection's second refusal in a row, doubling after each next one
BACKOFF_MAX_S = 0.1


def refusal_backoff(in_a_row: int, retry_after_s: float) -> float:
    """Seconds before a kept-alive connection is read again after its `in_a_row`-th refusal in a row: none
    after the first, then 1 ms doubling, at most BACKOFF_MAX_S and the refusal's Retry-After."""
    if in_a_row < 2:
        return 0.0
    return min(BACKOFF_FIRST_S * 2 ** min(in_a_row - 2, 16), BACKOFF_MAX_S, retry_after_s)


def unread_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes the client has sent that the kernel holds and the loop has not read yet (FIONREAD)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:  # closed meanwhile
        return 0


class LingeringTransport:
    """A connection's transport whose `close` lingers (see the module doc): the reply goes out, then a
    FIN, and what the client still sends is dropped (`swallow`) until it closes, or until the time or
    byte bound is reached. Everything else is the transport's own."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, max_bytes: int) -> None:
        self._transport = transport
        self._loop = loop
        self._left = max_bytes
        self.lingering = False
        self._held: list[bytes] | None = None
        self.write = transport.write  # the hot path, without a lookup through __getattr__

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def hold(self) -> None:
        """Keep what is written until `release`: a reply's head and body then go out in one write."""
        if self._held is None:
            self._held = []
            self.write = self._held.append

    def release(self) -> None:
        """Write what was held, at once and in one piece."""
        held, self._held = self._held, None
        if held is not None:
            self.write = self._transport.write
            if held:
                self.write(b"".join(held))

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        self.release()  # a held head goes out before the FIN
        transport = self._transport
        if self.lingering or transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()
            return
        self.lingering = True
        transport.write_eof()  # sent once the reply has left the buffer
        transport.resume_reading()  # flow control may have paused it: the body must be read to be dropped
        self._loop.call_later(LINGER_S, transport.close)

    def swallow(self, data: bytes) -> None:
        """Drop bytes that arrived while lingering; past the byte bound, close (and reset) now."""
        self._left -= len(data)
        if self._left < 0:
            self._transport.close()


class HeadTooLarge(Exception):
    """Raised from a parser callback: the complete head is over the limit."""


class NotHttp11(Exception):
    """Raised from a parser callback: an HTTP/0.9 request or CONNECT, which this server does not speak."""


ABSOLUTE_FORM = (b"http://", b"https://")  # lower case; the scheme is matched case-insensitively


@dataclass(frozen=True)
class Held:
    """A classify request refused from its head, waiting for its body: to drop it, or to read the form."""

    cycle: RequestResponseCycle
    app: Any
    refusal: Unavailable
    overturnable: bool  # a multipart form may name another model: the body decides
    started: float  # perf_counter when its head was complete


@dataclass(frozen=True)
class WorkEntry:
    """Where a work request enters the app: the service's own outermost middleware, inside the framework's
    built stack, entered directly. The layers around it (uvicorn's proxy headers, FastAPI and Starlette's
    entry, their error, telemetry and body-limit middleware) do nothing a work request needs: the accounting
    has its own last-resort 500 and body limit, and nothing on the way reads the client's address. Every
    other request takes the whole stack (docs/architecture.md, "Work past the framework")."""

    framework: weakref.ref[Any]  # the Starlette app, which `scope["app"]` names (Request.app); it may be the
    accounting: RequestAccounting  # cache's key itself (no proxy headers), hence weakly


_entries: weakref.WeakKeyDictionary[Any, WorkEntry] = weakref.WeakKeyDictionary()


def work_entry(app: ASGIApp) -> WorkEntry | None:
    """The work entry inside `app` (the app uvicorn loaded), once the framework has built its middleware
    stack (at the lifespan's start); None before, or in an app without the service's accounting."""
    found = _entries.get(app)
    if found is not None:
        return found
    framework, node = None, app
    for _ in range(32):  # a chain of wrappers, each holding the next as `app` (Starlette: `middleware_stack`)
        if isinstance(node, RequestAccounting):
            if framework is None:
                return None
            found = _entries[app] = WorkEntry(weakref.ref(framework), node)
            return found
        stack = getattr(node, "middleware_stack", None)
        if stack is not None:
            framework, node = node, stack
        else:
            node = getattr(node, "app", None)
    return None


class LimitedHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, limits: HttpLimits, share: ConnectionShare, admission: Admission | None = None,
                 log_requests: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.share = share
        self.refusal_owed: bytes | None = None  # a refusal waiting for the replies owed before it
        self.admission = admission  # None: every request goes to the app (the supervisor's own config)
        self.log_requests = log_requests
        self.held: Held | None = None
        self.limit_concurrency = None  # uvicorn's check answers in text/plain; ours is in on_headers_complete
        self.in_head = False  # from a request's first byte to the end of its headers
        self.head_bytes = 0  # bytes read for the current head (whole reads while it is incomplete)
        self.reading = 0  # length of the read being parsed
        self.messages_done = 0
        self.refused_in_a_row = 0  # 503s this connection got in a row: its backoff (refusal_backoff)
        # One timer per connection, not per request: it fires at the deadline it was set for, and
        # checks (and re-arms for) the request being read then, if any. Keep-alive requests that
        # arrive in time never touch it.
        self.read_deadline: float | None = None  # loop time by which the request being read must be in
        self.read_timer: asyncio.TimerHandle | None = None

    # connection events

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.lingering = LingeringTransport(transport, self.loop, self.limits.max_linger_bytes)
        super().connection_made(self.lingering)  # type: ignore[arg-type]
        self.share.opened(self)
        # When the client closes its side while we linger, uvicorn's eof_received lets the transport close.
        self._start_read()  # a connection that never sends a byte is closed at this deadline

    def request_waiting(self) -> bool:
        """Whether the client has sent bytes the loop has not read yet: the connection looks idle, and is
        not. Closed now, its request would be read and dropped by the lingering close, and never answered
        (a connection accepted in the same turn as others, a pooled connection sent on as the server drains)."""
        return unread_bytes(self.transport) > 0

    def shutdown(self) -> None:
        """uvicorn's, but a connection whose request has arrived unread is left to read it, and one that has
        sent nothing yet gets `FIRST_REQUEST_S` to send it: its client connected before the listener stopped
        taking connections, and may be a thread slow to run (CI lost requests so). While draining, their
        replies say `Connection: close`, and uvicorn waits for the connections to end."""
        if (self.cycle is None or self.cycle.response_complete) and self.request_waiting():
            return
        if self.cycle is None and not self.in_head and not self.transport.is_closing():
            self._read_by(min(self.read_deadline or float("inf"), self.loop.time() + FIRST_REQUEST_S))
            return
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.read_timer is not None:
            self.read_timer.cancel()
        self.share.closed(self)
        super().connection_lost(exc)

    def eof_received(self) -> bool | None:
        """The client has sent all it will: a half-close, as `nc` and some HTTP/1.0 clients make once their
        request is out. A request whose body is in still gets its reply on the open write side, and the
        connection closes after it. uvicorn let the transport close at the EOF, and the reply, computed and
        counted 200, was dropped. An EOF within a head or a body, or while lingering, ends the connection."""
        cycle = self.cycle  # the request parsed last
        if self.lingering.lingering or self.in_head or cycle is None or cycle.response_complete or cycle.more_body:
            return None
        cycle.keep_alive = False
        return True

    def data_received(self, data: bytes) -> None:
        if self.lingering.lingering:
            self.lingering.swallow(data)
            return
        if self.refusal_owed is not None:  # the parser stopped at an error: nothing after it is read
            return
        self._unset_keepalive_if_required()
        done_before = self.messages_done
        self.reading = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # no WebSocket routes (ws="none"): an Upgrade request is answered as plain HTTP
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, HeadTooLarge):
                self._head_too_large()
            else:
                self._refuse(400, "malformed_http", "the request is not valid HTTP/1.1")
            return
        if (self.in_head and self.messages_done == done_before and self.url and b"\n" in data
                and self.parser.get_http_version() == "0.0"):  # a request line ended without a version
            self._refuse(400, "malformed_http", "the request is not valid HTTP/1.1")
            return
        if self.in_head:
            if self.messages_done == done_before:  # no earlier request ended in this read: all of it is head
                self.head_bytes += len(data)
            if self.head_bytes > self.limits.max_head_bytes:
                self._head_too_large()

    # parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.share.busy(self)
        self.in_head = True
        self.head_bytes = 0
        self._start_read()

    def on_headers_complete(self) -> None:
        limit = self.limits.max_head_bytes
        if self.head_bytes + self.reading > limit and (  # else it is surely within: no need to add it up
                len(self.url) + sum(len(name) + len(value) for name, value in self.headers) > limit):
            raise HeadTooLarge  # a head that ended in this read
        if self.parser.get_http_version() == "0.9" or self.parser.get_method() == b"CONNECT":
            raise NotHttp11
        if self.url[:8].lower().startswith(ABSOLUTE_FORM):
            self._host_from_target()
        self.in_head = False
        limit = self.limits.max_connections
        over = self.share.open > limit or len(self.tasks) >= limit or self.share.over(self)
        self.app = self._over_capacity if over else self.config.loaded_app
        super().on_headers_complete()

    def _host_from_target(self) -> None:
        """An absolute-form target's authority replaces every Host header (RFC 9112 section 3.2.2),
        and the target becomes its path and query; the Host check then checks that authority."""
        parsed = httptools.parse_url(self.url)
        authority = parsed.host or b""
        if parsed.port is not None:
            authority += b":" + str(parsed.port).encode()
        self.headers[:] = [(name, value) for name, value in self.headers if name != b"host"]
        self.headers.append((b"host", authority))
        self.url = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.messages_done += 1
        self.read_deadline = None
        held = self.held
        if held is not None and held.cycle is self.cycle:
            self.held = None
            refusal = held.refusal
            if held.overturnable:
                refusal = self.admission.after_body(held.cycle.scope, bytes(held.cycle.body), refusal)
            if refusal is None:  # the model its form names takes it: the app answers, its body already in
                record_of(held.cycle.scope).admitted = True
                self._run(held.cycle, self._work(held.cycle, held.app))
            else:  # its body is in: the connection closes cleanly if its client asked for that (HTTP/1.0, close)
                self._refuse_here(held.cycle, refusal, held.started, keep=held.cycle.keep_alive)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        """Start the app on a request, unless admission refuses it from its head: then it is answered here
        (see the module doc), at once when the connection closes after it, else once its body is in. A request
        parsed after its connection began to close (pipelined, in the same read, behind one refused with a
        close while draining) is never started: no reply could reach its client, and writing one raised."""
        if self.transport.is_closing():
            cycle.response_complete = True  # the parser's later callbacks leave it alone
            return
        if app == self._over_capacity and cycle.scope["method"] in ("GET", "HEAD") and \
                start_record(cycle.scope).endpoint.probe:  # the cap never refuses a probe (`Endpoint.probe`)
            app = self.config.loaded_app
        if self.admission is None or app is not self.config.loaded_app:
            self._run(cycle, app)
            return
        started = time.perf_counter()
        start_record(cycle.scope)
        verdict = self.admission.at_head(cycle.scope)
        if verdict is None:
            record_of(cycle.scope).admitted = True
            self._run(cycle, self._work(cycle, app))
            return
        refusal, overturnable = verdict
        keep = keeps_alive(cycle.scope, self.admission.runtime.draining)
        if keep:
            self.held = Held(cycle, app, refusal, overturnable, started)
        elif overturnable:  # too large to read here: the pipeline refuses it if its own model's queue is full
            record_of(cycle.scope).admitted = True
            self._run(cycle, self._work(cycle, app))
        else:
            self._refuse_here(cycle, refusal, started, keep=False)

    @staticmethod
    def _work(cycle: RequestResponseCycle, app: ASGIApp) -> ASGIApp:
        """A POST to a work endpoint enters at the service's own middleware (`WorkEntry`); any other request
        at `app`."""
        entry = work_entry(app) if is_work(cycle.scope) else None
        framework = None if entry is None else entry.framework()
        if framework is None:
            return app
        cycle.scope["app"] = framework
        return entry.accounting

    def _run(self, cycle: RequestResponseCycle, app: ASGIApp) -> None:
        """Start the app's task on a request, its replies written whole (`_joined`)."""
        super()._start_asgi_task(cycle, self._joined(app))

    def _joined(self, app: ASGIApp) -> ASGIApp:
        """`app` with each reply's head held until its first body message, so that both leave in one write:
        one send(2) less per reply, which on loopback also spares the kernel a segment's receive path
        (docs/architecture.md, "One write per reply"). A JSON reply's body follows its head in the same task
        step; a streamed one's head leaves with its first chunk; a close writes what is held first.

        The wrapped `send` lives in the app's call only. Kept on the cycle (`cycle.send = ...`), it made
        every request's cycle, scope and record a reference cycle that only the garbage collector
        freed: full collections every 0.6 s under load, 20-40 ms each, on the event loop."""
        transport = self.lingering

        async def joined_app(scope: Scope, receive: Receive, send: Send) -> None:
            async def send_joined(message: Any) -> None:
                if message["type"] == "http.response.start":
                    transport.hold()
                    try:
                        await send(message)
                    except BaseException:
                        transport.release()
                        raise
                    return
                try:
                    await send(message)
                finally:
                    transport.release()

            await app(scope, receive, send_joined)

        return joined_app

    def _refuse_here(self, cycle: RequestResponseCycle, refusal: Unavailable, started: float, keep: bool) -> None:
        record = record_of(cycle.scope)
        record.reason, record.sent = refusal.reason, refusal.status
        body = error_body(refusal.code, refusal.text, record.request_id, record.endpoint.protocol == "oip")
        self.transport.write(self._json_response(refusal.status, body, record.request_id, refusal.retry_after,
                                                 close=not keep))
        cycle.response_started = cycle.response_complete = True  # no task holds it: nothing else answers
        account(record, cycle.scope, refusal.status, time.perf_counter() - started, self.log_requests)
        if keep:
            self.on_response_complete()  # keep-alive, the next pipelined request
        else:
            self.transport.close()

    def on_response_complete(self) -> None:
        refused = self.cycle is not None and record_of(self.cycle.scope).sent == 503
        self.refused_in_a_row = self.refused_in_a_row + 1 if refused else 0
        super().on_response_complete()
        pause = refusal_backoff(self.refused_in_a_row, self.limits.retry_after_s)
        if pause and not self.transport.is_closing():
            self.flow.pause_reading()
            self.loop.call_later(pause, self._resume_after_refusal)
        if self.pipeline or not self.cycle.response_complete or self.transport.is_closing():
            return  # a pipelined request still to answer (or none at all)
        if self.refusal_owed is not None:  # every reply owed before the refusal is sent: now the refusal
            self.transport.write(self.refusal_owed)
            self.transport.close()
            return
        self.share.idle(self)

    def _resume_after_refusal(self) -> None:
        if not self.transport.is_closing():
            self.flow.resume_reading()

    # refusals

    def _head_too_large(self) -> None:
        limit = self.limits.max_head_bytes
        self._refuse(431, "header_too_large", f"the request line and headers are larger than {limit} bytes")

    def _check_read(self) -> None:
        """The read timer: nothing to do, a later deadline to wait for, or a request that is late."""
        self.read_timer = None
        if self.read_deadline is None or self.transport.is_closing():
            return
        remaining = self.read_deadline - self.loop.time()
        if remaining > 0:
            self.read_timer = self.loop.call_later(remaining, self._check_read)
            return
        reading_body = not self.in_head and self.cycle is not None and self.cycle.more_body
        if self.in_head or reading_body:
            self._refuse(408, "read_timeout", f"the request did not arrive within {self.limits.read_timeout_s:g} s")
        else:  # nothing sent since the connection opened
            self.transport.close()

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer `status` (unless a reply is already under way) and close the connection; `code` is
        also the reason it is counted under."""
        cycle = self.cycle
        if self.held is not None and self.held.cycle is cycle:  # refused before its body came: now it is late
            record = record_of(cycle.scope)
            record.reason = code
            account(record, cycle.scope, status, time.perf_counter() - self.held.started, self.log_requests)
            self.held = None
        owed = cycle is not None and not cycle.response_complete  # a reply this connection still owes
        if self.in_head:  # the app never saw this request; `cycle` is an earlier (pipelined) one
            if self.refusal_owed is not None:
                return
            metrics.observe_rejected(UNKNOWN_MODEL, code)
            rid = request_id(None)
            reply = self._json_response(status, error_body(code, message, rid), rid)
            if owed:  # answer the requests parsed before this one first (on_response_complete), then refuse
                self.refusal_owed = reply
                self.flow.pause_reading()
                return
            self.transport.write(reply)
        elif owed and not cycle.response_started:  # the app holds this request: it counts it, we answer
            record = record_of(cycle.scope)
            record.status, record.reason = status, code
            body = error_body(code, message, record.request_id)
            self.transport.write(self._json_response(status, body, record.request_id))
        if owed:  # the app's receive() now says http.disconnect, and what it sends is dropped
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    def _json_response(self, status: int, body: dict, rid: str, retry_after: int | None = None,
                       close: bool = True) -> bytes:
        """A whole JSON reply as bytes, for the answers the protocol writes itself."""
        payload = orjson.dumps(body)
        head = [STATUS_LINE[status], b"x-request-id: ", rid.encode(), b"\r\n"]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        if retry_after is not None:
            head += [b"retry-after: ", str(retry_after).encode(), b"\r\n"]
        head += [b"content-type: application/json\r\ncontent-length: ", str(len(payload)).encode(),
                 b"\r\nconnection: close\r\n\r\n" if close else b"\r\n\r\n", payload]
        return b"".join(head)

    async def _over_capacity(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app for a request past the connection cap, or past its peer's share of it: 503 JSON with
        Retry-After, connection closed."""
        metrics.observe_rejected(UNKNOWN_MODEL, "too_many_connections")
        whose = "this client has" if self.share.over(self) else "the server has"
        body = error_body("too_many_connections", f"{whose} too many open connections; retry",
                          record_of(scope).request_id)
        await send_json(send, 503, body, retry_after=self.limits.retry_after_s)

    def _start_read(self) -> None:
        self._read_by(self.loop.time() + self.limits.read_timeout_s)

    def _read_by(self, deadline: float) -> None:
        """The request being read must be in by `deadline` (then `_check_read`). A timer due earlier is kept:
        it re-arms itself for the deadline of the moment when it fires."""
        self.read_deadline = deadline
        if self.read_timer is not None and self.read_timer.when() <= deadline:
            return
        if self.read_timer is not None:
            self.read_timer.cancel()
        self.read_timer = self.loop.call_at(deadline, self._check_read)


def uvicorn_options(settings: Settings, runtime: Runtime | None = None) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.Config` / `uvicorn.run`, shared by one worker and many (a partial
    of a module-level class, so a worker's config can be pickled). With the app's `runtime`, the
    protocol refuses from the head (each worker builds its own; the supervisor's binds the socket only)."""
    limits = HttpLimits(settings.max_header_bytes, settings.read_timeout_s, settings.max_connections,
                        settings.retry_after_s, max_linger_bytes=settings.max_upload_bytes)
    admission = None if runtime is None else Admission(runtime)
    share = ConnectionShare(settings.max_connections, settings.max_client_connections, settings.proxy_addresses)
    protocol = functools.partial(LimitedHttpProtocol, limits=limits, share=share, admission=admission,
                                 log_requests=settings.access_log)
    return {"host": settings.host, "port": settings.port, "loop": "uvloop", "http": protocol, "ws": "none",
            "server_header": False,
            "access_log": False, "timeout_graceful_shutdown": int(settings.drain_timeout_s) + 1}
