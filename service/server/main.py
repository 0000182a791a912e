"""`erde serve`: run the service under uvicorn, draining on SIGTERM, with one worker or many.

SIGTERM (or Ctrl-C) first turns /readyz to 503 and refuses new work with 503 + Retry-After,
while queued and in-flight requests are answered. Once idle (or after `drain_timeout_s`) the
listening socket stops taking connections (`stop_taking_connections`), the ones it already queued
get their 503 during a short last call, and uvicorn shuts down as usual. A second signal skips the
drain (`DrainingServer.handle_exit`). SIGHUP reloads the store.

With `workers` > 1 a small supervisor (`Supervisor`) binds the socket, starts the workers (each
a whole one-worker service: app, inference processes, `DrainingServer`) and gives every signal
the same meaning as with one worker: SIGHUP is forwarded, so each worker verifies, warms and
swaps in place; SIGTERM/SIGINT are forwarded once, so each worker drains, and the supervisor
exits when all have; a worker that dies is replaced. uvicorn's own supervisor restarts workers
on SIGHUP and stops them with its plain server, which does not drain.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import multiprocessing
import os
import signal
import socket
import struct
import time
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from prometheus_client import multiprocess
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Process

from service.engine import forkserver
from service.server.accept import AcceptQueued
from service.server.multiproc import prepare_metrics_dir
from service.settings import ENGINE_GROUP, Settings, get_settings

if TYPE_CHECKING:
    from service.engine.runtime import Runtime

log = logging.getLogger("erde.service")
# Even an idle server drains this long: a client (or a load balancer's pool) that sends on a kept-alive
# connection meanwhile gets a 503 with `Connection: close` instead of a connection closed under its
# request (the rolling-update test lost 1 request in 8,466 when the server left 60 ms after SIGTERM).
MIN_DRAIN_S = 1.0
# Closing a listening socket resets every connection still in its accept queue: their clients had
# already sent a request and get no reply (CI lost 2 of 1,576 so, clients retrying a 503 as the
# server left). So the socket first stops taking connections, and what it queued before is accepted
# and answered during this last call; a new client's SYN is dropped, and its retry is refused once
# the socket is closed, or reaches another instance: either way it knows nothing was sent.
LAST_CALL_S = 0.25
SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
# A classic BPF socket filter that drops the packets opening a connection (SYN without ACK) and keeps the
# rest. A filter on a TCP socket sees the packet from its TCP header, whose byte 13 holds the flags.
# Dropping every packet (the filter this replaced) also dropped the last ACK of a handshake under way:
# its client, connected, sent its request into a connection that never reached the accept queue, and
# was reset when the socket closed (CI: 1 request in about 1,000 of a pool through a drain).
_SYN_ONLY = (
    (0x30, 0, 0, 13),  # BPF_LD | BPF_B | BPF_ABS: A = the TCP flags
    (0x54, 0, 0, 0x12),  # BPF_ALU | BPF_AND | BPF_K: A &= SYN | ACK
    (0x15, 0, 1, 0x02),  # BPF_JMP | BPF_JEQ | BPF_K: SYN alone? then the next instruction, else the one after
    (0x06, 0, 0, 0),  # BPF_RET | BPF_K: drop
    (0x06, 0, 0, 0xFFFFFFFF),  # BPF_RET | BPF_K: keep all of it
)
_DROP_NEW = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in _SYN_ONLY), 8 * len(_SYN_ONLY))


def stop_taking_connections(sock: socket.socket) -> bool:
    """Make the kernel drop new connections to a listening socket, keeping those it has queued for
    `accept` and those whose handshake is under way (the filter lets all but a first SYN through). The
    socket is shared with every worker holding it. Linux only: elsewhere returns False and the socket is
    left as is."""
    program = struct.pack("HL", len(_SYN_ONLY), ctypes.addressof(_DROP_NEW))  # struct sock_fprog {len; filter *}
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, program)
    except OSError as exc:
        log.warning("cannot stop the listening socket taking connections (%s): those queued at exit reset", exc)
        return False
    return True


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime, drain_timeout: float) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.drain_timeout = drain_timeout
        self.drain_deadline: float | None = None
        self.last_call_ends: float | None = None  # set once the listener stops taking connections
        self.accepting: AcceptQueued | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit or not self.started:
            return
        config = self.config
        factory = functools.partial(config.http_protocol_class, config=config, server_state=self.server_state,
                                    app_state=self.lifespan.state)  # the protocol uvicorn's own server makes
        listeners = [sock for server in self.servers for sock in server.sockets]
        self.accepting = AcceptQueued(asyncio.get_running_loop(), listeners, factory)  # type: ignore[arg-type]

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.accepting is not None:
            self.accepting.close()
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """SIGTERM and SIGINT (uvicorn's only exit signals): the first drains; the second shuts down now, as
        uvicorn does (connections closed, the requests running answered, the app's shutdown run); a third
        does not wait for those requests either. Not recorded as uvicorn's own handler does, which raises the
        signal again once stopped: a Ctrl-C pressed twice ended in a KeyboardInterrupt traceback."""
        if self.drain_deadline is None:
            log.info("draining: finishing queued and in-flight requests")
            self.runtime.draining = True
            self.drain_deadline = time.monotonic() + self.drain_timeout
            return
        log.info("another signal: %s", "not waiting for the requests running" if self.should_exit else
                 "shutting down now, without the rest of the drain")
        self.force_exit = self.should_exit
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            now = time.monotonic()
            if self.last_call_ends is None:
                drained_for = now - (self.drain_deadline - self.drain_timeout)
                idle = self.runtime.idle() and drained_for >= min(MIN_DRAIN_S, self.drain_timeout)
                if idle or now > self.drain_deadline:
                    self._last_call(now)
            elif now >= self.last_call_ends and (self.runtime.idle() or now > self.drain_deadline):
                self.should_exit = True
        return await super().on_tick(counter)

    def _last_call(self, now: float) -> None:
        listeners = [sock for server in self.servers for sock in server.sockets]
        if all([stop_taking_connections(sock) for sock in listeners]):  # type: ignore[arg-type]
            log.info("drained: no new connections; answering those already queued")
            self.last_call_ends = now + LAST_CALL_S
        else:
            self.last_call_ends = now


def draining_server(settings: Settings) -> DrainingServer:
    # After the multiprocess directory is set, never before; and never in a supervisor of several workers,
    # which binds the socket and forwards signals: importing the app there (torch with it) cost 341 MB PSS.
    if not settings.shares_processes("cuda"):  # its own inference processes, whatever the device: its own
        forkserver.start()  # fork server, importing torch beside the app's import instead of after it
    from service.edge.protocol import uvicorn_options
    from service.server.app import create_app

    app = create_app(settings)
    return DrainingServer(uvicorn.Config(app, **uvicorn_options(settings, app.state.runtime)), app.state.runtime,
                          settings.drain_timeout_s)


class WorkerProcess(Process):
    """One worker of several: a whole service with its own `DrainingServer`, built in the child."""

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # runs in the child
        os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor alone, which forwards it once
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the app's reload handler is in place
        self._server = draining_server(get_settings())
        super().target(sockets)


class Supervisor:
    """Starts `workers` service processes on one socket and forwards signals to them (see the module doc)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Only to bind the socket: each worker builds its own server and its options (`WorkerProcess.target`).
        self.config = uvicorn.Config("service.server.app:create_app", factory=True, host=settings.host,
                                     port=settings.port)
        self.processes: list[WorkerProcess] = []
        self.sockets: list[socket.socket] = []
        self.signals: list[int] = []
        self.ready: set[int] = set()  # pids of workers that have finished starting
        self.reload_owed: set[int] = set()  # pids of workers a SIGHUP has not reached yet
        self.stopping = False

    def run(self) -> None:
        os.environ[ENGINE_GROUP] = str(os.getpid())  # the workers find the inference processes they share by it
        sockets = self.sockets = [self.config.bind_socket()]
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda sig, frame: self.signals.append(sig))
        self.processes = [self._start(sockets) for _ in range(self.settings.workers)]
        log.info("supervisor %d started %d workers", os.getpid(), len(self.processes))
        while self.processes:
            time.sleep(0.1)
            self._handle_signals()
            self._note_ready()
            self._reap(sockets)
        for sock in sockets:
            sock.close()  # a no-op when already closed by the drain
        log.info("supervisor %d: every worker has exited", os.getpid())

    def _start(self, sockets: list[socket.socket]) -> WorkerProcess:
        process = WorkerProcess(self.config, sockets)
        process.start()
        return process

    def _note_ready(self) -> None:
        """Remember which workers have finished starting (asked over uvicorn's health pipe), and give
        each the SIGHUP it is owed once it can take one (a starting worker has no handler yet)."""
        for process in self.processes:
            if process.pid not in self.ready and process.is_ready(timeout=0.01):
                self.ready.add(process.pid)
            if process.pid in self.ready and process.pid in self.reload_owed and process.process.is_alive():
                self.reload_owed.discard(process.pid)
                os.kill(process.pid, signal.SIGHUP)

    def _handle_signals(self) -> None:
        while self.signals:
            sig = self.signals.pop(0)
            if sig == signal.SIGHUP:
                log.info("SIGHUP: every worker reloads the store")
                self.reload_owed = {p.pid for p in self.processes}
                self._note_ready()
            elif not self.stopping:
                log.info("draining every worker")
                self._stop_all()
            else:
                log.info("second signal: stopping every worker now")
                self._forward(signal.SIGINT)

    def _stop_all(self) -> None:
        """Drain every worker. The supervisor's copy of the listening socket closes now: held open, it
        would queue connections no worker accepts any more, and reset them when the supervisor exits."""
        self.stopping = True
        for sock in self.sockets:
            sock.close()
        self._forward(signal.SIGTERM)

    def _forward(self, sig: int) -> None:
        for process in self.processes:
            if process.process.is_alive():
                os.kill(process.pid, sig)

    def _reap(self, sockets: list[socket.socket]) -> None:
        """Forget workers that have exited; replace them unless stopping (or unless they never started)."""
        for index, process in reversed(list(enumerate(self.processes))):
            if process.process.is_alive():
                continue
            process.join()
            del self.processes[index]
            multiprocess.mark_process_dead(process.pid)  # its live gauges leave the aggregate
            if self.stopping:
                continue
            if process.exitcode == STARTUP_FAILURE or (process.pid not in self.ready and process.exitcode > 0):
                # It failed on its own before serving, and would again (bad settings, no loadable app): stop,
                # as uvicorn does. One killed by a signal (an OOM kill) is replaced like any other.
                log.error("worker %d failed to start (code %s); stopping", process.pid, process.exitcode)
                self._stop_all()
                continue
            log.error("worker %d exited (code %s); starting another", process.pid, process.exitcode)
            self.processes.append(self._start(sockets))


def check_device(settings: Settings) -> None:
    """A GPU named in ERDE_DEVICE that is not there stops the service before it binds, saying what is
    missing. Asked of a short-lived spawned process, so that this one imports no torch (docs/architecture.md,
    "No torch in the server") and holds no fork server; `auto` and `cpu` are always there."""
    if settings.device.startswith("cuda"):
        try:
            forkserver.resolve_device(settings.device, via=multiprocessing.get_context("spawn"))
        except ValueError as exc:
            raise SystemExit(f"ERDE_DEVICE={settings.device}: {exc}") from None


def run(settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    check_device(settings)
    if settings.workers > 1:
        prepare_metrics_dir(fresh_if_unset=True)  # before the workers start; they inherit the variable
        Supervisor(settings).run()
        return
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a SIGHUP while models load must not end the process
    draining_server(settings).run()
