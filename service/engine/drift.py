"""Budgets that stay promises when the images drift (issue 19; the law and its parameters: docs/budgets.md).

Two label-free measurements, per cell (an operating point and a budget): the MACs fraction of each reply
that ran under it, and, from the model's latest shadow passes (rows run on to the last exit after their
answer), the estimated accuracy of the answers at the cell's live θ (erde/confidence.py).

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

**Shadow passes** are taken from the rows that ask for a budget and may reach the last exit, a
`shadow_fraction` of them, only from batches sent when nothing else is queued (spare capacity): every
k-th such row, by a running credit, so the sample is spread evenly. The last `window` shadow rows are
the model's evidence, shared by all its cells (the images do not depend on the budget they ask for),
less those from before a change of images (`change_point`: the mean last-exit entropy of the newest
rows differs from the older ones' by more than `change_z` standard errors).

**The accuracy estimate** of a cell is the estimator's figure at its live θ over that evidence, once
`change_rows` shadow rows are in. It is the one a reply quotes, and the floors follow, when it holds
`quote_rows` rows and differs from the offline accuracy by more than `margin` plus two standard errors
of a share over the evidence (so that sampling noise on clean images never turns into a quoted drop or
a refused floor).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from erde.curve import CalibrationCurve, OperatingPoint
from erde.estimator import AccuracyEstimator, AccuracyTable
from service.engine.batcher import Job
from service.engine.policy import EPS, Decision, Estimate
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
    window: int = 400  # shadow rows the accuracy estimate is taken over (a sliding window), and needs
    shadow_fraction: float = 0.15  # of the rows that may be shadowed, when the queue has room
    margin: float = 0.03  # a live accuracy this far from the offline one (plus its noise) is quoted instead
    ceiling: float = math.log(10) + 1e-3  # θ above this stops everything at the first exit anyway
    change_rows: int = 50  # shadow rows an estimate needs, and the fewest on either side of a change
    # Shadow rows before an estimate may be quoted or move the floors. At 50 the first rows of a fresh server
    # departed on clean images: the teacher refused 1-4% of a phase's floor requests 422 (make bench-overload).
    quote_rows: int = 100
    change_z: float = 4.5  # standard errors between the two sides of a change (change_point)
    change_every: int = 10  # shadow rows between two looks for a change (each look: 33 µs over 400 rows)

    @classmethod
    def from_settings(cls, settings: Settings, num_classes: int) -> DriftLaw:
        return cls(settings.drift_gain, settings.drift_max_step, settings.drift_max_offset, settings.drift_smoothing,
                   settings.drift_band, settings.drift_tolerance, settings.drift_window,
                   settings.drift_shadow_fraction, settings.drift_margin, math.log(num_classes) + 1e-3)


@dataclass(frozen=True)
class Cell:
    """What one cell's live replies say: its θ offset and realized cost."""

    offset: float  # θ_live − θ_calibrated, ≥ 0
    cost: float  # EWMA of the replies' MACs fraction
    replies: int = 0


def start(point: OperatingPoint) -> Cell:
    """A cell before any reply: as calibrated."""
    return Cell(0.0, point.macs_fraction)


def ceiling_of(rule: Decision) -> float:
    """The budget a row's cell holds its cost under: the budget it runs under, on a 0.01 grid rounded down
    (so that the cells are few), never below its point's calibrated cost (a clamped budget, a floor alone)."""
    budget = rule.expected.macs_fraction if rule.budget is None else rule.budget
    return max(math.floor(budget * 100 + 1e-9) / 100, rule.expected.macs_fraction)


def step(law: DriftLaw, state: Cell, point: OperatingPoint, budget: float, cost: float) -> Cell:
    """The state after one reply at `point` under `budget` that cost `cost` (MACs fraction)."""
    smoothed = state.cost + (cost - state.cost) / min(state.replies + 1, law.smoothing)
    low, high = (1.0 - law.band) * budget, (1.0 + law.tolerance) * budget
    error = smoothed - high if smoothed > high else smoothed - low if smoothed < low else 0.0
    if state.replies + 1 < law.smoothing:  # too few replies for the smoothed cost to mean anything yet
        error = 0.0
    move = max(min(law.gain * error, law.max_step), -law.max_step)
    offset = min(max(state.offset + move, 0.0), law.max_offset, max(law.ceiling - point.threshold, 0.0))
    return Cell(offset, smoothed, state.replies + 1)


class Evidence:
    """The latest shadow rows of one model, oldest first (at most `window`): every exit's entropy and prediction."""

    def __init__(self, window: int, exits: int) -> None:
        self.window = window
        self.entropy = np.zeros((0, exits))
        self.prediction = np.zeros((0, exits), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.entropy)

    def add(self, entropy: np.ndarray, prediction: np.ndarray) -> None:
        self.entropy = np.concatenate([self.entropy, entropy])[-self.window:]
        self.prediction = np.concatenate([self.prediction, prediction])[-self.window:]

    def keep_newest(self, rows: int) -> None:
        """Forget all but the newest `rows`: the older ones are of other images (`change_point`)."""
        self.entropy, self.prediction = self.entropy[-rows:], self.prediction[-rows:]


def change_point(entropy: np.ndarray, fewest: int, z: float) -> int | None:
    """How many of the newest rows to keep because they differ from the older ones, or None.

    `entropy` holds, oldest first, each shadow row's last-exit entropy: the confidence the estimate stands
    on. Over every split with at least `fewest` rows on each side, the one where the two sides' means
    differ most, in standard errors of a difference of means (the window's own spread, which a change
    only widens); a change if that is more than `z`. Tuned on the shifts the tests use (bench/shifts.py
    SEEN), never on the drift benchmark's: with 4.5, 0 to 15 in 10,000 windows of 400 clean test images
    show a false change (it costs the estimate rows, not its truth); 80 rows after blur, mix or noise ends,
    the change shows in 93-100% of windows on both shipped models (the share of sure last exits showed it
    in 23-100%); after low contrast on the student in 69%, after darker images (3 points fewer sure) not. A sliding
    window alone holds the images of before a change until it has slid past them: at 0.15 of the rows
    shadowed, 2,700 replies, so the estimate quoted the shifted images' accuracy long after they had gone."""
    n = len(entropy)
    spread = float(np.std(entropy)) if n else 0.0
    if n < 2 * fewest or spread < 1e-9:  # all alike (up to rounding): nothing changed
        return None
    newest = np.cumsum(entropy[::-1], dtype=np.float64)  # newest[k - 1]: the sum over the newest k
    k = np.arange(fewest, n - fewest + 1)
    gap = newest[k - 1] / k - (newest[-1] - newest[k - 1]) / (n - k)
    score = np.abs(gap) / (spread * np.sqrt(1 / k + 1 / (n - k)))
    best = int(np.argmax(score))
    return int(k[best]) if score[best] > z else None


class DriftGuard:
    """One model version's live view of its cells (operating point × budget): θ, cost, accuracy estimate.

    On the event loop only (the worker's steering and the reply encoder). Per server process: with several
    workers each holds its own cells and evidence (docs/budgets.md says what that costs).
    """

    def __init__(self, curve: CalibrationCurve, estimator: AccuracyEstimator | None, law: DriftLaw, enabled: bool,
                 on_change: Callable[[OperatingPoint, float, Cell], None] = lambda point, budget, cell: None) -> None:
        self.law = law
        self.enabled = enabled  # False (ERDE_DRIFT=off): measure and report, never move θ
        self.on_change = on_change
        self.cells: dict[tuple[float, float], tuple[OperatingPoint, Cell]] = {}  # by (calibrated θ, budget)
        self.estimator = estimator
        self.evidence = Evidence(law.window, len(curve.macs_per_exit))
        self.curve = curve
        self._last_exit = len(curve.macs_per_exit) - 1
        self._credit = 0.0  # shadow passes owed: grows by shadow_fraction per row that may be shadowed
        self._table: AccuracyTable | None = None  # the estimate at every θ over the evidence as it is now
        self._curve: list[Estimate] | None = None  # live_curve_at's answer over the evidence as it is now
        self._drifted = False  # the pooled verdict that answer was made under
        self.changes = 0  # changes of images the evidence showed (change_point)
        self._unchecked = 0  # shadow rows in since the last look for a change
        self._suspected = False  # the last look showed a change: the next one decides

    def theta(self, rule: Decision) -> float:
        """The θ a row runs with: its cell's live θ (its own when it fixed θ or a cap)."""
        if not self.enabled or not rule.adjustable:
            return rule.threshold
        entry = self.cells.get((rule.expected.threshold, ceiling_of(rule)))
        return rule.threshold if entry is None else rule.expected.threshold + entry[1].offset

    def adjust(self, jobs: list[Job], spare: bool) -> None:
        """Give every row about to be sent its cell's live θ (after the overload controller chose the point);
        with `spare` capacity, mark the shadow passes."""
        for job in jobs:
            theta = self.theta(job.rule)
            if theta != job.rule.threshold:
                job.used = self._moved(job.rule, theta)
        if not spare or self.estimator is None:
            return
        for job in jobs:
            if job.rule.adjustable and job.rule.cap >= self._last_exit:
                self._credit += self.law.shadow_fraction
                if self._credit >= 1.0:
                    self._credit -= 1.0
                    job.shadow = True

    def _moved(self, rule: Decision, theta: float) -> Decision:
        """`rule` at its cell's live θ. A row with a floor moves only where the figure at that θ meets the floor,
        and then quotes it; else it runs at the θ its floor was checked at. The figure is the live estimate
        there if it departs from the calibrated accuracy *at that θ*, else that calibrated accuracy: the offset
        only ever raises θ, to hold a budget's compute, and so lowers accuracy. Moved unchecked, a floor row
        answered at 25% live while quoting the 92% its floor had been checked against; checked against the
        calibrated figure at its own θ, with too little evidence to quote, it moved 1.5 nats quoting 92%
        (tests/service/test_drift.py; docs/budgets.md, "How it is quoted and used")."""
        if rule.min_accuracy is None:
            return dataclasses.replace(rule, threshold=theta)
        quoted = self.estimate_at(self.curve.point_at(theta), theta)
        if quoted.used < rule.min_accuracy - EPS:
            return rule
        return dataclasses.replace(rule, threshold=theta, quoted=quoted)

    def witness(self, entropy: np.ndarray, prediction: np.ndarray) -> None:
        """Shadow rows came back: they replace the oldest evidence, or all of it from before a change, once two
        looks in a row show one (`change_every` rows apart). Acted on at the first look, a false change kept
        the newest rows *because* their confidence stood out, and their estimate with them: on the teacher's
        clean test images it fell to 0.85 against a true 0.94 (the floors near its top then refused 422); with
        the second look, 0 false changes in 160,000 clean rows against 3, and a change of images is acted on
        after 72 rows instead of 60 (median; docs/budgets.md)."""
        self.evidence.add(entropy, prediction)
        self._curve = None
        self._unchecked += len(entropy)
        if self.estimator is not None and self._unchecked >= self.law.change_every:
            self._unchecked = 0
            keep = change_point(self.evidence.entropy[:, -1], self.law.change_rows, self.law.change_z)
            if keep is not None and self._suspected:
                self.evidence.keep_newest(keep)
                self.changes += 1
                self._suspected = False
            else:
                self._suspected = keep is not None
        self._table = None

    def observe(self, rule: Decision, macs_fraction: float) -> Estimate:
        """Step the law of the cell the reply ran under; returns what the reply says about accuracy."""
        point = rule.expected
        if not rule.adjustable:  # θ or a cap fixed by the caller: not a budget's reply
            return Estimate(None, point.accuracy, "offline")
        budget = ceiling_of(rule)
        key = (point.threshold, budget)
        _, cell = self.cells.get(key, (point, start(point)))
        if rule.min_accuracy is not None and rule.threshold == point.threshold and cell.offset > 0:
            # A floor row kept below its cell's θ (`_moved`): what it spent says nothing of that θ, and a cell of
            # floor rows alone, stepped by them, raised its θ to the bound while none of them could take it.
            return self.estimate(point, cell)
        cell = step(self.law, cell, point, budget, macs_fraction)
        self.cells[key] = (point, cell)
        if cell.replies % REPORT_EVERY == 1:  # its first reply, then every REPORT_EVERY-th
            self.on_change(point, budget, cell)
        return self.estimate(point, cell)

    def estimate(self, point: OperatingPoint, cell: Cell) -> Estimate:
        return self.estimate_at(point, point.threshold + cell.offset)

    def estimate_at(self, point: OperatingPoint, theta: float) -> Estimate:
        live = self._live(theta)
        if live is None:
            return Estimate(None, point.accuracy, "offline")
        return Estimate(live, point.accuracy, "live" if self._departs(live, point.accuracy) else "offline")

    def _departs(self, live: float, offline: float) -> bool:
        """Whether the evidence contradicts the calibration: it holds `quote_rows` rows, and the live figure is
        further from it than the margin plus two standard errors of a share over the evidence (2.6 points at
        93% over 400 rows, 5.1 over 100)."""
        rows = len(self.evidence)
        return rows >= self.law.quote_rows and abs(live - offline) > self.law.margin + 2 * math.sqrt(
            live * (1 - live) / rows)

    def _live(self, theta: float) -> float | None:
        """The estimated accuracy at θ over the evidence; None until it holds `change_rows` rows."""
        if self.estimator is None or len(self.evidence) < self.law.change_rows:
            return None
        if self._table is None:  # once per new evidence; then a bisection per reply
            self._table = self.estimator.table(self.evidence.entropy, self.evidence.prediction)
        return self._table.at(theta)

    def _evidence(self) -> list[tuple[int, float, float]]:
        """(replies, live, calibrated accuracy) of the cells that have replies, once there is a live figure."""
        return [(c.replies, live, p.accuracy) for p, c in self.cells.values()
                if c.replies and (live := self._live(p.threshold + c.offset)) is not None]

    def live_curve_at(self, points: list[OperatingPoint]) -> list[Estimate]:
        """The live curve floors and the degrade mode choose from (BudgetPolicy.set_live): the calibrated
        figures while the replies of the cells in use, pooled, do not contradict the calibration (the test
        for quoting); once they do, what a reply at each point's calibrated θ would quote. Tested point by
        point alone, clean images made some of the teacher's 155 points depart by chance, and refused 1% of
        its floor requests 422 at half its capacity (`make bench-overload`). Computed once per change of the
        evidence or of the pooled verdict (the student's frontier took 290 µs), the same list until then."""
        live, offline = self.summary()
        drifted = live is not None and self._departs(live, offline)
        if self._curve is None or len(self._curve) != len(points) or drifted != self._drifted:
            self._drifted = drifted
            self._curve = [self.estimate_at(point, point.threshold) if drifted else
                           Estimate(None, point.accuracy, "offline") for point in points]
        return self._curve

    def summary(self) -> tuple[float | None, float]:
        """Accuracy of the replies in the cells in use, (live, calibrated), weighted by their replies; live is
        None until there is enough evidence. What the drift alert compares (docs/budgets.md)."""
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
