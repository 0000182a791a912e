"""Budget, floor and degradation semantics (docs/design.md §4) as pure functions of options and a curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from erde.curve import CalibrationCurve, OperatingPoint
from service.engine.policy import BudgetPolicy, Decision
from service.errors import BadOptions, Unsatisfiable
from service.schemas import parse_options

ROOT = Path(__file__).resolve().parents[2]

# (θ, expected MACs fraction, accuracy); the 0.35 point is dominated by the 0.3 one, the 0.7 one is a
# near-tie (within 5e-4) of the 0.5 one, so the budget rule prefers 0.5 up to budget 1.
CURVE = [(0.0, 1.0, 0.9204), (0.1, 0.7, 0.9204), (0.2, 0.5, 0.9200), (0.5, 0.3, 0.91), (0.6, 0.35, 0.905),
         (0.8, 0.25, 0.90), (1.0, 0.2, 0.88), (2.0, 0.15, 0.85), (3.0, 0.12, 0.80)]


def curve_of(rows: list[tuple[float, float, float]]) -> CalibrationCurve:
    return CalibrationCurve([OperatingPoint(t, c, a, [1.0, 0.0, 0.0]) for t, c, a in rows], [1, 2, 3])


def policy(server_floor: float = 0.85, curve: CalibrationCurve | None = None) -> BudgetPolicy:
    return BudgetPolicy(curve or curve_of(CURVE), num_exits=3, num_classes=10, default_budget=0.5, max_top_k=100,
                        min_accuracy=server_floor)


def decide(**fields: str) -> Decision:
    return policy().decide(parse_options(fields))


# options -> (θ, budget used, requested_budget, floor_accuracy, adjustable)
DECISIONS = {
    "nothing: the default budget": ({}, (0.2, 0.5, 0.5, 0.85, True)),
    "budget alone, as before floors": ({"budget": "0.3"}, (0.5, 0.3, 0.3, 0.85, True)),
    "floor alone: the cheapest point meeting it": ({"min_accuracy": "0.9"}, (0.8, 0.25, None, 0.9, True)),
    "floor alone, exactly a point's accuracy": ({"min_accuracy": "0.88"}, (1.0, 0.2, None, 0.88, True)),
    "floor alone, below every point": ({"min_accuracy": "0.5"}, (3.0, 0.12, None, 0.5, True)),
    "budget and a floor it meets": ({"budget": "0.3", "min_accuracy": "0.9"}, (0.5, 0.3, 0.3, 0.9, True)),
    "near-tie pick under the floor: the more accurate point": (
        {"budget": "1", "min_accuracy": "0.9202"}, (0.1, 1.0, 1.0, 0.9202, True)),
    "threshold: fixed, never degraded": ({"threshold": "0.5"}, (0.5, None, None, 0.85, False)),
    "max_exit: never degraded": ({"budget": "0.3", "max_exit": "1"}, (0.5, 0.3, 0.3, 0.85, False)),
}


@pytest.mark.parametrize("case", DECISIONS)
def test_decisions(case: str) -> None:
    fields, (threshold, budget, requested, floor, adjustable) = DECISIONS[case]
    d = decide(**fields)
    assert (d.threshold, d.budget, d.requested_budget, d.floor_accuracy, d.adjustable) == \
        (threshold, budget, requested, floor, adjustable)
    assert d.min_accuracy == (float(fields["min_accuracy"]) if "min_accuracy" in fields else None)
    assert not d.degraded and d.expected.accuracy >= (d.min_accuracy or 0)


# options -> (error type, code, what the message must say)
REFUSALS = {
    "floor above every point": ({"min_accuracy": "0.95"}, Unsatisfiable, "unsatisfiable", "best on offer is 0.9204"),
    "floor 1": ({"min_accuracy": "1"}, Unsatisfiable, "unsatisfiable", "best on offer is 0.9204"),
    "budget too small for the floor": ({"budget": "0.22", "min_accuracy": "0.9"}, Unsatisfiable, "unsatisfiable",
                                       "the best within it is 0.88; the floor needs budget 0.25"),
    "budget below every point, floor above it": ({"budget": "0.05", "min_accuracy": "0.85"}, Unsatisfiable,
                                                 "unsatisfiable", "the floor needs budget 0.15"),
    "budget and a floor above every point": ({"budget": "0.6", "min_accuracy": "0.99"}, Unsatisfiable,
                                             "unsatisfiable", "best on offer is 0.9204"),
    "floor with threshold": ({"min_accuracy": "0.9", "threshold": "0.1"}, BadOptions, "invalid_option",
                             "a threshold bypasses them"),
    "floor with max_exit": ({"min_accuracy": "0.9", "max_exit": "1"}, BadOptions, "invalid_option",
                            "did not measure capped depths"),
    "floor 0": ({"min_accuracy": "0"}, BadOptions, "invalid_option", "min_accuracy"),
    "floor above 1": ({"min_accuracy": "1.01"}, BadOptions, "invalid_option", "min_accuracy"),
    "floor nan": ({"min_accuracy": "nan"}, BadOptions, "invalid_option", "min_accuracy"),
    "floor text": ({"min_accuracy": "high"}, BadOptions, "invalid_option", "min_accuracy"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals(case: str) -> None:
    fields, error, code, message = REFUSALS[case]
    with pytest.raises(error) as caught:
        decide(**fields)
    assert caught.value.status == 422 and caught.value.code == code and message in caught.value.message


def test_the_quoted_remedies_are_accepted() -> None:
    """What an unsatisfiable message offers (rounded the safe way) works when asked for."""
    shipped = policy(curve=shipped_curve())
    best = max(p.accuracy for p in shipped.curve.points)
    with pytest.raises(Unsatisfiable) as caught:
        shipped.decide(parse_options({"min_accuracy": str(best + 1e-3)}))
    offered = caught.value.message.split("best on offer is ")[1].split(" ")[0]
    assert shipped.decide(parse_options({"min_accuracy": offered})).expected.accuracy >= float(offered)
    with pytest.raises(Unsatisfiable) as caught:
        shipped.decide(parse_options({"min_accuracy": "0.91", "budget": "0.2"}))
    needed = caught.value.message.split("the floor needs budget ")[1]
    d = shipped.decide(parse_options({"min_accuracy": "0.91", "budget": needed}))
    assert d.expected.accuracy >= 0.91 and d.expected.macs_fraction <= float(needed)


def shipped_curve() -> CalibrationCurve:
    return CalibrationCurve.from_dict(json.loads((ROOT / "model_store/fashion-mnist/1/calibration.json").read_text()))


# ---- degradation under load ------------------------------------------------------------------------------


def test_no_pressure_or_a_fixed_row_keeps_the_decision_itself() -> None:
    p = policy()
    asked = p.decide(parse_options({"budget": "1"}))
    assert p.degrade(asked, 0.0) is asked
    for fixed in ({"threshold": "0.2"}, {"budget": "1", "max_exit": "2"}):
        d = p.decide(parse_options(fixed))
        assert p.degrade(d, 1.0) is d


@pytest.mark.parametrize("fields, floor_threshold", [
    ({"budget": "1"}, 2.0),  # no floor of its own: down to the server's 0.85
    ({"budget": "1", "min_accuracy": "0.9"}, 0.8),
    ({"min_accuracy": "0.5", "budget": "0.3"}, 3.0),  # a floor below the server's is the row's to choose
])
def test_full_pressure_is_the_cheapest_point_meeting_the_floor(fields: dict, floor_threshold: float) -> None:
    p = policy()
    asked = p.decide(parse_options(fields))
    d = p.degrade(asked, 1.0)
    assert d.threshold == floor_threshold and d.degraded and d.expected.accuracy >= d.floor_accuracy
    assert (d.requested_budget, d.min_accuracy, d.cap, d.top_k) == \
        (asked.requested_budget, asked.min_accuracy, asked.cap, asked.top_k)
    assert d.budget == pytest.approx(d.expected.macs_fraction) and not d.clamped


@pytest.mark.parametrize("fields, server_floor", [
    ({"min_accuracy": "0.9"}, 0.85),  # a floor alone is already the cheapest point meeting it
    ({"budget": "0.05"}, 0.85),  # clamped: already the cheapest point
    ({"budget": "0.2"}, 0.9),  # asked for less accuracy than the server floor: kept as asked
    ({"budget": "1"}, 0.99),  # a server floor no point meets: nothing is cheap enough
])
def test_rows_at_or_below_their_floor_are_never_degraded(fields: dict, server_floor: float) -> None:
    p = policy(server_floor)
    d = p.decide(parse_options(fields))
    assert p.degrade(d, 1.0) is d


@pytest.mark.parametrize("floor", [None, "0.88", "0.91"])
def test_degradation_is_graded_and_never_below_the_floor_on_the_shipped_curve(floor: str | None) -> None:
    p = policy(curve=shipped_curve())
    asked = p.decide(parse_options({"budget": "1"} | ({"min_accuracy": floor} if floor else {})))
    pressures = [i / 100 for i in range(101)]
    answers = [p.degrade(asked, x) for x in pressures]
    costs = [d.expected.macs_fraction for d in answers]
    accuracies = [d.expected.accuracy for d in answers]
    assert costs == sorted(costs, reverse=True) and accuracies == sorted(accuracies, reverse=True)
    assert len(set(costs)) >= 10  # graded: many steps between the asked point and the floor
    assert min(accuracies) >= asked.floor_accuracy and costs[-1] < 0.6 * costs[0]
    for d in answers:
        assert d.degraded == (d.expected != asked.expected)
        assert d.expected.macs_fraction <= d.budget + 1e-9 <= asked.budget + 1e-9

