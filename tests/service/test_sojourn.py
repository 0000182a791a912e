"""Admission by expected waiting time and the queue's order, as pure laws (service/engine/sojourn.py):
no sleeps, the clock and the measurements passed in."""

from __future__ import annotations

import math
from collections import deque

import pytest

from erde.calibrate import CalibrationCurve, OperatingPoint
from service.engine.adaptive import AdaptiveBudgets
from service.engine.batcher import Job, take_batch
from service.engine.overload import OverloadLaw
from service.engine.policy import BudgetPolicy, Decision
from service.engine.runtime import time_allowed
from service.engine.sojourn import (
    HEADROOM,
    RowCost,
    WaitLaw,
    is_standing,
    late,
    measured,
    refusal,
    retry_after,
    row_cost,
)
from service.settings import Settings

LAW = WaitLaw(slo_s=0.1, target_s=0.02, interval_s=0.1)
MS = 1e-3


def test_an_idle_model_takes_any_request_however_long_it_runs() -> None:
    assert refusal(LAW, r=10.0, queued=0, running=0, rows=64, lag_s=1.0, time_s=0.1, standing=False) is None


def test_a_request_is_refused_when_its_predicted_answer_passes_its_share_of_the_time() -> None:
    # 1 ms a row: 40 queued + 10 running + 1 = 51 ms, within 0.6 x 100 ms; 10 more rows pass it
    assert refusal(LAW, 1 * MS, queued=40, running=10, rows=1, lag_s=0.0, time_s=0.1, standing=False) is None
    wait = refusal(LAW, 1 * MS, queued=50, running=10, rows=1, lag_s=0.0, time_s=0.1, standing=False)
    assert wait is not None and not wait.held
    assert wait.answer_s == pytest.approx(0.061) and wait.allowed_s == pytest.approx(HEADROOM * 0.1)


def test_the_event_loops_lag_counts_against_the_request() -> None:
    assert refusal(LAW, 1 * MS, queued=10, running=10, rows=1, lag_s=0.0, time_s=0.1, standing=False) is None
    wait = refusal(LAW, 1 * MS, queued=10, running=10, rows=1, lag_s=0.045, time_s=0.1, standing=False)
    assert wait is not None and wait.answer_s == pytest.approx(0.066)


def test_more_time_admits_what_the_slo_would_refuse() -> None:
    args = dict(queued=200, running=32, rows=1, lag_s=0.0, standing=False)
    assert refusal(LAW, 1 * MS, time_s=0.1, **args) is not None
    assert refusal(LAW, 1 * MS, time_s=5.0, **args) is None


def test_a_standing_queue_is_held_at_its_target_even_for_a_patient_request() -> None:
    args = dict(running=32, rows=1, lag_s=0.0, time_s=5.0)
    assert refusal(LAW, 1 * MS, queued=19, standing=True, **args) is None  # 19 ms of sojourn: under 20
    held = refusal(LAW, 1 * MS, queued=21, standing=True, **args)
    assert held is not None and held.held and held.allowed_s == LAW.target_s
    assert refusal(LAW, 1 * MS, queued=21, standing=False, **args) is None  # a burst may queue


def test_retry_after_is_how_long_what_is_ahead_takes_at_least_the_configured_one() -> None:
    wait = refusal(LAW, 10 * MS, queued=300, running=32, rows=1, lag_s=0.0, time_s=0.1, standing=False)
    assert wait is not None and retry_after(wait, 1) == math.ceil(wait.answer_s) == 4
    assert retry_after(wait, 7) == 7


def test_the_cost_of_a_row_is_a_mean_over_batches_weighted_by_their_rows() -> None:
    cost = measured(RowCost(), rows=32, busy_s=0.032)
    assert cost.row_s == pytest.approx(1 * MS)
    for _ in range(50):  # the batches get slower: the mean follows, in a few batches
        cost = measured(cost, rows=32, busy_s=0.064)
    assert cost.row_s == pytest.approx(2 * MS, rel=1e-3)
    small = measured(cost, rows=1, busy_s=0.010)  # one small slow batch moves it less than a full one would
    full = measured(cost, rows=32, busy_s=0.320)
    assert cost.row_s < small.row_s < full.row_s
    assert RowCost().row_s == 0.0


def test_a_batch_running_longer_than_the_mean_raises_the_cost_at_once() -> None:
    cost = measured(RowCost(), rows=10, busy_s=0.010)
    assert row_cost(cost, running_s=0.005, running_rows=10) == pytest.approx(1 * MS)
    assert row_cost(cost, running_s=0.300, running_rows=10) == pytest.approx(30 * MS)  # a process that slowed
    assert row_cost(RowCost(), running_s=0.2, running_rows=1) == pytest.approx(0.2)  # before any batch ended


def test_a_queue_is_standing_once_it_has_not_been_empty_for_an_interval() -> None:
    assert not is_standing(LAW, queued=5, last_empty=10.0, now=10.09)
    assert is_standing(LAW, queued=5, last_empty=10.0, now=10.11)
    assert not is_standing(LAW, queued=0, last_empty=10.0, now=20.0)


def test_a_row_that_waited_past_its_time_is_late_but_not_one_that_never_had_the_time() -> None:
    # 1 ms a row, 32 running, a batch of 32 leaving at t=0.07: answered at 0.134
    assert late(1 * MS, running=32, batch=32, now=0.07, enqueued=0.0, answer_by=0.1)
    assert not late(1 * MS, running=32, batch=32, now=0.03, enqueued=0.0, answer_by=0.1)
    # a request of 64 rows at 10 ms each can never be answered within 100 ms: it runs, by its deadline
    assert not late(10 * MS, running=0, batch=64, now=0.001, enqueued=0.0, answer_by=0.1)


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


def test_degrading_absorbs_the_first_overflow_then_the_excess_is_refused() -> None:
    degrade = budgets(degrade=True)
    assert degrade.saturate(1.0) is True  # pressure was 0: every row goes to its floor, this one is taken
    assert degrade.state.pressure == 1.0
    assert degrade.saturate(1.001) is False  # at the floors already: refuse
    assert budgets(degrade=False).saturate(1.0) is False  # reject mode never absorbs
