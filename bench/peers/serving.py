"""What every peer server shares: the same artifact, preprocessing and early-exit forward as the service.

Imported inside each peer's own virtualenv (the repo root on PYTHONPATH), so the network, the
decode and the exit rule are byte-for-byte the service's: `service.engine.decode.decode_image` for the
tensor, `erde.nets.fuse_for_inference` for the network (the service serves the BN-folded copy),
and `service.engine.compute.run_batch` for the stage-by-stage loop with per-row θ (with the
per-stage convolution backends the service measures at load). Only the serving framework differs.

Request options, as form fields: `threshold` (θ, 0 = full depth), or `budget` (absent or 1.0 =
full depth, otherwise the θ the artifact's calibration chooses for it, as the service does).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from bench.common import default_artifact
from erde.nets import fuse_for_inference
from service.engine.compute import Sample, choose_stage_backends, run_batch
from service.engine.decode import decode_image
from service.engine.limits import ImageLimits
from service.engine.wire import ExitResult
from service.settings import Settings

# The service runs its network on one intra-op thread (ERDE_TORCH_THREADS=1); the peers get the same.
TORCH_THREADS = int(os.environ.get("PEER_TORCH_THREADS", "1"))
MAX_BATCH_SIZE = int(os.environ.get("PEER_MAX_BATCH_SIZE", "32"))  # the service's ERDE_MAX_BATCH_SIZE
BATCH_WAIT_S = float(os.environ.get("PEER_BATCH_WAIT_MS", "2")) / 1000  # LitServe / Ray Serve batch wait
CONSTANT: dict[str, Any] = {"label": "constant", "class_id": 0, "exit": 0}


class PeerModel:
    """The served artifact, loaded once per worker, run the way the service's inference process runs it."""

    def __init__(self) -> None:
        self._threads_set = threading.local()
        self._set_threads()
        self.artifact = default_artifact()
        self.net = fuse_for_inference(self.artifact.model).eval()
        self.mkldnn = choose_stage_backends(self.net, MAX_BATCH_SIZE)  # the service's per-stage conv backend
        self.spec = self.artifact.spec
        defaults = Settings()
        self.limits = ImageLimits(defaults.max_pixels, defaults.min_image_side, defaults.image_formats)
        self.last_exit = self.net.num_exits - 1
        self.classes = self.artifact.classes
        self.predict([torch.zeros(self.spec.channels, self.spec.size, self.spec.size)] * 2, [0.0, 0.0])  # warm

    def theta(self, fields: Mapping[str, Any]) -> float:
        """θ for a request's form fields (strings, or numbers where the framework parsed them)."""
        threshold, budget = fields.get("threshold"), fields.get("budget")
        if threshold not in (None, ""):
            return float(threshold)
        if budget in (None, "") or float(budget) >= 1.0:
            return 0.0
        return self.artifact.calibration.choose(float(budget))[0].threshold

    def decode(self, data: bytes) -> torch.Tensor:
        return decode_image(data, self.spec, self.limits)

    def _set_threads(self) -> None:
        """torch's thread count is per calling thread (OpenMP): set it in whichever thread runs the
        network (a framework's thread pool, its event loop), once per thread, as the service does."""
        if not getattr(self._threads_set, "done", False):
            torch.set_num_threads(TORCH_THREADS)
            self._threads_set.done = True

    def predict(self, xs: Sequence[torch.Tensor], thetas: Sequence[float]) -> list[dict[str, Any]]:
        """One early-exit pass over a batch; each row stops at its own θ."""
        self._set_threads()
        jobs = [Sample(x, float(t), self.last_exit, 1, 0.0) for x, t in zip(xs, thetas, strict=True)]
        results: dict[int, ExitResult] = {}

        def collect(done: list[Sample], out: list[ExitResult]) -> None:
            results.update((id(j), r) for j, r in zip(done, out, strict=True))

        run_batch(self.net, jobs, collect, mkldnn=self.mkldnn)
        return [self.reply(results[id(j)]) for j in jobs]

    def reply(self, r: ExitResult) -> dict[str, Any]:
        c = r.top_ids[0]
        return {"label": self.classes[c], "class_id": c, "exit": r.exit, "confidence": r.top_probs[0]}
