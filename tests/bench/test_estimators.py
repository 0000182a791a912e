"""bench/estimators.py: its two per-θ estimators are fitted so that, on the split they were fitted on, they
give the true accuracy at every θ; a figure off there would be a bug of the benchmark, not of the estimator."""

from __future__ import annotations

import numpy as np
import pytest

from bench.estimators import answered, estimators
from erde.calibrate import ExitOutputs
from erde.estimator import AccuracyEstimator


@pytest.fixture
def validation() -> ExitOutputs:
    rng = np.random.default_rng(0)
    n = 2000
    labels = rng.integers(0, 4, n)
    last = np.where(rng.random(n) < 0.8, labels, rng.integers(0, 4, n))  # the last exit right 80% of the time
    early = np.where(rng.random(n) < 0.7, last, rng.integers(0, 4, n))  # the first one agrees with it 70%
    return ExitOutputs(rng.uniform(0, 1.4, (n, 3)), np.stack([early, early, last], 1), labels)


@pytest.mark.parametrize("theta", [0.0, 0.3, 0.7, 1.1])
def test_the_per_theta_fits_are_exact_on_their_own_split(validation: ExitOutputs, theta: float) -> None:
    served = AccuracyEstimator(0.5, (0.0,), (0.0,))
    truth = float(np.mean(answered(validation, theta)[0] == validation.labels))
    fitted = estimators(served, validation)
    assert fitted["ATC on the answer"](validation, theta) == pytest.approx(truth, abs=1 / 2000)
    answer, _ = answered(validation, theta)
    differ = answer != validation.prediction[:, -1]
    right_where_differ = float(np.mean(answer[differ] == validation.labels[differ])) if differ.any() else 0.0
    exact_q = AccuracyEstimator(0.5, (0.0,), (right_where_differ,))  # q(θ) as the validation split has it
    assert estimators(exact_q, validation)["agreement, ATC per θ"](validation, theta) == pytest.approx(truth,
                                                                                                     abs=1 / 2000)
