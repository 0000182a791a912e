"""Load-adaptive budgets for one model: the glue between its queue, the controller and its policy.

The worker calls `adjust` with each batch just before sending it, `saturate` when its queue is full,
and `absorb` when a request could not be answered in its time at today's cost. `adjust` measures
how long the oldest row left queued waited (the least over the last interval), steps the controller
(service/engine/overload.py), and gives every row the rule to run with: its own, or under pressure a
cheaper operating point no lower than its floor (`BudgetPolicy.degrade`). Rows are degraded when they
leave the queue, so the ones already queued when load rises are answered cheaper too.
"""

from __future__ import annotations

from collections.abc import Callable

from service.engine.batcher import Job
from service.engine.overload import OverloadLaw, OverloadState, step
from service.engine.policy import BudgetPolicy
from service.engine.sojourn import IntervalLow, seen, standing


class AdaptiveBudgets:
    def __init__(self, policy: BudgetPolicy, law: OverloadLaw, degrade: bool,
                 on_pressure: Callable[[float], None] = lambda pressure: None) -> None:
        self.policy = policy
        self.law = law
        self.degrade = degrade  # False (ERDE_OVERLOAD=reject): measure and report, never change a row
        self.on_pressure = on_pressure
        self.state = OverloadState()
        self.low = IntervalLow()  # the least wait of the oldest row left queued, over the last interval

    def adjust(self, jobs: list[Job], now: float, waited_s: float) -> None:
        """Give every row of the batch about to be sent the rule to run with, after measuring `waited_s`,
        how long the oldest row left behind in the queue has waited (0 when none is). The controller sees
        the least of these over the last interval (CoDel's minimum), which is 0 whenever the queue emptied:
        load is a queue that stands. The oldest row of each batch, measured before, had waited for the
        batches ahead of it at any load: the teacher answered 58-82% of its rows degraded at half its
        capacity (`make bench-overload`); and under adaptive LIFO the batch's rows are the newest."""
        self.low = seen(self.law.interval_s, self.low, waited_s, now)
        self._measured(step(self.law, self.state, standing(self.low), now))
        if not self.degrade or self.state.pressure <= 0.0:
            return
        for job in jobs:
            job.used = self.policy.degrade(job.asked, self.state.pressure)

    def saturate(self, now: float) -> None:
        """The queue refused rows for lack of room, the strongest load signal there is: every queued row
        goes at its floor before anyone else is refused."""
        self._measured(OverloadState(1.0, now))

    def absorb(self, wait_s: float, now: float) -> bool:
        """A request would wait `wait_s`, too long to be answered in its time: in degrade mode below full
        pressure, that is a measurement like a late row's (the pressure rises with it) and the request is
        taken, as cheaper rows ahead will make room; True then. Refused otherwise (service/engine/sojourn.py)."""
        if not self.degrade or self.state.pressure >= 1.0:
            return False
        self._measured(step(self.law, self.state, wait_s, now))
        return True

    def _measured(self, state: OverloadState) -> None:
        self.state = state
        self.on_pressure(state.pressure)
