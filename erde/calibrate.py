"""Calibration: from per-exit entropies on held-out data to a budget -> threshold rule.

The exit rule itself (docs/design.md §3.2) lives in `erde.exits`, shared with the serving loop; this
module simulates it over a θ grid. Reading and writing run folders is `erde.runs`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from erde.curve import CalibrationCurve, OperatingPoint
from erde.data import TensorData, iterate_batches
from erde.exits import exit_scores, exit_taken
from erde.nets import EarlyExitResNet


@dataclass(frozen=True)
class ExitOutputs:
    """Every exit's entropy and prediction for a set of images: arrays of shape (N, n_exits)."""

    entropy: np.ndarray  # float64, from erde.exits.exit_scores
    prediction: np.ndarray
    labels: np.ndarray  # (N,)


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


def sweep(outputs: ExitOutputs, macs: list[int], points: int = 401) -> CalibrationCurve:
    return CalibrationCurve([simulate(outputs, macs, float(t)) for t in threshold_grid(outputs, points)], list(macs))

