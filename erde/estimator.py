"""Label-free accuracy estimation (docs/budgets.md): agreement with the last exit, on shadow passes.

A *shadow pass* runs a sampled row on to the last exit after its answer has gone (service/engine/compute.py).
Such a row shows, for every θ, which answer it would have had and whether that answer agrees with the last
exit's. Over the latest shadow rows, the accuracy of the answers at θ is estimated as

    acc(θ) ≈ mean_i  [a_i(θ) = y_i] · [H_i < t]  +  [a_i(θ) ≠ y_i] · q(θ)

with a_i(θ) the answer at θ, y_i and H_i the last exit's answer and entropy, t the ATC threshold of the last
exit (Garg et al., ICLR 2022: the entropy below which the share of validation images equals the last
exit's validation accuracy), and q(θ) the share of validation answers at θ that are right where they
differ from the last exit's. An answer that agrees with the last exit is right when the last exit is, and
ATC is applied where it was designed for: one classifier over all images (shadow rows are not selected by
their entropy). Threshold ATC per exit on the rows that *stopped* there (the estimator this replaces) sees
only rows that are confident by construction, and was 3 points low on clean images and up to 20 off under
shift (reports/drift.md).

The fit is stored in the artifact's manifest under `estimator`, with q aligned with the points of
`calibration.json`: `python -m erde.confidence model_store/NAME/VERSION` adds it to an existing artifact
from its own validation split (the manifest lists the sha256 of the other files, not its own, so they stay
verified); `erde export` writes it with every new artifact.

Plain numpy, no torch: the server estimates while the network runs in another process.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import numpy as np

from erde.curve import CalibrationCurve
from erde.exits import exit_taken


@dataclass(frozen=True)
class AccuracyEstimator:
    """The fitted estimator: the last exit's ATC threshold and q(θ) on the calibration grid (ascending θ)."""

    last_threshold: float
    thetas: tuple[float, ...]
    disagree_right: tuple[float, ...]

    def accuracy(self, entropy: np.ndarray, prediction: np.ndarray, theta: float) -> float:
        """The estimated accuracy at θ of the answers of rows whose every exit ran: (N, exits) arrays."""
        rows = np.arange(len(entropy))
        answer = prediction[rows, exit_taken(entropy, theta)]
        agree = answer == prediction[:, -1]
        return float(np.mean(np.where(agree, entropy[:, -1] < self.last_threshold, self.q(theta))))

    def q(self, theta: float) -> float:
        """q(θ): the validation share of right answers at θ among those that differ from the last exit's."""
        return self.disagree_right[max(bisect.bisect_right(self.thetas, theta) - 1, 0)]

    def table(self, entropy: np.ndarray, prediction: np.ndarray) -> AccuracyTable:
        """`accuracy` at every θ over these rows at once, as a step function (see AccuracyTable)."""
        n, exits = entropy.shape
        agrees = prediction == prediction[:, -1:]  # (N, exits): the answer at each exit is the last exit's
        right = entropy[:, -1] < self.last_threshold
        early = entropy[:, :-1]
        # θ > H_k makes exit k answer when no earlier exit does: it changes a row's answer only where H_k is
        # below every earlier exit's entropy. From the lowest θ up, the answering exit moves from the last
        # one to each such k, the latest k first (its H is the lowest).
        earlier = np.minimum.accumulate(np.concatenate([np.full((n, 1), np.inf), early[:, :-1]], axis=1), axis=1)
        changes = early < earlier
        rows = np.arange(n)
        answering = np.full(n, exits - 1)  # below every edge
        edges, gains, whose = [], [], []
        for k in range(exits - 2, -1, -1):
            at = changes[:, k]
            edges.append(early[at, k])
            gains.append((agrees[:, k].astype(np.int64) - agrees[rows, answering])[at])
            whose.append(rows[at])
            answering = np.where(at, k, answering)
        edge = np.concatenate(edges)
        order = np.argsort(edge, kind="stable")
        gain = np.concatenate(gains)[order]
        gain_right = gain * right[np.concatenate(whose)[order]]
        return AccuracyTable(self, edge[order].tolist(), n,
                             agree=(n + np.concatenate([[0], np.cumsum(gain)])).tolist(),
                             agree_right=(int(right.sum()) + np.concatenate([[0], np.cumsum(gain_right)])).tolist())

    @classmethod
    def from_manifest(cls, fitted: dict[str, Any] | None, curve: CalibrationCurve) -> AccuracyEstimator | None:
        """The manifest's `estimator`, or None for an artifact without one (its replies quote offline figures)."""
        if fitted is None:
            return None
        order = sorted(range(len(curve.points)), key=lambda i: curve.points[i].threshold)
        return cls(float(fitted["last_threshold"]), tuple(curve.points[i].threshold for i in order),
                   tuple(float(fitted["disagree_right"][i]) for i in order))


@dataclass(frozen=True)
class AccuracyTable:
    """`AccuracyEstimator.accuracy` over one set of rows, at every θ: with A(θ) the rows whose answer at θ
    agrees with the last exit and is deemed right (H_L < t), and B(θ) those that agree,
    accuracy(θ) = (A(θ) + q(θ)·(N − B(θ))) / N. A and B change only where θ passes an edge (the exit
    rule is `entropy < θ`, erde/exits.py), so a lookup is a bisection; tests/service/test_drift.py holds it
    to `accuracy` at every θ, ties included."""

    estimator: AccuracyEstimator
    edges: list[float]  # ascending
    rows: int
    agree: list[float]  # B after the first k edges, k = 0..len(edges)
    agree_right: list[float]  # A likewise

    def at(self, theta: float) -> float:
        k = bisect.bisect_left(self.edges, theta)  # the edges below θ
        return (self.agree_right[k] + self.estimator.q(theta) * (self.rows - self.agree[k])) / self.rows
