"""BentoML with adaptive batching: the idiomatic two-service composition of BentoML >= 1.2.

`Classifier` (HTTP, POST /classify) takes the multipart upload, decodes it with the service's
decode and calls `Model.infer`, a `@bentoml.api(batchable=True)` method whose adaptive batcher
merges concurrent calls into one array (batchable APIs take one argument, so each row carries
its θ as its last column). BentoML runs each service in its own worker process and routes
between them itself. `Constant` is the same stack answering a constant for the same upload.

`python bench/peers/bentoml_server.py PORT [--constant]` with the repo root on PYTHONPATH runs
`bentoml serve` on 127.0.0.1 (GET /readyz is BentoML's own readiness probe).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import bentoml
import numpy as np
import torch
from _bentoml_impl.client import proxy2

from bench.peers.serving import CONSTANT, MAX_BATCH_SIZE, PeerModel

MAX_LATENCY_MS = int(os.environ.get("PEER_BENTOML_MAX_LATENCY_MS", "1000"))

# Workaround for a BentoML 1.4.40 bug: the client that calls a dependency (proxy2.SessionManager)
# replaces its aiohttp session every 100 requests and closes the old one while other requests are
# still in flight on it, which fails them ("Server disconnected", "Cannot write to closing
# transport": HTTP 500 for ~20% of requests at concurrency 64). Renew by age only.
_session_init = proxy2.SessionManager.__init__


def _session_init_no_request_cap(self, *args, **kwargs) -> None:
    _session_init(self, *args, **kwargs)
    self.max_requests = 2**62


proxy2.SessionManager.__init__ = _session_init_no_request_cap


@bentoml.service(workers=1)
class Model:
    def __init__(self) -> None:
        self.model = PeerModel()

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def infer(self, rows: np.ndarray) -> np.ndarray:
        """(B, C*H*W + 1) float32, θ last -> (B, 3): class_id, exit, confidence."""
        spec = self.model.spec
        xs = [torch.from_numpy(r[:-1].reshape(spec.channels, spec.size, spec.size)) for r in rows]
        out = self.model.predict(xs, rows[:, -1].tolist())
        return np.array([[r["class_id"], r["exit"], r["confidence"]] for r in out], dtype=np.float64)


@bentoml.service(workers=1)
class Classifier:
    model = bentoml.depends(Model)

    def __init__(self) -> None:
        self.prep = PeerModel()  # decode and θ on this side; the network runs in Model

    @bentoml.api(route="/classify")
    async def classify(self, image: Path, budget: float | None = None, threshold: float | None = None) -> dict:
        x = self.prep.decode(image.read_bytes()).numpy().ravel()
        row = np.append(x, np.float32(self.prep.theta({"budget": budget, "threshold": threshold})))
        class_id, exit_, confidence = (await self.model.to_async.infer(row[None].astype(np.float32)))[0]
        return {"label": self.prep.classes[int(class_id)], "class_id": int(class_id), "exit": int(exit_),
                "confidence": float(confidence)}


@bentoml.service(workers=1)
class Constant:
    @bentoml.api(route="/classify")
    async def classify(self, image: Path, budget: float | None = None, threshold: float | None = None) -> dict:
        image.read_bytes()
        return CONSTANT


if __name__ == "__main__":
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    target = "Constant" if "--constant" in sys.argv else "Classifier"
    bentoml_cli = str(Path(sys.executable).with_name("bentoml"))
    os.execv(bentoml_cli, [bentoml_cli, "serve", f"bench.peers.bentoml_server:{target}", "--host", "127.0.0.1",
                           "--port", sys.argv[1], "--working-dir", str(Path(__file__).resolve().parents[2])])
