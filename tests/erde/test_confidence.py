"""The label-free accuracy estimator (erde/confidence.py): exact where it should be on the data it was fitted
on, close on held-out clean images, and stored in both shipped artifacts."""

from __future__ import annotations

import numpy as np
import pytest

from erde.calibrate import ExitOutputs, answers, sweep
from erde.confidence import fit_estimator
from erde.estimator import AccuracyEstimator

SHIPPED = ["fashion-mnist/2", "fashion-mnist-teacher/1"]


def synthetic(n: int = 4000, seed: int = 0) -> ExitOutputs:
    """Three exits that see the same images: each image has a difficulty, deeper exits get more of them right
    and are surer, and a wrong answer is mostly the same wrong class at every exit."""
    rng = np.random.default_rng(seed)
    difficulty = rng.random(n)
    labels = rng.integers(0, 10, n)
    right = difficulty[:, None] < np.array([0.6, 0.78, 0.9]) + rng.normal(0, 0.05, (n, 3))
    wrong = np.where(rng.random((n, 3)) < 0.8, labels[:, None] + 1, labels[:, None] + rng.integers(2, 9, (n, 3))) % 10
    prediction = np.where(right, labels[:, None], wrong)
    entropy = np.clip(difficulty[:, None] * np.array([2.2, 1.8, 1.4]) + rng.normal(0, 0.25, (n, 3)), 0, 2.3)
    return ExitOutputs(entropy, prediction, labels)


def test_on_its_own_data_the_estimate_is_exact_where_it_should_be() -> None:
    """At θ = 0 the last exit answers and the estimate is plain ATC, exact up to one image; at every θ the
    answers that differ from the last exit's count at exactly their validation rate."""
    outputs = synthetic()
    curve = sweep(outputs, [10, 50, 100], points=41)
    fitted = fit_estimator(outputs, curve)
    assert len(fitted["disagree_right"]) == len(curve.points) and fitted["samples"] == 4000
    estimator = AccuracyEstimator.from_manifest(fitted, curve)
    sure_last = outputs.entropy[:, -1] < estimator.last_threshold
    for point in curve.points:
        taken, correct = answers(outputs, point.threshold)
        answer = outputs.prediction[np.arange(4000), taken]
        agree = answer == outputs.prediction[:, -1]
        estimate = estimator.accuracy(outputs.entropy, outputs.prediction, point.threshold)
        # q is stored to 6 places
        assert estimate == pytest.approx(np.mean(agree & sure_last) + np.mean(~agree & correct), abs=1e-6)
        if point.threshold == 0.0:
            assert estimate == pytest.approx(correct.mean(), abs=1 / 4000)


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_estimators_are_unbiased_on_clean_held_out_images(name: str, shipped_on_test_split) -> None:
    """The test split was not fitted on: there the estimate must stay within a point of the truth at every
    budget a client may ask for, or clean traffic would be quoted below its accuracy and floors refused."""
    art, outputs = shipped_on_test_split(name)
    estimator = AccuracyEstimator.from_manifest(art.manifest["estimator"], art.calibration)
    assert len(estimator.disagree_right) == len(art.calibration.points)
    for budget in (1.0, 0.75, 0.5, 0.4, 0.3, 0.25):
        point, _ = art.calibration.choose(budget)
        _, correct = answers(outputs, point.threshold)
        estimate = estimator.accuracy(outputs.entropy, outputs.prediction, point.threshold)
        assert estimate == pytest.approx(correct.mean(), abs=0.01), budget
