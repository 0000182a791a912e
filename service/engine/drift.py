"""Budgets that stay promises when the images drift (issue 19; the law and its parameters: docs/budgets.md).

Two label-free measurements per reply, in the cell it ran under (its operating point and its budget):
its MACs fraction, and whether its answering exit's entropy is below that exit's ATC threshold
(erde/confidence.py).

**The compute law** is a pure function of (law, state, point, budget, measured cost), like the
overload law (service/engine/overload.py): it counts in replies, not seconds, since every reply is a
measurement, so it needs no clock. With m̄ the smoothed cost of the cell's recent replies (an EWMA
over `smoothing` replies), U the cell's budget (never below the point's calibrated cost), and the
hold band from (1−b)·U to (1+t)·U (t is inside the 5% the budget allows: the mean over a window of
1,000 replies stays under 1.05·U):

    m̄ > (1+t)·U             θ += min(gain · (m̄ − (1+t)·U), max_step)   (spending too much: exit earlier)
    (1−b)·U ≤ m̄ ≤ (1+t)·U   θ unchanged
    m̄ < (1−b)·U             θ −= min(gain · ((1−b)·U − m̄), max_step)   (back towards the calibrated θ)

θ holds for a cell's first `smoothing` replies, never goes below the calibrated θ (the calibration
chose it as the most accurate point within the budget: spending more per image than it does bought
no accuracy on validation), and stays within `max_offset` of it and below `ceiling`. So on images
that cost what the calibration measured, θ is the calibrated one; when images cost more, θ rises
until the budget holds; when they cost less again, θ returns.

**The accuracy estimate** of a cell is an EWMA over `window` replies of the ATC indicators. It is
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
from service.engine.policy import Decision
from service.settings import Settings

# Replies of a cell between two reports of its state (the floors' live shift, the gauges). Each report
# walks every cell; per reply it was 8% of the event loop's time (py-spy, c=16). The law's windows are
# 100 replies long, so a report every 16 moves no decision by more than a sixth of a window.
REPORT_EVERY = 16

@dataclass(frozen=True)
class DriftLaw:
    gain: float = 0.2  # θ (nats) per unit of smoothed cost error, per reply
    max_step: float = 0.02  # most one reply moves θ (nats)
    max_offset: float = 1.5  # most θ may rise above its calibrated value (nats)
    smoothing: int = 100  # replies in the cost EWMA's time constant
    band: float = 0.04  # hold while the smoothed cost is within [(1 − band)·U, (1 + tolerance)·U]
    tolerance: float = 0.04
    window: int = 400  # replies in the accuracy EWMA's time constant, and the evidence a live figure needs
    margin: float = 0.03  # a live accuracy this far from the offline one is quoted instead of it
    ceiling: float = math.log(10) + 1e-3  # θ above this stops everything at the first exit anyway

    @classmethod
    def from_settings(cls, settings: Settings, num_classes: int) -> DriftLaw:
        return cls(settings.drift_gain, settings.drift_max_step, settings.drift_max_offset, settings.drift_smoothing,
                   settings.drift_band, settings.drift_tolerance, settings.drift_window, settings.drift_margin,
                   math.log(num_classes) + 1e-3)


@dataclass(frozen=True)
class Cell:
    """What one cell's live replies say: its θ offset, realized cost, estimated accuracy."""

    offset: float  # θ_live − θ_calibrated, ≥ 0
    cost: float  # EWMA of the replies' MACs fraction
    accuracy: float  # EWMA of the replies' ATC indicators
    replies: int = 0


def start(point: OperatingPoint) -> Cell:
    """A cell before any reply: as calibrated."""
    return Cell(0.0, point.macs_fraction, point.accuracy)


def ceiling_of(rule: Decision) -> float:
    """The budget a row's cell holds its cost under: the budget it runs under, on a 0.01 grid rounded down
    (so that the cells are few), never below its point's calibrated cost (a clamped budget, a floor alone)."""
    budget = rule.expected.macs_fraction if rule.budget is None else rule.budget
    return max(math.floor(budget * 100 + 1e-9) / 100, rule.expected.macs_fraction)


def step(law: DriftLaw, state: Cell, point: OperatingPoint, budget: float, cost: float,
         right: float | None) -> Cell:
    """The state after one reply at `point` under `budget` that cost `cost` (MACs fraction); `right` is its
    ATC indicator (1.0 likely right, 0.0 likely wrong), None when the artifact has no ATC thresholds."""
    smoothed = state.cost + (cost - state.cost) / min(state.replies + 1, law.smoothing)
    low, high = (1.0 - law.band) * budget, (1.0 + law.tolerance) * budget
    error = smoothed - high if smoothed > high else smoothed - low if smoothed < low else 0.0
    if state.replies + 1 < law.smoothing:  # too few replies for the smoothed cost to mean anything yet
        error = 0.0
    move = max(min(law.gain * error, law.max_step), -law.max_step)
    offset = min(max(state.offset + move, 0.0), law.max_offset, max(law.ceiling - point.threshold, 0.0))
    accuracy = state.accuracy if right is None else \
        state.accuracy + (right - state.accuracy) / min(state.replies + 1, law.window)
    return Cell(offset, smoothed, accuracy, state.replies + 1)


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
    """One model version's live view of its cells (operating point × budget): θ, cost, accuracy estimate.

    On the event loop only (the worker's `adjust` hook and the reply encoder). Per server process:
    with several workers each holds its own cells (docs/budgets.md says what that costs).
    """

    def __init__(self, curve: CalibrationCurve, atc: dict[str, Any] | None, law: DriftLaw, enabled: bool,
                 on_change: Callable[[OperatingPoint, float, Cell], None] = lambda point, budget, cell: None) -> None:
        self.law = law
        self.enabled = enabled  # False (ERDE_DRIFT=off): measure and report, never move θ
        self.on_change = on_change
        self.cells: dict[tuple[float, float], tuple[OperatingPoint, Cell]] = {}  # by (calibrated θ, budget)
        order = sorted(range(len(curve.points)), key=lambda i: curve.points[i].threshold)
        self._grid = [curve.points[i].threshold for i in order]
        self._atc = None if atc is None else [atc["thresholds"][i] for i in order]

    def theta(self, rule: Decision) -> float:
        """The θ a row runs with: its cell's live θ (its own when it fixed θ or a cap)."""
        if not self.enabled or not rule.adjustable:
            return rule.threshold
        entry = self.cells.get((rule.expected.threshold, ceiling_of(rule)))
        return rule.threshold if entry is None else rule.expected.threshold + entry[1].offset

    def adjust(self, jobs: list[Job]) -> None:
        """Give every row about to be sent its cell's live θ (after the overload controller chose the point)."""
        for job in jobs:
            theta = self.theta(job.rule)
            if theta != job.rule.threshold:
                job.used = dataclasses.replace(job.rule, threshold=theta)

    def observe(self, rule: Decision, exit_index: int, entropy: float, macs_fraction: float) -> Estimate:
        """Step the law of the cell the reply ran under; returns what the reply says about accuracy."""
        point = rule.expected
        if not rule.adjustable:  # θ or a cap fixed by the caller: not a budget's reply
            return Estimate(None, point.accuracy, "offline")
        budget = ceiling_of(rule)
        key = (point.threshold, budget)
        _, cell = self.cells.get(key, (point, start(point)))
        cell = step(self.law, cell, point, budget, macs_fraction, self._right(rule.threshold, exit_index, entropy))
        self.cells[key] = (point, cell)
        if cell.replies % REPORT_EVERY == 1:  # its first reply, then every REPORT_EVERY-th
            self.on_change(point, budget, cell)
        return self.estimate(point, cell)

    def estimate(self, point: OperatingPoint, cell: Cell) -> Estimate:
        if self._atc is None or cell.replies < self.law.window:
            return Estimate(None, point.accuracy, "offline")
        live = cell.accuracy
        return Estimate(live, point.accuracy, "live" if abs(live - point.accuracy) > self.law.margin else "offline")

    def _evidence(self) -> list[tuple[int, float, float]]:
        """(replies, live, calibrated accuracy) of the cells with enough replies for a live figure."""
        if self._atc is None:
            return []
        return [(c.replies, c.accuracy, p.accuracy) for p, c in self.cells.values() if c.replies >= self.law.window]

    def shift(self) -> float:
        """The accuracy drift the live evidence shows, pooled over the cells with enough of it (live −
        calibrated, weighted by replies); 0 while none has enough or within the margin. Floors use it."""
        evidence = self._evidence()
        if not evidence:
            return 0.0
        drift = sum(n * (live - offline) for n, live, offline in evidence) / sum(n for n, _, _ in evidence)
        return drift if abs(drift) > self.law.margin else 0.0

    def summary(self) -> tuple[float | None, float]:
        """Accuracy of the replies in the cells in use, (live, calibrated), weighted by their replies; live is
        None until a cell has `window` replies (and then both cover those cells). What the drift alert
        compares (docs/budgets.md)."""
        evidence = self._evidence()
        if not evidence:
            used = [(c.replies, p.accuracy) for p, c in self.cells.values()]
            return None, sum(n * a for n, a in used) / (sum(n for n, _ in used) or 1)
        total = sum(n for n, _, _ in evidence)
        return (sum(n * live for n, live, _ in evidence) / total,
                sum(n * offline for n, _, offline in evidence) / total)

    def live_curve(self) -> list[dict[str, Any]]:
        """Every cell with live replies: calibrated and live figures side by side, cheapest first."""
        out = []
        for (_, budget), (point, cell) in sorted(self.cells.items(), key=lambda e: (e[1][0].macs_fraction, e[0][1])):
            est = self.estimate(point, cell)
            out.append({"budget": budget, "threshold": point.threshold, "live_threshold": point.threshold + cell.offset,
                        "expected_macs_fraction": point.macs_fraction, "live_macs_fraction": cell.cost,
                        "expected_accuracy": point.accuracy, "live_accuracy": est.live,
                        "accuracy_source": est.source, "replies": cell.replies})
        return out

    def _right(self, theta: float, exit_index: int, entropy: float) -> float | None:
        """The ATC indicator of one answer, with the thresholds of the grid point at or below its θ."""
        if self._atc is None:
            return None
        row = self._atc[max(bisect.bisect_right(self._grid, theta) - 1, 0)]
        return 1.0 if entropy < row[exit_index] else 0.0
