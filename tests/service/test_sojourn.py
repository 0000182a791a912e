"""Admission by expected waiting time and the queue's order, as pure laws (service/engine/sojourn.py):
no sleeps, the clock and the measurements passed in."""

from __future__ import annotations

import math
from collections import deque

import pytest

from erde.curve import CalibrationCurve, OperatingPoint
from service.engine.adaptive import AdaptiveBudgets
from service.engine.batcher import Job, take_batch
from service.engine.overload import OverloadLaw
from service.engine.policy import BudgetPolicy, Decision
from service.engine.runtime import time_allowed
from service.engine.sojourn import (
    HEADROOM,
    LOOP_HOPS,
    IntervalLow,
    Queue,
    RowCost,
    WaitLaw,
    late,
    measured,
    refusal,
    retry_after,
    seen,
    standing,
)
from service.settings import Settings

LAW = WaitLaw(slo_s=0.1, target_s=0.02, interval_s=0.1)
MS = 1e-3
COST = measured(RowCost(), rows=32, busy_s=0.032)  # 1 ms a row
SLOW = measured(RowCost(), rows=1, busy_s=0.010)  # 10 ms a row


def test_an_idle_model_takes_any_request_however_long_it_runs() -> None:
    assert refusal(LAW, SLOW, Queue(0, 0), rows=64, lag_s=1.0, time_s=0.1, standing=0) is None


def test_a_request_is_refused_when_its_predicted_answer_passes_its_share_of_the_time() -> None:
    # 1 ms a row: 60 queued + 10 running + 1 = 71 ms, within 0.8 x 100 ms; 10 more rows pass it
    assert refusal(LAW, COST, Queue(60, 10), rows=1, lag_s=0.0, time_s=0.1, standing=0) is None
    wait = refusal(LAW, COST, Queue(70, 10), rows=1, lag_s=0.0, time_s=0.1, standing=0)
    assert wait is not None and not wait.held and wait.time_s == 0.1
    assert wait.answer_s == pytest.approx(0.081) and wait.allowed_s == pytest.approx(HEADROOM * 0.1)


def test_the_event_loops_lag_counts_against_the_request() -> None:
    assert refusal(LAW, COST, Queue(10, 10), rows=1, lag_s=0.0, time_s=0.1, standing=0) is None
    assert refusal(LAW, COST, Queue(10, 10), rows=1, lag_s=0.019, time_s=0.1, standing=0) is None
    wait = refusal(LAW, COST, Queue(10, 10), rows=1, lag_s=0.021, time_s=0.1, standing=0)  # once per hop
    assert wait is not None and wait.answer_s == pytest.approx(LOOP_HOPS * 0.021 + 0.021)


def test_more_time_admits_what_the_slo_would_refuse() -> None:
    assert refusal(LAW, COST, Queue(200, 32), rows=1, lag_s=0.0, time_s=0.1, standing=0) is not None
    assert refusal(LAW, COST, Queue(200, 32), rows=1, lag_s=0.0, time_s=5.0, standing=0) is None


def test_a_standing_queue_is_held_at_its_target_even_for_a_patient_request() -> None:
    queue = Queue(40, 32)
    assert refusal(LAW, COST, queue, rows=1, lag_s=0.0, time_s=5.0, standing=19) is None  # 19 ms stood: under 20
    held = refusal(LAW, COST, queue, rows=1, lag_s=0.0, time_s=5.0, standing=21)
    assert held is not None and held.held and held.allowed_s == LAW.target_s
    assert refusal(LAW, COST, queue, rows=1, lag_s=0.0, time_s=5.0, standing=0) is None  # a burst may queue


def test_retry_after_is_how_long_what_is_ahead_takes_at_least_the_configured_one() -> None:
    wait = refusal(LAW, SLOW, Queue(300, 32), rows=1, lag_s=0.0, time_s=0.1, standing=0)
    assert wait is not None and retry_after(wait, 1) == math.ceil(wait.answer_s) == 4
    assert retry_after(wait, 7) == 7


def test_the_cost_of_a_row_is_a_mean_over_batches_weighted_by_their_rows() -> None:
    assert COST.row_s == pytest.approx(1 * MS)
    cost = COST
    for _ in range(80):  # the batches get slower: the mean follows, in a few dozen batches
        cost = measured(cost, rows=32, busy_s=0.064)
    assert cost.row_s == pytest.approx(2 * MS, rel=1e-3)
    small = measured(cost, rows=1, busy_s=0.010)  # one small slow batch moves it less than a full one would
    full = measured(cost, rows=32, busy_s=0.320)
    assert cost.row_s < small.row_s < full.row_s
    assert RowCost().row_s == 0.0


def test_the_standing_queue_is_the_fewest_rows_queued_over_the_last_interval() -> None:
    state = IntervalLow()
    for t, queued in [(0.0, 5), (0.03, 40), (0.06, 12), (0.09, 30)]:  # an interval that never emptied below 5
        state = seen(LAW.interval_s, state, queued, t)
    assert standing(state) == 0  # the interval before it: nothing known, nothing standing
    state = seen(LAW.interval_s, state, 25, 0.101)
    assert standing(state) == 5
    state = seen(LAW.interval_s, state, 0, 0.15)  # it emptied since: nothing stands
    assert standing(state) == 0
    for t in (0.21, 0.25, 0.29):
        state = seen(LAW.interval_s, state, 50, t)
    assert standing(state) == 0  # the interval that ended at 0.21 had an empty queue
    state = seen(LAW.interval_s, state, 60, 0.32)
    assert standing(state) == 50


def test_a_row_that_waited_past_its_time_is_late_but_not_one_that_never_had_the_time() -> None:
    # 1 ms a row, 32 running, a batch of 32 leaving at t=0.07: answered at 0.134
    assert late(COST, running=32, rows=32, now=0.07, enqueued=0.0, answer_by=0.1)
    assert not late(COST, running=32, rows=32, now=0.03, enqueued=0.0, answer_by=0.1)
    # a request of 64 rows at 10 ms each can never be answered within 100 ms: it runs, by its deadline
    assert not late(SLOW, running=0, rows=64, now=0.001, enqueued=0.0, answer_by=0.1)


POINT = OperatingPoint(0.0, 1.0, 0.9, [0.0, 1.0])


def job(enqueued: float) -> Job:
    return Job(b"", Decision.expert(0.0, 1, 1, POINT, server_floor=0.0), enqueued)


def test_a_standing_queue_is_served_newest_first() -> None:
    pending = deque(job(t) for t in range(10))
    newest = take_batch(pending, now=20.0, max_size=4, max_delay=0.0, newest_first=True)
    assert [j.enqueued for j in newest] == [9, 8, 7, 6]
    oldest = take_batch(pending, now=20.0, max_size=4, max_delay=0.0)
    assert [j.enqueued for j in oldest] == [0, 1, 2, 3]


def test_a_request_has_its_timeout_else_the_slo_within_the_servers_timeout() -> None:
    settings = Settings(slo_ms=100, request_timeout_s=5)
    assert time_allowed(settings, None) == (5.0, 0.1)
    assert time_allowed(settings, 2000) == (2.0, 2.0)
    assert time_allowed(settings, 9000) == (5.0, 5.0)
    assert time_allowed(Settings(slo_ms=9000, request_timeout_s=5), None) == (5.0, 5.0)


def budgets(degrade: bool) -> AdaptiveBudgets:
    curve = CalibrationCurve([OperatingPoint(0.5, 0.5, 0.9, [1.0, 0.0]), POINT], [1, 2])
    return AdaptiveBudgets(BudgetPolicy(curve, 2, 10, 0.5, 10, 0.85), OverloadLaw(0.02), degrade)


def test_degrading_absorbs_a_late_request_as_a_late_row_until_full_pressure_then_refuses() -> None:
    degrade = budgets(degrade=True)
    assert degrade.absorb(wait_s=0.08, now=1.0)  # taken; four times the 20 ms target: the pressure rises
    first = degrade.state.pressure
    assert 0 < first < 1
    now = 1.0
    while degrade.absorb(wait_s=0.08, now=now + 0.01):
        now += 0.01
    assert degrade.state.pressure == 1.0 and now - 1.0 <= 0.3  # 0 to 1 within rise_s / 2 at 3x overshoot
    assert not degrade.absorb(wait_s=0.08, now=now + 0.02)  # at the floors already: refused
    assert not budgets(degrade=False).absorb(wait_s=0.08, now=1.0)  # reject mode never absorbs
    full = budgets(degrade=True)
    full.saturate(2.0)  # a full queue: every row at its floor at once
    assert full.state.pressure == 1.0


def test_degrading_starts_when_a_queue_stands_not_when_rows_wait_for_the_batch_ahead() -> None:
    """At light load a row that came while batches ran waits for them, then leaves the queue empty: the
    pressure stays 0 (the teacher at half its capacity had 58-82% of its rows degraded when each batch's
    oldest row counted). A queue whose oldest row stays over the target raises it within rise_s."""
    light, now = budgets(degrade=True), 0.0
    for k in range(300):  # 3 s of batches every 10 ms; now and then a few rows are left for the next one
        now += 0.01
        light.adjust([job(now - 0.03)], now, waited_s=0.025 if k % 3 else 0.0)
    assert light.state.pressure == 0.0
    loaded = budgets(degrade=True)
    for _ in range(30):
        now += 0.01
        loaded.adjust([job(now - 0.001)], now, waited_s=0.06)  # newest first: the batch's rows are fresh
    assert loaded.state.pressure > 0.5
