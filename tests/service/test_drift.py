"""The drift law (service/engine/drift.py), without sleeps or servers: a pure function of its state and one reply."""

from __future__ import annotations

import itertools
import math

import pytest

from erde.calibrate import CalibrationCurve, OperatingPoint
from service.engine.drift import Cell, DriftGuard, DriftLaw, ceiling_of, start, step
from service.engine.policy import BudgetPolicy
from service.errors import Unsatisfiable
from service.schemas import ClassifyOptions

LAW = DriftLaw()
POINT = OperatingPoint(0.7, 0.25, 0.92, [0.8, 0.1, 0.1])
BUDGET = 0.3


def replies(state: Cell, cost: float, n: int, right: float | None = None, budget: float = BUDGET) -> Cell:
    for _ in range(n):
        state = step(LAW, state, POINT, budget, cost, right)
    return state


def test_a_cost_within_the_budget_keeps_theta_where_calibration_put_it() -> None:
    for cost in (POINT.macs_fraction, 0.05, BUDGET, (1 + LAW.tolerance / 2) * BUDGET):
        assert replies(start(POINT), cost, 1000).offset == 0.0  # never below the calibrated θ either


def test_spending_too_much_raises_theta_by_bounded_steps() -> None:
    state, offsets = start(POINT), []
    for _ in range(200):
        state = step(LAW, state, POINT, BUDGET, 1.0, None)
        offsets.append(state.offset)
    assert offsets[LAW.smoothing - 3] == 0.0  # no move before the smoothed cost means anything
    assert all(0 <= b - a <= LAW.max_step + 1e-12 for a, b in itertools.pairwise(offsets))
    assert offsets[-1] > 1.0


def test_theta_stays_within_its_range() -> None:
    assert replies(start(POINT), 1.0, 5000).offset == pytest.approx(LAW.max_offset)
    near_top = OperatingPoint(2.2, 0.1, 0.8, [1.0, 0.0, 0.0])
    state = start(near_top)
    for _ in range(5000):
        state = step(LAW, state, near_top, 0.1, 1.0, None)
    assert near_top.threshold + state.offset == pytest.approx(LAW.ceiling)


def test_shift_and_return() -> None:
    """Costs that fall as θ rises, like an early-exit network's (0.6 of the MACs per nat): the law finds a θ
    that spends the budget when images get harder, and goes back to the calibrated θ when they are
    calibration-like again (which spends 0.25, below the budget's band: nothing to move for)."""
    def cost(theta: float, hard: bool) -> float:
        return min(max((1.12 if hard else 0.67) - 0.6 * theta, 0.0), 1.0)  # calibration-like: 0.25 at θ 0.7
    state, spent = start(POINT), []
    for _ in range(1500):
        spent.append(cost(POINT.threshold + state.offset, True))
        state = step(LAW, state, POINT, BUDGET, spent[-1], None)
    assert spent[0] > 2 * BUDGET
    assert (1 - LAW.band) * BUDGET - 0.01 <= sum(spent[-400:]) / 400 <= (1 + LAW.tolerance) * BUDGET
    for _ in range(600):
        state = step(LAW, state, POINT, BUDGET, cost(POINT.threshold + state.offset, False), None)
    assert state.offset == 0.0


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


def test_each_budget_has_its_own_cell() -> None:
    guard, policy = guard_and_policy()
    low, high = policy.decide(ClassifyOptions(budget=0.25)), policy.decide(ClassifyOptions(budget=0.455))
    assert low.expected == high.expected and (ceiling_of(low), ceiling_of(high)) == (0.25, 0.45)
    assert ceiling_of(policy.decide(ClassifyOptions(budget=0.05))) == 0.1  # clamped: the point's own cost
    for _ in range(200):
        guard.observe(low, 2, 0.1, 0.4)  # 0.4 is too much for 0.25, within 0.45
        guard.observe(high, 2, 0.1, 0.4)
    assert guard.theta(low) > low.threshold and guard.theta(high) == high.threshold


def test_replies_quote_the_live_estimate_once_it_has_evidence_and_departs() -> None:
    guard, policy = guard_and_policy()
    rule = policy.decide(ClassifyOptions(budget=0.25))
    first = guard.observe(rule, 0, 0.9, 0.1)  # entropy above the ATC threshold: likely wrong
    assert first.source == "offline" and first.live is None and first.used == 0.92
    for _ in range(LAW.window):
        estimate = guard.observe(rule, 0, 0.9, 0.1)
    assert estimate.source == "live" and estimate.used == estimate.live < 0.92 - LAW.margin
    assert guard.summary() == (pytest.approx(estimate.live), 0.92)
    (live,) = guard.live_curve()
    assert live["replies"] == LAW.window + 1 and live["live_accuracy"] == estimate.live and live["budget"] == 0.25


def test_rows_that_fix_theta_or_a_cap_are_left_alone() -> None:
    guard, policy = guard_and_policy()
    budget = policy.decide(ClassifyOptions(budget=0.25))
    for _ in range(200):
        guard.observe(budget, 2, 0.1, 1.0)
    assert guard.theta(budget) > budget.threshold  # these replies cost too much: their rows exit earlier
    fixed = policy.decide(ClassifyOptions(threshold=0.7))
    capped = policy.decide(ClassifyOptions(budget=0.25, max_exit=1))
    assert guard.theta(fixed) == 0.7 and guard.theta(capped) == capped.threshold
    assert guard.observe(fixed, 2, 0.1, 1.0).source == "offline" and len(guard.cells) == 1


def test_off_measures_but_never_moves_theta() -> None:
    guard, policy = guard_and_policy()
    guard.enabled = False
    rule = policy.decide(ClassifyOptions(budget=0.25))
    for _ in range(200):
        guard.observe(rule, 2, 0.1, 1.0)
    assert guard.theta(rule) == rule.threshold and guard.live_curve()[0]["live_threshold"] > rule.threshold


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
