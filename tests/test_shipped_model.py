"""The shipped models, read-only: integrity, calibration consistency, card vs a fresh evaluation on
the Fashion-MNIST test split; and the served default (the newest version) saving real MACs over HTTP."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from erde.artifact import list_versions
from erde.data import load_fashion_mnist
from erde.evaluate import DEFAULT_BUDGETS, metrics_from_outputs
from erde.store import read_artifact
from tests.service.conftest import start_server

STORE = Path(__file__).resolve().parents[1] / "model_store"
SHIPPED = ["fashion-mnist/1", "fashion-mnist/2", "fashion-mnist-teacher/1"]
STUDENTS = {"fashion-mnist/1", "fashion-mnist/2"}


@pytest.fixture(scope="module", params=SHIPPED)
def shipped(request):
    return read_artifact(STORE / request.param)  # verifies every sha256 and the weights against the network


@pytest.fixture(scope="module")
def test_split():
    return load_fashion_mnist("test")


def test_is_small_and_students_are_erde_trained(shipped) -> None:
    size = sum(f.stat().st_size for f in shipped.path.iterdir())
    assert size < 3 * 1024 * 1024
    student = f"{shipped.name}/{shipped.version}" in STUDENTS
    assert shipped.manifest["training"]["loss"]["kind"] == ("erde" if student else "ce")
    assert shipped.manifest["training"]["dataset"] == "fashion-mnist"
    assert shipped.classes[0] == "T-shirt/top" and len(shipped.classes) == 10


def test_calibration_is_consistent(shipped) -> None:
    macs = np.array(shipped.macs_per_exit, dtype=float)
    points = shipped.calibration.points
    for p in points:
        assert abs(sum(p.exit_histogram) - 1) < 1e-4
        assert p.macs_fraction == pytest.approx(float(np.dot(p.exit_histogram, macs) / macs[-1]), abs=1e-4)
        assert 0 <= p.accuracy <= 1
    by_theta = sorted(points, key=lambda p: p.threshold)
    assert by_theta[0].threshold == 0 and by_theta[0].exit_histogram[-1] == 1.0
    assert by_theta[-1].exit_histogram[0] == 1.0
    costs = [p.macs_fraction for p in by_theta]
    assert costs == sorted(costs, reverse=True)  # a larger θ never costs more
    for budget in (1.0, 0.75, 0.5, 0.35, 0.25):
        point, clamped = shipped.calibration.choose(budget)
        assert clamped or point.macs_fraction <= budget + 1e-9


def test_card_and_manifest_match_a_fresh_evaluation(shipped, shipped_on_test_split) -> None:
    _, outputs = shipped_on_test_split(f"{shipped.name}/{shipped.version}")  # `measure_test_split`, shared
    fresh = metrics_from_outputs(outputs, shipped.calibration, DEFAULT_BUDGETS)
    stored = shipped.manifest["test_metrics"]
    assert fresh["exit_accuracy"] == pytest.approx(stored["exit_accuracy"], abs=1e-6)
    for a, b in zip(fresh["budgets"], stored["budgets"], strict=True):
        assert (a["budget"], a["threshold"]) == (b["budget"], b["threshold"])
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-6)
        assert a["macs_fraction"] == pytest.approx(b["macs_fraction"], abs=1e-6)
    card = (shipped.path / "MODEL_CARD.md").read_text()
    assert f"| {fresh['full_depth_accuracy'] * 100:.2f} |" in card
    for row in fresh["budgets"]:
        assert re.search(rf"\| {row['budget']}(?: \(cheapest\))? \| {row['threshold']:.4f} \| "
                         rf"{row['accuracy'] * 100:.2f} \|", card), row


def test_lower_budgets_spend_fewer_macs_over_http(test_split, tmp_path) -> None:
    pngs, labels = [], test_split.labels[:120].tolist()
    for pixels in test_split.images[:120, 0].numpy():
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        pngs.append(buf.getvalue())
    served = read_artifact(STORE / "fashion-mnist" / list_versions(STORE)["fashion-mnist"][-1])
    # Three budgets the served curve answers at three different costs (a budget may buy a cheaper point).
    by_cost = {served.calibration.choose(b)[0].macs_fraction: b for b in (0.25, 0.35, 0.5, 0.75, 1.0)}
    costs = sorted(by_cost)
    budgets = [str(by_cost[costs[i]]) for i in (-1, len(costs) // 2, 0)]
    server = start_server(STORE, tmp_path, default_model="fashion-mnist")
    try:
        mean_macs, accuracy = {}, {}
        with server.client() as c:
            for budget in budgets:
                replies = [c.post("/classify", data={"budget": budget}, files={"image": ("x.png", p, "image/png")})
                           .json() for p in pngs]
                mean_macs[budget] = np.mean([r["macs"] for r in replies])
                accuracy[budget] = np.mean([r["class_id"] == y for r, y in zip(replies, labels, strict=True)])
    finally:
        server.stop()
    assert replies[0]["version"] == served.version
    high, middle, low = budgets
    assert mean_macs[high] > mean_macs[middle] > mean_macs[low], mean_macs
    assert accuracy[high] > 0.85 and accuracy[low] > 0.75, accuracy
