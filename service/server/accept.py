"""Every queued connection accepted at each turn of the event loop, not one.

libuv (since 1.45, the one uvloop 0.22 carries) accepts one connection per readiness of a listening
socket and relies on the next poll for the next one: one connection per turn of the event loop. A
loaded loop turns every 10-30 ms, so it took 50-100 new connections a second while hundreds waited in
the kernel's accept queue for seconds, and past the queue's length new clients' SYNs were dropped and
retried 1, 3 and 7 s later (reports/overload.md: at 1.5x the student's capacity, 800 connections
queued for 6 s). An accepted connection can be answered, or refused with a readable 503 at once; one
left in the queue cannot. So `AcceptQueued` watches a duplicate of each listening socket and, at every
turn, accepts what is queued (at most `PER_TURN`), handing each connection to the loop as uvicorn's own
server would (`loop.connect_accepted_socket`, the same protocol factory). The connection cap and its
fair share (service/edge/protocol.py, service/edge/fairness.py) still bound what is kept open.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable, Iterable

log = logging.getLogger("erde.service")

PER_TURN = 128  # connections accepted per turn of the loop, at most: about 4 ms of protocol set-up
RETRY_S = 0.1  # out of file descriptors: wait this long before accepting again
TRANSIENT = (errno.ECONNABORTED, errno.EPROTO, errno.EPERM)  # that connection is gone: go on with the next


class AcceptQueued:
    def __init__(self, loop: asyncio.AbstractEventLoop, listeners: Iterable[socket.socket],
                 protocol_factory: Callable[[], asyncio.Protocol]) -> None:
        self.loop = loop
        self.factory = protocol_factory
        self.sockets = [socket.socket(fileno=os.dup(s.fileno())) for s in listeners]
        self.starting: set[asyncio.Task] = set()
        for sock in self.sockets:
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(PER_TURN):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in TRANSIENT:
                    continue
                log.warning("accepting connections paused for %g s: %s", RETRY_S, exc)  # EMFILE, ENFILE, ENOBUFS
                self.loop.remove_reader(sock.fileno())
                self.loop.call_later(RETRY_S, self._resume, sock)
                return
            conn.setblocking(False)
            task = self.loop.create_task(self.loop.connect_accepted_socket(self.factory, conn))
            self.starting.add(task)
            task.add_done_callback(self._started)

    def _started(self, task: asyncio.Task) -> None:
        self.starting.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the client left before its transport was made
            log.debug("an accepted connection could not start: %s", task.exception())

    def _resume(self, sock: socket.socket) -> None:
        if sock.fileno() != -1:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop accepting here (the listening sockets themselves are the server's to close)."""
        for sock in self.sockets:
            if sock.fileno() != -1:
                self.loop.remove_reader(sock.fileno())
                sock.close()
