"""Budget semantics (DESIGN section 4): request options -> θ, cap, and what the reply promises."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from erde.calibrate import CalibrationCurve, OperatingPoint
from service.errors import BadOptions
from service.schemas import ClassifyOptions


@dataclass(frozen=True)
class Decision:
    threshold: float
    budget: float | None  # None when the caller gave θ directly
    clamped: bool  # the budget was below the cheapest calibrated point
    cap: int  # last exit this image may reach
    top_k: int
    expected: OperatingPoint  # calibrated accuracy and MACs of the point used


class BudgetPolicy:
    """One model's rule, built once: budgets via the calibration curve, θ overrides by lookup."""

    def __init__(self, curve: CalibrationCurve, num_exits: int, num_classes: int, default_budget: float,
                 max_top_k: int) -> None:
        self.curve = curve
        self.num_exits = num_exits
        self.max_top_k = min(max_top_k, num_classes)
        self.default_budget = default_budget
        self._by_threshold = sorted(curve.points, key=lambda p: p.threshold)
        self._thresholds = [p.threshold for p in self._by_threshold]

    def point_for_threshold(self, threshold: float) -> OperatingPoint:
        """The calibrated point at the largest grid θ not above `threshold` (the rule is monotone in θ)."""
        i = bisect.bisect_right(self._thresholds, threshold) - 1
        return self._by_threshold[max(i, 0)]

    def decide(self, options: ClassifyOptions) -> Decision:
        if options.max_exit is not None and options.max_exit >= self.num_exits:
            raise BadOptions(f"max_exit must be between 0 and {self.num_exits - 1} for this model")
        if options.top_k > self.max_top_k:
            raise BadOptions(f"top_k must be between 1 and {self.max_top_k} for this model")
        cap = self.num_exits - 1 if options.max_exit is None else options.max_exit
        if options.threshold is not None:
            point = self.point_for_threshold(options.threshold)
            return Decision(options.threshold, None, False, cap, options.top_k, point)
        budget = self.default_budget if options.budget is None else options.budget
        point, clamped = self.curve.choose(budget)
        return Decision(point.threshold, budget, clamped, cap, options.top_k, point)
