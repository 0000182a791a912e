"""HTTP conformance (issue 20, findings 6 and 7): replies owed before a parse error are sent, one
Host header in host[:port] form, an absolute-form target checked as Host, HTTP/0.9 and CONNECT
refused with a reply, HEAD wherever GET works. Each probe runs with /healthz watched and a
bystander's /classify (tests/service/contained.py)."""

from __future__ import annotations

import re
import socket
import time

import httpx
import orjson
import pytest

from bench.probes import exchange
from tests.service import images
from tests.service.conftest import Server
from tests.service.contained import contained

PNG = images.png()


def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def read_all(port: int, payload: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """Everything the server sends on one connection until it closes it, and how long that took."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        started = time.perf_counter()
        sock.sendall(payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data, time.perf_counter() - started


def statuses(data: bytes) -> list[int]:
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


def json_error(reply, status: int, code: str) -> None:
    assert reply.status == status, reply.head
    assert orjson.loads(reply.body)["error"]["code"] == code, reply.body


# ---- 6. a malformed request pipelined behind good ones: their replies first, then 400 and close ----

def classify_request() -> bytes:
    return (b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            b"Content-Length: " + str(len(PNG)).encode() + b"\r\n\r\n" + PNG)


@pytest.mark.parametrize("count", [1, 3])
def test_a_client_that_half_closes_after_its_requests_gets_every_reply(server: Server, count: int) -> None:
    """`printf 'POST ...' | nc host port` sends the request, then a FIN (a half-close: the client still
    reads). The transport closed at the FIN, and the replies, computed and counted 200, never went out."""
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as sock:
        sock.sendall(classify_request() * count)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):  # until the server closes (else the 10 s timeout raises)
            data += chunk
    # Every reply, then the close. (`Connection: close` is on the last reply only when the FIN was read before
    # its head went out: a fresh clone's run read it after, and the connection closed all the same.)
    assert statuses(data) == [200] * count, data[-300:]


@pytest.mark.parametrize("good", [1, 3])
def test_replies_owed_before_a_parse_error_are_sent_then_it_is_refused(server: Server, good: int) -> None:
    """The good requests' replies used to be dropped and the connection closed with no byte sent."""
    payload = classify_request() * good + b"GARBAGE / NOT-HTTP\r\n\r\n"
    data, seconds = contained(server, lambda: read_all(port_of(server), payload), seconds=2.0)
    assert statuses(data) == [200] * good + [400], data[-300:]
    assert re.search(rb'"malformed_http","message":"the request is not valid HTTP/1.1","request_id":"[0-9a-f]{16}"}}$',
                     data) and seconds < 2.0


def test_a_good_request_then_an_oversized_head_gets_its_reply_then_431(server: Server) -> None:
    payload = classify_request() + b"GET /healthz HTTP/1.1\r\nX: " + b"x" * 70_000 + b"\r\n\r\n"
    data, _ = read_all(port_of(server), payload)
    assert statuses(data) == [200, 431], data[-300:]


# ---- 7. Host and the request line ----

HOSTS = {  # Host value -> status; the allow-list is ["localhost"] and IP literals
    "[::1]evil.com": 400, "[::1]@evil.com": 400, "localhost:abc": 400, "localhost@evil.com": 400,
    "localhost:80@evil.com": 400, "evil.com#localhost": 400, "local host": 400, "[127.0.0.1]": 400,
    "[::1": 400, "localhost:123456": 400, "localhost:8000": 200, "[::1]:8000": 200, "[::1]": 200,
    "127.0.0.1": 200, "LOCALHOST.": 200,
}


def get(path: str, *headers: str, target: str | None = None) -> bytes:
    lines = [f"GET {target or path} HTTP/1.1", *headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize("host", HOSTS)
def test_host_values_follow_the_host_port_grammar(server: Server, host: str) -> None:
    reply = exchange(port_of(server), get("/models", f"Host: {host}"))
    if HOSTS[host] == 400:
        json_error(reply, 400, "invalid_host")
    else:
        assert reply.status == 200, reply.body


def test_two_host_headers_are_refused(server: Server) -> None:
    """The first one used to count: a second, unchecked name rode along."""
    reply = contained(server, lambda: exchange(port_of(server), get("/models", "Host: localhost", "Host: evil.com")),
                      seconds=1.0)
    json_error(reply, 400, "invalid_host")
    json_error(exchange(port_of(server), get("/models", "Host: localhost", "Host: localhost")), 400, "invalid_host")


def test_an_absolute_form_target_is_checked_as_the_host(server: Server) -> None:
    port = port_of(server)
    evil = contained(server, lambda: exchange(port, get("/models", "Host: localhost",
                                                        target="http://evil.example/models")), seconds=1.0)
    json_error(evil, 400, "invalid_host")
    ours = exchange(port, get("/healthz", "Host: evil.example", target=f"http://localhost:{port}/healthz?x=1"))
    assert ours.status == 200 and orjson.loads(ours.body) == {"status": "ok"}, ours.head


@pytest.mark.parametrize("payload", [
    b"GET /healthz\r\n", b"GET /healthz\r\n\r\n", b"GET /healthz\r\nHost: localhost\r\n\r\n",
    b"CONNECT localhost:443 HTTP/1.1\r\nHost: localhost:443\r\n\r\n",
], ids=["HTTP/0.9 line", "HTTP/0.9 line, blank line", "HTTP/0.9 with a header", "CONNECT"])
def test_http09_and_connect_get_400_at_once(server: Server, payload: bytes) -> None:
    """A bare HTTP/0.9 line was answered 200 (or waited for the read timeout); CONNECT got no reply."""
    reply = contained(server, lambda: exchange(port_of(server), payload, timeout=5), seconds=1.0)
    json_error(reply, 400, "malformed_http")
    assert reply.closed and reply.seconds < 1.0


def get_routes(server: Server) -> list[str]:
    """Every GET route: the documented ones from OpenAPI (a model and version filled in), and the rest."""
    with server.client() as c:
        spec = c.get("/openapi.json").json()
    paths = [p.replace("{name}", "toy").replace("{version}", "1") for p, ops in spec["paths"].items() if "get" in ops]
    return [*paths, "/metrics", "/", "/ui", "/stats", "/docs", "/redoc", "/openapi.json", "/no-such-path"]


def test_head_is_answered_wherever_get_is(server: Server) -> None:
    """HEAD got 405 on every route."""
    with httpx.Client(base_url=server.url, timeout=10) as c:
        for path in get_routes(server):
            got, head = c.get(path), c.head(path)
            assert head.status_code == got.status_code, (path, head.status_code, got.status_code)
            assert head.content == b"" and head.headers.get("content-type") == got.headers.get("content-type"), path
        post_only = c.head("/classify")
    assert post_only.status_code == 405 and post_only.content == b""
