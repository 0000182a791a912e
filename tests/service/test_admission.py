"""Admission reads the model where the pipeline does: a form field, the query, or the OIP path."""

from __future__ import annotations

import base64
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import orjson

from erde.export import export_run
from tests.service import images
from tests.service.conftest import eventually

PNG = images.png()
QUEUE = 4
# Every batch takes 0.6 s: two in the inference process and QUEUE waiting fill a model's queue (an SLO of
# a minute: every row is in time, so the queue's room is what refuses; test_waiting.py tests the time).
FLOODABLE = {"max_batch_size": 1, "queue_size": QUEUE, "slow_batch_ms": 600, "hang_timeout_s": 10, "overload": "reject",
             "slo_ms": 60_000}


def post(url: str, params: dict[str, str] | None = None, **fields: str) -> httpx.Response:
    return httpx.post(f"{url}/classify", params=params, data=fields, timeout=30,
                      files={"image": ("a.png", PNG, "image/png")})


def oip_infer(url: str, model: str) -> httpx.Response:
    doc = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(PNG).decode()]}]}
    return httpx.post(f"{url}/v2/models/{model}/infer", json=doc, timeout=30)


def test_a_model_named_in_a_form_field_is_admitted_against_its_own_queue(make_server, tiny_pipeline, tmp_path) -> None:
    store = tmp_path / "store"
    for name in ("toy", "other"):
        export_run(tiny_pipeline.student_run, store, name, "1")
    server = make_server(store=store, **FLOODABLE)
    with ThreadPoolExecutor(QUEUE + 2) as pool:
        flood = [pool.submit(post, server.url) for _ in range(QUEUE + 2)]  # 2 in the process, 4 queued
        eventually(lambda: server.metric("erde_queue_depth", model="toy") == QUEUE)
        assert post(server.url).status_code == 503  # the default model is full ...
        refused_by_path = oip_infer(server.url, "toy")
        # Named twice in the query, the last wins (the framework's reading): weighed against the queue of the
        # model that serves it. Sent while the full model surely still is (each answer takes 0.6 s).
        by_query_twice = post(server.url, params=[("model", "toy"), ("model", "other")])
        by_form = post(server.url, model="other")  # ... and the model the form names is idle
        by_query = post(server.url, params={"model": "other"})
        by_path = oip_infer(server.url, "other")  # the Open Inference Protocol names it in the path
        assert all(f.result().status_code == 200 for f in flood)
    assert (by_form.status_code, by_form.json()["model"]) == (200, "other"), by_form.text
    assert (by_query.status_code, by_query.json()["model"]) == (200, "other"), by_query.text
    assert by_query_twice.status_code == 200 and by_query_twice.json()["model"] == "other", by_query_twice.text
    assert (by_path.status_code, by_path.json()["model_name"]) == (200, "other"), by_path.text
    assert refused_by_path.status_code == 503 and refused_by_path.headers["retry-after"]
    assert isinstance(refused_by_path.json()["error"], str)  # in the protocol's own error shape
    eventually(lambda: server.metric("erde_rejected_total", model="toy", reason="queue_full") == 2)
    assert server.metric("erde_rejected_total", model="other") == 0


def test_a_full_model_named_in_a_form_field_is_refused_under_its_own_name(make_server, tiny_pipeline,
                                                                          tmp_path) -> None:
    store = tmp_path / "store"
    for name in ("toy", "other"):
        export_run(tiny_pipeline.student_run, store, name, "1")
    server = make_server(store=store, **FLOODABLE)
    with ThreadPoolExecutor(QUEUE + 2) as pool:
        flood = [pool.submit(post, server.url, model="other") for _ in range(QUEUE + 2)]
        eventually(lambda: server.metric("erde_queue_depth", model="other") == QUEUE)
        refused = post(server.url, model="other")
        assert all(f.result().status_code == 200 for f in flood)
    assert refused.status_code == 503 and refused.headers["retry-after"], refused.text
    assert refused.json()["error"]["code"] == "overloaded"
    eventually(lambda: server.metric("erde_rejected_total", model="other", reason="queue_full") == 1)
    assert server.metric("erde_rejected_total", model="toy") == 0


def head_and_body(png: bytes) -> tuple[bytes, bytes]:
    """A multipart /classify request as its head and its body, to send in two writes as a slow client does."""
    body = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--b--\r\n")
    head = (b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    return head, body


def status_of_reply(sock: socket.socket) -> int:
    head = b""
    while b"\r\n" not in head:
        chunk = sock.recv(65536)
        assert chunk, "closed without a reply"
        head += chunk
    return int(head.split(b" ", 2)[1])


def test_a_refused_client_that_does_not_keep_alive_gets_its_connection_closed(make_server) -> None:
    """An HTTP/1.0 client (ApacheBench is one) and one that says `Connection: close` learn that the reply has
    ended when the connection closes. A refusal from the head kept their connections open, with no
    `Connection: close`, so each waited for the keep-alive timeout after its 503."""
    server = make_server(**FLOODABLE)
    head, body = head_and_body(PNG)
    address = ("127.0.0.1", int(server.url.rsplit(":", 1)[1]))
    replies = []
    with ThreadPoolExecutor(QUEUE + 2) as pool:
        flood = [pool.submit(post, server.url) for _ in range(QUEUE + 2)]
        eventually(lambda: server.metric("erde_queue_depth", model="toy") == QUEUE)
        closing = (head.replace(b"HTTP/1.1", b"HTTP/1.0"), head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        for request in closing:
            with socket.create_connection(address, timeout=2) as sock:  # a reply left open times out here
                # A request pipelined behind the one that asked to close is dropped: one reply, then the close.
                sock.sendall(request + body + head + body)
                replies.append(read_until_closed(sock))
        assert all(f.result().status_code == 200 for f in flood)
    for reply in replies:
        assert reply.startswith(b"HTTP/1.1 503 ") and b"\r\nconnection: close\r\n" in reply.lower(), reply[:300]
        assert reply.endswith(b"}") and reply.count(b"HTTP/1.1 ") == 1, reply[-300:]  # one whole reply, then the close
    assert "Traceback" not in server.log.read_text()


def test_a_request_admitted_from_its_head_keeps_its_place_until_its_body_comes(make_server) -> None:
    # 1 s a batch, two batches in the process and one row queued leave room for one more row.
    server = make_server(max_batch_size=1, queue_size=2, slow_batch_ms=1000, hang_timeout_s=10, overload="reject",
                         slo_ms=60_000)
    with ThreadPoolExecutor(3) as pool:
        fill = [pool.submit(post, server.url) for _ in range(3)]
        eventually(lambda: server.metric("erde_queue_depth", model="toy") == 1)
        head, body = head_and_body(PNG)
        with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10) as slow:
            slow.sendall(head)  # admitted from its head: its body is on the way
            eventually(lambda: server.metric("erde_inflight_requests") == 4)
            newcomer = post(server.url)  # the last row's room is the slow client's
            slow.sendall(body)
            status = status_of_reply(slow)
        assert all(f.result().status_code == 200 for f in fill)
    assert newcomer.status_code == 503 and newcomer.json()["error"]["code"] == "overloaded", newcomer.text
    assert status == 200


def test_heads_read_together_by_an_idle_model_are_all_admitted(make_server) -> None:
    # Three heads before any body: the process's two free slots take two of the rows at once, the queue of
    # one the third. Counted all as queued while held, the second and third were refused "queue full"
    # against an idle model (a fresh clone's `make test` lost tests/service/test_faults.py's setup so).
    server = make_server(max_batch_size=1, queue_size=1, slow_batch_ms=300, hang_timeout_s=10, overload="reject",
                         slo_ms=60_000)
    head, body = head_and_body(PNG)
    address = ("127.0.0.1", int(server.url.rsplit(":", 1)[1]))
    socks = [socket.create_connection(address, timeout=10) for _ in range(3)]
    try:
        for sock in socks:
            sock.sendall(head)
        eventually(lambda: server.metric("erde_inflight_requests") == 3)  # all three admitted from their heads
        for sock in socks:
            sock.sendall(body)
        assert [status_of_reply(sock) for sock in socks] == [200, 200, 200]
    finally:
        for sock in socks:
            sock.close()


def test_a_request_that_ends_before_its_rows_are_queued_gives_its_place_back(make_server) -> None:
    server = make_server(max_batch_size=1, queue_size=1, slow_batch_ms=200, hang_timeout_s=10, overload="reject",
                         slo_ms=60_000)
    for _ in range(3):  # admitted from the head, then refused by the pipeline: a form without an image
        reply = httpx.post(f"{server.url}/classify", files={"other": ("a.txt", b"x", "text/plain")}, timeout=30)
        assert reply.status_code == 422, reply.text
    assert post(server.url).status_code == 200
    eventually(lambda: server.metric("erde_inflight_requests") == 0)


def read_until_closed(sock: socket.socket) -> bytes:
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    return reply


def with_expect(head: bytes) -> bytes:
    return head.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n")


def test_a_client_waiting_for_100_continue_is_never_held_for_its_body(make_server) -> None:
    """A client that sends `Expect: 100-continue` sends its body only once told to (curl does for large
    uploads). Held for its body, a refusal from the head waited for a body that was not coming, until the read
    timeout answered 408. Now the request the query sends to a full model is refused at once, connection
    closed; one whose form may name another model is told to go on, and its form decides."""
    server = make_server(**FLOODABLE, read_timeout_s=5)
    head, body = head_and_body(PNG)
    address = ("127.0.0.1", int(server.url.rsplit(":", 1)[1]))
    with ThreadPoolExecutor(QUEUE + 2) as pool:
        flood = [pool.submit(post, server.url) for _ in range(QUEUE + 2)]
        eventually(lambda: server.metric("erde_queue_depth", model="toy") == QUEUE)
        with socket.create_connection(address, timeout=2) as sock:
            sock.sendall(with_expect(head.replace(b"/classify ", b"/classify?model=toy ")))
            named = read_until_closed(sock)  # without ever sending the body
        with socket.create_connection(address, timeout=2) as sock:
            sock.sendall(with_expect(head))
            go_on = sock.recv(65536)
            sock.sendall(body)
            formed = status_of_reply(sock) if go_on.startswith(b"HTTP/1.1 100 ") else None
        assert all(f.result().status_code == 200 for f in flood)
    assert named.startswith(b"HTTP/1.1 503 "), named[:200]
    assert b"\r\nretry-after: " in named.lower() and b"\r\nconnection: close\r\n" in named.lower()
    assert go_on.startswith(b"HTTP/1.1 100 Continue\r\n"), go_on[:200]
    assert formed == 503  # the form names no model: the default one, full


def test_a_client_waiting_for_100_continue_is_told_to_send_its_body_when_admitted(make_server) -> None:
    server = make_server()
    head, body = head_and_body(PNG)
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(with_expect(head))
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(body)
        assert status_of_reply(sock) == 200


def test_an_oip_client_waiting_for_100_continue_is_refused_at_once(make_server) -> None:
    """The Open Inference Protocol names its model in the path: refused from the head, a client that waits
    for `100 Continue` gets its 503 at once, in the protocol's own error shape, and the connection closes."""
    server = make_server(**FLOODABLE, read_timeout_s=5)
    doc = orjson.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                    "data": [base64.b64encode(PNG).decode()]}]})
    head = (b"POST /v2/models/toy/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(doc))
    with ThreadPoolExecutor(QUEUE + 2) as pool:
        flood = [pool.submit(post, server.url) for _ in range(QUEUE + 2)]
        eventually(lambda: server.metric("erde_queue_depth", model="toy") == QUEUE)
        with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=2) as sock:
            sock.sendall(head)  # the JSON body waits for 100 Continue
            reply = read_until_closed(sock)
        assert all(f.result().status_code == 200 for f in flood)
    assert reply.startswith(b"HTTP/1.1 503 "), reply[:200]
    assert b"\r\nretry-after: " in reply.lower() and b"\r\nconnection: close\r\n" in reply.lower()
    assert isinstance(orjson.loads(reply.split(b"\r\n\r\n", 1)[1])["error"], str)
