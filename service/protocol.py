"""How uvicorn speaks HTTP for this service: the options every server process is started with."""

from __future__ import annotations

from typing import Any

from service.settings import Settings


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.Config` / `uvicorn.run`, shared by one worker and many."""
    return {"host": settings.host, "port": settings.port, "loop": "uvloop", "http": "httptools",
            "access_log": False, "timeout_graceful_shutdown": int(settings.drain_timeout_s) + 1}
