"""erde.stats on synthetic predictions whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from erde.stats import Interval, mean_std, paired_bootstrap


def test_mean_and_sample_std_over_seeds() -> None:
    assert mean_std([0.90, 0.92, 0.94]) == pytest.approx((0.92, 0.02))
    assert mean_std([0.9]) == (0.9, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        mean_std([])


def test_identical_models_differ_by_exactly_nothing() -> None:
    correct = np.random.default_rng(0).random(2000) < 0.9
    interval = paired_bootstrap(correct, correct)
    assert (interval.mean, interval.low, interval.high) == (0.0, 0.0, 0.0)
    assert interval.verdict("ERDE", "KD") == "no difference shown"


def test_a_known_difference_is_found_and_bracketed() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.random(5000) < 0.8, rng.random(5000) < 0.7  # independent: true difference 0.10
    interval = paired_bootstrap(a, b, resamples=3000)
    assert interval.low < 0.10 < interval.high and interval.low > 0
    expected_width = 2 * 1.96 * np.sqrt((0.8 * 0.2 + 0.7 * 0.3) / 5000)  # normal approximation: 0.034
    assert interval.high - interval.low == pytest.approx(expected_width, rel=0.15)
    assert interval.verdict("ERDE", "KD") == "ERDE > KD"
    assert paired_bootstrap(b, a, resamples=3000).verdict("ERDE", "KD") == "ERDE < KD"


def test_pairing_finds_a_small_difference_that_unpaired_accuracies_would_hide() -> None:
    """Two models agree on 9,950 of 10,000 images; A is right and B wrong on the other 50: +0.5 points.
    Unpaired, two accuracies near 90% on 10,000 images each have a ±0.6-point interval; paired, the
    shared images cancel and only the 50 that differ count."""
    rng = np.random.default_rng(2)
    b = rng.random(10_000) < 0.9
    a = b.copy()
    a[np.flatnonzero(~b)[:50]] = True
    interval = paired_bootstrap(a, b)
    assert interval.mean == pytest.approx(0.005)
    assert 0 < interval.low < 0.005 < interval.high < 0.01


def test_seed_noise_widens_the_interval() -> None:
    rng = np.random.default_rng(3)
    base = rng.random(3000) < 0.85
    steady = np.stack([base] * 3)  # three seeds that answer alike
    noisy = np.stack([base, rng.random(3000) < 0.80, rng.random(3000) < 0.90])  # seeds that disagree
    other = rng.random(3000) < 0.85
    narrow, wide = paired_bootstrap(steady, other), paired_bootstrap(noisy, other)
    assert wide.high - wide.low > 1.2 * (narrow.high - narrow.low)


def test_reproducible_and_refuses_mismatched_images() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.random((3, 500)) < 0.9, rng.random((2, 500)) < 0.88
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(a, b[:, :400])
    assert Interval(0.01, -0.002, 0.02, 0.95).verdict() == "no difference shown"
