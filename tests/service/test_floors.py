"""Accuracy floors over real HTTP, on a copy of the shipped student (the toy model is 100% accurate
everywhere, so only a real curve has floors it cannot meet)."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator

import pytest

from tests.service import images
from tests.service.conftest import ROOT, Server, eventually, start_server

SHIPPED = ROOT / "model_store" / "fashion-mnist" / "1"
PNG = images.png()


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    store = tmp_path_factory.mktemp("shipped-store")
    shutil.copytree(SHIPPED, store / "fashion-mnist" / "1")
    srv = start_server(store, tmp_path_factory.mktemp("logs"), default_model="fashion-mnist", min_accuracy=0.85)
    yield srv
    srv.stop()


def frontier() -> list[tuple[float, float]]:
    """(MACs fraction, accuracy) of every point more accurate than all cheaper ones, cheapest first."""
    points = json.loads((SHIPPED / "calibration.json").read_text())["points"]
    best, out = -1.0, []
    for p in sorted(points, key=lambda p: (p["macs_fraction"], -p["threshold"])):
        if p["accuracy"] > best:
            best = p["accuracy"]
            out.append((p["macs_fraction"], p["accuracy"]))
    return out


def needed_budget(floor: float) -> float:
    """The smallest budget that meets `floor`, quoted to 4 decimals, rounded up."""
    return math.ceil(min(cost for cost, acc in frontier() if acc >= floor) * 1e4) / 1e4


def post(server: Server, **fields: str):
    with server.client() as c:
        return c.post("/classify", data=fields, files={"image": ("x.png", PNG, "image/png")})


@pytest.mark.parametrize("floor", ["0.88", "0.91", "0.92"])
def test_a_floor_alone_buys_the_cheapest_point_that_meets_it(shipped: Server, floor: str) -> None:
    reply = post(shipped, min_accuracy=floor).json()
    cheapest = min(cost for cost, acc in frontier() if acc >= float(floor))
    assert reply["min_accuracy"] == float(floor) and reply["requested_budget"] is None and not reply["degraded"]
    assert reply["expected_accuracy"] >= float(floor) and reply["budget"] == pytest.approx(cheapest)


def test_a_floor_with_a_budget_is_the_most_accurate_point_within_it(shipped: Server) -> None:
    reply = post(shipped, budget="0.3", min_accuracy="0.91").json()
    best = max(acc for cost, acc in frontier() if cost <= 0.3)
    assert reply["budget"] == 0.3 and reply["requested_budget"] == 0.3 and reply["min_accuracy"] == 0.91
    assert reply["expected_accuracy"] >= best - 5e-4 and not reply["degraded"]  # the budget rule's near-tie


def test_without_a_floor_the_reply_says_so(shipped: Server) -> None:
    reply = post(shipped, budget="0.6").json()
    assert (reply["min_accuracy"], reply["requested_budget"], reply["degraded"]) == (None, 0.6, False)


def test_floors_in_the_query_and_on_the_batch_endpoint(shipped: Server) -> None:
    with shipped.client() as c:
        raw = c.post("/classify", params={"min_accuracy": "0.9"}, content=PNG, headers={"content-type": "image/png"})
        batch = c.post("/classify/batch", data={"min_accuracy": "0.9"},
                       files=[("image", (f"{i}.png", images.png(i), "image/png")) for i in range(3)])
    assert raw.status_code == 200 and raw.json()["min_accuracy"] == 0.9 and raw.json()["expected_accuracy"] >= 0.9
    results = batch.json()["results"]
    assert len(results) == 3 and all(r["min_accuracy"] == 0.9 and r["expected_accuracy"] >= 0.9 for r in results)


# fields -> (status, code, what the message must say)
REFUSALS = {
    "a floor no point meets": ({"min_accuracy": "0.99"}, 422, "unsatisfiable", "the best on offer is 0.92"),
    "a budget too small for the floor": ({"min_accuracy": "0.91", "budget": "0.2"}, 422, "unsatisfiable",
                                         f"the floor needs budget {needed_budget(0.91)}"),
    "a floor with a threshold": ({"min_accuracy": "0.9", "threshold": "0.2"}, 422, "invalid_option",
                                 "a threshold bypasses them"),
    "a floor with max_exit": ({"min_accuracy": "0.9", "max_exit": "1"}, 422, "invalid_option", "max_exit"),
    "a floor of 0": ({"min_accuracy": "0"}, 422, "invalid_option", "min_accuracy"),
    "a floor above 1": ({"min_accuracy": "2"}, 422, "invalid_option", "min_accuracy"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_floor_refusals(shipped: Server, case: str) -> None:
    fields, status, code, message = REFUSALS[case]
    before = shipped.metric("erde_unsatisfiable_total", model="fashion-mnist")
    for response in (post(shipped, **fields), shipped.client().post(
            "/classify", params=fields, content=PNG, headers={"content-type": "image/png"})):
        assert response.status_code == status and response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert error["code"] == code and message in error["message"]
    counted = 2 if code == "unsatisfiable" else 0
    eventually(lambda: shipped.metric("erde_unsatisfiable_total", model="fashion-mnist") - before == counted)


def test_budget_used_is_recorded_beside_the_requested_one(shipped: Server) -> None:
    asked = shipped.metric("erde_budget_count", model="fashion-mnist")
    used = shipped.metric("erde_budget_used_count", model="fashion-mnist")
    post(shipped, budget="0.5")
    post(shipped, min_accuracy="0.9")  # a floor alone: a budget used, none asked for
    eventually(lambda: shipped.metric("erde_budget_used_count", model="fashion-mnist") - used == 2)
    assert shipped.metric("erde_budget_count", model="fashion-mnist") - asked == 1
    assert shipped.metric("erde_degraded_total", model="fashion-mnist") == 0  # idle: nothing degraded
