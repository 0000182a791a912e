"""bench/exit_latency.py: the exit mix a budget gives a candidate, rows split by it, and a real run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.exit_latency import mix_at_budget, rows_per_exit, tracking_gap
from erde.curve import CalibrationCurve, OperatingPoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("histogram", "rows", "expected"), [
    ([0.84, 0.1, 0.06], 32, [27, 3, 2]), ([1.0, 0.0, 0.0], 32, [32, 0, 0]), ([1 / 3] * 3, 32, [11, 11, 10]),
    ([0.5, 0.5], 1, [1, 0]),
])
def test_rows_follow_the_histogram_and_sum_to_the_batch(histogram, rows, expected) -> None:
    assert rows_per_exit(histogram, rows) == expected


def test_the_mix_is_recosted_with_the_candidates_own_macs() -> None:
    # Two points of a served curve: mostly at exit 0 (less accurate) and mostly at the last exit.
    curve = CalibrationCurve([OperatingPoint(1.0, 0.3, 0.80, [0.9, 0.0, 0.1]),
                              OperatingPoint(0.1, 0.9, 0.95, [0.1, 0.0, 0.9])], [10, 50, 100])
    cheap_first_exit = mix_at_budget(curve, [5, 50, 100], 0.25)
    assert cheap_first_exit.exit_histogram == [0.9, 0.0, 0.1]
    assert cheap_first_exit.macs_fraction == pytest.approx(0.9 * 0.05 + 0.1)
    dear_first_exit = mix_at_budget(curve, [40, 50, 100], 0.25)  # 0.46 at best: the cheapest point, clamped
    assert dear_first_exit.macs_fraction == pytest.approx(0.9 * 0.4 + 0.1)


def test_tracking_gap_is_zero_when_time_follows_macs() -> None:
    assert tracking_gap([10, 50, 100], [1.0, 5.0, 10.0]) == pytest.approx(0.0)
    assert tracking_gap([10, 50, 100], [4.0, 5.0, 10.0]) == pytest.approx(0.15)


def test_the_benchmark_prints_both_tables_for_a_candidate() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.exit_latency", "--repeats", "2", "--arch", "tiny"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("|") and "tiny" in line]
    assert len(lines) == 4  # three exits, and the budget row
    assert "time saved / MACs saved" in result.stdout
