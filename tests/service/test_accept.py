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
