import numpy as np
import pytest

from erde.calibrate import ExitOutputs, simulate, sweep
from erde.curve import CalibrationCurve, OperatingPoint

MACS = [10, 20, 40]


def outputs() -> ExitOutputs:
    rng = np.random.default_rng(0)
    ent = rng.uniform(0, 2, size=(200, 3))
    labels = rng.integers(0, 4, 200)
    pred = np.stack([np.where(rng.random(200) < p, labels, (labels + 1) % 4) for p in (0.6, 0.8, 0.95)], 1)
    return ExitOutputs(ent, pred, labels)


def test_threshold_zero_is_full_depth_and_huge_is_first_exit() -> None:
    out = outputs()
    full = simulate(out, MACS, 0.0)
    assert full.macs_fraction == 1.0 and full.exit_histogram == [0, 0, 1]
    first = simulate(out, MACS, 1e9)
    assert first.macs_fraction == pytest.approx(0.25) and first.exit_histogram == [1, 0, 0]
    curve = sweep(out, MACS, points=50)
    assert min(p.threshold for p in curve.points) == 0.0
    assert curve.points[-1].exit_histogram == [1.0, 0.0, 0.0]  # the grid's top always stops at exit 0


def point(theta: float, macs: float, acc: float) -> OperatingPoint:
    return OperatingPoint(theta, macs, acc, [0.0, 0.0, 1.0])


def test_budget_picks_most_accurate_affordable_point_and_cheaper_on_near_ties() -> None:
    curve = CalibrationCurve([point(0.0, 1.0, 0.95), point(0.1, 0.8, 0.95), point(0.3, 0.5, 0.9402),
                              point(0.4, 0.45, 0.94), point(0.9, 0.3, 0.80)], MACS)
    assert curve.choose(1.0) == (point(0.1, 0.8, 0.95), False)  # same accuracy, cheaper
    assert curve.choose(0.5)[0].threshold == 0.4  # 0.9402 vs 0.94 is a near tie: the cheaper wins
    assert curve.choose(0.44)[0].threshold == 0.9
    assert curve.choose(0.1) == (point(0.9, 0.3, 0.80), True)  # below the cheapest: clamped, said so


def test_lower_budget_never_costs_more() -> None:
    curve = sweep(outputs(), MACS, points=80)
    costs = [curve.choose(b)[0].macs_fraction for b in np.linspace(0.05, 1.0, 40)]
    assert costs == sorted(costs) or all(c <= b + 1e-9 for c, b in zip(costs, np.linspace(0.05, 1, 40), strict=True))
    for b in np.linspace(0.3, 1.0, 15):
        chosen, clamped = curve.choose(float(b))
        assert not clamped and chosen.macs_fraction <= b + 1e-9


def test_round_trip_and_malformed() -> None:
    curve = sweep(outputs(), MACS, points=20)
    again = CalibrationCurve.from_dict(curve.to_dict())
    assert again.points == curve.points and again.choose(0.6) == curve.choose(0.6)
    with pytest.raises(ValueError, match="malformed"):
        CalibrationCurve.from_dict({"macs_per_exit": MACS, "points": [{"threshold": 1}]})
