"""Dependencies for routes: the runtime, typed as an Annotated alias."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.engine.runtime import Runtime


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_runtime(request: Request) -> Runtime:
    """Async on purpose: FastAPI runs a sync dependency in a thread pool, a hand-off per request."""
    return runtime_of(request)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
