"""LitServe with its own batching: `max_batch_size` and `batch_timeout` on the LitAPI, ZeroMQ queues.

`python bench/peers/litserve_server.py PORT [--constant]` with the repo root on PYTHONPATH; binds
127.0.0.1. The HTTP server parses the multipart form and hands it to the inference worker
process, which decodes each request, batches, runs the early-exit forward and encodes the
replies. With --constant, predict answers a constant for the same upload (the stack's floor).
"""

from __future__ import annotations

import sys

import litserve as ls

from bench.peers.serving import BATCH_WAIT_S, CONSTANT, MAX_BATCH_SIZE, PeerModel

CONSTANT_MODE = "--constant" in sys.argv


class ClassifyAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = None if CONSTANT_MODE else PeerModel()

    def decode_request(self, request):
        data = request["image"].file.read()
        if self.model is None:
            return None
        return self.model.decode(data), self.model.theta(request)

    def batch(self, inputs):
        return inputs

    def predict(self, batch):
        if self.model is None:
            return [CONSTANT] * len(batch)
        xs, thetas = zip(*batch, strict=True)
        return self.model.predict(xs, thetas)

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return output


if __name__ == "__main__":
    api = ClassifyAPI(max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_WAIT_S, api_path="/classify")
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, healthcheck_path="/readyz",
                          fast_queue=True)
    server.run(host="127.0.0.1", port=int(sys.argv[1]), num_api_servers=1, generate_client_file=False,
               log_level="warning")
