"""Budget semantics (docs/design.md §4): request options -> θ, cap, and what the reply promises.

Floors and overload degradation work on the curve's *frontier*: the operating points more
accurate than every cheaper point, in rising cost (and so rising accuracy). Every point the
budget rule picks is on it, so moving along it trades compute for accuracy monotonically.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass

from erde.calibrate import CalibrationCurve, OperatingPoint
from service.errors import BadOptions, Unsatisfiable
from service.schemas import ClassifyOptions

EPS = 1e-9  # floors and budgets are compared with this slack (0.91 vs 5460/6000 in floating point)


@dataclass(frozen=True, kw_only=True)
class Decision:
    threshold: float
    budget: float | None  # budget used; None when the caller gave θ directly
    clamped: bool  # the budget was below the cheapest calibrated point
    cap: int  # last exit this image may reach
    top_k: int
    expected: OperatingPoint  # calibrated accuracy and MACs of the point used
    min_accuracy: float | None  # the row's floor, None when not given
    requested_budget: float | None  # the budget asked for (or the server default); None with θ or a floor alone
    adjustable: bool  # may be answered cheaper under load; False when the row fixed θ or max_exit
    floor_accuracy: float  # never degraded below this: the row's min_accuracy, else the server's floor
    degraded: bool = False  # answered at a cheaper point than asked, under load

    @classmethod
    def expert(cls, threshold: float, cap: int, top_k: int, point: OperatingPoint, server_floor: float) -> Decision:
        """A row that fixed θ itself: no budget, never degraded; `point` is the calibrated one nearest below."""
        return cls(threshold=threshold, budget=None, clamped=False, cap=cap, top_k=top_k, expected=point,
                   min_accuracy=None, requested_budget=None, adjustable=False, floor_accuracy=server_floor)


class BudgetPolicy:
    """One model's rule, built once: budgets and floors via the calibration curve, θ overrides by lookup."""

    def __init__(self, curve: CalibrationCurve, num_exits: int, num_classes: int, default_budget: float,
                 max_top_k: int, min_accuracy: float = 0.0) -> None:
        self.curve = curve
        self.num_exits = num_exits
        self.max_top_k = min(max_top_k, num_classes)
        self.default_budget = default_budget
        self.server_floor = min_accuracy  # ERDE_MIN_ACCURACY: how far rows without a floor may be degraded
        self._by_threshold = sorted(curve.points, key=lambda p: p.threshold)
        self._thresholds = [p.threshold for p in self._by_threshold]
        # The curve's own cost order (cheaper first, larger θ first among equals), keeping only points
        # strictly more accurate than all before them: the budget rule's answers are all among these.
        frontier: list[OperatingPoint] = []
        for point in sorted(curve.points, key=lambda p: (p.macs_fraction, -p.threshold)):
            if not frontier or point.accuracy > frontier[-1].accuracy:
                frontier.append(point)
        self._frontier = frontier
        self._frontier_costs = [p.macs_fraction for p in frontier]
        self._frontier_accuracies = [p.accuracy for p in frontier]
        # Live accuracy − calibrated accuracy at the points in use, once the drift guard has evidence
        # (service/engine/drift.py): floors compare against the live curve, the calibrated one shifted by it.
        self.live_shift = 0.0

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
        floor = options.min_accuracy
        if options.threshold is not None:
            point = self.point_for_threshold(options.threshold)
            return Decision.expert(options.threshold, cap, options.top_k, point, self.server_floor)
        adjustable = options.max_exit is None
        if options.budget is None and floor is not None:  # "pay the least for the accuracy I need"
            point = self._frontier[self._cheapest_meeting(floor)]
            return Decision(threshold=point.threshold, budget=point.macs_fraction, clamped=False, cap=cap,
                            top_k=options.top_k, expected=point, min_accuracy=floor, requested_budget=None,
                            adjustable=adjustable, floor_accuracy=floor)
        budget = self.default_budget if options.budget is None else options.budget
        point, clamped = self.curve.choose(budget)
        if floor is not None and point.accuracy + self.live_shift < floor - EPS:
            point = self._within_budget_meeting(floor, budget)
        return Decision(threshold=point.threshold, budget=budget, clamped=clamped, cap=cap, top_k=options.top_k,
                        expected=point, min_accuracy=floor, requested_budget=budget, adjustable=adjustable,
                        floor_accuracy=self.server_floor if floor is None else floor)

    def degrade(self, decision: Decision, pressure: float) -> Decision:
        """The decision to answer with under load `pressure` ∈ [0, 1]: graded along the frontier.

        The target cost moves from the requested point's (pressure 0) to the cost of the cheapest
        point meeting the row's floor (pressure 1), linearly in MACs fraction; the row gets the most
        accurate point within it, which is never below its floor. Rows that fixed θ or a cap, rows
        already at or below their floor, and pressure 0 keep the decision itself (so
        `degrade(d, 1.0) is d` says that d cannot get any cheaper). O(log n): three bisections.
        """
        if pressure <= 0.0 or not decision.adjustable:
            return decision
        requested = decision.expected
        top = bisect.bisect_right(self._frontier_costs, requested.macs_fraction + EPS) - 1
        lowest = bisect.bisect_left(self._frontier_accuracies, decision.floor_accuracy - self.live_shift - EPS)
        if lowest >= top:
            return decision
        floor_cost = self._frontier_costs[lowest]
        target = requested.macs_fraction - min(pressure, 1.0) * (requested.macs_fraction - floor_cost)
        index = max(bisect.bisect_right(self._frontier_costs, target + EPS) - 1, lowest)
        if index >= top:
            return decision
        point = self._frontier[index]
        return dataclasses.replace(decision, threshold=point.threshold, budget=target, clamped=False, expected=point,
                                   degraded=True)

    def _cheapest_meeting(self, floor: float) -> int:
        """Frontier index of the cheapest point whose expected accuracy meets `floor`; 422 when none does."""
        index = bisect.bisect_left(self._frontier_accuracies, floor - self.live_shift - EPS)
        if index == len(self._frontier):
            best = self._frontier[-1]
            raise Unsatisfiable(f"no operating point of this model meets min_accuracy {floor}: the best on offer "
                                f"is {_down(best.accuracy + self.live_shift)}{self._live_note()} "
                                f"(at budget {_up(best.macs_fraction)})")
        return index

    def _within_budget_meeting(self, floor: float, budget: float) -> OperatingPoint:
        """The budget rule's answer missed the floor: the cheapest point meeting it, if the budget allows."""
        needed = self._frontier[self._cheapest_meeting(floor)]
        if needed.macs_fraction > budget + EPS:
            best = self._frontier[max(bisect.bisect_right(self._frontier_costs, budget + EPS) - 1, 0)]
            raise Unsatisfiable(f"budget {budget} cannot meet min_accuracy {floor}: the best within it is "
                                f"{_down(best.accuracy + self.live_shift)}{self._live_note()}; the floor needs "
                                f"budget {_up(needed.macs_fraction)}")
        return needed  # within NEAR_TIE of the best in the budget: the near-tie choice fell just under the floor


    def _live_note(self) -> str:
        return "" if self.live_shift == 0.0 else \
            f" on today's images (live estimate, {self.live_shift * 100:+.1f} points from the calibrated curve)"


def _down(accuracy: float) -> float:
    """An accuracy to quote: rounded down, so that asking for it as min_accuracy succeeds."""
    return math.floor(accuracy * 1e4) / 1e4


def _up(budget: float) -> float:
    """A budget to quote: rounded up, so that asking for it succeeds."""
    return min(math.ceil(budget * 1e4) / 1e4, 1.0)
