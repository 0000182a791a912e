"""What the server queues for a model, and how micro-batches form: a pure function of the pending
queue and the clock (testable without sleeping)."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass, field

from service.engine.policy import Decision


@dataclass(eq=False)
class Job:
    """One encoded image waiting for the model's inference process, with the rule it asked for."""

    image: bytes  # the encoded file; decoded in the inference process
    asked: Decision  # the rule the request asked for (θ, cap, top_k, floor)
    enqueued: float  # monotonic seconds when it entered the queue
    deadline: float = math.inf  # monotonic seconds past which nobody waits for it
    future: asyncio.Future | None = field(default=None, repr=False)  # resolved with an ExitResult
    answer_by: float = math.inf  # answered after this it is late: never run then (service/engine/sojourn.py)
    used: Decision | None = None  # the rule it was sent with (cheaper than `asked` under overload)
    shadow: bool = False  # runs on to the last exit after its answer: a shadow pass (docs/budgets.md)

    @property
    def rule(self) -> Decision:
        return self.used or self.asked


def take_batch(pending: deque[Job], now: float, max_size: int, max_delay: float,
               newest_first: bool = False) -> list[Job] | float:
    """A batch of up to `max_size` jobs if one is due, else the seconds to wait before asking again.

    A batch is due when it is full or when its oldest job has waited `max_delay`; under load the
    oldest job has always waited that long already, so a busy worker never idles waiting to fill.
    It takes the oldest jobs, or with `newest_first` (a standing queue: adaptive LIFO) the newest.
    """
    if not pending:
        return math.inf
    waited = now - pending[0].enqueued
    if len(pending) >= max_size or waited >= max_delay:
        take = pending.pop if newest_first else pending.popleft
        return [take() for _ in range(min(max_size, len(pending)))]
    return max_delay - waited


def put_back(pending: deque[Job], jobs: list[Job], newest_first: bool = False) -> None:
    """Return jobs that `take_batch` took (the tail of its batch: the rows that did not fit the arena) to the
    end they were taken from, in their order there, with nothing left of the send they missed: the rule and
    the shadow pass are chosen again at their next one (kept, a degraded row stayed degraded once the load had
    gone, and a floor row its θ once the evidence no longer met its floor). Put at the oldest end under
    adaptive LIFO, the newest rows read as the oldest: the overload controller, which measures the oldest row
    left, saw a short wait, and they were served last."""
    for job in jobs:
        job.used, job.shadow = None, False
    if newest_first:
        pending.extend(reversed(jobs))
    else:
        pending.extendleft(reversed(jobs))
