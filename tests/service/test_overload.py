"""The overload controller as a pure function of (state, delay, clock): no sleeps, no server."""

from __future__ import annotations

import pytest

from service.engine.overload import MAX_OVERSHOOT, MAX_RISE_STEP_S, OverloadLaw, OverloadState, step
from service.settings import Settings

LAW = OverloadLaw(target_s=0.020, hold_fraction=0.5, rise_s=0.5, recover_s=5.0)
TICK = 0.01  # seconds between measurements: about one dispatch under load


def run(state: OverloadState, delay_s: float, seconds: float, start: float = 0.0) -> list[OverloadState]:
    """The states after measuring the same delay every TICK for `seconds`."""
    states = []
    for i in range(1, round(seconds / TICK) + 1):
        state = step(LAW, state, delay_s, start + i * TICK)
        states.append(state)
    return states


def test_law_comes_from_the_settings() -> None:
    law = OverloadLaw.from_settings(Settings(target_queue_ms=30, overload_hold_fraction=0.4, overload_rise_s=1,
                                             overload_recover_s=8))
    assert law == OverloadLaw(0.030, 0.4, 1.0, 8.0)


def test_rises_quickly_under_sustained_delay() -> None:
    states = run(OverloadState(), 3 * LAW.target_s, 1.0)
    pressures = [s.pressure for s in states]
    assert pressures == sorted(pressures) and pressures[0] > 0
    reached = next(i for i, p in enumerate(pressures) if p == 1.0)
    assert (reached + 1) * TICK <= LAW.rise_s  # at three times the target: twice as fast as rise_s


@pytest.mark.parametrize("low, high", [(1.5, 2.0), (2.0, 3.0)])
def test_rise_is_graded_by_the_overshoot(low: float, high: float) -> None:
    slow = run(OverloadState(), low * LAW.target_s, 0.1)[-1].pressure
    fast = run(OverloadState(), high * LAW.target_s, 0.1)[-1].pressure
    assert 0 < slow < fast < 1


def test_one_late_row_after_a_quiet_spell_moves_pressure_little() -> None:
    quiet = run(OverloadState(), 0.0, 1.0)[-1]
    spiked = step(LAW, quiet, 50 * LAW.target_s, quiet.updated + 30.0)
    assert spiked.pressure == pytest.approx(MAX_RISE_STEP_S / LAW.rise_s * MAX_OVERSHOOT)
    assert spiked.pressure <= 0.25


@pytest.mark.parametrize("delay_fraction", [0.5, 0.75, 1.0])
def test_holds_inside_the_hysteresis_band(delay_fraction: float) -> None:
    held = OverloadState(pressure=0.6, updated=0.0)
    states = run(held, delay_fraction * LAW.target_s, 10.0)
    assert {s.pressure for s in states} == {0.6}


def test_recovers_when_the_load_falls_slower_than_it_rose() -> None:
    states = run(OverloadState(pressure=1.0, updated=0.0), 0.1 * LAW.target_s, 2 * LAW.recover_s)
    pressures = [s.pressure for s in states]
    assert pressures == sorted(pressures, reverse=True) and pressures[-1] == 0.0
    recovered = next(i for i, p in enumerate(pressures) if p == 0.0)
    assert LAW.recover_s <= (recovered + 1) * TICK <= 2 * LAW.recover_s  # 0.1 target: 80% of the full rate
    assert run(OverloadState(pressure=1.0, updated=0.0), 0.0, 1.0)[-1].pressure == pytest.approx(0.8)


def test_an_idle_gap_counts_as_recovery() -> None:
    assert step(LAW, OverloadState(pressure=1.0, updated=0.0), 0.0, 60.0).pressure == 0.0
    assert step(LAW, OverloadState(), 0.0, 1.0).pressure == 0.0  # the first measurement ever


def test_pressure_stays_within_zero_and_one() -> None:
    assert run(OverloadState(), 1000.0, 5.0)[-1].pressure == 1.0
    assert step(LAW, OverloadState(pressure=0.0, updated=0.0), 0.0, 10.0).pressure == 0.0


@pytest.mark.parametrize("overload", [1.5, 2.0, 2.9])
def test_closed_loop_settles_without_oscillating(overload: float) -> None:
    """A fluid queue whose service rate grows with pressure (x3 at 1), offered `overload` x its rate at 0:
    the pressure settles near the balance point, then moves within a narrow range, and the delay
    stays near the target; when the load falls to half the capacity, it recovers to 0."""
    base_rate, queued, state, t, dt = 1000.0, 0.0, OverloadState(), 0.0, 0.005
    settled: list[tuple[float, float]] = []
    while t < 30.0:
        rate = base_rate * (1 + 2 * state.pressure)
        queued = max(queued + (overload * base_rate - rate) * dt, 0.0)
        t += dt
        state = step(LAW, state, queued / rate, t)
        if t > 15.0:
            settled.append((state.pressure, queued / rate))
    pressures = [p for p, _ in settled]
    assert max(pressures) - min(pressures) < 0.1
    assert abs(sum(pressures) / len(pressures) - (overload - 1) / 2) < 0.05
    assert max(d for _, d in settled) < 1.25 * LAW.target_s
    for _ in range(round(LAW.recover_s / dt)):
        rate = base_rate * (1 + 2 * state.pressure)
        queued = max(queued + (0.5 * base_rate - rate) * dt, 0.0)
        t += dt
        state = step(LAW, state, queued / rate, t)
    assert state.pressure == 0.0
