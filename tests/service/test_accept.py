"""Connections queued in the kernel are accepted at each turn of a loaded event loop, all of them
(service/server/accept.py), not one per turn as libuv does."""

from __future__ import annotations

import selectors
import socket
import time

from tests.service.conftest import Server

CONNECTIONS = 300


def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def seconds_until_all_answered(server: Server, n: int) -> float:
    """Open `n` connections at once, each sending one request; seconds until every reply's head is in."""
    started = time.monotonic()
    socks = [socket.create_connection(("127.0.0.1", port_of(server)), timeout=30) for _ in range(n)]
    try:
        with selectors.DefaultSelector() as selector:
            for sock in socks:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ, b"")
            waiting = n
            while waiting:
                events = selector.select(timeout=30)
                assert events, f"{waiting} of {n} connections not answered within 30 s"
                for key, _ in events:
                    data = key.data + key.fileobj.recv(65536)
                    if b"\r\n\r\n" in data:
                        assert data.startswith(b"HTTP/1.1 200"), data[:100]
                        selector.unregister(key.fileobj)
                        waiting -= 1
                    else:
                        selector.modify(key.fileobj, selectors.EVENT_READ, data)
        return time.monotonic() - started
    finally:
        for sock in socks:
            sock.close()


def test_a_loaded_loop_accepts_every_queued_connection_at_each_turn(make_server) -> None:
    # Every turn of this server's loop takes 10 ms or more, as under load: one connection accepted per
    # turn would take 3 s or more for 300.
    server = make_server(slow_loop_ms=10, stall_period_ms=0)
    took = seconds_until_all_answered(server, CONNECTIONS)
    assert took < 1.0, f"{CONNECTIONS} connections answered after {took:.2f} s"


def test_connections_accepted_in_one_turn_are_all_answered_past_the_cap(make_server) -> None:
    # Six clients each send a request at once to a loaded loop with a cap of 4: all six are accepted in
    # one turn and opened before any is read, so the first ones looked idle, and opening the later ones
    # closed them to make room, their requests unread and never answered. Each gets a reply now: 200,
    # or the JSON 503 of the cap.
    server = make_server(slow_loop_ms=10, stall_period_ms=0, max_connections=4)
    socks = [socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) for _ in range(6)]
    try:
        for sock in socks:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        heads = []
        for sock in socks:
            reply = b""
            while b"\r\n\r\n" not in reply and (chunk := sock.recv(65536)):
                reply += chunk
            heads.append(reply.split(b"\r\n", 1)[0])
    finally:
        for sock in socks:
            sock.close()
    assert all(head in (b"HTTP/1.1 200 OK", b"HTTP/1.1 503 Service Unavailable") for head in heads), heads
