"""Naive FastAPI: one request, one forward, no batching (the textbook `UploadFile` endpoint).

`python bench/peers/fastapi_server.py PORT [--constant]` with the repo root on PYTHONPATH; binds
127.0.0.1. With --constant, /classify reads the same upload and answers a constant (the stack's
transport floor).
"""

from __future__ import annotations

import sys
from typing import Annotated

import uvicorn
from fastapi import FastAPI, File, Form, UploadFile

from bench.peers.serving import CONSTANT, PeerModel


def create_app(constant: bool) -> FastAPI:
    app = FastAPI()
    model = None if constant else PeerModel()

    @app.post("/classify")
    def classify(image: Annotated[UploadFile, File()], budget: Annotated[str | None, Form()] = None,
                 threshold: Annotated[str | None, Form()] = None) -> dict:
        data = image.file.read()
        if model is None:
            return CONSTANT
        x = model.decode(data)
        return model.predict([x], [model.theta({"budget": budget, "threshold": threshold})])[0]

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    return app


if __name__ == "__main__":
    uvicorn.run(create_app("--constant" in sys.argv), host="127.0.0.1", port=int(sys.argv[1]), access_log=False,
                log_level="warning")
