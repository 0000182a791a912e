"""The calibration curve: an artifact's budget -> operating point rule, as data (docs/design.md §4).

Plain numpy, no torch: the server reads it from the manifest and answers from it, while the network
runs in another process. `erde.calibrate` measures the points it holds.
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# Validation accuracies closer than this are a tie; the cheaper θ wins (about 3 of 6000 images).
NEAR_TIE = 5e-4


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float  # θ
    macs_fraction: float  # expected MACs as a fraction of the full-depth MACs
    accuracy: float
    exit_histogram: list[float]  # share of images answered at each exit


@dataclass
class CalibrationCurve:
    """The θ sweep, and the budget -> operating point rule of docs/design.md §4."""

    points: list[OperatingPoint]
    macs_per_exit: list[int]

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a calibration curve needs at least one point")
        order = sorted(range(len(self.points)), key=lambda i: (self.points[i].macs_fraction, -self.points[i].threshold))
        self._by_cost = [self.points[i] for i in order]
        self._costs = [p.macs_fraction for p in self._by_cost]
        acc = np.array([p.accuracy for p in self._by_cost])
        best_so_far = np.maximum.accumulate(acc)
        # For the budget ending at point k: the cheapest j <= k whose accuracy is within NEAR_TIE of the best.
        good = acc[None, :] >= best_so_far[:, None] - NEAR_TIE  # (k, j)
        good &= np.tri(len(acc), dtype=bool)
        self._answer = good.argmax(1)
        self._by_threshold = sorted(self.points, key=lambda p: p.threshold)
        self._thresholds = [p.threshold for p in self._by_threshold]

    def choose(self, budget: float) -> tuple[OperatingPoint, bool]:
        """The most accurate point with expected MACs fraction <= budget; (point, clamped).

        A budget below the cheapest point gets the cheapest point, and `clamped` says so.
        """
        k = bisect.bisect_right(self._costs, budget + 1e-12) - 1
        if k < 0:
            return self._by_cost[0], True
        return self._by_cost[int(self._answer[k])], False

    def point_at(self, threshold: float) -> OperatingPoint:
        """The point at the largest grid θ not above `threshold` (the exit rule is monotone in θ); the first
        point below the grid."""
        i = bisect.bisect_right(self._thresholds, threshold) - 1
        return self._by_threshold[max(i, 0)]

    def to_dict(self) -> dict[str, Any]:
        return {"macs_per_exit": self.macs_per_exit, "points": [asdict(p) for p in self.points]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationCurve:
        try:
            points = [OperatingPoint(float(p["threshold"]), float(p["macs_fraction"]), float(p["accuracy"]),
                                     [float(h) for h in p["exit_histogram"]]) for p in data["points"]]
            macs = [int(m) for m in data["macs_per_exit"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"calibration is malformed: {exc!r}") from None
        if any(len(p.exit_histogram) != len(macs) for p in points):
            raise ValueError("calibration is malformed: an exit histogram does not match the number of exits")
        return cls(points, macs)
