"""Calibration: from per-exit entropies on held-out data to a budget -> threshold rule.

The exit rule itself (docs/design.md §3.2) lives in `erde.exits`, shared with the serving loop; this
module simulates it over a θ grid. Reading and writing run folders is `erde.runs`'s job.
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from erde.data import TensorData, iterate_batches
from erde.exits import exit_scores, exit_taken
from erde.nets import EarlyExitResNet

# Validation accuracies closer than this are a tie; the cheaper θ wins (about 3 of 6000 images).
NEAR_TIE = 5e-4


@dataclass(frozen=True)
class ExitOutputs:
    """Every exit's entropy and prediction for a set of images: arrays of shape (N, n_exits)."""

    entropy: np.ndarray  # float64, from erde.exits.exit_scores
    prediction: np.ndarray
    labels: np.ndarray  # (N,)


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float  # θ
    macs_fraction: float  # expected MACs as a fraction of the full-depth MACs
    accuracy: float
    exit_histogram: list[float]  # share of images answered at each exit


@torch.inference_mode()
def exit_outputs(model: EarlyExitResNet, data: TensorData, batch_size: int = 512) -> ExitOutputs:
    model.eval()
    device = next(model.parameters()).device
    ents, preds = [], []
    for x, _ in iterate_batches(data, batch_size, shuffle=False):
        logits = model.forward_all(x.to(device))
        ents.append(np.stack([exit_scores(lg)[1] for lg in logits], 1))  # float64, as served
        preds.append(torch.stack([lg.argmax(-1) for lg in logits], 1).cpu())
    return ExitOutputs(np.concatenate(ents), torch.cat(preds).numpy(), data.labels.numpy())


def answers(outputs: ExitOutputs, threshold: float, max_exit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The exit each image answers at under θ, and whether that answer is right: two (N,) arrays."""
    taken = exit_taken(outputs.entropy, threshold, max_exit)
    return taken, outputs.prediction[np.arange(len(taken)), taken] == outputs.labels


def simulate(outputs: ExitOutputs, macs: list[int], threshold: float, max_exit: int | None = None) -> OperatingPoint:
    """Accuracy, expected MACs fraction and exit histogram of the exit rule at θ."""
    taken, correct = answers(outputs, threshold, max_exit)
    cost = np.asarray(macs, dtype=np.float64)[taken]
    hist = np.bincount(taken, minlength=len(macs)) / max(len(taken), 1)
    return OperatingPoint(float(threshold), float(cost.mean() / macs[-1]), float(correct.mean()),
                          [round(float(h), 6) for h in hist])


def threshold_grid(outputs: ExitOutputs, points: int) -> np.ndarray:
    """θ from 0 to just above the largest entropy seen (everything stops at the first exit there),
    an even grid plus quantiles of the intermediate exits' entropies, where the decisions change."""
    top = float(outputs.entropy.max(initial=0.0)) + 1e-3
    even = np.linspace(0.0, top, points)
    inner = outputs.entropy[:, :-1].ravel()
    quant = np.quantile(inner, np.linspace(0, 1, points)) + 1e-7 if inner.size else np.empty(0)
    return np.unique(np.round(np.concatenate([even, quant, [top]]), 7))


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


def sweep(outputs: ExitOutputs, macs: list[int], points: int = 401) -> CalibrationCurve:
    return CalibrationCurve([simulate(outputs, macs, float(t)) for t in threshold_grid(outputs, points)], list(macs))

