"""An open-loop HTTP load generator: requests leave at a fixed rate whether or not earlier ones were
answered (a closed loop such as wrk's waits for an answer before sending again, which slows the
offered load down exactly when the server is overloaded and hides the queueing).

It runs in its own process (`generate`), on uvloop, with raw keep-alive connections: a request
goes out on an idle connection, or on a new one when every open connection is waiting for an
answer (so in-flight requests never delay the next send). Bodies are prepared by the caller, as
whole HTTP/1.1 requests. Latency is measured from the request's *scheduled* time, so a late send
counts against the answer, and how late the sends were is reported: the generator kept up when
its achieved send rate matches the offered one and its send lag stays small.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import time
from dataclasses import dataclass

import orjson
import uvloop

TICK_S = 0.0005  # the sender wakes this often and sends everything that is due
NO_ANSWER = 0  # status recorded for a request that got no HTTP answer (connection error, timeout)
NOT_SENT = -1  # status recorded for a request the generator could not send (connection limit)


@dataclass(frozen=True)
class Outcome:
    """One request: what was sent (index into the caller's bodies), when, and what came back."""

    body: int  # index of the request bytes sent
    scheduled: float  # seconds after the phase started
    lag: float  # seconds between the scheduled time and the write
    latency: float  # seconds from the scheduled time to the whole answer (inf when none)
    status: int  # HTTP status, NO_ANSWER or NOT_SENT
    reply: dict | None  # the JSON reply of a 200


@dataclass(frozen=True)
class Phase:
    host: str
    port: int
    rate: float  # requests per second offered
    seconds: float  # how long requests are offered
    order: list[int]  # body index of each request, cycled
    drain_s: float = 6.0  # how long answers are awaited after the last send
    max_connections: int = 8192


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, on_answer) -> None:
        self.on_answer = on_answer  # (connection, status, body, keep_alive) -> None
        self.transport: asyncio.Transport | None = None
        self.waiting: int | None = None  # the request in flight on it
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        length, keep_alive = 0, True
        for line in bytes(self.buffer[:end]).split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection":
                keep_alive = value.strip().lower() != b"close"
        if len(self.buffer) < end + 4 + length:
            return
        status = int(self.buffer[9:12])
        body = bytes(self.buffer[end + 4:end + 4 + length])
        del self.buffer[:end + 4 + length]
        self.on_answer(self, status, body, keep_alive)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiting is not None:
            self.on_answer(self, NO_ANSWER, b"", False)


async def _run(phase: Phase, requests: list[bytes]) -> tuple[list[Outcome], float]:
    """Offer the phase's load; (outcomes in send order, seconds over which the sends were spread)."""
    loop = asyncio.get_running_loop()
    clock = time.perf_counter  # uvloop's loop.time() has millisecond resolution
    count = max(1, round(phase.rate * phase.seconds))
    scheduled = [k / phase.rate for k in range(count)]
    sent_at = [0.0] * count
    answered: dict[int, tuple[float, int, bytes]] = {}
    idle: list[_Connection] = []
    opened = 0
    all_answered = asyncio.Event()

    def on_answer(conn: _Connection, status: int, body: bytes, keep_alive: bool) -> None:
        k, conn.waiting = conn.waiting, None
        if k is not None:
            answered[k] = (clock(), status, body)
            if len(answered) == count:
                all_answered.set()
        if keep_alive and conn.transport is not None:
            idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()

    async def send_new(k: int) -> None:
        try:
            _, conn = await loop.create_connection(lambda: _Connection(on_answer), phase.host, phase.port)
        except OSError:
            answered[k] = (clock(), NO_ANSWER, b"")
            if len(answered) == count:
                all_answered.set()
            return
        write(conn, k)

    def write(conn: _Connection, k: int) -> None:
        conn.waiting = k
        sent_at[k] = clock()
        conn.transport.write(requests[phase.order[k % len(phase.order)]])

    start = clock() + 0.05
    tasks = set()
    for k in range(count):
        wait = start + scheduled[k] - clock()
        if wait > 0:
            await asyncio.sleep(max(wait, TICK_S))
        elif k % 32 == 0:  # behind schedule: still let answers in, so that their connections are reused
            await asyncio.sleep(0)
        while idle and idle[-1].transport is None:
            idle.pop()
        if idle:
            write(idle.pop(), k)
        elif opened < phase.max_connections:
            opened += 1
            sent_at[k] = clock()
            task = loop.create_task(send_new(k))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        else:
            answered[k] = (clock(), NOT_SENT, b"")
    spread = max(sent_at) - min(t for t in sent_at if t > 0) if count > 1 else 0.0
    with contextlib.suppress(TimeoutError):  # what is still unanswered then counts as NO_ANSWER
        await asyncio.wait_for(all_answered.wait(), phase.drain_s)
    outcomes = []
    for k in range(count):
        done, status, body = answered.get(k, (float("inf"), NO_ANSWER, b""))
        reply = orjson.loads(body) if status == 200 else None
        outcomes.append(Outcome(phase.order[k % len(phase.order)], scheduled[k], sent_at[k] - start - scheduled[k],
                                done - start - scheduled[k], status, reply))
    return outcomes, spread


def _child(phase: Phase, requests: list[bytes], pipe) -> None:
    # The child inherits its parent's heap (torch, the images: some 290,000 objects); the collector walked
    # them all in passes of up to 136 ms, during which nothing was sent or read, and every request in flight
    # was counted late. So the inherited objects are frozen and the collector is off while the phase runs,
    # as `timeit` turns it off (what the phase makes is freed by reference counting).
    gc.freeze()
    gc.disable()
    uvloop.install()
    started = time.process_time()
    outcomes, spread = asyncio.run(_run(phase, requests))
    gc.enable()
    pipe.send((outcomes, spread, time.process_time() - started))
    pipe.close()


def generate(phase: Phase, requests: list[bytes]) -> tuple[list[Outcome], float, float]:
    """Run one phase in a fresh process: (outcomes, seconds the sends spanned, CPU seconds the generator used)."""
    context = multiprocessing.get_context("fork")  # nothing to re-import; the child never touches torch
    receive, send = context.Pipe(duplex=False)
    proc = context.Process(target=_child, args=(phase, requests, send), daemon=True)
    proc.start()
    send.close()
    try:
        return receive.recv()
    finally:
        proc.join(30)
