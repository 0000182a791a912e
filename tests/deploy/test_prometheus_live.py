"""The deployment's monitoring, end to end, without Docker (docs/design.md §8).

Debian's `prometheus` runs the project's own prometheus.yml and rules.yml (target rewritten to a
live `erde serve` on loopback, 1 s scrapes); traffic with several budgets goes through /classify;
then every query of the Grafana dashboard is evaluated through Prometheus's HTTP API and must
return data. Everything binds 127.0.0.1 only and is stopped in the fixture's teardown.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from tests.deploy.deploy_support import DASHBOARD, PROMETHEUS_DIR, ROOT, Query, dashboard_queries, require_binary

BUDGETS = (0.1, 0.25, 0.5, 0.75, 1.0)
IMAGES_PER_BUDGET = 4  # per wave
# A tiny model that is as accurate at its first exit as at its last is calibrated to exit first at
# every budget; expert options make the deeper exits answer too: threshold 0 = full depth, and
# max_exit 1 stops at the second exit (the tiny test network has three).
DEEP_OPTIONS = ({"threshold": 0}, {"threshold": 0, "max_exit": 1})
WAVES = 3  # separated by a scrape each, so every counter has risen between two samples
# The shipped student serves beside the tiny one: its curve has floors it cannot meet (the tiny model is
# right everywhere) and cheaper points to degrade to. The stack's batches take one row, so concurrent rows
# stand in the queue; its queue target (0.05 ms) and interval (1 ms) are far below their waits, so the
# controller degrades at once.
SHIPPED = ROOT / "model_store" / "fashion-mnist" / "1"
FLOOR = 0.9
OVERLOAD_IMAGES = 12  # per wave, at budget 1 with a floor, concurrently
WAIT_MS = 5000  # every request's timeout_ms: the stack is about metrics, not deadlines
STARTUP_TIMEOUT_S = 60.0
SCRAPE_TIMEOUT_S = 15.0

QUERIES = dashboard_queries(json.loads(DASHBOARD.read_text()))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(seed: int) -> bytes:
    """A real PNG; sizes and modes vary (the service resizes and converts to the model's input spec)."""
    rng = np.random.default_rng(seed)
    size, mode = [((16, 16), "L"), ((28, 28), "L"), ((32, 24), "RGB"), ((40, 40), "RGB")][seed % 4]
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def wait_until(check: Callable[[], bool], timeout: float, what: str, log: Path | None = None,
               proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll `check` until true; fail with the process's log when it times out or `proc` dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    why = f"it exited with {proc.returncode}" if proc is not None and proc.poll() is not None else \
        f"timed out after {timeout:.0f}s"
    pytest.fail(f"waiting for {what}: {why}\n{tail}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def prometheus_config(tmp: Path, service_port: int) -> Path:
    """The project's prometheus.yml and rules.yml, copied, with the scrape target and interval for a test."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "erde"]
    for static in job["static_configs"]:
        static["targets"] = [f"127.0.0.1:{service_port}"]
    for rule_file in config["rule_files"]:
        shutil.copy(PROMETHEUS_DIR / rule_file, tmp / rule_file)
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Stack:
    service: httpx.Client
    prometheus: httpx.Client
    sent: int = 0  # requests to /classify and /classify/batch, any status
    fractions: dict[float, list[float]] = field(default_factory=dict)  # budget -> macs_fraction of replies
    exits: set[int] = field(default_factory=set)  # exits that answered
    n_exits: int = 0  # exits the model has
    degraded: int = 0  # replies of the shipped student answered cheaper than asked

    def query(self, promql: str) -> list[dict[str, Any]]:
        reply = self.prometheus.get("/api/v1/query", params={"query": promql})
        body = reply.json()
        assert reply.status_code == 200 and body["status"] == "success", f"{promql}: {body}"
        data = body["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def classify(self, image: bytes, **form: Any) -> httpx.Response:
        self.sent += 1
        return self.service.post("/classify", files={"image": ("x.png", image, "image/png")},
                                 data={k: str(v) for k, v in form.items()})

    def wave(self, index: int) -> None:
        """One burst: every budget, concurrently (so batches form), a batch call, deep exits, two rejections."""
        jobs = [(b, png(index * 100 + i)) for b in BUDGETS for i in range(IMAGES_PER_BUDGET)]
        # What this fills is the dashboard, not a deadline: every request may wait (timeout_ms). With the
        # 100 ms SLO, a slower machine refused one 503 `overloaded` that had waited 208 ms to be read.
        with ThreadPoolExecutor(max_workers=4) as pool:
            replies = list(pool.map(lambda job: self.classify(job[1], budget=job[0], timeout_ms=WAIT_MS), jobs))
        for (budget, _), reply in zip(jobs, replies, strict=True):
            assert reply.status_code == 200, reply.text
            body = reply.json()
            self.fractions.setdefault(budget, []).append(body["macs_fraction"])
            self.exits.add(body["exit"])
            self.n_exits = body["exits"]
        self.sent += 1
        batch = self.service.post("/classify/batch", data={"budget": "0.3", "timeout_ms": str(WAIT_MS)},
                                  files=[("image", (f"{i}.png", png(i), "image/png")) for i in range(3)])
        assert batch.status_code == 200, batch.text
        for i, options in enumerate(DEEP_OPTIONS):
            reply = self.classify(png(index * 100 + 50 + i), **options, timeout_ms=WAIT_MS)
            assert reply.status_code == 200, reply.text
            self.exits.add(reply.json()["exit"])
        assert self.classify(png(1), model="no-such-model").status_code == 404
        assert self.classify(b"this is not an image").status_code == 415
        self.floors(index)

    def floors(self, index: int) -> None:
        """The shipped student: concurrent rows with a floor (degraded, never below it) and one it cannot meet."""
        # All at once: a queue that stands. Each may wait for all the others (timeout_ms): a slower machine's
        # predicted wait for the twelfth row passed the SLO's share, and admission refused it 503.
        with ThreadPoolExecutor(max_workers=OVERLOAD_IMAGES) as pool:
            replies = list(pool.map(lambda i: self.classify(png(index * 100 + 70 + i), model="fashion-mnist",
                                                            budget=1, min_accuracy=FLOOR, timeout_ms=WAIT_MS),
                                    range(OVERLOAD_IMAGES)))
        for reply in replies:
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert body["expected_accuracy"] >= FLOOR and body["requested_budget"] == 1
            self.degraded += body["degraded"]
        unmet = self.classify(png(2), model="fashion-mnist", min_accuracy=0.99)
        assert unmet.status_code == 422 and unmet.json()["error"]["code"] == "unsatisfiable"

    def wait_for_scrape(self) -> None:
        """Until Prometheus has seen every classify request sent so far (probes and scrapes count too)."""
        sent = 'sum(erde_requests_total{endpoint=~"classify|classify_batch"})'
        wait_until(lambda: self.scalar(sent) == self.sent, SCRAPE_TIMEOUT_S,
                   f"Prometheus to scrape {self.sent} requests")


@pytest.fixture(scope="module")
def stack(tiny_pipeline: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus_bin = require_binary("prometheus")
    tmp = tmp_path_factory.mktemp("deploy-live")
    store = tmp / "store"
    shutil.copytree(tiny_pipeline.student_artifact, store / "student" / "1")
    shutil.copytree(SHIPPED, store / "fashion-mnist" / "1")
    service_port, prometheus_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERDE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(ERDE_HOST="127.0.0.1", ERDE_PORT=str(service_port), ERDE_STORE=str(store),
               ERDE_DEFAULT_MODEL="student", ERDE_TORCH_THREADS="1",
               ERDE_MAX_BATCH_DELAY_MS="5", ERDE_ACCESS_LOG="false", ERDE_TARGET_QUEUE_MS="0.05",
               ERDE_OVERLOAD_RISE_S="0.01", ERDE_OVERLOAD_INTERVAL_MS="1", ERDE_MAX_BATCH_SIZE="1")
    service_log, prometheus_log = tmp / "service.log", tmp / "prometheus.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with service_log.open("wb") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "erde.cli", "serve"], cwd=ROOT, env=env,
                                          stdout=out, stderr=subprocess.STDOUT))
        with prometheus_log.open("wb") as out:
            procs.append(subprocess.Popen(
                [prometheus_bin, f"--config.file={prometheus_config(tmp, service_port)}",
                 f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prometheus_port}",
                 "--log.level=warn"], cwd=tmp, stdout=out, stderr=subprocess.STDOUT))
        with httpx.Client(base_url=f"http://127.0.0.1:{service_port}", timeout=30) as service, \
                httpx.Client(base_url=f"http://127.0.0.1:{prometheus_port}", timeout=10) as prometheus:
            s = Stack(service, prometheus)
            wait_until(lambda: service.get("/readyz").status_code == 200, STARTUP_TIMEOUT_S, "the service",
                       service_log, procs[0])
            wait_until(lambda: prometheus.get("/-/ready").status_code == 200, STARTUP_TIMEOUT_S, "Prometheus",
                       prometheus_log, procs[1])
            wait_until(lambda: s.scalar('up{job="erde"}') == 1, SCRAPE_TIMEOUT_S, "a first scrape", prometheus_log)
            for i in range(WAVES):
                s.wave(i)
                s.wait_for_scrape()
            yield s
    finally:
        for proc in reversed(procs):
            stop(proc)


def test_traffic_spent_less_than_full_compute_below_budget_1(stack: Stack) -> None:
    """The premise of the checks below: low budgets exit early, so there is compute saved to show."""
    assert min(stack.fractions[min(BUDGETS)]) < 1
    assert {0, 1, stack.n_exits - 1} <= stack.exits, f"replies came from exits {stack.exits} of {stack.n_exits}"


def test_prometheus_has_every_metric_the_dashboard_and_alerts_use(stack: Stack) -> None:
    scraped = set(stack.prometheus.get("/api/v1/label/__name__/values").json()["data"])
    used = {m for q in QUERIES for m in re.findall(r"erde_[a-z_]+", q.expr)}
    rules = (PROMETHEUS_DIR / "rules.yml").read_text()
    used |= set(re.findall(r"erde_[a-z_]+", rules))
    assert used <= scraped, f"used by the dashboard or alerts but not exported: {sorted(used - scraped)}"


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: f"{q.panel} {q.ref}")
def test_dashboard_query_returns_data(stack: Stack, query: Query) -> None:
    result = stack.query(query.promql)
    assert result, f"no data for {query}\n(evaluated as {query.promql})"
    values = [float(r["value"][1]) for r in result]
    assert any(math.isfinite(v) for v in values), f"only NaN/Inf for {query}: {result}"


def test_model_variable_lists_the_served_model(stack: Stack) -> None:
    """label_values(erde_model_info, model), as Grafana asks it."""
    reply = stack.prometheus.get("/api/v1/label/model/values", params={"match[]": "erde_model_info"})
    assert reply.json()["data"] == ["fashion-mnist", "student"]


def test_exit_distribution_shows_several_exits(stack: Stack) -> None:
    for query in QUERIES:
        if re.search(r"by \([^)]*\bexit\b", query.expr):  # the panels that split by exit
            exits = {r["metric"]["exit"] for r in stack.query(query.promql)}
            assert len(exits) > 1, f"{query} shows exits {exits}"


def test_compute_saved_is_positive(stack: Stack) -> None:
    saved = [q for q in QUERIES if "erde_macs_full_total" in q.expr]
    assert saved
    for query in saved:
        values = [float(r["value"][1]) for r in stack.query(query.promql)]
        assert values and all(0 < v <= 100 for v in values), f"{query}: {values}"


def test_alert_rules_load_and_evaluate_without_errors(stack: Stack) -> None:
    def healthy() -> bool:
        groups = stack.prometheus.get("/api/v1/rules").json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        for r in rules:
            assert r["health"] != "err", f"{r['name']}: {r.get('lastError')}"
        return bool(rules) and all(r["health"] == "ok" for r in rules)

    wait_until(healthy, SCRAPE_TIMEOUT_S, "every alert rule to be evaluated")
    # The traffic held a 404 (unknown model) and a 415 (not an image): client mistakes never page.
    alerts = stack.prometheus.get("/api/v1/alerts").json()["data"]["alerts"]
    assert not [a for a in alerts if a["labels"]["alertname"] == "ErdeRequestsRejected"], alerts


def by_model(stack: Stack, query: Query) -> dict[str, float]:
    return {r["metric"].get("model", ""): float(r["value"][1]) for r in stack.query(query.promql)}


def test_overload_panels_show_the_degraded_and_unsatisfiable_requests(stack: Stack) -> None:
    """The floors traffic as the overload panels show it: a pressure above 0, degraded images and
    unsatisfiable floors on the shipped student alone (the tiny one has no cheaper point and meets every
    floor), a used budget below the asked one."""
    assert stack.degraded > 0, "the premise: the shipped student answered some rows cheaper than asked"
    panels = {q.panel: q for q in QUERIES if q.ref == "A"}
    assert by_model(stack, panels["Load pressure"])["fashion-mnist"] > 0
    for title in ("Degraded images (share)", "Unsatisfiable floors"):
        values = by_model(stack, panels[title])
        assert values["fashion-mnist"] > 0 and values["student"] == 0, (title, values)
    (asked,) = [q for q in QUERIES if q.panel == "Budget asked vs used (mean)" and q.ref == "A"]
    (used,) = [q for q in QUERIES if q.panel == "Budget asked vs used (mean)" and q.ref == "B"]
    assert by_model(stack, used)["fashion-mnist"] < by_model(stack, asked)["fashion-mnist"]
