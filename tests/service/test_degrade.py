"""Load-adaptive budgets over real HTTP: a copy of the shipped student made slow on purpose
(bench/slow_service.py) and offered more than it can run."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.service import images
from tests.service.conftest import ROOT, Server

SHIPPED = ROOT / "model_store" / "fashion-mnist" / "1"
PNG = images.png()
SERVER_FLOOR = 0.85
ASKS = [{"budget": "1.0"}, {"budget": "1.0", "min_accuracy": "0.88"}, {"budget": "1.0", "min_accuracy": "0.91"},
        {"threshold": "0"}]


def overloaded(make_server, tmp_path: Path, mode: str) -> Server:
    store = tmp_path / "store"
    shutil.copytree(SHIPPED, store / "fashion-mnist" / "1")
    return make_server(store=store, default_model="fashion-mnist", min_accuracy=SERVER_FLOOR, overload=mode,
                       slow_batch_ms=150, max_batch_size=2, queue_size=6, target_queue_ms=20, hang_timeout_s=10,
                       request_timeout_s=30, slo_ms=30_000)  # the queue's room refuses here, not the time


def client(server: Server, index: int) -> list[tuple[dict, httpx.Response, float | None]]:
    """Six requests in a row; after a 503, the model's pressure as /metrics says at once."""
    out = []
    with server.client() as c:
        for i in range(6):
            ask = ASKS[(index + i) % len(ASKS)]
            reply = c.post("/classify", data=ask, files={"image": ("x.png", PNG, "image/png")})
            pressure = server.metric("erde_load_pressure", model="fashion-mnist") if reply.status_code == 503 else None
            out.append((ask, reply, pressure))
    return out


def offer(server: Server, clients: int) -> list[tuple[dict, httpx.Response, float | None]]:
    with ThreadPoolExecutor(clients) as pool:
        return [r for rs in pool.map(lambda i: client(server, i), range(clients)) for r in rs]


def test_overload_degrades_rows_down_to_their_floors_and_refuses_only_at_full_pressure(make_server,
                                                                                        tmp_path) -> None:
    server = overloaded(make_server, tmp_path, "degrade")
    replies = offer(server, 12)
    answered = [(ask, r.json()) for ask, r, _ in replies if r.status_code == 200]
    degraded = [(ask, body) for ask, body in answered if body["degraded"]]
    assert degraded, "no reply was degraded under twice the load the model can run"
    for ask, body in answered:
        floor = float(ask.get("min_accuracy", SERVER_FLOOR))
        if "threshold" in ask:  # a row that fixed θ is never changed
            assert not body["degraded"] and body["threshold"] == 0
            continue
        assert body["expected_accuracy"] >= floor - 1e-9, (ask, body)
        assert body["requested_budget"] == 1.0
        if body["degraded"]:
            assert body["budget"] < 1.0 and body["macs_fraction"] <= 1.0
    for _, reply, pressure in replies:
        assert reply.status_code in (200, 503), reply.text
        if reply.status_code == 503:  # refused only once every row goes at its floor
            # (read just after the reply: a queue that emptied meanwhile may have eased it by a few thousandths)
            assert reply.headers["retry-after"] and pressure > 0.98
    assert server.metric("erde_degraded_total", model="fashion-mnist") == len(degraded)


def test_reject_mode_never_degrades(make_server, tmp_path) -> None:
    server = overloaded(make_server, tmp_path, "reject")
    replies = offer(server, 12)
    assert all(r.status_code in (200, 503) for _, r, _ in replies)
    assert not any(r.json()["degraded"] for _, r, _ in replies if r.status_code == 200)
    assert server.metric("erde_load_pressure", model="fashion-mnist") > 0  # measured all the same
