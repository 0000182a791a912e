"""Load-adaptive budgets for one model: the glue between its queue, the controller and its policy.

The worker calls it with each batch just before sending it (and with no rows when the queue is
full). It measures how long the batch's oldest row waited, steps the controller
(service/overload.py), and gives every row the rule to run with: its own, or under pressure a
cheaper operating point no lower than its floor (`BudgetPolicy.degrade`). Rows are degraded when
they leave the queue, so the ones already queued when load rises are answered cheaper too.
"""

from __future__ import annotations

from collections.abc import Callable

from service.engine.batcher import Job
from service.overload import OverloadLaw, OverloadState, step
from service.policy import BudgetPolicy


class AdaptiveBudgets:
    def __init__(self, policy: BudgetPolicy, law: OverloadLaw, degrade: bool,
                 on_pressure: Callable[[float], None] = lambda pressure: None) -> None:
        self.policy = policy
        self.law = law
        self.degrade = degrade  # False (ERDE_OVERLOAD=reject): measure and report, never change a row
        self.on_pressure = on_pressure
        self.state = OverloadState()

    @property
    def pressure(self) -> float:
        return self.state.pressure

    def __call__(self, jobs: list[Job], now: float, fill: float) -> None:
        """`jobs`: the batch about to be sent (empty: the queue refused rows for lack of room);
        `fill`: the share of the queue still occupied."""
        if not jobs:  # a full queue: every queued row goes at its floor before anyone is refused
            self.state = OverloadState(1.0, now)
        else:
            self.state = step(self.law, self.state, now - min(j.enqueued for j in jobs), now)
        self.on_pressure(self.state.pressure)
        if not self.degrade or self.state.pressure <= 0.0:
            return
        for job in jobs:
            job.used = self.policy.degrade(job.asked, self.state.pressure)
