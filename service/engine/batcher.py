"""Forming micro-batches: a pure function of the pending queue and the clock (testable without sleeping)."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class Job:
    """One image waiting for the network, with its own exit rule."""

    x: torch.Tensor  # (C, H, W) normalised input
    threshold: float  # θ: stop at the first exit with entropy below it
    cap: int  # last exit this image may reach (max_exit, or the model's last)
    top_k: int  # how many classes the reply lists
    enqueued: float  # monotonic seconds when it entered the queue
    future: asyncio.Future | None = field(default=None, repr=False)  # resolved with an ExitResult


def take_batch(pending: deque[Job], now: float, max_size: int, max_delay: float) -> list[Job] | float:
    """A batch of up to `max_size` jobs if one is due, else the seconds to wait before asking again.

    A batch is due when it is full or when its oldest job has waited `max_delay`; under load the
    oldest job has always waited that long already, so a busy worker never idles waiting to fill.
    """
    if not pending:
        return math.inf
    waited = now - pending[0].enqueued
    if len(pending) >= max_size or waited >= max_delay:
        return [pending.popleft() for _ in range(min(max_size, len(pending)))]
    return max_delay - waited
