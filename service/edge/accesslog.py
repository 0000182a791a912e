"""The access log: one JSON line per request on the `erde.access` logger, written once per event-loop turn.

A line written and flushed per request was a write(2) per request, the largest single cost of the
event loop after the framework (`python -m bench.profile --spy 0.25`). `LineBatcher` keeps the logger
(its level, filters and handlers stay the user's to configure) and gathers the lines one loop turn
formats into one write; a process killed with SIGKILL loses at most that turn's lines. Each write
holds whole lines and at most PIPE_BUF bytes, so lines from several worker processes sharing one
stderr pipe never interleave mid-line.

When the batcher is the logger's one way out (the service configured logging, and nobody added a
handler, a filter or a level since), `write` hands it the line formatted as its formatter would, with
no LogRecord: making, dispatching and formatting one was 4-5% of the loop's CPU per request. Otherwise
the line goes through logging, as the user configured it.
"""

from __future__ import annotations

import asyncio
import logging
import select
import sys
import time

access_log = logging.getLogger("erde.access")

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
ATOMIC_BYTES = select.PIPE_BUF  # a pipe write this size or smaller is never interleaved with another's


def chunks(lines: list[str], limit: int = ATOMIC_BYTES) -> list[str]:
    """The lines joined into as few pieces as fit `limit` bytes each (a longer line is a piece of its own)."""
    out: list[str] = []
    piece: list[str] = []
    size = 0
    for line in lines:
        n = len(line.encode()) + 1
        if piece and size + n > limit:
            out.append("".join(piece))
            piece, size = [], 0
        piece.append(line + "\n")
        size += n
    if piece:
        out.append("".join(piece))
    return out


class LineBatcher(logging.StreamHandler):
    """A stream handler that writes the lines of one event-loop turn together (outside a loop: at once)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # logging's contract: a bad record is reported, never raised into the request
            self.handleError(record)
            return
        self.add(line)

    def add(self, line: str) -> None:
        """A formatted line, written with the rest of this loop turn's."""
        self.pending.append(line)
        if len(self.pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop in this thread
                self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # StreamHandler always has one
            lines, self.pending = self.pending, []
            for piece in chunks(lines):
                self.stream.write(piece)
                self.stream.flush()


class Stamp:
    """logging.Formatter's default `asctime` ("2026-12-07 04:42:44,123", local time), its date and time
    formatted once per second."""

    def __init__(self) -> None:
        self.second = -1
        self.text = ""

    def __call__(self, now: float) -> str:
        second = int(now)
        if second != self.second:
            self.second, self.text = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self.text},{int((now - second) * 1000):03d}"


_direct: LineBatcher | None = None  # the batcher `configure` installed, while it is the logger's one way out
_stamp = Stamp()
_PREFIX = f" {logging.getLevelName(logging.INFO)} {access_log.name} "


def write(message: str) -> None:
    """One access-log line: straight to the batcher when nothing else could see or change it (see the
    module doc), else through logging."""
    direct = _direct
    if (direct is not None and access_log.handlers == [direct] and not access_log.filters
            and not access_log.propagate and access_log.isEnabledFor(logging.INFO)):
        direct.add(_stamp(time.time()) + _PREFIX + message)
    else:
        access_log.info(message)


def configure() -> None:
    """The service's logging, unless the process already has some (then it is the user's, and left alone):
    INFO to stderr, the access log through a `LineBatcher`. LogRecord fields the format never shows
    (thread, process and task names) are not gathered: logging's own switches for it."""
    if logging.root.handlers:
        return
    logging.basicConfig(level=logging.INFO, format=FORMAT)
    batcher = LineBatcher()
    batcher.setFormatter(logging.Formatter(FORMAT))
    access_log.addHandler(batcher)
    access_log.propagate = False
    global _direct
    _direct = batcher
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.logAsyncioTasks = False
