"""Admission by expected waiting time, and the queue's order under a standing queue (docs/design.md §4).

Pure functions of the measured cost of a row, what is queued and the clock, like `overload.step`
and `take_batch`: tested without sleeping; the worker (service/engine/worker.py) measures and acts.

A queue that refuses only when it is full answers everyone late under an open loop past capacity:
its 512 rows are 0.3 s of the teacher's work, three times a 100 ms SLO. So a request is admitted
only when it can be answered in time. With r the inference process's measured seconds per row in
a well-filled batch (its own clock, so the event loop's delays are not in it: `RowCost`), P the
rows queued, F the rows in the process, n the request's rows, L the event loop's lag (how long a
request may have waited before the loop read it) and t the time the request has (its
`timeout_ms`, else ERDE_SLO_MS):

    answer   A = 3·L + (P + F + n)·r         when it would be answered
    standing Q = the fewest rows queued over the last interval (CoDel's; the SLO)

    admit  iff  P + F = 0                    an idle model takes anything
           or   A ≤ HEADROOM·t  and  Q·r ≤ target

L counts three times (LOOP_HOPS): a request waits for the loop to come round when its head arrives,
when its rows' batch is sent, and when its reply comes back from the process; a loaded loop comes round
about once per L. Counted once, at three times the teacher's capacity 7-23% of the answered requests
were late; counted three times, 4-5%, with as many answered in time or more (bench/overload.py's
open-loop generator, four runs each, alternating).

A standing queue (rows that stayed queued the whole interval) buys no throughput, only latency, so
its sojourn is held at the target (CoDel's minimum sojourn, as in Facebook's "Fail at Scale"); a
burst, which empties again within the interval, may queue up to the request's time. HEADROOM
leaves the rest of t for the reply, the HTTP path and the spread around these means. A refusal's
Retry-After is A rounded up to whole seconds, at least the configured one. In degrade mode a
refusal comes after degrading: while the overload controller's pressure is below 1, a request
predicted within its whole time t is taken, and its predicted wait steps the controller as a late
row's would (service/engine/adaptive.py); one predicted past t is refused even then.

At dispatch, a standing queue (Q > 0) is served newest first (adaptive LIFO): the oldest rows are
the likeliest to be late whatever happens, and the newest can still be answered in time. A row
that would be answered after its time if its batch of b rows left now (now + (F + b)·r) is never
run: the worker answers it 503 `expired`. Unless it never had the time: a row that even an idle
model could not answer in its time (b·r more than it had) runs, bounded by its deadline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from service.settings import Settings

HEADROOM = 0.8  # share of a request's time its predicted answer may take
# Times a request waits for the event loop to come round: its head read, its rows' batch sent, its reply read.
LOOP_HOPS = 3
SMOOTHING = 0.1  # weight of each batch in the cost's running moments


@dataclass(frozen=True)
class WaitLaw:
    slo_s: float  # the time a request without timeout_ms has
    target_s: float  # sojourn a standing queue is held at
    interval_s: float  # the window over which the standing queue is the fewest rows queued
    adaptive_lifo: bool = True  # serve a standing queue newest first

    @classmethod
    def from_settings(cls, settings: Settings) -> WaitLaw:
        return cls(settings.slo_ms / 1000, settings.target_queue_ms / 1000, settings.slo_ms / 1000,
                   settings.adaptive_lifo)


@dataclass(frozen=True)
class RowCost:
    """Running means of the inference process's busy seconds and rows per batch; their ratio is the cost
    of a row. Unknown (0) before any batch. Once it holds batches of at least half the batch size on
    average, the worker feeds it only such batches: a queue long enough to matter leaves in full
    batches, and a small batch's fixed cost spread over its few rows would overstate a row's (the
    teacher: 2 ms a row in batches of 5, 0.7 ms in batches of 26), so that a burst at light load
    would be refused. Until then it takes every batch, small ones too.

    A line a + c·rows fitted over all batches was tried: over batches of 14 to 29 rows its slope
    swung from 0.15 to 1.8 ms a row for the teacher, and a wrong slope refuses at 0.8x capacity."""

    busy_s: float = 0.0
    rows: float = 0.0

    @property
    def row_s(self) -> float:
        return self.busy_s / self.rows if self.rows else 0.0


def measured(cost: RowCost, rows: int, busy_s: float) -> RowCost:
    """The cost after a batch of `rows` kept the process busy for `busy_s` (the process's own clock)."""
    if not cost.rows:
        return RowCost(busy_s, float(rows))
    return RowCost(cost.busy_s + SMOOTHING * (busy_s - cost.busy_s), cost.rows + SMOOTHING * (rows - cost.rows))


@dataclass(frozen=True)
class Queue:
    """What is ahead of a new row: rows queued, and rows in the inference process."""

    queued: int
    running: int

    def ahead_s(self, cost: RowCost, rows: int) -> float:
        """Seconds until `rows` more rows, queued behind all of it, are answered."""
        return (self.running + self.queued + rows) * cost.row_s


@dataclass(frozen=True)
class Wait:
    """Why a request is refused, for its reply to say: its predicted answer, and the time it was allowed
    (its own, or the target a standing queue is held at)."""

    answer_s: float
    allowed_s: float
    held: bool  # refused to hold a standing queue at its target, though it had the time
    time_s: float  # the request's whole time: past it, degrading the rows ahead cannot help it either


def refusal(law: WaitLaw, cost: RowCost, queue: Queue, rows: int, lag_s: float, time_s: float,
            standing: int) -> Wait | None:
    """None when `rows` more can be answered within `time_s`, with `standing` rows that stayed queued
    over the last interval (see the module docstring), else the wait that says why not."""
    if queue.queued + queue.running == 0:
        return None
    answer = LOOP_HOPS * lag_s + queue.ahead_s(cost, rows)
    too_long = answer > HEADROOM * time_s
    held = standing * cost.row_s > law.target_s
    if not (too_long or held):
        return None
    return Wait(answer, HEADROOM * time_s if too_long else law.target_s, held and not too_long, time_s)


def late(cost: RowCost, running: int, rows: int, now: float, enqueued: float, answer_by: float) -> bool:
    """Whether a row of a batch of `rows` leaving now, behind `running` rows in the process, would be
    answered after its time because it waited (see the module docstring)."""
    own = rows * cost.row_s
    return now + running * cost.row_s + own > answer_by and answer_by - enqueued > own


def retry_after(wait: Wait, configured: int) -> int:
    """Whole seconds until what is ahead has been answered, at least the configured Retry-After."""
    return max(configured, math.ceil(wait.answer_s))


@dataclass(frozen=True)
class IntervalLow:
    """The least of a measure seen in the interval now running, and in the one before it: the rows the
    queue held (here), or the seconds a batch's oldest row waited (service/engine/adaptive.py). What stood
    over a whole interval is load; what did not was a burst, or a row that waited for the batch ahead."""

    started: float = -math.inf  # the first sight starts an interval
    low: float = 0
    last: float = 0


def seen(interval_s: float, state: IntervalLow, value: float, now: float) -> IntervalLow:
    """The state after `value` was seen at `now` (after every change)."""
    if now - state.started >= interval_s:
        return IntervalLow(now, value, state.low)
    return IntervalLow(state.started, min(state.low, value), state.last)


def standing(state: IntervalLow) -> float:
    """What stood over the last interval: its least, or less since."""
    return min(state.low, state.last)
