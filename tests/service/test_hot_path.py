"""What the hot path skips, and that it answers the same: the work endpoints dispatched past the
framework's routing (service/api/routes.py, `WorkDispatch`), and a reply's head and body in one write
(service/edge/protocol.py, `LingeringTransport.hold`)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from service.api.routes import WorkDispatch
from service.edge.middleware import AllowedHosts, RequestAccounting
from service.edge.protocol import LimitedHttpProtocol, LingeringTransport, work_entry
from service.endpoints import WORK
from tests.service import images
from tests.service.conftest import Server


def test_every_work_endpoint_is_dispatched_past_the_framework(toy_store) -> None:
    """The app's dispatch finds a handler for every work endpoint of the table: an included router
    that hides its routes (as FastAPI's `_IncludedRouter` does) would leave the dispatch empty."""
    from service.server.app import create_app
    from service.settings import Settings

    app = create_app(Settings(store=toy_store))
    (found,) = [m for m in app.user_middleware if m.cls is WorkDispatch]
    assert set(WorkDispatch(app.router, *found.args, **found.kwargs).handlers) == WORK


def test_a_work_request_enters_at_the_services_own_middleware_inside_the_built_stack(toy_store) -> None:
    """The protocol hands a POST to a work endpoint to the accounting middleware of the app uvicorn loaded
    (`work_entry`), past the framework's own layers: the same instances the framework's stack calls."""
    from service.server.app import create_app
    from service.settings import Settings

    app = create_app(Settings(store=toy_store))
    loaded = ProxyHeadersMiddleware(app)  # as uvicorn wraps it
    assert work_entry(loaded) is None  # the framework builds its stack when the lifespan starts
    app.middleware_stack = app.build_middleware_stack()
    entry = work_entry(loaded)
    assert entry is not None and entry.framework() is app and isinstance(entry.accounting, RequestAccounting)
    assert work_entry(loaded) is entry  # found once
    chain, node = [], entry.accounting
    while not isinstance(node, WorkDispatch):
        chain.append(type(node))
        node = node.app
    assert chain[:2] == [RequestAccounting, AllowedHosts]  # the Host check and admission stay on the way
    outer, node = [], app.middleware_stack
    while node is not entry.accounting:
        outer.append(type(node).__name__)
        node = node.app
    assert outer  # what a work request skips: the framework's error, telemetry and body-limit layers


def test_errors_through_the_dispatch_keep_each_protocols_shape(server: Server) -> None:
    png = images.png()
    with server.client() as c:
        ours = c.post("/classify", params={"budget": "2"}, files={"image": ("x.png", png, "image/png")})
        oip = c.post("/v2/models/no-such-model/infer", json={"inputs": []})
        unknown = c.post("/classify", params={"model": "no-such-model"},
                         files={"image": ("x.png", png, "image/png")})
    assert ours.status_code == 422 and ours.json()["error"]["code"] == "invalid_option"
    assert ours.json()["error"]["request_id"] == ours.headers["x-request-id"]
    assert oip.status_code == 404 and isinstance(oip.json()["error"], str)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_model"


class Recorder:
    """A transport that records its writes."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.writes.append(b"<eof>")

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True


def joined_send(recorder: Recorder) -> Any:
    """The `send` an app wrapped by `LimitedHttpProtocol._joined` is given, around one that writes as
    uvicorn's does: the head on start, each body message as it comes, a close after the last one when the
    connection does not stay open."""
    loop = asyncio.new_event_loop()
    transport = LingeringTransport(recorder, loop, 1024)  # type: ignore[arg-type]

    class Protocol:
        lingering = transport

    async def uvicorn_send(message: dict) -> None:
        if message["type"] == "http.response.start":
            transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        else:
            transport.write(message["body"])
            if message.get("close"):
                transport.close()

    given: list[Any] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        given.append(send)

    asyncio.run(LimitedHttpProtocol._joined(Protocol(), app)({}, None, uvicorn_send))  # type: ignore[arg-type]
    return given[0]


def test_a_replys_head_and_body_leave_in_one_write() -> None:
    recorder = Recorder()
    send = joined_send(recorder)
    asyncio.run(send({"type": "http.response.start", "status": 200}))
    assert recorder.writes == []  # held for the body
    asyncio.run(send({"type": "http.response.body", "body": b"{}"}))
    assert recorder.writes == [b"HTTP/1.1 200 OK\r\n\r\n{}"]
    asyncio.run(send({"type": "http.response.body", "body": b"later"}))  # past the first: written at once
    assert recorder.writes[-1] == b"later"


def test_a_close_writes_the_held_head_before_its_fin() -> None:
    recorder = Recorder()
    send = joined_send(recorder)
    asyncio.run(send({"type": "http.response.start", "status": 200}))
    asyncio.run(send({"type": "http.response.body", "body": b"{}", "close": True}))
    assert recorder.writes == [b"HTTP/1.1 200 OK\r\n\r\n{}", b"<eof>"]


def test_replies_read_whole_on_a_kept_alive_connection(server: Server) -> None:
    """Many replies on one connection, small and large (a /metrics page), each read whole."""
    png = images.png()
    with httpx.Client(base_url=server.url) as c:
        for _ in range(20):
            assert c.post("/classify", files={"image": ("x.png", png, "image/png")}).json()["exit"] >= 0
            page = c.get("/metrics")
            assert page.status_code == 200 and "erde_requests_total" in page.text


def test_a_request_leaves_nothing_for_the_garbage_collector(server: Server) -> None:
    """A request's objects are freed by reference counting as its reply goes. Held in a reference cycle
    (its cycle kept a wrapped `send` that pointed back at it), every request's cycle, scope and record
    waited for the cyclic collector, whose full passes stopped the event loop for 20-40 ms every 0.6 s
    under load."""
    png = images.png()

    def collected() -> float:
        return server.metric("python_gc_objects_collected_total")

    with server.client() as c:
        for _ in range(20):  # the first requests fill caches and import lazily
            c.post("/classify", files={"image": ("x.png", png, "image/png")})
        before = collected()
        for _ in range(300):
            assert c.post("/classify", files={"image": ("x.png", png, "image/png")}).status_code == 200
        after = collected()
    assert after - before < 300, f"{after - before:.0f} objects the collector freed over 300 requests"
