"""What each run of the api container must show: the models, the README's quick start, /metrics, a clean drain."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from erde.data import load_fashion_mnist
from tests.image.build import ROOT
from tests.image.container import Container, classify, compose_api, seconds
from tests.image.podman import podman
from tests.service.steady_load import SteadyLoad

LOAD_CLIENTS = 8


def quick_start_png(folder: Path) -> Path:
    """boot.png, made as the README's quick start makes it."""
    path = folder / "boot.png"
    Image.fromarray(load_fashion_mnist("test").images[0, 0].numpy()).save(path)
    return path


def readme_quick_start() -> tuple[dict[str, str], dict[str, Any]]:
    """The quick start's curl fields and the reply the README shows for them."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quick start"):]
    curl = re.search(r"^curl (.*)/classify$", section, re.M)
    fields = dict(re.findall(r"-F (\w+)=([^@\s]+)(?:\s|$)", curl[1]))
    shown = json.loads(re.search(r"```json\n(.*?)```", section[curl.end():], re.S)[1])
    return fields, shown


def differences(got: Any, shown: Any, path: str = "") -> list[str]:
    """Where a reply differs from the README's: floats to the README's 3 decimals; latency is not compared."""
    if isinstance(shown, dict):
        return [d for k, v in shown.items() if k != "latency_ms"
                for d in differences(got.get(k) if isinstance(got, dict) else None, v, f"{path}.{k}")]
    if isinstance(shown, list):
        if not isinstance(got, list) or len(got) != len(shown):
            return [f"{path}: {got!r}, README {shown!r}"]
        return [d for i, (g, v) in enumerate(zip(got, shown, strict=True)) for d in differences(g, v, f"{path}[{i}]")]
    if isinstance(shown, float) and isinstance(got, int | float) and abs(got - shown) <= 0.0005 + 1e-9:
        return []
    return [] if got == shown else [f"{path}: {got!r}, README {shown!r}"]


def check_quick_start(container: Container, png: Path) -> dict:
    """The quick start's request answers what the README shows."""
    fields, shown = readme_quick_start()
    reply = classify(container.url, png, **fields)
    assert reply.status_code == 200, f"quick start: {reply.status_code} {reply.text}\n{container.logs()}"
    body = reply.json()
    wrong = differences(body, shown)
    assert not wrong, f"quick start: the reply differs from the README's: {wrong}"
    return body


def check_models(container: Container) -> dict[str, str]:
    """Every model of the repository's model_store/ is served, at its newest version."""
    store = ROOT / "model_store"
    expected = {d.name: str(max(int(v.name) for v in d.iterdir() if v.name.isdigit()))
                for d in store.iterdir() if d.is_dir()}
    served = {m["name"]: m["version"] for m in httpx.get(f"{container.url}/models", timeout=10).json()}
    missing = {name: version for name, version in expected.items() if served.get(name) != version}
    assert not missing, f"not served (model: version in model_store/): {missing}; served: {served}"
    return served


def check_metrics(container: Container) -> int:
    """/metrics answers, and the classified image is counted; returns the number of erde_ series."""
    text = httpx.get(f"{container.url}/metrics", timeout=10).text
    series = [ln for ln in text.splitlines() if ln.startswith("erde_")]
    for name in ("erde_requests_total", "erde_exits_total", "erde_model_info"):
        assert any(ln.startswith(name + "{") for ln in series), f"/metrics has no {name} series"
    return len(series)


def check_drain(container: Container) -> dict:
    """`podman stop` (SIGTERM) under load: every request gets a reply (200, or 503 with Retry-After) or
    no connection at all, and the container exits 0 within compose's stop_grace_period."""
    api = compose_api()
    grace = seconds(api["stop_grace_period"])
    with SteadyLoad(container.url, clients=LOAD_CLIENTS) as load:
        load.wait_for(50, timeout=60)
        before = load.count()
        started = time.monotonic()
        podman("stop", "--time", str(int(grace)), container.name, timeout=grace + 30)
        stopped_s = time.monotonic() - started
    exit_code = int(container.state("ExitCode"))
    summary = load.summary()
    assert not load.unanswered(), (f"drain: requests without a reply: {load.unanswered()[:5]} ({summary}), "
                                   f"{stopped_s:.2f} s from SIGTERM to exit\n{container.logs()}")
    assert not load.dishonest(), f"drain: refusals without Retry-After: {load.dishonest()[:5]} ({summary})"
    assert exit_code == 0, f"drain: exit code {exit_code}\n{container.logs()}"
    assert stopped_s < grace, f"drain: {stopped_s:.1f} s from SIGTERM to exit, grace period {grace} s"
    return {"requests": load.count(), "before_sigterm": before, "codes": dict(summary), "stop_s": round(stopped_s, 1)}
