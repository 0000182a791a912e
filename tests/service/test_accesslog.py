"""The access log's batching: one loop turn's lines in one write, whole lines of at most PIPE_BUF bytes."""

from __future__ import annotations

import asyncio
import io
import logging

from service.edge import accesslog
from service.edge.accesslog import _PREFIX, ATOMIC_BYTES, FORMAT, LineBatcher, Stamp, access_log, chunks, write


class Writes(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.pieces: list[str] = []

    def write(self, s: str) -> int:
        self.pieces.append(s)
        return len(s)


def batcher() -> tuple[logging.Logger, Writes]:
    handler, stream = LineBatcher(), Writes()
    handler.setStream(stream)
    log = logging.getLogger("test.accesslog")
    log.handlers, log.propagate, log.level = [handler], False, logging.INFO
    return log, stream


def test_pieces_hold_whole_lines_within_pipe_buf() -> None:
    lines = [f'{{"n":{i},"pad":"{"x" * (i % 300)}"}}' for i in range(200)]
    pieces = chunks(lines)
    assert "".join(pieces).splitlines() == lines
    assert all(len(p.encode()) <= ATOMIC_BYTES and p.endswith("\n") for p in pieces)
    assert len(pieces) < len(lines) / 10
    assert chunks(["y" * (2 * ATOMIC_BYTES)]) == ["y" * (2 * ATOMIC_BYTES) + "\n"]  # a long line stays whole


def test_one_loop_turn_is_one_write_and_outside_a_loop_each_line_goes_at_once() -> None:
    log, stream = batcher()

    async def turn() -> int:
        for i in range(5):
            log.info("line %d", i)
        written = len(stream.pieces)
        await asyncio.sleep(0)
        return written

    assert asyncio.run(turn()) == 0
    assert stream.pieces == ["".join(f"line {i}\n" for i in range(5))]
    log.info("outside")
    assert stream.pieces[-1] == "outside\n"


def test_a_direct_line_is_the_line_the_formatter_writes() -> None:
    for created in (1_765_082_564.0, 1_765_082_564.999, 1_765_082_565.0421):
        record = logging.LogRecord("erde.access", logging.INFO, __file__, 1, '{"code":200}', None, None)
        record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
        assert Stamp()(created) + _PREFIX + '{"code":200}' == logging.Formatter(FORMAT).format(record)


def test_lines_skip_logging_only_while_the_batcher_is_the_loggers_one_way_out(monkeypatch) -> None:
    handler, stream = LineBatcher(), Writes()
    handler.setStream(stream)
    handler.setFormatter(logging.Formatter(FORMAT))
    monkeypatch.setattr(access_log, "handlers", [handler])
    monkeypatch.setattr(access_log, "propagate", False)
    monkeypatch.setattr(accesslog, "_direct", handler)
    level = access_log.level
    access_log.setLevel(logging.INFO)
    seen: list[str] = []
    try:
        write("one")
        access_log.addFilter(lambda record: seen.append(record.getMessage()) or True)  # the user's filter
        write("two")
        access_log.filters.clear()
        access_log.setLevel(logging.WARNING)  # the user's level: the line is not written
        write("three")
    finally:
        access_log.filters.clear()
        access_log.setLevel(level)
    assert seen == ["two"]
    lines = [line.split(" ", 2)[2] for line in "".join(stream.pieces).splitlines()]
    assert lines == ["INFO erde.access one", "INFO erde.access two"]
