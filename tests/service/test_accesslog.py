"""The access log's batching: one loop turn's lines in one write, whole lines of at most PIPE_BUF bytes."""

from __future__ import annotations

import asyncio
import io
import logging

from service.edge.accesslog import ATOMIC_BYTES, LineBatcher, chunks


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
