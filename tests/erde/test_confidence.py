"""ATC thresholds (erde/confidence.py): on the data they were fitted on, the thresholded share is the accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from erde.calibrate import ExitOutputs, answers, sweep
from erde.confidence import fit_atc
from erde.store import read_artifact

ROOT = Path(__file__).resolve().parents[2]


def synthetic(n: int = 4000, seed: int = 0) -> ExitOutputs:
    """Three exits, entropies falling with depth; an answer is right more often when its entropy is low."""
    rng = np.random.default_rng(seed)
    entropy = np.sort(rng.uniform(0, 2.3, (n, 3)), axis=1)[:, ::-1].copy()
    labels = rng.integers(0, 10, n)
    right = rng.random((n, 3)) < 1 - entropy / 2.5
    prediction = np.where(right, labels[:, None], (labels[:, None] + 1) % 10)
    return ExitOutputs(entropy, prediction, labels)


def test_the_thresholded_share_is_the_accuracy_at_every_point() -> None:
    outputs = synthetic()
    curve = sweep(outputs, [10, 50, 100], points=41)
    atc = fit_atc(outputs, curve)
    assert len(atc["thresholds"]) == len(curve.points) and atc["samples"] == 4000
    rows = np.arange(4000)
    for point, thresholds in zip(curve.points, atc["thresholds"], strict=True):
        taken, correct = answers(outputs, point.threshold)
        estimate = np.mean(outputs.entropy[rows, taken] < np.asarray(thresholds)[taken])
        assert estimate == pytest.approx(correct.mean(), abs=0.01)


@pytest.mark.parametrize("name", ["fashion-mnist/2", "fashion-mnist-teacher/1"])
def test_the_shipped_artifacts_carry_thresholds_for_every_point_and_exit(name: str) -> None:
    art = read_artifact(ROOT / "model_store" / name)
    thresholds = art.manifest["atc"]["thresholds"]
    assert len(thresholds) == len(art.calibration.points)
    assert all(len(row) == art.model.num_exits for row in thresholds)
