"""Every Prometheus collector, declared once (docs/design.md §7), and emit helpers that never raise.

Labels are bounded: model names come from the store (unknown ones become "unknown"), exits are
small integers, endpoints, codes, stages and reasons are fixed sets. With several uvicorn workers,
PROMETHEUS_MULTIPROC_DIR switches prometheus-client to multiprocess mode (set up by `erde serve`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import lru_cache, wraps
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics import MetricWrapperBase

log = logging.getLogger("erde.service")

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BUDGET_BUCKETS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)

REQUESTS = Counter("erde_requests_total", "Requests answered, by model, endpoint and HTTP status code",
                   ["model", "endpoint", "code"])
EXITS = Counter("erde_exits_total", "Images answered at each exit (0-based)", ["model", "exit"])
REQUEST_DURATION = Histogram("erde_request_duration_seconds", "End-to-end request latency in the service",
                             ["model", "endpoint"], buckets=LATENCY_BUCKETS)
STAGE_DURATION = Histogram("erde_stage_duration_seconds", "Per-image time in each stage: decode, queue, inference",
                           ["model", "stage"], buckets=LATENCY_BUCKETS)
MACS = Counter("erde_macs_total", "Multiply-accumulates spent answering images", ["model"])
MACS_FULL = Counter("erde_macs_full_total", "Multiply-accumulates the same images would cost at full depth",
                    ["model"])
BUDGET = Histogram("erde_budget", "Budget (fraction of full MACs) each image asked for (the default when none)",
                   ["model"], buckets=BUDGET_BUCKETS)
BUDGET_USED = Histogram("erde_budget_used", "Budget each image was answered under (cheaper than asked when degraded)",
                        ["model"], buckets=BUDGET_BUCKETS)
BATCH_SIZE = Histogram("erde_batch_size", "Rows per micro-batch", ["model"], buckets=BATCH_BUCKETS)
QUEUE_DEPTH = Gauge("erde_queue_depth", "Images waiting in the inference queue", ["model"],
                    multiprocess_mode="livesum")
INFLIGHT = Gauge("erde_inflight_requests", "Requests being handled now", multiprocess_mode="livesum")
REJECTED = Counter("erde_rejected_total", "Requests refused, by reason", ["model", "reason"])
# Several workers: the max over live processes, so a version is 1 while any worker serves it, and 0 once
# all have moved on (a retired series cannot be removed from the other processes' files).
MODEL_INFO = Gauge("erde_model_info", "1 for every model version being served (0: retired), and the device its "
                   "inference process runs on", ["model", "version", "device"],
                   multiprocess_mode="livemax")
# overload (issue 12). Several workers: each runs its own controller, the dashboard shows the highest.
LOAD_PRESSURE = Gauge("erde_load_pressure", "Overload controller pressure: 0 answers rows as asked, 1 at their floors",
                      ["model"], multiprocess_mode="livemax")
DEGRADED = Counter("erde_degraded_total", "Images answered at a cheaper operating point than asked, under load",
                   ["model"])
UNSATISFIABLE = Counter("erde_unsatisfiable_total", "Requests refused 422 because no operating point meets their "
                        "min_accuracy (within their budget)", ["model"])
# drift (issue 19; docs/budgets.md). Per budget cell (a 0.01 grid, or a point's calibrated cost: a bounded set);
# several workers each run their own controllers, the dashboard shows the most drifted.
DRIFT_SPENT = Gauge("erde_drift_macs_fraction", "Realized MACs fraction of the recent replies under a budget (an "
                    "EWMA the drift controller holds at or under the budget)", ["model", "budget"],
                    multiprocess_mode="livemax")
DRIFT_OFFSET = Gauge("erde_drift_theta_offset", "How far the drift controller raised θ above its calibrated value "
                     "for the replies under a budget (nats)", ["model", "budget"], multiprocess_mode="livemax")
ACCURACY = Gauge("erde_accuracy_estimate", "Accuracy of the replies at the operating points in use: calibrated "
                 "(offline) and estimated without labels (live, from shadow passes)", ["model", "source"],
                 multiprocess_mode="livemin")
BUDGET_SPENT = Counter("erde_budget_spent_total", "Sum of the MACs fractions spent, by the budget asked for (upper "
                       "edge of its erde_budget bucket)", ["model", "budget"])
BUDGET_REPLIES = Counter("erde_budget_replies_total", "Replies, by the budget asked for (upper edge of its "
                         "erde_budget bucket)", ["model", "budget"])
NETWORK_STAGE = Histogram("erde_network_stage_duration_seconds", "Per micro-batch: the time each stage of the "
                          "network took where it runs, its logits read (one sync on a device)", ["model", "stage"],
                          buckets=LATENCY_BUCKETS)
DEVICE_MEMORY = Gauge("erde_device_memory_bytes", "Device memory torch holds for a model's inference process "
                      "(0 on the CPU)", ["model"], multiprocess_mode="livemax")
SHADOW_MACS = Counter("erde_shadow_macs_total", "Multiply-accumulates spent on shadow passes beyond the answers' own "
                      "(the label-free accuracy estimate's cost: docs/budgets.md)", ["model"])
RELOADS = Counter("erde_reloads_total", "Store reloads by result (ok, unchanged, failed)", ["result"])


def never_raises(fn: Callable[..., None]) -> Callable[..., None]:
    """Metrics must never fail a request: log and carry on."""

    @wraps(fn)
    def safe(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            log.exception("metrics emit failed in %s", fn.__name__)

    return safe


@lru_cache(maxsize=4096)
def _series(metric: MetricWrapperBase, *labels: str) -> MetricWrapperBase:
    """One labelled series, looked up once: `labels()` costs more than the increment, per image.
    Bounded, as the labels are (not for MODEL_INFO, whose series are removed)."""
    return metric.labels(*labels)


@never_raises
def observe_request(model: str, endpoint: str, code: int, seconds: float) -> None:
    _series(REQUESTS, model, endpoint, str(code)).inc()
    _series(REQUEST_DURATION, model, endpoint).observe(seconds)


@never_raises
def observe_image(model: str, exit_index: int, macs: int, full_macs: int, requested_budget: float | None,
                  budget_used: float | None, degraded: bool, decode_s: float, queue_s: float,
                  inference_s: float) -> None:
    _series(EXITS, model, str(exit_index)).inc()
    _series(MACS, model).inc(macs)
    _series(MACS_FULL, model).inc(full_macs)
    if requested_budget is not None:
        _series(BUDGET, model).observe(requested_budget)
    if budget_used is not None:
        _series(BUDGET_USED, model).observe(budget_used)
    if degraded:
        _series(DEGRADED, model).inc()
    _series(STAGE_DURATION, model, "decode").observe(decode_s)
    _series(STAGE_DURATION, model, "queue").observe(queue_s)
    _series(STAGE_DURATION, model, "inference").observe(inference_s)


@never_raises
def observe_network(model: str, stage_s: list[float], device_bytes: int) -> None:
    for stage, seconds in enumerate(stage_s):
        _series(NETWORK_STAGE, model, str(stage)).observe(seconds)
    _series(DEVICE_MEMORY, model).set(device_bytes)


@never_raises
def observe_shadow(model: str, macs: int) -> None:
    _series(SHADOW_MACS, model).inc(macs)


@never_raises
def observe_batch(model: str, size: int) -> None:
    _series(BATCH_SIZE, model).observe(size)


@never_raises
def set_queue_depth(model: str, depth: int) -> None:
    _series(QUEUE_DEPTH, model).set(depth)


@never_raises
def observe_rejected(model: str, reason: str) -> None:
    _series(REJECTED, model, reason).inc()
    if reason == "unsatisfiable":  # the floors' own counter, so that it needs no wiring where 422s are raised
        _series(UNSATISFIABLE, model).inc()


@never_raises
def set_load_pressure(model: str, pressure: float) -> None:
    _series(LOAD_PRESSURE, model).set(pressure)


@never_raises
def observe_drift(model: str, budget: float, spent: float, offset: float) -> None:
    label = f"{budget:.3f}"
    _series(DRIFT_SPENT, model, label).set(spent)
    _series(DRIFT_OFFSET, model, label).set(offset)


@never_raises
def set_accuracy(model: str, live: float | None, offline: float) -> None:
    _series(ACCURACY, model, "offline").set(offline)
    if live is not None:
        _series(ACCURACY, model, "live").set(live)


@never_raises
def observe_spent(model: str, requested_budget: float | None, macs_fraction: float) -> None:
    if requested_budget is None:
        return
    edge = next((b for b in BUDGET_BUCKETS if requested_budget <= b + 1e-9), 1.0)
    _series(BUDGET_SPENT, model, f"{edge:g}").inc(macs_fraction)
    _series(BUDGET_REPLIES, model, f"{edge:g}").inc()


@never_raises
def set_inflight(delta: int) -> None:
    INFLIGHT.inc(delta)


@never_raises
def set_model_info(model: str, version: str, serving: bool, device: str = "cpu") -> None:
    if serving:
        MODEL_INFO.labels(model, version, device).set(1)
        for metric in (LOAD_PRESSURE, DEGRADED, UNSATISFIABLE):  # at 0 from the start: rates and panels
            _series(metric, model)  # have data before the first overload or unsatisfiable floor
    elif os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MODEL_INFO.labels(model, version, device).set(0)
    else:
        MODEL_INFO.remove(model, version, device)


@never_raises
def observe_reload(result: str) -> None:
    RELOADS.labels(result).inc()


def registry() -> CollectorRegistry:
    """What this service exposes: this process's registry, or all workers' in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined)
        return combined
    return REGISTRY


def render() -> tuple[bytes, str]:
    """The exposition for /metrics."""
    return generate_latest(registry()), CONTENT_TYPE_LATEST
