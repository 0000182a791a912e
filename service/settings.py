"""The one settings class: every knob of the service, from ERDE_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Service settings; `ERDE_<NAME>` in the environment overrides each default."""

    model_config = SettingsConfigDict(env_prefix="ERDE_", extra="ignore")

    host: str = Field("127.0.0.1", description="bind address; loopback unless configured (the container sets 0.0.0.0)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")
    workers: int = Field(1, ge=1, le=64, description="server processes on one socket; >1 shares metrics through "
                                                     "prometheus-client's multiprocess mode")
    store: Path = Field(Path("model_store"),
                        description="model store root; the newest version of every model is served")
    default_model: str = Field("fashion-mnist",
                               description="used when a request names no model (else the only/first one)")
    default_budget: float = Field(0.5, gt=0, le=1,
                                  description="budget when a request gives neither budget nor threshold")

    max_upload_bytes: int = Field(8 * 1024 * 1024, ge=1024,
                                  description="largest request body, enforced while streaming")
    max_upload_bytes_in_flight: int = Field(64 * 1024 * 1024, ge=1024, description=(
        "request bodies one server process takes at once (their declared lengths, or what has streamed; unset, "
        "at least max_upload_bytes); past it 503 with Retry-After: 64 uploads of 8 MB sent together held 1.26 GB, "
        "past a pod's 1.5 GiB limit"))
    max_pixels: int = Field(16_000_000, ge=64,
                            description="largest width x height, checked before decoding (pixel bombs)")
    min_image_side: int = Field(8, ge=1, description="smallest side accepted; smaller images carry too little "
                                                     "to classify")
    image_formats: tuple[str, ...] = Field(("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"),
                                           description="PIL format allow-list (a JSON list)")
    max_batch_images: int = Field(64, ge=1, description="images per /classify/batch request")
    max_top_k: int = Field(100, ge=1, description="top_k above min(this, classes) is refused")

    max_batch_size: int = Field(32, ge=1, le=1024, description="rows per micro-batch")
    max_batch_delay_ms: float = Field(0.0, ge=0, le=10_000, description=(
        "longest wait for a batch to fill; 0: take what is queued (a busy worker lets requests pile up, "
        "so batches form under load without waiting)"))
    queue_size: int = Field(512, ge=1, description="queued images per model; a full queue answers 503 at once")
    torch_threads: int = Field(1, ge=1, le=256, description="intra-op threads of each inference process")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d{1,2})?)$", description=(
        "where each model's inference process runs the network: auto (CUDA when this torch sees it, else the "
        "CPU), cpu, cuda or cuda:N; a device that is not there is refused at start"))
    engine: Literal["auto", "own", "shared"] = Field("auto", description=(
        "inference processes: own (each worker starts one per model), shared (one per model serves every "
        "worker and runs their batches together), auto (shared on a GPU with several workers, else own)"))
    drain_timeout_s: float = Field(10.0, ge=0,
                                   description="SIGTERM: longest wait for queued and in-flight requests")
    retry_after_s: int = Field(1, ge=1, description="Retry-After on 503, in seconds")

    # faults (issue 10)
    request_timeout_s: float = Field(5.0, gt=0, le=3600, description=(
        "past it a request gets 504 (a request's timeout_ms can only shorten it)"))
    hang_timeout_s: float = Field(2.0, gt=0, le=600, description=(
        "an inference process holding work without progress this long is killed and replaced "
        "(its rows get 503)"))

    # limits (issue 11): what one client can make the server hold or do (README, Security)
    max_header_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024, description=(
        "largest request line + headers; beyond it 431 and the connection is closed"))
    read_timeout_s: float = Field(10.0, gt=0, le=3600, description=(
        "a request's head and body must arrive within this many seconds of its first byte, else 408 "
        "and the connection is closed"))
    max_connections: int = Field(1000, ge=1, description=(
        "open connections (and requests in progress) per server process; beyond it 503 with Retry-After"))
    max_client_connections: int = Field(500, ge=1, description=(
        "one peer address's share of max_connections: near the cap its connections past the share are closed "
        "and refused first (README, Security: behind a proxy, list it in proxy_addresses)"))
    proxy_addresses: tuple[str, ...] = Field((), description=(
        "peer addresses exempt from max_client_connections: the proxy in front of the service (a JSON list)"))
    max_pixels_ratio: int = Field(1024, ge=1, description=(
        "an image may have at most this many times the model's input pixels (28x28: 802,816, about "
        "896x896), under max_pixels"))
    decode_timeout_ms: float = Field(250.0, gt=0, le=60_000, description=(
        "CPU time an image may take to decode, else it is refused (413 decode_too_slow) and its batch goes "
        "on; under hang_timeout_s (the slowest real image at the pixel limit decodes in about 60 ms)"))
    max_request_pixels: int = Field(4_000_000, ge=64, description=(
        "total pixels of all images in one request (64 of 250x250), checked from their headers before "
        "any is decoded"))
    allowed_hosts: tuple[str, ...] = Field(("localhost",), description=(
        "Host names answered besides IP literals and ERDE_HOST (a JSON list; '*.example.com' for its "
        "subdomains, '*' for any): others get 400, against DNS rebinding"))

    # overload (issue 12): rows that wait too long are answered at cheaper operating points (service/engine/overload.py)
    overload: Literal["degrade", "reject"] = Field(
        "degrade", description="degrade: answer late rows at cheaper points; reject: never degrade, a full queue "
                               "answers 503")
    target_queue_ms: float = Field(20.0, gt=0, le=60_000, description=(
        "queueing delay the controller holds rows under, and a standing queue's sojourn target: a fifth of "
        "the SLO, leaving the rest for a batch's inference and HTTP on a loaded CPU"))
    # admission by expected waiting time (issue 23): what cannot be answered in time is refused at once
    slo_ms: float = Field(100.0, gt=0, le=3_600_000, description=(
        "the time a request without timeout_ms has: it is admitted only when it can be answered within it, "
        "and a row still queued past it is never run (503 expired); timeout_ms gives a request its own"))
    adaptive_lifo: bool = Field(True, description=(
        "serve a queue that has not been empty for an SLO newest first, so that the rows answered are the "
        "ones still in time"))
    min_accuracy: float = Field(0.85, gt=0, le=1, description=(
        "server floor for rows without min_accuracy: about what a linear classifier gets on Fashion-MNIST; "
        "the shipped student's cheapest point (87.7%) is above it"))
    overload_hold_fraction: float = Field(0.5, gt=0, lt=1, description=(
        "hysteresis: pressure holds while the delay is between this fraction of the target and the target, "
        "and recovers only below it"))
    overload_rise_s: float = Field(0.5, gt=0, le=600, description=(
        "seconds from pressure 0 to 1 at twice the target delay (proportionally faster further above it)"))
    overload_recover_s: float = Field(5.0, gt=0, le=3600,
                                      description="seconds from pressure 1 to 0 with no queueing delay")
    overload_interval_ms: float = Field(100.0, gt=0, le=60_000, description=(
        "a queueing delay is load once it stood this long: the controller sees the least delay over it "
        "(CoDel's interval), so a row that waited for the batch ahead of it is not load"))
    # drift (issue 19): θ per operating point held to its offline cost, accuracy estimated live (engine/drift.py)
    drift: Literal["on", "off"] = Field("on", description=(
        "on: move θ per operating point and budget so that the replies spend at most the budget; off: measure only"))
    drift_gain: float = Field(0.2, gt=0, le=10, description=(
        "θ (nats) moved per reply per unit of smoothed MACs-fraction error (docs/budgets.md)"))
    drift_max_step: float = Field(0.02, gt=0, le=1, description="most one reply moves θ (nats)")
    drift_max_offset: float = Field(1.5, ge=0, le=10, description="most θ may rise above its calibrated value (nats)")
    drift_smoothing: int = Field(100, ge=1, le=100_000, description="replies in the realized-cost EWMA")
    drift_band: float = Field(0.04, ge=0, lt=1, description=(
        "θ holds while the realized cost under a budget is between (1 - band) and (1 + tolerance) times the budget"))
    drift_tolerance: float = Field(0.04, ge=0, le=0.05, description=(
        "how far above the budget the realized cost may be before θ rises (within the 5% a budget allows)"))
    drift_window: int = Field(400, ge=1, le=100_000, description=(
        "shadow rows the live accuracy estimate is taken over (the latest ones), and needs before it is quoted"))
    drift_shadow_fraction: float = Field(0.15, ge=0, le=1, description=(
        "share of the rows asking for a budget that run on to the last exit after their answer (shadow passes, "
        "for the accuracy estimate), taken only from batches sent while nothing else is queued; 0: none"))
    drift_shadow_cpu: float = Field(0.25, ge=0, le=1, description=(
        "most of the time the inference process spends on batches that shadow passes may take; they run after "
        "their batch is done and only while no other batch waits (else they are dropped)"))
    drift_margin: float = Field(0.03, ge=0, le=1, description=(
        "a live accuracy estimate further from the calibrated one than this plus two standard errors (of a share "
        "over the window) replaces it in replies and floors"))
    access_log: bool = Field(True, description="one JSON line per request on the erde.access logger")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.default_budget <= 0:
            raise ValueError("default_budget must be in (0, 1]")
        if "max_upload_bytes_in_flight" not in self.model_fields_set:  # the default follows a larger upload limit
            self.max_upload_bytes_in_flight = max(self.max_upload_bytes_in_flight, self.max_upload_bytes)
        elif self.max_upload_bytes_in_flight < self.max_upload_bytes:
            raise ValueError("max_upload_bytes_in_flight must be at least max_upload_bytes: else the largest "
                             "upload could never be taken")
        if self.queue_size < self.max_batch_size:
            raise ValueError("queue_size must be at least max_batch_size")
        if self.max_batch_delay_ms >= self.slo_ms:
            raise ValueError("max_batch_delay_ms must be below slo_ms: rows held for a batch past their time "
                             "would never run")
        if self.decode_timeout_ms >= self.hang_timeout_s * 1000:
            raise ValueError("decode_timeout_ms must be below hang_timeout_s: a slow image is refused, "
                             "never taken for a hang")
        self.image_formats = tuple(f.upper() for f in self.image_formats)
        return self

    def shares_processes(self, device: str) -> bool:
        """Whether one inference process per model version serves every worker on `device` (ERDE_ENGINE;
        auto: on a GPU with several workers), or each worker starts its own."""
        return self.engine == "shared" or (self.engine == "auto" and self.workers > 1 and device.startswith("cuda"))


# Set by the supervisor of several workers (service/server/main.py): they find the inference processes they
# share by it (service/engine/worker.py, `shared_address`).
ENGINE_GROUP = "ERDE_ENGINE_GROUP"


@lru_cache
def get_settings() -> Settings:
    return Settings()
