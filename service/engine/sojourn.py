"""Admission by expected waiting time, and the queue's order under a standing queue (docs/design.md §4).

Pure functions of the measured cost of a row, what is queued and the clock, like `overload.step`
and `take_batch`: tested without sleeping; the worker (service/engine/worker.py) measures and acts.

A queue that refuses only when it is full answers everyone late under an open loop past capacity:
its 512 rows are 0.3 s of the teacher's work, three times a 100 ms SLO. So a request is admitted
only when it can be answered in time. With r the measured inference seconds per row, P the rows
queued, F the rows in the inference process, n the request's rows, L the event loop's lag (how
long a request may have waited before the loop read it) and t the time the request has (its
`timeout_ms`, else ERDE_SLO_MS):

    answer   A = L + (P + F + n)·r          when it would be answered
    sojourn  S = P·r                        how long it would wait before its batch leaves
    standing   the queue has not been empty for an interval (CoDel's; the SLO)

    admit  iff  P + F = 0                                  an idle model takes anything
           or   A ≤ HEADROOM·t  and  (S ≤ target  or  not standing)

A standing queue buys no throughput, only latency, so it is held near the target sojourn (CoDel,
as in Facebook's "Fail at Scale"); a burst may queue up to the request's own time. HEADROOM leaves
the rest of t for the reply, the HTTP path and the spread around these means. A refusal's
Retry-After is how long what is ahead of it takes to answer (A, rounded up), at least the
configured one.

At dispatch, a standing queue is served newest first (adaptive LIFO): the oldest rows are the
likeliest to be late whatever happens, and the newest can still be answered in time. A row that
would be answered late if its batch left now (now + (F + b)·r past its time, b the batch's rows)
is never run: the worker answers it 503 `expired`. Unless it never had the time: a row that even
an idle model could not answer in its time ((b)·r more than it had) runs, bounded by its deadline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from service.settings import Settings

HEADROOM = 0.6  # share of a request's time its predicted answer may take
SMOOTHING = 0.2  # weight of each batch in the cost's running means


@dataclass(frozen=True)
class WaitLaw:
    slo_s: float  # the time a request without timeout_ms has
    target_s: float  # sojourn a standing queue is held at
    interval_s: float  # a queue not empty for this long is standing
    adaptive_lifo: bool = True  # serve a standing queue newest first

    @classmethod
    def from_settings(cls, settings: Settings) -> WaitLaw:
        return cls(settings.slo_ms / 1000, settings.target_queue_ms / 1000, settings.slo_ms / 1000,
                   settings.adaptive_lifo)


@dataclass(frozen=True)
class RowCost:
    """Running means of the inference process's busy seconds and rows per batch; their ratio is the cost
    of a row (a big batch weighs more than a small one, as it should). Unknown (0) before any batch."""

    busy_s: float = 0.0
    rows: float = 0.0

    @property
    def row_s(self) -> float:
        return self.busy_s / self.rows if self.rows else 0.0


def measured(cost: RowCost, rows: int, busy_s: float) -> RowCost:
    """The cost after a batch of `rows` kept the process busy for `busy_s`."""
    if not cost.rows:
        return RowCost(busy_s, float(rows))
    return RowCost(cost.busy_s + SMOOTHING * (busy_s - cost.busy_s), cost.rows + SMOOTHING * (rows - cost.rows))


@dataclass(frozen=True)
class Wait:
    """Why a request is refused, for its reply to say: its predicted answer, and the time it was allowed
    (its own, or the target a standing queue is held at)."""

    answer_s: float
    allowed_s: float
    held: bool  # refused to hold a standing queue at its target, though it had the time


def row_cost(cost: RowCost, running_s: float, running_rows: int) -> float:
    """Seconds per row: the measured mean, or more while the batch running now has already taken longer
    per row (a process that just slowed down, or the first batch of all)."""
    return max(cost.row_s, running_s / running_rows) if running_rows else cost.row_s


def refusal(law: WaitLaw, r: float, queued: int, running: int, rows: int, lag_s: float, time_s: float,
            standing: bool) -> Wait | None:
    """None when `rows` more can be answered within `time_s` at `r` seconds per row (see the module
    docstring), else the wait that says why not."""
    if queued + running == 0:
        return None
    answer = lag_s + (queued + running + rows) * r
    too_long = answer > HEADROOM * time_s
    held = standing and queued * r > law.target_s
    if not (too_long or held):
        return None
    return Wait(answer, HEADROOM * time_s if too_long else law.target_s, held and not too_long)


def late(r: float, running: int, batch: int, now: float, enqueued: float, answer_by: float) -> bool:
    """Whether a row of a batch of `batch` rows leaving now, behind `running` rows, would be answered
    after its time because it waited (see the module docstring)."""
    own = batch * r
    return now + running * r + own > answer_by and answer_by - enqueued > own


def retry_after(wait: Wait, configured: int) -> int:
    """Whole seconds until what is ahead has been answered, at least the configured Retry-After."""
    return max(configured, math.ceil(wait.answer_s))


def is_standing(law: WaitLaw, queued: int, last_empty: float, now: float) -> bool:
    """Whether the queue has held rows for longer than the interval."""
    return queued > 0 and now - last_empty > law.interval_s
