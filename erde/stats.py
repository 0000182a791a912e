"""Statistics for comparing models on the same test images: mean ± std over seeds, and a paired
bootstrap of the accuracy difference between two models (issue 14: "ERDE ≥ KD" is claimed only
where the interval says so).

Inputs are per-image correctness, shape (seeds, images): row s says which test images seed s's
model answered correctly at one operating point (a budget's θ, or full depth).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK = 256  # resamples computed at once: (CHUNK, images) floats in memory


@dataclass(frozen=True)
class Interval:
    """A difference of accuracies (A - B, as a fraction) and its bootstrap confidence interval."""

    mean: float  # the observed difference: mean over seeds and images of A minus that of B
    low: float
    high: float
    level: float  # e.g. 0.95

    def verdict(self, a: str = "A", b: str = "B") -> str:
        """What the interval supports: a strict order when it excludes 0, else no difference shown."""
        if self.low > 0:
            return f"{a} > {b}"
        if self.high < 0:
            return f"{a} < {b}"
        return "no difference shown"


def mean_std(values: list[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) of per-seed results."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("mean_std needs at least one value")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _as_seeds_by_images(correct: np.ndarray) -> np.ndarray:
    arr = np.asarray(correct, dtype=np.float64)
    return arr[None, :] if arr.ndim == 1 else arr


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 5000, level: float = 0.95,
                     seed: int = 0) -> Interval:
    """Bootstrap interval of accuracy(A) - accuracy(B) on the same images.

    `a` (seeds_a, images) and `b` (seeds_b, images) hold per-image correctness (or 1-D for one
    seed). Each resample draws the images with replacement, the same draw for both models (paired:
    the images that are hard for both cancel out), and each model's seeds with replacement (so the
    interval carries seed noise as well, as far as a few seeds can show it). Percentile interval.
    """
    a, b = _as_seeds_by_images(a), _as_seeds_by_images(b)
    if a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(f"both models must be scored on the same images: {a.shape[1]} vs {b.shape[1]}")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError("level must be in (0, 1) and resamples at least 1")
    rng = np.random.default_rng(seed)
    images = a.shape[1]
    diffs = np.empty(resamples)
    for start in range(0, resamples, CHUNK):
        n = min(CHUNK, resamples - start)
        per_image = _seed_mean(a, n, rng) - _seed_mean(b, n, rng)  # (n, images)
        drawn = rng.integers(0, images, size=(n, images))
        diffs[start:start + n] = np.take_along_axis(per_image, drawn, axis=1).mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return Interval(float(a.mean() - b.mean()), float(low), float(high), level)


def _seed_mean(correct: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Per-image correctness averaged over a with-replacement draw of the seeds, for n resamples."""
    seeds = correct.shape[0]
    if seeds == 1:
        return np.broadcast_to(correct, (n, correct.shape[1]))
    counts = rng.multinomial(seeds, np.full(seeds, 1 / seeds), size=n)  # (n, seeds)
    return counts @ correct / seeds
