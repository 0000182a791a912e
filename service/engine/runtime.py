"""Process-wide service state: settings, served models, readiness and draining."""

from __future__ import annotations

import asyncio

from service.engine.registry import ModelRegistry
from service.errors import Unavailable
from service.settings import Settings


def time_allowed(settings: Settings, timeout_ms: float | None) -> tuple[float, float]:
    """(seconds until a request is answered 504, seconds it is admitted for): the server's request timeout,
    shortened by the request's timeout_ms; and its timeout_ms, else the SLO, within that timeout
    (admission by expected waiting time: service/engine/sojourn.py)."""
    limit = settings.request_timeout_s
    if timeout_ms is None:
        return limit, min(settings.slo_ms / 1000, limit)
    own = min(limit, timeout_ms / 1000)
    return own, own


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = ModelRegistry(settings)
        self.inflight = 0
        self.draining = False
        self.started = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Load every model (each in its own inference process, answering on `loop`)."""
        self.registry.loop = loop
        self.registry.lag.start(loop)
        self.registry.reload()
        self.started = True

    def draining_refusal(self) -> Unavailable | None:
        """The 503 every new classify request gets while the service drains (from admission, or from the
        pipeline for a request admitted just before), or None."""
        if not self.draining:
            return None
        return Unavailable("the service is shutting down; retry on another instance",
                           retry_after=self.settings.retry_after_s, reason="draining")

    def readiness_refusal(self) -> Unavailable | None:
        """The 503 a readiness probe gets now (ours and the Open Inference Protocol's alike), or None."""
        reason = self.unready_reason()
        if reason is None:
            return None
        return Unavailable(reason, code="not_ready", retry_after=self.settings.retry_after_s)

    def unready_reason(self) -> str | None:
        """Why /readyz must answer 503 now, or None: loading, draining, no model, or a model down."""
        if self.draining:
            return "the service is draining"
        if not self.started:
            return "models are loading"
        if not self.registry.names:
            return "no model could be loaded"
        down = self.registry.down()
        if down:
            return f"no live inference process for model {', '.join(down)}"
        return None

    def idle(self) -> bool:
        return self.inflight == 0 and all(self.registry.get(n).worker.depth == 0 for n in self.registry.names)

    def close(self) -> None:
        self.registry.close(self.settings.drain_timeout_s)
