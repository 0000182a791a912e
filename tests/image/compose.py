"""docker-compose.yml brought up with podman-compose: the `api` service from the image just built and
`prometheus` from Debian's package, scraping `api` with the repository's prometheus.yml and rules.

An override file names the two images (compose's own `build:` and upstream image stay untouched);
host ports come from API_PORT and PROMETHEUS_PORT, free ones. Grafana is left out: no package of
Debian, PyPI or npm carries it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

from tests.image.build import ROOT
from tests.image.container import Container, classify, compose_api, free_port
from tests.image.podman import environment, podman, run

PROMETHEUS_CONTAINERFILE = Path(__file__).with_name("prometheus.Containerfile")
SCRAPED_WITHIN_S = 120


def prometheus_image(base: str) -> str:
    """Debian's prometheus on the base image; podman's layer cache makes a rebuild take seconds."""
    tag = "localhost/erde-prometheus:debian"
    podman("build", "--layers", "-f", str(PROMETHEUS_CONTAINERFILE), "-t", tag, "--build-arg",
           f"BASE_IMAGE={base}", str(PROMETHEUS_CONTAINERFILE.parent), timeout=600)
    return tag


def query(prometheus: str, promql: str) -> list[dict]:
    reply = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10).json()
    return reply["data"]["result"]


def erde_target(prometheus: str) -> dict | None:
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    return next((t for t in targets if t["labels"].get("job") == "erde"), None)


def check_compose(api_image: str, prometheus_tag: str, png: Path, folder: Path) -> dict:
    """Up, wait for api's health check, classify, wait until Prometheus has scraped it; always down."""
    project = f"erde-image-test-{os.getpid()}"
    override = folder / "compose.override.yml"
    override.write_text(f"services:\n  api:\n    image: {api_image}\n  prometheus:\n    image: {prometheus_tag}\n")
    api_port, prometheus_port = free_port(), free_port()
    env = {**environment(), "API_PORT": str(api_port), "PROMETHEUS_PORT": str(prometheus_port),
           "GRAFANA_ADMIN_PASSWORD": "unused-grafana-is-not-started"}
    compose = ["podman-compose", "-p", project, "-f", str(ROOT / "docker-compose.yml"), "-f", str(override)]
    try:
        run(*compose, "up", "-d", "--no-build", "api", "prometheus", env=env, timeout=300)
        api = Container(f"{project}_api_1", api_port)
        # Compose's own health check, run as Docker runs a CMD test: podman-compose 1.0.3 joins its
        # words into a broken shell line, so its `podman healthcheck run` never passes.
        test = compose_api()["healthcheck"]["test"]
        assert test[0] == "CMD", test
        healthy_s = api.wait_healthy(test[1:])
        assert classify(api.url, png).status_code == 200
        prometheus = f"http://127.0.0.1:{prometheus_port}"
        started = time.monotonic()
        while True:
            try:
                target = erde_target(prometheus)
                exits = query(prometheus, "erde_exits_total")
            except httpx.HTTPError:
                target, exits = None, []
            if target and target["health"] == "up" and exits:
                break
            if time.monotonic() - started > SCRAPED_WITHIN_S:
                logs = podman("logs", f"{project}_prometheus_1", check=False)
                raise AssertionError(f"compose: target {target}, erde_exits_total {exits} after "
                                     f"{SCRAPED_WITHIN_S} s\n{(logs.stdout + logs.stderr)[-3000:]}")
            time.sleep(1)
        rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        return {"api_healthy_s": round(healthy_s, 1), "scraped_s": round(time.monotonic() - started, 1),
                "target": target["scrapeUrl"], "erde_exits_total_series": len(exits),
                "alert_rules": sum(len(g["rules"]) for g in rules)}
    finally:
        run(*compose, "down", "-v", env=env, timeout=300, check=False)
        podman("network", "rm", f"{project}_default", check=False)  # podman-compose 1.0.3 leaves it
