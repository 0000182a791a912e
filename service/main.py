"""`erde serve`: run the service under uvicorn, draining on SIGTERM.

SIGTERM (or Ctrl-C) first turns /readyz to 503 and refuses new work with 503 + Retry-After,
while queued and in-flight requests are answered; once idle (or after `drain_timeout_s`)
uvicorn shuts down as usual. A second signal stops at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import time
from types import FrameType

import uvicorn

from service.protocol import uvicorn_options
from service.runtime import Runtime
from service.settings import Settings, get_settings


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime, drain_timeout: float) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.drain_timeout = drain_timeout
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_deadline is None and sig in (signal.SIGTERM, signal.SIGINT):
            logging.getLogger("erde.service").info("draining: finishing queued and in-flight requests")
            self.runtime.draining = True
            self.drain_deadline = time.monotonic() + self.drain_timeout
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit and (
                self.runtime.idle() or time.monotonic() > self.drain_deadline):
            self.should_exit = True
        return await super().on_tick(counter)


def _multiprocess_dir() -> str:
    """Several workers share metrics through files in a directory that is empty at every start:
    the one PROMETHEUS_MULTIPROC_DIR names (emptied), else a fresh one for this server."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
    else:
        path = tempfile.mkdtemp(prefix="erde-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def run(settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    common = uvicorn_options(settings)
    if settings.workers > 1:
        path = _multiprocess_dir()
        try:
            uvicorn.run("service.app:create_app", factory=True, workers=settings.workers, **common)
        finally:
            shutil.rmtree(path, ignore_errors=True)
        return
    from service.app import create_app  # after the multiprocess directory is set, never before

    app = create_app(settings)
    server = DrainingServer(uvicorn.Config(app, **common), app.state.runtime, settings.drain_timeout_s)
    server.run()
