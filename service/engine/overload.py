"""The overload controller: how hard to degrade budgets, from how long rows wait (docs/design.md §4).

A pure function of (state, measured queueing delay, clock), like `take_batch`: tested without
sleeping, and the caller decides when to measure (at each dispatch) and what to do with the
pressure (`BudgetPolicy.degrade` per row).

The law, with d the measured queueing delay, T the target (ERDE_TARGET_QUEUE_MS), h the hold
fraction and dt the time since the previous measurement:

    d > T          rise:    p += min(dt, MAX_RISE_STEP_S) / rise_s · min(d/T − 1, MAX_OVERSHOOT)
    h·T ≤ d ≤ T    hold:    p unchanged (the hysteresis band)
    d < h·T        recover: p −= dt / recover_s · (1 − d/(h·T))

then p is clipped to [0, 1]. Rising is graded (proportional to the overshoot, so twice the target
takes `rise_s` from 0 to 1 and a single late row moves p little) and quick; recovery is ten
times slower by default and only starts well below the target, so a pressure that has just
brought the delay under the target is held there instead of being released at once, which
would let the queue grow again (the oscillation the band prevents). Rises trust one measurement
for at most MAX_RISE_STEP_S; recovery uses the whole gap, since no measurements means no load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from service.settings import Settings

MAX_RISE_STEP_S = 0.05  # one late measurement after a quiet spell counts for at most this long
MAX_OVERSHOOT = 2.0  # delays beyond 3x the target raise p no faster than 3x does


@dataclass(frozen=True)
class OverloadLaw:
    target_s: float  # queueing delay to hold rows under
    hold_fraction: float = 0.5  # the band [hold_fraction·target, target] holds p
    rise_s: float = 0.5  # seconds from 0 to 1 at twice the target delay
    recover_s: float = 5.0  # seconds from 1 to 0 at no delay
    # A delay is load when it stood this long (service/engine/adaptive.py): CoDel's 100 ms. Not the SLO, as
    # for admission: an SLO of 30 s kept the waits of an idle start in view for 30 s and eased the pressure.
    interval_s: float = 0.1

    @classmethod
    def from_settings(cls, settings: Settings) -> OverloadLaw:
        return cls(settings.target_queue_ms / 1000, settings.overload_hold_fraction, settings.overload_rise_s,
                   settings.overload_recover_s, settings.overload_interval_ms / 1000)


@dataclass(frozen=True)
class OverloadState:
    pressure: float = 0.0  # 0: answer rows as asked; 1: every adjustable row at its floor
    updated: float = -math.inf  # clock (monotonic seconds) of the last measurement


def step(law: OverloadLaw, state: OverloadState, delay_s: float, now: float) -> OverloadState:
    """The state after measuring a queueing delay of `delay_s` at time `now` (see the module docstring)."""
    dt = max(now - state.updated, 0.0)
    ratio = delay_s / law.target_s
    pressure = state.pressure
    if ratio > 1.0:
        pressure += min(dt, MAX_RISE_STEP_S) / law.rise_s * min(ratio - 1.0, MAX_OVERSHOOT)
    elif ratio < law.hold_fraction:
        pressure -= dt / law.recover_s * (1.0 - ratio / law.hold_fraction)
    return OverloadState(min(max(pressure, 0.0), 1.0), now)
