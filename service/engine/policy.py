"""Budget semantics (docs/design.md §4): request options -> θ, cap, and what the reply promises.

Floors and overload degradation work on the curve's *frontier*: the operating points more
accurate than every cheaper point, in rising cost (and so rising accuracy). Every point the
budget rule picks is on it, so moving along it trades compute for accuracy monotonically.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
from dataclasses import dataclass

from erde.curve import CalibrationCurve, OperatingPoint
from service.errors import BadOptions, Unsatisfiable
from service.schemas import ClassifyOptions

EPS = 1e-9  # floors and budgets are compared with this slack (0.91 vs 5460/6000 in floating point)


@dataclass(frozen=True)
class Estimate:
    """What a reply says about its accuracy: both figures and which one it quotes."""

    live: float | None  # None until the drift guard has enough shadow rows (or the artifact has no estimator)
    offline: float
    source: str  # "live" or "offline"

    @property
    def used(self) -> float:
        return self.offline if self.live is None or self.source == "offline" else self.live


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
    # With a floor: the figure the floor was checked against, which the reply quotes (one snapshot for both)
    quoted: Estimate | None = None

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
        # The curve's own cost order (cheaper first, larger θ first among equals), keeping only points
        # strictly more accurate than all before them: the budget rule's answers are all among these.
        frontier: list[OperatingPoint] = []
        for point in sorted(curve.points, key=lambda p: (p.macs_fraction, -p.threshold)):
            if not frontier or point.accuracy > frontier[-1].accuracy:
                frontier.append(point)
        self._frontier = frontier
        self._frontier_costs = [p.macs_fraction for p in frontier]
        self._index = {p.threshold: i for i, p in enumerate(frontier)}
        self.set_live([Estimate(None, p.accuracy, "offline") for p in frontier])

    @property
    def frontier(self) -> list[OperatingPoint]:
        return self._frontier

    def set_live(self, estimates: list[Estimate]) -> None:
        """What a reply at each frontier point would quote now (the drift guard's live curve, renewed as its
        evidence and cells move; the calibrated figures until then). Floors and the degrade mode choose from
        it, and a reply with a floor quotes the figure its floor was checked against."""
        self.live = estimates
        # The cheapest point meeting a floor is the first whose running maximum meets it: a key to bisect on,
        # although live figures along the frontier need not rise as its calibrated ones do.
        self._reach = list(itertools.accumulate((e.used for e in estimates), max))

    def decide(self, options: ClassifyOptions) -> Decision:
        if options.max_exit is not None and options.max_exit >= self.num_exits:
            raise BadOptions(f"max_exit must be between 0 and {self.num_exits - 1} for this model")
        if options.top_k > self.max_top_k:
            raise BadOptions(f"top_k must be between 1 and {self.max_top_k} for this model")
        cap = self.num_exits - 1 if options.max_exit is None else options.max_exit
        floor = options.min_accuracy
        if options.threshold is not None:
            point = self.curve.point_at(options.threshold)
            return Decision.expert(options.threshold, cap, options.top_k, point, self.server_floor)
        adjustable = options.max_exit is None
        if options.budget is None and floor is not None:  # "pay the least for the accuracy I need"
            index = self._cheapest_meeting(floor)
            point = self._frontier[index]
            return Decision(threshold=point.threshold, budget=point.macs_fraction, clamped=False, cap=cap,
                            top_k=options.top_k, expected=point, min_accuracy=floor, requested_budget=None,
                            adjustable=adjustable, floor_accuracy=floor, quoted=self.live[index])
        budget = self.default_budget if options.budget is None else options.budget
        point, clamped = self.curve.choose(budget)
        quoted = None
        if floor is not None:
            index = self._index[point.threshold]
            if self.live[index].used < floor - EPS:
                index = self._within_budget_meeting(floor, budget)
                point = self._frontier[index]
            quoted = self.live[index]
        return Decision(threshold=point.threshold, budget=budget, clamped=clamped, cap=cap, top_k=options.top_k,
                        expected=point, min_accuracy=floor, requested_budget=budget, adjustable=adjustable,
                        floor_accuracy=self.server_floor if floor is None else floor, quoted=quoted)

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
        lowest = bisect.bisect_left(self._reach, decision.floor_accuracy - EPS)
        if lowest >= top:
            return decision
        floor_cost = self._frontier_costs[lowest]
        target = requested.macs_fraction - min(pressure, 1.0) * (requested.macs_fraction - floor_cost)
        # The most accurate point today within the target cost: the live figures need not rise with cost, and
        # the dearest point within it may read below the floor that an earlier one meets (a review found so).
        index = self._best(max(bisect.bisect_right(self._frontier_costs, target + EPS) - 1, lowest))
        if index >= top:
            return decision
        point = self._frontier[index]
        quoted = None if decision.min_accuracy is None else self.live[index]
        return dataclasses.replace(decision, threshold=point.threshold, budget=target, clamped=False, expected=point,
                                   degraded=True, quoted=quoted)

    def _cheapest_meeting(self, floor: float) -> int:
        """Frontier index of the cheapest point whose expected accuracy (live once the drift guard quotes it)
        meets `floor`; 422 when none does."""
        index = bisect.bisect_left(self._reach, floor - EPS)
        if index == len(self._frontier):
            best = self._best(len(self._frontier) - 1)
            raise Unsatisfiable(f"no operating point of this model meets min_accuracy {floor}: the best on offer "
                                f"is {_down(self.live[best].used)}{self._live_note(best)} "
                                f"(at budget {_up(self._frontier[best].macs_fraction)})")
        return index

    def _within_budget_meeting(self, floor: float, budget: float) -> int:
        """The budget rule's answer missed the floor: the cheapest point meeting it, if the budget allows."""
        needed = self._cheapest_meeting(floor)
        if self._frontier[needed].macs_fraction > budget + EPS:
            best = self._best(max(bisect.bisect_right(self._frontier_costs, budget + EPS) - 1, 0))
            raise Unsatisfiable(f"budget {budget} cannot meet min_accuracy {floor}: the best within it is "
                                f"{_down(self.live[best].used)}{self._live_note(best)}; the floor needs "
                                f"budget {_up(self._frontier[needed].macs_fraction)}")
        return needed  # within NEAR_TIE of the best in the budget: the near-tie choice fell just under the floor

    def _best(self, last: int) -> int:
        """The frontier index of the most accurate point up to `last`, by the figures replies quote."""
        return bisect.bisect_left(self._reach, self._reach[last], hi=last + 1)

    def _live_note(self, index: int) -> str:
        estimate = self.live[index]
        return "" if estimate.source != "live" else \
            f" on today's images (live estimate; {_down(estimate.offline)} on the calibration images)"


def _down(accuracy: float) -> float:
    """An accuracy to quote: rounded down, so that asking for it as min_accuracy succeeds."""
    return math.floor(accuracy * 1e4) / 1e4


def _up(budget: float) -> float:
    """A budget to quote: rounded up, so that asking for it succeeds."""
    return min(math.ceil(budget * 1e4) / 1e4, 1.0)
