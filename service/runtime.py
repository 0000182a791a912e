"""Process-wide service state: settings, served models, readiness and draining."""

from __future__ import annotations

import asyncio

from service.registry import ModelRegistry
from service.settings import Settings


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
        self.registry.reload()
        self.started = True

    @property
    def ready(self) -> bool:
        return self.started and not self.draining and bool(self.registry.names)

    def idle(self) -> bool:
        return self.inflight == 0 and all(self.registry.get(n).worker.depth == 0 for n in self.registry.names)

    def close(self) -> None:
        self.registry.close(self.settings.drain_timeout_s)
