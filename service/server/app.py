"""The app factory: settings in, a FastAPI app with its runtime, routes, errors and accounting out."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from service.api.oip import router as oip_router
from service.api.routes import WorkDispatch, classify_router, router
from service.api.ui import ui_router
from service.edge import accesslog
from service.edge.admission import AdmissionControl
from service.edge.head import HeadAsGet
from service.edge.middleware import AllowedHosts, RequestAccounting
from service.engine.runtime import Runtime
from service.errors import install_error_handlers
from service.settings import Settings, get_settings

log = logging.getLogger("erde.service")


def _watch_sighup(runtime: Runtime) -> None:
    """SIGHUP reloads the store in a thread (verify + warm before swap); only in the main thread."""
    loop = asyncio.get_running_loop()

    def reload_logged() -> None:
        try:
            log.info("reload: %s", runtime.registry.reload())
        except Exception:  # a reload never takes the service down, and its failure is never lost
            log.exception("reload of %s failed; the models already served keep serving", runtime.settings.store)

    def reload() -> None:
        log.info("SIGHUP: reloading %s", runtime.settings.store)
        loop.run_in_executor(None, reload_logged)

    try:
        loop.add_signal_handler(signal.SIGHUP, reload)
    except (NotImplementedError, RuntimeError, ValueError):
        log.debug("SIGHUP reload not available in this thread")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # Here, not in `erde serve`: each uvicorn worker process builds its own app (a no-op if configured).
    accesslog.configure()
    runtime = Runtime(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, runtime.start, loop)
        if not runtime.registry.names:
            log.error("no loadable model in %s; /readyz stays 503", settings.store)
        # What exists now lives as long as the server: keep the collector from walking it again and
        # again under load (the oldest generation's passes showed up as 100 ms stalls in p99).
        gc.collect()
        gc.freeze()
        _watch_sighup(runtime)
        yield
        runtime.draining = True
        await asyncio.get_running_loop().run_in_executor(None, runtime.close)

    # /docs and /redoc load their scripts from the fastapi-offline package, not a CDN: they work offline.
    # FastAPI's own OpenTelemetry off: the service's metrics are Prometheus's (service/metrics.py), and asking
    # for OpenTelemetry providers on every request cost 2% of the event loop's CPU (docs/architecture.md).
    app = FastAPIOffline(title="ERDE serving", version="0.1.0", lifespan=lifespan,
                         description="Early-exit image classification with a compute budget per request.",
                         telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.runtime = runtime
    install_error_handlers(app)
    app.include_router(classify_router)
    app.include_router(router)
    app.include_router(oip_router)  # the Open Inference Protocol (v2 REST) under /v2
    app.include_router(ui_router())  # the demo page at / and /ui, and /stats
    # innermost: the work endpoints' routes are called past the framework's routing
    app.add_middleware(WorkDispatch, routes=[*classify_router.routes, *oip_router.routes])
    app.add_middleware(HeadAsGet)  # HEAD is routed as GET, and counted as what it asked
    app.add_middleware(AdmissionControl, runtime=runtime)  # inside the accounting: refusals are counted
    app.add_middleware(AllowedHosts, names=(*settings.allowed_hosts, settings.host))  # counted too
    app.add_middleware(RequestAccounting, runtime=runtime, max_body=settings.max_upload_bytes,
                       max_in_flight=settings.max_upload_bytes_in_flight, retry_after_s=settings.retry_after_s,
                       log_requests=settings.access_log)
    return app
