"""The drift law (service/engine/drift.py), without sleeps or servers: a pure function of its state and one reply."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from erde.curve import CalibrationCurve, OperatingPoint
from erde.estimator import AccuracyEstimator
from service.engine.batcher import Job
from service.engine.drift import Cell, DriftGuard, DriftLaw, ceiling_of, change_point, start, step
from service.engine.policy import BudgetPolicy, Estimate
from service.errors import Unsatisfiable
from service.schemas import ClassifyOptions

LAW = DriftLaw()
POINT = OperatingPoint(0.7, 0.25, 0.92, [0.8, 0.1, 0.1])
BUDGET = 0.3


def replies(state: Cell, cost: float, n: int, budget: float = BUDGET) -> Cell:
    for _ in range(n):
        state = step(LAW, state, POINT, budget, cost)
    return state


def test_a_cost_within_the_budget_keeps_theta_where_calibration_put_it() -> None:
    for cost in (POINT.macs_fraction, 0.05, BUDGET, (1 + LAW.tolerance / 2) * BUDGET):
        assert replies(start(POINT), cost, 1000).offset == 0.0  # never below the calibrated θ either


def test_spending_too_much_raises_theta_by_bounded_steps() -> None:
    state, offsets = start(POINT), []
    for _ in range(200):
        state = step(LAW, state, POINT, BUDGET, 1.0)
        offsets.append(state.offset)
    assert offsets[LAW.smoothing - 3] == 0.0  # no move before the smoothed cost means anything
    assert all(0 <= b - a <= LAW.max_step + 1e-12 for a, b in itertools.pairwise(offsets))
    assert offsets[-1] > 1.0


def test_theta_stays_within_its_range() -> None:
    assert replies(start(POINT), 1.0, 5000).offset == pytest.approx(LAW.max_offset)
    near_top = OperatingPoint(2.2, 0.1, 0.8, [1.0, 0.0, 0.0])
    state = start(near_top)
    for _ in range(5000):
        state = step(LAW, state, near_top, 0.1, 1.0)
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
        state = step(LAW, state, POINT, BUDGET, spent[-1])
    assert spent[0] > 2 * BUDGET
    assert (1 - LAW.band) * BUDGET - 0.01 <= sum(spent[-400:]) / 400 <= (1 + LAW.tolerance) * BUDGET
    for _ in range(600):
        state = step(LAW, state, POINT, BUDGET, cost(POINT.threshold + state.offset, False))
    assert state.offset == 0.0


def guard_and_policy() -> tuple[DriftGuard, BudgetPolicy]:
    points = [OperatingPoint(0.0, 1.0, 0.93, [0, 0, 1]), OperatingPoint(0.3, 0.5, 0.925, [0.5, 0.2, 0.3]),
              OperatingPoint(0.7, 0.25, 0.92, [0.8, 0.1, 0.1]), OperatingPoint(3.0, 0.1, 0.85, [1, 0, 0])]
    curve = CalibrationCurve(points, [10, 50, 100])
    estimator = AccuracyEstimator(0.5, tuple(p.threshold for p in points), (0.2, 0.2, 0.25, 0.3))
    return DriftGuard(curve, estimator, LAW, enabled=True), BudgetPolicy(curve, 3, 10, 0.5, 10)


def shadow_rows(n: int, *, sure: bool, agree: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """n shadow rows whose first exit is sure (entropy 0.1, below every θ of the grid but 0); the last exit
    sure or not (below or above the estimator's 0.5), agreeing with the first or not."""
    entropy = np.tile([0.1, 0.1, 0.2 if sure else 0.9], (n, 1))
    prediction = np.tile([3, 3, 3 if agree else 4], (n, 1))
    return entropy, prediction


def test_each_budget_has_its_own_cell() -> None:
    guard, policy = guard_and_policy()
    low, high = policy.decide(ClassifyOptions(budget=0.25)), policy.decide(ClassifyOptions(budget=0.455))
    assert low.expected == high.expected and (ceiling_of(low), ceiling_of(high)) == (0.25, 0.45)
    assert ceiling_of(policy.decide(ClassifyOptions(budget=0.05))) == 0.1  # clamped: the point's own cost
    for _ in range(200):
        guard.observe(low, 0.4)  # 0.4 is too much for 0.25, within 0.45
        guard.observe(high, 0.4)
    assert guard.theta(low) > low.threshold and guard.theta(high) == high.threshold


def test_replies_quote_the_live_estimate_once_enough_shadow_rows_depart() -> None:
    guard, policy = guard_and_policy()
    rule = policy.decide(ClassifyOptions(budget=0.25))
    first = guard.observe(rule, 0.1)
    assert first.source == "offline" and first.live is None and first.used == 0.92
    guard.witness(*shadow_rows(LAW.change_rows - 1, sure=False))  # the last exit unsure: likely wrong
    assert guard.observe(rule, 0.1).live is None  # one row short of enough
    guard.witness(*shadow_rows(1, sure=False))
    estimate = guard.observe(rule, 0.1)
    assert estimate.live == 0.0 and estimate.source == "offline" and estimate.used == 0.92  # too few to quote
    assert {e.source for e in guard.live_curve_at(policy.frontier)} == {"offline"}  # nor to move the floors
    guard.witness(*shadow_rows(LAW.quote_rows - LAW.change_rows, sure=False))
    estimate = guard.observe(rule, 0.1)
    assert estimate.source == "live" and estimate.used == estimate.live == 0.0
    assert guard.summary() == (0.0, 0.92)
    assert [e.used for e in guard.live_curve_at(policy.frontier)] == [0.0] * 4  # the last exit unsure too
    (live,) = guard.live_curve()
    assert live["replies"] == 4 and live["live_accuracy"] == 0.0 and live["budget"] == 0.25
    guard.witness(*shadow_rows(LAW.window, sure=True))  # the window slides: the old evidence is gone
    assert guard.observe(rule, 0.1).live == 1.0


def test_a_change_of_images_drops_the_evidence_from_before_it() -> None:
    """After a shift ends, a sliding window alone quoted the shifted images' accuracy until it had slid past
    them (2,700 replies at the default sampling); the evidence from before a change is dropped once it shows."""
    guard, policy = guard_and_policy()
    rule = policy.decide(ClassifyOptions(budget=0.25))
    guard.witness(*shadow_rows(LAW.window, sure=False))  # shifted images: every answer likely wrong
    assert guard.observe(rule, 0.1).live == 0.0
    guard.witness(*shadow_rows(LAW.change_rows, sure=True))  # the shift ended ...
    assert guard.changes == 0  # ... as the first look says, and the next one decides
    guard.witness(*shadow_rows(LAW.change_every, sure=True))
    assert guard.changes == 1 and len(guard.evidence) <= LAW.change_rows + LAW.change_every
    assert guard.observe(rule, 0.1).live == 1.0  # a sliding window: 60 / 400 = 0.15
    assert guard.observe(rule, 0.1).source == "offline"  # 60 rows: too few to quote
    guard.witness(*shadow_rows(LAW.quote_rows - len(guard.evidence), sure=True))
    assert guard.observe(rule, 0.1).source == "live"  # the calibration says 0.92; the evidence says more


def rows_with_last_entropy(last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    entropy = np.column_stack([np.full(len(last), 0.1), np.full(len(last), 0.1), last])
    return entropy, np.full(entropy.shape, 3)


def test_a_change_that_the_next_look_does_not_show_keeps_the_evidence() -> None:
    """A run of less sure rows looks like a change at one look, and the next rows show none: the evidence stays,
    all of it (kept, the newest rows would be the ones that stood out, and so would their estimate)."""
    older, run, after = np.tile([0.1, 0.3], 175), np.full(LAW.change_rows, 0.28), np.zeros(LAW.change_every)
    assert change_point(np.concatenate([older, run]), LAW.change_rows, LAW.change_z) is not None
    assert change_point(np.concatenate([older, run, after])[-LAW.window:], LAW.change_rows, LAW.change_z) is None
    guard, _ = guard_and_policy()
    for part in (older, run, after):
        guard.witness(*rows_with_last_entropy(part))
    assert guard.changes == 0 and len(guard.evidence) == LAW.window


def test_a_change_point_is_found_only_where_the_entropies_differ() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):  # identical images: one distribution throughout, no change
        assert change_point(rng.exponential(0.2, 400), 50, LAW.change_z) is None
    shifted, clean = rng.exponential(0.6, 320), rng.exponential(0.2, 80)  # the shift ends: surer again
    keep = change_point(np.concatenate([shifted, clean]), 50, LAW.change_z)
    assert keep is not None and 60 <= keep <= 100  # about the 80 clean rows
    assert change_point(np.concatenate([shifted, clean[:30]]), 50, LAW.change_z) is None  # too few to tell
    assert change_point(np.full(400, 0.3), 50, LAW.change_z) is None


def test_the_estimate_counts_disagreeing_answers_at_the_validation_rate() -> None:
    """Answers that differ from the last exit's are right at q(θ), whatever the last exit's confidence."""
    guard, policy = guard_and_policy()
    rule = policy.decide(ClassifyOptions(budget=0.25))  # θ 0.7: the answer is the first exit's
    guard.witness(*shadow_rows(LAW.window // 2, sure=True, agree=False))
    guard.witness(*shadow_rows(LAW.window // 2, sure=True))
    assert guard.observe(rule, 0.1).live == pytest.approx(0.5 * 0.25 + 0.5 * 1.0)
    full = policy.decide(ClassifyOptions(budget=1.0))  # θ 0: the last exit answers, so it always agrees
    assert guard.observe(full, 1.0).live == 1.0


def test_the_table_is_the_estimate_at_every_theta() -> None:
    """The guard looks the estimate up in a table built once per new evidence (AccuracyTable), not once per
    reply: at any θ, on evidence with ties and θ exactly on an entropy or a grid point, it is the direct
    figure, with 2 to 5 exits and rows whose entropies rise, fall or repeat."""
    rng = np.random.default_rng(1)
    for exits in (2, 3, 5):
        guard, _ = guard_and_policy()  # a guard of 3 exits
        entropy = np.round(rng.random((LAW.window, exits)) * 1.2, 2)  # rounded: ties, and θ that equal an entropy
        entropy[:20] = np.sort(entropy[:20], axis=1)  # rising along the exits
        entropy[20:40, 1:] = entropy[20:40, :1]  # equal at every exit
        prediction = rng.integers(0, 3, (LAW.window, exits))
        estimator = guard.estimator
        table = estimator.table(entropy, prediction)
        if exits == 3:
            guard.witness(entropy, prediction)
        thetas = [*rng.random(300) * 1.3, *entropy[:50].ravel(), *estimator.thetas, 0.0, 5.0]
        for theta in thetas:
            direct = estimator.accuracy(entropy, prediction, theta)
            assert table.at(theta) == pytest.approx(direct, abs=1e-12), (exits, theta)
            if exits == 3:
                assert guard._live(theta) == pytest.approx(direct, abs=1e-12), theta


def test_shadow_passes_take_every_kth_row_that_may_reach_the_last_exit_and_only_with_room() -> None:
    guard, policy = guard_and_policy()
    budget = policy.decide(ClassifyOptions(budget=0.25))
    capped = policy.decide(ClassifyOptions(budget=0.25, max_exit=1))
    fixed = policy.decide(ClassifyOptions(threshold=0.7))
    jobs = [Job(b"", rule, 0.0) for _ in range(100) for rule in (budget, capped, fixed)]
    guard.adjust(jobs, spare=False)
    assert not any(j.shadow for j in jobs)  # a queue: no spare capacity to spend
    guard.adjust(jobs, spare=True)
    marked = [i for i, j in enumerate(jobs) if j.shadow]
    assert all(jobs[i].asked is budget for i in marked)  # never a capped row, nor one that fixed θ
    assert len(marked) == round(100 * LAW.shadow_fraction)
    gaps = {b - a for a, b in itertools.pairwise(marked)}
    assert max(gaps) - min(gaps) <= 3  # spread out, every ~1/fraction-th eligible row
    bare = DriftGuard(policy.curve, None, LAW, enabled=True)  # no estimator: nothing to shadow for
    others = [Job(b"", budget, 0.0) for _ in range(100)]
    bare.adjust(others, spare=True)
    assert not any(j.shadow for j in others)


def test_rows_that_fix_theta_or_a_cap_are_left_alone() -> None:
    guard, policy = guard_and_policy()
    budget = policy.decide(ClassifyOptions(budget=0.25))
    for _ in range(200):
        guard.observe(budget, 1.0)
    assert guard.theta(budget) > budget.threshold  # these replies cost too much: their rows exit earlier
    fixed = policy.decide(ClassifyOptions(threshold=0.7))
    capped = policy.decide(ClassifyOptions(budget=0.25, max_exit=1))
    assert guard.theta(fixed) == 0.7 and guard.theta(capped) == capped.threshold
    assert guard.observe(fixed, 1.0).source == "offline" and len(guard.cells) == 1


def test_off_measures_but_never_moves_theta() -> None:
    guard, policy = guard_and_policy()
    guard.enabled = False
    rule = policy.decide(ClassifyOptions(budget=0.25))
    for _ in range(200):
        guard.observe(rule, 1.0)
    assert guard.theta(rule) == rule.threshold and guard.live_curve()[0]["live_threshold"] > rule.threshold


def test_floors_use_the_live_curve() -> None:
    """A floor the calibrated curve meets but the live evidence contradicts is unsatisfiable, with live numbers."""
    guard, policy = guard_and_policy()
    rule = policy.decide(ClassifyOptions(budget=0.25))
    guard.witness(*shadow_rows(LAW.window, sure=False))  # every answer likely wrong
    guard.observe(rule, 0.25)
    policy.set_live(guard.live_curve_at(policy.frontier))
    with pytest.raises(Unsatisfiable, match="live estimate"):
        policy.decide(ClassifyOptions(min_accuracy=0.95))
    policy.set_live([Estimate(None, p.accuracy, "offline") for p in policy.frontier])
    assert policy.decide(ClassifyOptions(min_accuracy=0.9)).expected.accuracy >= 0.9


def test_floors_choose_from_each_points_own_live_figure_and_the_reply_quotes_it() -> None:
    """Images on which the early exits disagree with the last one (half of them): the cheap points lose 27-33
    points, full depth nothing. Shifting the whole curve by the cells in use (the law this replaced) refused
    min_accuracy 0.9 outright; each point's own figure serves it at full depth. And a reply with a floor quotes
    the very figure its floor was checked against."""
    guard, policy = guard_and_policy()
    guard.witness(*shadow_rows(LAW.window // 2, sure=True, agree=True))
    guard.witness(*shadow_rows(LAW.window // 2, sure=True, agree=False))
    guard.observe(policy.decide(ClassifyOptions(budget=0.25)), 0.25)  # the cell in use: 0.625 live, 0.92 calibrated
    live = guard.live_curve_at(policy.frontier)  # by rising cost: θ 3.0, 0.7, 0.3, 0.0
    assert [e.used for e in live] == pytest.approx([0.65, 0.625, 0.6, 1.0])
    assert {e.source for e in live} == {"live"}
    policy.set_live(live)
    full = policy.decide(ClassifyOptions(min_accuracy=0.9))
    assert full.expected.threshold == 0.0 and full.quoted == live[3]
    cheap = policy.decide(ClassifyOptions(budget=0.3, min_accuracy=0.62))
    assert cheap.expected.threshold == 0.7 and cheap.quoted.used == pytest.approx(0.625)
    cheaper = policy.decide(ClassifyOptions(budget=0.3, min_accuracy=0.63))  # a cheaper point is better today
    assert cheaper.expected.threshold == 3.0 and cheaper.quoted.used == pytest.approx(0.65)
    with pytest.raises(Unsatisfiable, match=r"best within it is 0\.65 on today's images .*needs budget 1\.0"):
        policy.decide(ClassifyOptions(budget=0.3, min_accuracy=0.66))
    degraded = policy.degrade(policy.decide(ClassifyOptions(budget=1.0, min_accuracy=0.62)), 1.0)
    assert degraded.expected.threshold == 3.0 and degraded.quoted.used >= 0.62
    for floor in np.linspace(0.5, 1.0, 51):  # whatever the floor: never a quote below it
        for budget in (None, 0.3, 0.6, 1.0):
            try:
                decision = policy.decide(ClassifyOptions(budget=budget, min_accuracy=float(floor)))
            except Unsatisfiable:
                continue
            assert decision.quoted.used >= floor - 1e-9, (floor, budget, decision)


def test_while_the_cells_in_use_agree_with_the_calibration_floors_keep_the_calibrated_curve() -> None:
    """Point by point, chance departures at some of a curve's many points refused floors on clean images (1% of
    the teacher's floor requests at half its capacity). So the live curve is used once the replies of the cells
    in use, pooled, contradict the calibration; until then a point that departs alone does not move floors."""
    guard, policy = guard_and_policy()
    parts = [shadow_rows(296, sure=True), shadow_rows(28, sure=False), shadow_rows(76, sure=True, agree=False)]
    order = np.random.default_rng(0).permutation(LAW.window)  # mixed: one kind of images, no change to act on
    guard.witness(np.concatenate([e for e, _ in parts])[order], np.concatenate([p for _, p in parts])[order])
    alone = [guard.estimate_at(p, p.threshold) for p in policy.frontier]
    assert [e.source for e in alone] == ["offline", "live", "live", "offline"]  # θ 0.7 and 0.3 depart alone
    guard.observe(policy.decide(ClassifyOptions(budget=1.0)), 1.0)  # in use: full depth, 0.93 as calibrated
    policy.set_live(guard.live_curve_at(policy.frontier))
    assert {e.source for e in policy.live} == {"offline"}
    assert policy.decide(ClassifyOptions(budget=0.3, min_accuracy=0.9)).quoted.used == 0.92
    guard.observe(policy.decide(ClassifyOptions(budget=0.25)), 0.25)  # now the cells in use contradict it
    guard.observe(policy.decide(ClassifyOptions(budget=0.25)), 0.25)
    policy.set_live(guard.live_curve_at(policy.frontier))
    assert [e.source for e in policy.live] == ["offline", "live", "live", "offline"]
    with pytest.raises(Unsatisfiable, match=r"the best within it is 0\.85; the floor needs budget 1\.0"):
        policy.decide(ClassifyOptions(budget=0.3, min_accuracy=0.9))  # θ 0.7 reads 0.79 today, θ 3.0 still 0.85



def test_degrading_on_a_live_curve_that_does_not_rise_with_cost_never_goes_below_the_floor() -> None:
    """Live figures by rising cost 0.80, 0.88, 0.86, 0.93: half pressure targets the third point's cost, whose
    0.86 is below a 0.87 floor the second meets; the row goes to the second (a review found the third)."""
    _, policy = guard_and_policy()
    policy.set_live([Estimate(live, p.accuracy, "live") for live, p in zip((0.80, 0.88, 0.86, 0.93), policy.frontier,
                                                                          strict=True)])
    asked = policy.decide(ClassifyOptions(budget=1.0, min_accuracy=0.87))
    degraded = policy.degrade(asked, 0.5)
    assert degraded.expected.threshold == 0.7 and degraded.quoted.used == 0.88


def test_a_floor_row_takes_its_cells_live_theta_only_where_that_meets_its_floor_and_quotes_it() -> None:
    """The cell's offset raises θ to hold a budget's compute, and so lowers accuracy. Where the early exits
    disagree with a sure last exit, the raised θ answers from the first exit, live 25%: the floor row stays
    at its calibrated θ (live 100%). Where they agree, the raised θ keeps 100%: the row takes it, quoting it."""
    guard, policy = guard_and_policy()
    floor = policy.decide(ClassifyOptions(min_accuracy=0.92))
    assert floor.expected.threshold == 0.7
    for _ in range(200):  # replies in its cell that cost four times the point's 0.25: the cell raises θ
        guard.observe(dataclasses.replace(floor, min_accuracy=None), 1.0)
    raised = guard.theta(floor)
    assert raised > 1.0
    guard.witness(np.tile([0.9, 0.9, 0.2], (LAW.window, 1)), np.tile([4, 4, 3], (LAW.window, 1)))
    assert guard.estimate_at(floor.expected, raised).used == 0.25
    budget = policy.decide(ClassifyOptions(budget=0.25))  # the same cell, without a floor: it moves
    kept, moved = Job(b"", floor, 0.0), Job(b"", budget, 0.0)
    guard.adjust([kept, moved], spare=False)
    assert kept.rule is floor and kept.rule.quoted.used >= 0.92
    assert moved.rule.threshold == raised
    guard.witness(np.tile([0.9, 0.9, 0.2], (LAW.window, 1)), np.tile([3, 3, 3], (LAW.window, 1)))
    agreeing = Job(b"", floor, 0.0)
    guard.adjust([agreeing], spare=False)
    assert agreeing.rule.threshold == raised and agreeing.rule.quoted.used == 1.0


def test_a_floor_row_is_held_to_the_calibrated_figure_at_its_raised_theta_until_the_evidence_says_more() -> None:
    """With no estimate to quote (here no estimator at all), the figure at the raised θ is the calibrated
    curve's there (0.86 at θ 2.0), not the point's own 0.92: a floor of 0.92 keeps its θ. A 0.8 floor takes
    the raised θ, quoting 0.86. Kept rows do not step the cell: a cell of floor rows alone raised θ to its
    bound so."""
    points = [OperatingPoint(0.0, 1.0, 0.93, [0, 0, 1]), OperatingPoint(0.7, 0.25, 0.92, [0.8, 0.1, 0.1]),
              OperatingPoint(2.0, 0.15, 0.86, [0.9, 0.1, 0]), OperatingPoint(3.0, 0.1, 0.85, [1, 0, 0])]
    curve = CalibrationCurve(points, [10, 50, 100])
    guard, policy = DriftGuard(curve, None, LAW, enabled=True), BudgetPolicy(curve, 3, 10, 0.5, 10)
    floor = policy.decide(ClassifyOptions(min_accuracy=0.92))
    for _ in range(200):
        guard.observe(dataclasses.replace(floor, min_accuracy=None), 1.0)  # budget rows raise the cell's θ
    raised = guard.theta(floor)
    assert raised >= 2.0
    kept = Job(b"", floor, 0.0)
    guard.adjust([kept], spare=False)
    assert kept.rule is floor
    before = guard.cells[(floor.expected.threshold, ceiling_of(floor))][1]
    guard.observe(kept.rule, 1.0)
    assert guard.cells[(floor.expected.threshold, ceiling_of(floor))][1] == before  # not stepped
    low = dataclasses.replace(floor, min_accuracy=0.8, floor_accuracy=0.8)
    moved = Job(b"", low, 0.0)
    guard.adjust([moved], spare=False)
    assert moved.rule.threshold == raised and moved.rule.quoted == Estimate(None, 0.86, "offline")
