"""Budgets that stay promises when the images drift (issue 19; the law and its parameters: docs/budgets.md).

Two label-free measurements per reply, at the operating point it ran under: its MACs fraction, and
whether its answering exit's entropy is below that exit's ATC threshold (erde/confidence.py).

**The compute law** is a pure function of (law, state, target, measured cost), like the overload
law (service/overload.py): it counts in replies, not seconds, since every reply is a measurement,
so it needs no clock. With m̄ the smoothed cost of the point's recent replies (an EWMA over
`smoothing` replies), c the point's offline expected cost (at most the budget that chose it) and
b the hold band:

    m̄ > c             θ += min(gain · (m̄ − c), max_step)          (spending too much: exit earlier)
    (1−b)·c ≤ m̄ ≤ c   θ unchanged
    m̄ < (1−b)·c       θ −= min(gain · ((1−b)·c − m̄), max_step)    (leaving compute unspent)

(θ holds for the first `smoothing` replies), then θ − θ_offline is clipped to ±max_offset and θ to
[0, ceiling]. On the validation split m̄ = c and θ stays where calibration put it. The target is c, not the budget: every point costing more
within the budget was no more accurate on validation (the curve's near-tie rule), so spending up to
the budget would not buy accuracy; see docs/budgets.md for when this rule holds.

**The accuracy estimate** of a point is an EWMA over `window` replies of the ATC indicators. It is
the one a reply quotes once `window` replies have been seen and it differs from the offline
accuracy by more than `margin`.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from erde.calibrate import CalibrationCurve, OperatingPoint
from service.engine.batcher import Job
from service.policy import Decision
from service.settings import Settings


@dataclass(frozen=True)
class DriftLaw:
    gain: float = 0.2  # θ (nats) per unit of smoothed cost error, per reply
    max_step: float = 0.02  # most one reply moves θ (nats)
    max_offset: float = 1.5  # most θ may leave its offline value (nats)
    smoothing: int = 30  # replies in the cost EWMA's time constant
    band: float = 0.03  # hold while the smoothed cost is within [(1 − band)·c, c]
    window: int = 300  # replies in the accuracy EWMA's time constant, and the evidence a live figure needs
    margin: float = 0.02  # a live accuracy this far from the offline one is quoted instead of it
    ceiling: float = math.log(10) + 1e-3  # θ above this stops everything at the first exit anyway

    @classmethod
    def from_settings(cls, settings: Settings, num_classes: int) -> DriftLaw:
        return cls(settings.drift_gain, settings.drift_max_step, settings.drift_max_offset, settings.drift_smoothing,
                   settings.drift_band, settings.drift_window, settings.drift_margin, math.log(num_classes) + 1e-3)


@dataclass(frozen=True)
class PointState:
    """What one operating point's live replies say: its θ offset, realized cost, estimated accuracy."""

    offset: float  # θ_live − θ_offline
    cost: float  # EWMA of the replies' MACs fraction
    accuracy: float  # EWMA of the replies' ATC indicators
    replies: int = 0


def start(point: OperatingPoint) -> PointState:
    """A point before any reply: as calibrated."""
    return PointState(0.0, point.macs_fraction, point.accuracy)


def step(law: DriftLaw, state: PointState, point: OperatingPoint, cost: float, right: float | None) -> PointState:
    """The state after one reply at `point` that cost `cost` (MACs fraction); `right` is its ATC
    indicator (1.0 likely right, 0.0 likely wrong), None when the artifact has no ATC thresholds."""
    smoothed = state.cost + (cost - state.cost) / min(state.replies + 1, law.smoothing)
    target = point.macs_fraction
    low = (1.0 - law.band) * target
    error = smoothed - target if smoothed > target else smoothed - low if smoothed < low else 0.0
    if state.replies + 1 < law.smoothing:  # too few replies for the smoothed cost to mean anything yet
        error = 0.0
    move = max(min(law.gain * error, law.max_step), -law.max_step)
    offset = min(max(state.offset + move, -law.max_offset, -point.threshold), law.max_offset,
                 law.ceiling - point.threshold)
    accuracy = state.accuracy if right is None else \
        state.accuracy + (right - state.accuracy) / min(state.replies + 1, law.window)
    return PointState(offset, smoothed, accuracy, state.replies + 1)


@dataclass(frozen=True)
class Estimate:
    """What a reply says about its accuracy: both figures and which one it quotes."""

    live: float | None  # None until the point has `window` replies (or the artifact has no ATC thresholds)
    offline: float
    source: str  # "live" or "offline"

    @property
    def used(self) -> float:
        return self.offline if self.live is None or self.source == "offline" else self.live


class DriftGuard:
    """One model version's live view of its operating points: θ per point, and the accuracy estimate.

    On the event loop only (the worker's `adjust` hook and the reply encoder). Per server process:
    with several workers each holds its own states (docs/budgets.md says what that costs).
    """

    def __init__(self, curve: CalibrationCurve, atc: dict[str, Any] | None, law: DriftLaw, enabled: bool,
                 on_change: Callable[[OperatingPoint, PointState], None] = lambda point, state: None) -> None:
        self.law = law
        self.enabled = enabled  # False (ERDE_DRIFT=off): measure and report, never move θ
        self.on_change = on_change
        self.states: dict[float, tuple[OperatingPoint, PointState]] = {}  # by the point's offline θ
        order = sorted(range(len(curve.points)), key=lambda i: curve.points[i].threshold)
        self._grid = [curve.points[i].threshold for i in order]
        self._atc = None if atc is None else [atc["thresholds"][i] for i in order]

    def theta(self, rule: Decision) -> float:
        """The θ a row runs with: its point's live θ (its own when it fixed θ or a cap)."""
        entry = self.states.get(rule.expected.threshold) if self.enabled and rule.adjustable else None
        return rule.threshold if entry is None else rule.expected.threshold + entry[1].offset

    def adjust(self, jobs: list[Job]) -> None:
        """Give every row about to be sent its point's live θ (after the overload controller chose the point)."""
        for job in jobs:
            theta = self.theta(job.rule)
            if theta != job.rule.threshold:
                job.used = dataclasses.replace(job.rule, threshold=theta)

    def observe(self, rule: Decision, exit_index: int, entropy: float, macs_fraction: float) -> Estimate:
        """Step the law of the point the reply ran under; returns what the reply says about accuracy."""
        point = rule.expected
        if rule.budget is None or not rule.adjustable:  # θ or a cap fixed by the caller: not a budget's reply
            return Estimate(None, point.accuracy, "offline")
        _, state = self.states.get(point.threshold, (point, start(point)))
        state = step(self.law, state, point, macs_fraction, self._right(rule.threshold, exit_index, entropy))
        self.states[point.threshold] = (point, state)
        self.on_change(point, state)
        return self.estimate(point, state)

    def estimate(self, point: OperatingPoint, state: PointState) -> Estimate:
        if self._atc is None or state.replies < self.law.window:
            return Estimate(None, point.accuracy, "offline")
        live = state.accuracy
        return Estimate(live, point.accuracy, "live" if abs(live - point.accuracy) > self.law.margin else "offline")

    def shift(self) -> float:
        """The accuracy drift the live evidence shows, pooled over the points with enough of it (live − offline,
        weighted by replies); 0 while none has enough or when it is within the margin. Floors use it."""
        evidence = [(s.replies, s.accuracy - p.accuracy) for p, s in self.states.values()
                    if self._atc is not None and s.replies >= self.law.window]
        if not evidence:
            return 0.0
        drift = sum(n * d for n, d in evidence) / sum(n for n, _ in evidence)
        return drift if abs(drift) > self.law.margin else 0.0

    def summary(self) -> tuple[float | None, float]:
        """Accuracy of the replies at the points in use, (live, offline), weighted by their replies; live is
        None until a point has `window` replies. What the drift alert compares (docs/budgets.md)."""
        used = [(s.replies, s.accuracy, p.accuracy) for p, s in self.states.values()]
        total = sum(n for n, _, _ in used) or 1
        offline = sum(n * a for n, _, a in used) / total
        evidence = [(n, a) for n, a, _ in used if n >= self.law.window] if self._atc is not None else []
        if not evidence:
            return None, offline
        live_total = sum(n for n, _ in evidence)
        offline_there = sum(n * a for n, _, a in used if n >= self.law.window) / live_total
        return sum(n * a for n, a in evidence) / live_total, offline_there

    def live_curve(self) -> list[dict[str, Any]]:
        """Every point with live replies: offline and live figures side by side, cheapest first."""
        out = []
        for point, state in sorted(self.states.values(), key=lambda e: e[0].macs_fraction):
            est = self.estimate(point, state)
            out.append({"threshold": point.threshold, "live_threshold": point.threshold + state.offset,
                        "expected_macs_fraction": point.macs_fraction, "live_macs_fraction": state.cost,
                        "expected_accuracy": point.accuracy, "live_accuracy": est.live,
                        "accuracy_source": est.source, "replies": state.replies})
        return out

    def _right(self, theta: float, exit_index: int, entropy: float) -> float | None:
        """The ATC indicator of one answer, with the thresholds of the grid point at or below its θ."""
        if self._atc is None:
            return None
        row = self._atc[max(bisect.bisect_right(self._grid, theta) - 1, 0)]
        return 1.0 if entropy < row[exit_index] else 0.0
