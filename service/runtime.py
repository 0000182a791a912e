"""Process-wide service state: settings, served models, decode pool, readiness and draining."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch

from erde.data import InputSpec
from service.decode import decode_image
from service.registry import ModelRegistry
from service.settings import Settings


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = ModelRegistry(settings)
        self.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="erde-decode")
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

    async def decode(self, data: bytes, spec: InputSpec) -> torch.Tensor:
        """Small uploads decode inline (cheaper than a thread hand-off); larger ones off the event loop."""
        limits = self.registry.limits
        if len(data) <= self.settings.inline_decode_bytes:
            return decode_image(data, spec, limits)
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, decode_image, data, spec, limits)

    def close(self) -> None:
        self.registry.close(self.settings.drain_timeout_s)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
