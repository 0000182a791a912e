"""Ray Serve with `@serve.batch`: one deployment with a FastAPI ingress, local Ray, no dashboard.

`python bench/peers/ray_server.py PORT [--constant]` with the repo root on PYTHONPATH. Ray's
HTTP proxy (an actor) takes the request and forwards it to the replica (another actor), whose
route decodes the upload and awaits `infer`, a `@serve.batch` method that merges concurrent
calls. `max_ongoing_requests` is raised from Ray's default of 5 so that batches can fill, as
Ray's batching guide advises. With --constant the route answers a constant for the same upload.
(No `from __future__ import annotations` here: Ray's ingress wrapper cannot resolve string
annotations, and FastAPI would then take `image` for a query parameter.)
"""

import os
import signal
import sys
import time
from typing import Annotated

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray
from fastapi import FastAPI, File, Form, UploadFile
from ray import serve

from bench.peers.serving import BATCH_WAIT_S, CONSTANT, MAX_BATCH_SIZE, PeerModel

app = FastAPI()


@serve.deployment(num_replicas=1, max_ongoing_requests=2 * MAX_BATCH_SIZE)
@serve.ingress(app)
class Classifier:
    def __init__(self, constant: bool) -> None:
        self.model = None if constant else PeerModel()

    @app.post("/classify")
    async def classify(self, image: Annotated[UploadFile, File()], budget: Annotated[str | None, Form()] = None,
                       threshold: Annotated[str | None, Form()] = None) -> dict:
        data = await image.read()
        if self.model is None:
            return CONSTANT
        x = self.model.decode(data)
        return await self.infer((x, self.model.theta({"budget": budget, "threshold": threshold})))

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def infer(self, rows: list[tuple]) -> list[dict]:
        xs, thetas = zip(*rows, strict=True)
        return self.model.predict(xs, thetas)

    @app.get("/readyz")
    async def readyz(self) -> dict[str, str]:
        return {"status": "ready"}


def main() -> None:
    port = int(sys.argv[1])
    # Local Ray; the workers inherit this environment (PYTHONPATH, ERDE_*, PEER_*). Serve's HTTP proxy
    # binds 127.0.0.1. Ray's own control plane (GCS, raylet, agents, actors' gRPC) listens on the node's
    # address whatever we ask (Ray turns 127.0.0.1 into the reachable IP); only loopback traffic is sent.
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Classifier.bind("--constant" in sys.argv), name="erde", route_prefix="/")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        time.sleep(0.2)
    ray.shutdown()  # this driver started the local cluster: that stops Serve's actors with it


if __name__ == "__main__":
    main()
