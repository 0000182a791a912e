"""The served models: load the newest version of each from the store, warm it, swap on reload.

The server reads each artifact as data (erde/artifact.py) and never builds its network: the model's own
process does, from the verified bytes, and says why when it cannot (docs/architecture.md, "No torch in the
server").

A reload verifies and warms every new version before it replaces the old one; the old worker
then finishes what it has queued. A broken version is refused (logged and counted) and the old
one keeps serving. Nothing here ever takes a path from a client.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass

import numpy as np

from erde.artifact import StoredArtifact, list_versions, read_stored
from erde.estimator import AccuracyEstimator
from service import metrics
from service.engine import forkserver
from service.engine.adaptive import AdaptiveBudgets
from service.engine.batcher import Job
from service.engine.drift import Cell, DriftGuard, DriftLaw
from service.engine.limits import ImageLimits
from service.engine.overload import OverloadLaw
from service.engine.policy import BudgetPolicy
from service.engine.sojourn import WaitLaw
from service.engine.wire import ModelBlob
from service.engine.worker import LoopLag, ModelWorker, Steering, shared_address
from service.errors import UnknownModel
from service.schemas import ModelInfo, OperatingPointOut
from service.settings import Settings

log = logging.getLogger("erde.service")


@dataclass
class ServedModel:
    artifact: StoredArtifact
    worker: ModelWorker
    policy: BudgetPolicy
    versions: list[str]  # every version in the store when this one was loaded
    drift: DriftGuard  # per version: a reload of the same version keeps it, a new version starts afresh

    @property
    def name(self) -> str:
        return self.artifact.name

    @property
    def full_macs(self) -> int:
        return self.artifact.macs_per_exit[-1]

    def info(self) -> ModelInfo:
        """What `GET /models/{name}` says of this model: the one description of it for clients."""
        art = self.artifact
        curve = []
        for budget in (1.0, 0.9, 0.75, 0.6, 0.5, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1):
            point, _ = art.calibration.choose(budget)
            curve.append(OperatingPointOut(budget=budget, threshold=point.threshold, expected_accuracy=point.accuracy,
                                           expected_macs_fraction=point.macs_fraction))
        return ModelInfo(name=art.name, version=art.version, versions=self.versions, classes=art.classes,
                         input=art.spec.to_dict(), arch=art.manifest.get("arch", ""), exits=art.num_exits,
                         macs_per_exit=art.macs_per_exit, test_metrics=art.manifest.get("test_metrics"),
                         calibration=curve, live_calibration=self.drift.live_curve(),
                         device=self.worker.placed["description"],
                         exit_latency=art.manifest.get("exit_latency"))


def report_drift(name: str, drift: DriftGuard, policy: BudgetPolicy, budget: float, cell: Cell) -> None:
    """After a cell's first reply, then every REPORT_EVERY-th: floors see the live curve, the metrics the
    controller's state."""
    curve = drift.live_curve_at(policy.frontier)
    if curve is not policy.live:  # the evidence changed since
        policy.set_live(curve)
    metrics.observe_drift(name, budget, cell.cost, cell.offset)
    metrics.set_accuracy(name, *drift.summary())


class ModelSteering(Steering):
    """One model's steering: the overload controller picks each row's point, the drift guard its θ and
    the shadow passes; the metrics see the queue."""

    def __init__(self, name: str, adaptive: AdaptiveBudgets, drift: DriftGuard, macs_per_exit: list[int]) -> None:
        self.name = name
        self.adaptive = adaptive
        self.drift = drift
        self.macs_per_exit = macs_per_exit

    def adjust(self, jobs: list[Job], now: float, spare: bool, waited_s: float = 0.0) -> None:
        self.adaptive.adjust(jobs, now, waited_s)
        self.drift.adjust(jobs, spare)

    def on_full(self, now: float) -> None:
        self.adaptive.saturate(now)

    def absorb(self, wait_s: float, now: float) -> bool:
        return self.adaptive.absorb(wait_s, now)

    def on_batch(self, size: int) -> None:
        metrics.observe_batch(self.name, size)

    def on_depth(self, depth: int) -> None:
        metrics.set_queue_depth(self.name, depth)

    def on_finished(self, stage_s: list[float], device_bytes: int) -> None:
        metrics.observe_network(self.name, stage_s, device_bytes)

    def witness(self, answered: list[int], entropy: np.ndarray, prediction: np.ndarray) -> None:
        self.drift.witness(entropy, prediction)
        metrics.observe_shadow(self.name, sum(self.macs_per_exit[-1] - self.macs_per_exit[e] for e in answered))


class ModelRegistry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limits = ImageLimits.from_settings(settings)
        self._models: dict[str, ServedModel] = {}
        self._lock = threading.Lock()  # one reload at a time
        self.loop: asyncio.AbstractEventLoop | None = None  # where the workers answer; set before reload
        self.lag = LoopLag()  # that loop's lag, which admission adds to every predicted wait
        self._device: str | None = None  # ERDE_DEVICE "auto" resolved, where it decides the process layout

    @property
    def names(self) -> list[str]:
        return sorted(self._models)

    def get(self, name: str | None) -> ServedModel:
        """The served model by name (None: the default); 404 `unknown_model` when there is none. The one
        lookup: admission and the pipeline both ask here, with the name read the same way."""
        if name is None:
            name = self.default_name()
        served = self._models.get(name) if name else None
        if served is None:
            known = ", ".join(self.names) or "none loaded"
            asked = f"unknown model {name!r}" if name else "no default model to serve; name one with `model`"
            raise UnknownModel(f"{asked}; available: {known}", reason="unknown_model")
        return served

    def default_name(self) -> str | None:
        if self.settings.default_model in self._models:
            return self.settings.default_model
        return self.names[0] if self.names else None

    def _load(self, name: str, version: str, versions: list[str]) -> ServedModel:
        artifact = read_stored(self.settings.store / name / version)
        if artifact.name != name or artifact.version != version:
            raise ValueError(f"manifest says {artifact.name}/{artifact.version}, folder is {name}/{version}")
        s = self.settings
        policy = BudgetPolicy(artifact.calibration, artifact.num_exits, len(artifact.classes),
                              s.default_budget, s.max_top_k, s.min_accuracy)
        adaptive = AdaptiveBudgets(policy, OverloadLaw.from_settings(s), degrade=s.overload == "degrade",
                                   on_pressure=lambda pressure: metrics.set_load_pressure(name, pressure))
        estimator = AccuracyEstimator.from_manifest(artifact.manifest.get("estimator"), artifact.calibration)
        drift = DriftGuard(artifact.calibration, estimator, DriftLaw.from_settings(s, len(artifact.classes)),
                           enabled=s.drift == "on")
        drift.on_change = lambda point, budget, cell: report_drift(name, drift, policy, budget, cell)
        device = s.device
        if s.engine == "auto" and s.workers > 1 and device == "auto":  # whether they share depends on what torch sees
            if self._device is None:  # asked once, of a child of the fork server: this process has no torch
                self._device = forkserver.resolve_device(device)
            device = self._device
        shared = s.shares_processes(device)
        address = shared_address(str(s.store.resolve()), name, version, device) if shared else None
        worker = ModelWorker(ModelBlob.of(artifact), artifact.spec, self.limits, max_batch_size=s.max_batch_size,
                             max_batch_delay_s=s.max_batch_delay_ms / 1000, queue_size=s.queue_size,
                             max_image_bytes=s.max_upload_bytes, retry_after=s.retry_after_s, name=name,
                             threads=s.torch_threads, hang_timeout_s=s.hang_timeout_s,
                             law=WaitLaw.from_settings(s), lag=self.lag,
                             steer=ModelSteering(name, adaptive, drift, artifact.macs_per_exit),
                             shadow_cpu=s.drift_shadow_cpu if estimator is not None else 0.0,
                             device=device, address=address, sharers=s.workers if shared else 1)
        worker.start(self.loop)  # loads, fuses and warms the model in its own process, which decodes too
        return ServedModel(artifact, worker, policy, versions, drift)

    def reload(self) -> dict[str, str]:
        """Serve the newest version of every model in the store that verifies; returns name -> outcome.

        A model already served moves only to its newest version (a broken one leaves the old serving);
        a model not yet served (a cold start) falls back to the newest version that verifies.
        """
        outcome: dict[str, str] = {}
        with self._lock:
            for name, versions in list_versions(self.settings.store).items():
                current = self._models.get(name)
                if current is not None and current.artifact.version == versions[-1]:
                    current.versions = versions
                    outcome[name] = "unchanged"
                    continue
                candidates = [versions[-1]] if current is not None else versions[::-1]
                served = None
                for version in candidates:
                    try:
                        served = self._load(name, version, versions)
                        break
                    except Exception as exc:  # a broken artifact must never take the service down
                        log.error("refused %s/%s: %s", name, version, exc, exc_info=not isinstance(exc, ValueError))
                        metrics.observe_reload("failed")
                        outcome[name] = f"failed: {exc}"
                if served is None:
                    continue
                self._models[name] = served  # atomic swap: new requests go to the new version
                metrics.set_model_info(name, served.artifact.version, True, served.worker.placed["device"])
                metrics.observe_reload("ok")
                outcome[name] = f"loaded {served.artifact.version}"
                log.info("serving %s/%s", name, served.artifact.version)
                if current is not None:
                    metrics.set_model_info(name, current.artifact.version, False, current.worker.placed["device"])
                    threading.Thread(target=current.worker.close, args=(self.settings.drain_timeout_s,),
                                     daemon=True).start()
        return outcome

    def down(self) -> list[str]:
        """Models with no live inference process right now (crashed, hung, or failing to restart)."""
        return [name for name, served in sorted(self._models.items()) if not served.worker.live]

    def close(self, timeout: float) -> None:
        for served in list(self._models.values()):
            served.worker.close(timeout)

