"""The one settings class: every knob of the service, from ERDE_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Service settings; `ERDE_<NAME>` in the environment overrides each default."""

    model_config = SettingsConfigDict(env_prefix="ERDE_", extra="ignore")

    host: str = "127.0.0.1"  # loopback unless configured (the container sets 0.0.0.0)
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)  # uvicorn worker processes; >1 uses multiprocess metrics
    store: Path = Path("model_store")  # model store root; the newest version of every model is served
    default_model: str = "fashion-mnist"  # used when a request names no model (else the only/first one)
    default_budget: float = Field(0.5, gt=0, le=1)  # budget when a request gives neither budget nor threshold

    max_upload_bytes: int = Field(8 * 1024 * 1024, ge=1024)  # per request body, enforced while streaming
    max_pixels: int = Field(16_000_000, ge=64)  # width x height, checked before decoding (pixel bombs)
    min_image_side: int = Field(8, ge=1)  # smaller images carry too little to classify
    image_formats: tuple[str, ...] = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")  # PIL format allow-list
    max_batch_images: int = Field(64, ge=1)  # images per /classify/batch request
    max_top_k: int = Field(100, ge=1)  # top_k above min(this, classes) is refused

    max_batch_size: int = Field(32, ge=1, le=1024)  # rows per micro-batch
    max_batch_delay_ms: float = Field(0.0, ge=0, le=10_000)  # longest wait for a batch to fill; 0: take
    # what is queued (a busy worker lets requests pile up, so batches form under load without waiting)
    queue_size: int = Field(512, ge=1)  # queued images per model; a full queue answers 503 at once
    torch_threads: int = Field(1, ge=1, le=256)  # intra-op threads of the inference worker
    drain_timeout_s: float = Field(10.0, ge=0)  # SIGTERM: longest wait for queued and in-flight requests
    retry_after_s: int = Field(1, ge=1)  # Retry-After on 503

    # faults (issue 10)
    request_timeout_s: float = Field(5.0, gt=0, le=3600)  # past it a request gets 504 (a request's timeout_ms
    # can only shorten it)
    hang_timeout_s: float = Field(2.0, gt=0, le=600)  # an inference process holding work without progress
    # this long is killed and replaced (its rows get 503)
    test_slow_ms: float = Field(0.0, ge=0, le=10_000)  # test-only: every batch takes this much longer
    access_log: bool = True  # one structured line per request

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.default_budget <= 0:
            raise ValueError("default_budget must be in (0, 1]")
        if self.queue_size < self.max_batch_size:
            raise ValueError("queue_size must be at least max_batch_size")
        self.image_formats = tuple(f.upper() for f in self.image_formats)
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
