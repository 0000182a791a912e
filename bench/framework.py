"""What the web framework costs: constant-answer endpoints that read the same PNG multipart upload,
written five ways, each served by uvicorn (uvloop + httptools) and loaded with wrk.

- `fastapi-post`: a FastAPI `@app.post` endpoint (what the service used before RequestOnlyRoute);
- `request-only-route`: FastAPI with the service's `RequestOnlyRoute` (the transport floor, bench/floor.py);
- `starlette-route`: a Starlette `Route` inside the FastAPI app;
- `starlette`: a bare Starlette app;
- `fastapi-form`: `@app.post` parsing the upload with Starlette's `request.form()` instead of our parser.

Usage: .venv/bin/python -m bench.framework [--seconds 5] [--rounds 2] [--concurrency 64]
       (`python -m bench.framework serve VARIANT PORT` runs one server)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request, Response
from starlette.applications import Starlette
from starlette.routing import Route

from bench.common import default_artifact, table
from bench.floor import CONSTANT, create_floor_app
from bench.load import launch, lua, require_wrk, server_port, stop, write_bodies, wrk
from service.api.pipeline import read_upload


async def _constant(request: Request) -> Response:
    await read_upload(request, max_images=1)
    return Response(CONSTANT, media_type="application/json")


async def _ready(request: Request) -> Response:
    return Response(b'{"status":"ready"}', media_type="application/json")


def _fastapi_post() -> FastAPI:
    app = FastAPI()
    app.post("/classify")(_constant)
    app.get("/readyz")(_ready)
    return app


def _fastapi_form() -> FastAPI:
    app = FastAPI()

    @app.post("/classify")
    async def classify(request: Request) -> Response:
        form = await request.form()
        await form["image"].read()
        return Response(CONSTANT, media_type="application/json")

    app.get("/readyz")(_ready)
    return app


def _starlette_route() -> FastAPI:
    app = FastAPI()
    app.router.routes.append(Route("/classify", _constant, methods=["POST"]))
    app.get("/readyz")(_ready)
    return app


def _starlette() -> Starlette:
    return Starlette(routes=[Route("/classify", _constant, methods=["POST"]), Route("/readyz", _ready)])


VARIANTS: dict[str, Callable[[], Starlette]] = {
    "fastapi-post": _fastapi_post, "request-only-route": create_floor_app, "starlette-route": _starlette_route,
    "starlette": _starlette, "fastapi-form": _fastapi_form}


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        uvicorn.run(VARIANTS[sys.argv[2]](), host="127.0.0.1", port=int(sys.argv[3]), loop="uvloop",
                    http="httptools", access_log=False, log_level="warning")
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    require_wrk()
    art = default_artifact()
    tmp = Path(tempfile.mkdtemp(prefix="erde-framework-"))
    script = lua(tmp, write_bodies(tmp, {}, art.spec.size), "constant", 10_000_000)
    servers, ports = {}, {}
    try:
        for name in VARIANTS:
            ports[name] = server_port()
            servers[name], _ = launch([sys.executable, "-m", "bench.framework", "serve", name, str(ports[name])],
                                      ports[name], dict(os.environ), tmp / f"{name}.log", 60)
        rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name in VARIANTS:
                rates[name].append(wrk(ports[name], script, args.concurrency, args.seconds)["ok_rps"])
    finally:
        for proc in servers.values():
            stop(proc)
    print(f"# Constant-answer endpoints reading the same upload: wrk 1 thread c={args.concurrency}, "
          f"{args.seconds:g} s per run, {args.rounds} interleaved rounds (one number per round)\n")
    print(table(["endpoint", "requests/s"], [[name, " / ".join(f"{r:,.0f}" for r in rates[name])]
                                             for name in VARIANTS]))


if __name__ == "__main__":
    main()
