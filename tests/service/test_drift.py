"""The drift law (service/drift.py), without sleeps or servers: a pure function of its state and one reply."""

from __future__ import annotations

import itertools
import math

import pytest

from erde.calibrate import CalibrationCurve, OperatingPoint
from service.drift import DriftGuard, DriftLaw, PointState, start, step
from service.errors import Unsatisfiable
from service.policy import BudgetPolicy
from service.schemas import ClassifyOptions

LAW = DriftLaw()
POINT = OperatingPoint(0.7, 0.25, 0.92, [0.8, 0.1, 0.1])


def replies(state: PointState, cost: float, n: int, right: float | None = None) -> PointState:
    for _ in range(n):
        state = step(LAW, state, POINT, cost, right)
    return state


def test_the_calibrated_cost_keeps_theta_where_calibration_put_it() -> None:
    assert replies(start(POINT), POINT.macs_fraction, 1000).offset == 0.0


def test_spending_too_much_raises_theta_by_bounded_steps() -> None:
    state, offsets = start(POINT), []
    for _ in range(200):
        state = step(LAW, state, POINT, 1.0, None)
        offsets.append(state.offset)
    assert offsets[LAW.smoothing - 3] == 0.0  # no move before the smoothed cost means anything
    assert all(0 <= b - a <= LAW.max_step + 1e-12 for a, b in itertools.pairwise(offsets))
    assert offsets[-1] > 1.0


def test_theta_stays_within_its_range() -> None:
    assert replies(start(POINT), 1.0, 5000).offset == pytest.approx(LAW.max_offset)
    low = replies(start(POINT), 0.0, 5000)
    assert low.offset == pytest.approx(-POINT.threshold)  # θ never below 0 (0 runs every image to the end)
    near_top = OperatingPoint(2.2, 0.1, 0.8, [1.0, 0.0, 0.0])
    state = start(near_top)
    for _ in range(5000):
        state = step(LAW, state, near_top, 1.0, None)
    assert near_top.threshold + state.offset == pytest.approx(LAW.ceiling)


def test_the_hold_band_lets_a_cheaper_stream_be() -> None:
    inside = (1 - LAW.band / 2) * POINT.macs_fraction
    assert replies(start(POINT), inside, 1000).offset == 0.0
    assert replies(start(POINT), 0.5 * POINT.macs_fraction, 1000).offset < 0  # well below: spend more


def test_shift_and_return() -> None:
    """Costs that fall as θ rises, like an early-exit network's: the law finds the θ that spends c, and
    comes back when the images do."""
    def cost(theta: float, hard: bool) -> float:
        return min(max((1.5 if hard else 0.95) - theta, 0.0), 1.0)  # the calibrated images cost 0.25 at θ 0.7
    state = start(POINT)
    for hard in (True, False):
        for _ in range(LAW.smoothing + 300):
            state = step(LAW, state, POINT, cost(POINT.threshold + state.offset, hard), None)
        assert (1 - LAW.band) * 0.25 - 0.01 <= cost(POINT.threshold + state.offset, hard) <= 0.25 + 0.01


def test_the_accuracy_estimate_is_an_ewma_of_the_atc_indicators() -> None:
    state = replies(start(POINT), POINT.macs_fraction, 3 * LAW.window, right=0.0)
    assert state.accuracy < POINT.accuracy * math.exp(-2)
    assert replies(state, POINT.macs_fraction, 10 * LAW.window, right=1.0).accuracy > 0.99


def guard_and_policy() -> tuple[DriftGuard, BudgetPolicy]:
    points = [OperatingPoint(0.0, 1.0, 0.93, [0, 0, 1]), OperatingPoint(0.3, 0.5, 0.925, [0.5, 0.2, 0.3]),
              OperatingPoint(0.7, 0.25, 0.92, [0.8, 0.1, 0.1]), OperatingPoint(3.0, 0.1, 0.85, [1, 0, 0])]
    curve = CalibrationCurve(points, [10, 50, 100])
    atc = {"thresholds": [[0.5, 0.5, 0.5]] * len(points)}
    return DriftGuard(curve, atc, LAW, enabled=True), BudgetPolicy(curve, 3, 10, 0.5, 10)


def test_replies_quote_the_live_estimate_once_it_has_evidence_and_departs() -> None:
    guard, policy = guard_and_policy()
    rule = policy.decide(ClassifyOptions(budget=0.25))
    first = guard.observe(rule, 0, 0.9, 0.1)  # entropy above the ATC threshold: likely wrong
    assert first.source == "offline" and first.live is None and first.used == 0.92
    for _ in range(LAW.window):
        estimate = guard.observe(rule, 0, 0.9, 0.1)
    assert estimate.source == "live" and estimate.used == estimate.live < 0.92 - LAW.margin
    assert guard.summary()[0] == pytest.approx(estimate.live) and guard.summary()[1] == 0.92
    (live,) = guard.live_curve()
    assert live["replies"] == LAW.window + 1 and live["live_accuracy"] == estimate.live


def test_rows_that_fix_theta_or_a_cap_are_left_alone() -> None:
    guard, policy = guard_and_policy()
    budget = policy.decide(ClassifyOptions(budget=0.25))
    for _ in range(200):
        guard.observe(budget, 2, 0.1, 1.0)
    assert guard.theta(budget) > budget.threshold  # this point costs too much: its rows exit earlier
    fixed = policy.decide(ClassifyOptions(threshold=0.7))
    capped = policy.decide(ClassifyOptions(budget=0.25, max_exit=1))
    assert guard.theta(fixed) == 0.7 and guard.theta(capped) == capped.threshold
    assert guard.observe(fixed, 2, 0.1, 1.0).source == "offline" and len(guard.states) == 1


def test_floors_use_the_live_shift() -> None:
    """A floor the calibrated curve meets but the live evidence contradicts is unsatisfiable, with live numbers."""
    guard, policy = guard_and_policy()
    rule = policy.decide(ClassifyOptions(budget=0.25))
    for _ in range(LAW.window + 1):
        guard.observe(rule, 0, 0.9, 0.25)  # every answer likely wrong
    policy.live_shift = guard.shift()
    assert policy.live_shift < -0.5
    with pytest.raises(Unsatisfiable, match="live estimate"):
        policy.decide(ClassifyOptions(min_accuracy=0.9))
    policy.live_shift = 0.0
    assert policy.decide(ClassifyOptions(min_accuracy=0.9)).expected.accuracy >= 0.9
