"""The transport floor: the same HTTP stack and upload parsing as the service, answering a constant.

Run as `python -m bench.floor PORT`; it binds 127.0.0.1 only.
"""

from __future__ import annotations

import sys

import uvicorn
from fastapi import APIRouter, FastAPI, Request, Response

from service.api.pipeline import read_upload
from service.api.routes import RequestOnlyRoute

CONSTANT = b'{"label":"constant","class_id":0,"exit":0}'


def create_floor_app() -> FastAPI:
    app = FastAPI()
    hot = APIRouter(route_class=RequestOnlyRoute)  # the route class the service's /classify uses

    @hot.post("/classify")
    async def classify(request: Request) -> Response:
        """Read the multipart upload exactly as the service does, skip decode and model."""
        await read_upload(request, max_images=1)
        return Response(CONSTANT, media_type="application/json")

    app.include_router(hot)

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    return app


if __name__ == "__main__":
    uvicorn.run(create_floor_app(), host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools",
                access_log=False, log_level="warning")
