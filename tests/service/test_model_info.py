"""GET /models/{name} shows the latency per exit that `erde export` measured, and null for an
artifact from before it (the shipped fashion-mnist/1, served from a read-only copy)."""

from __future__ import annotations

import shutil
from pathlib import Path

from erde.store import read_artifact

SHIPPED = Path(__file__).resolve().parents[2] / "model_store" / "fashion-mnist" / "1"


def test_models_show_exit_latency_when_the_manifest_has_it(toy_store: Path, make_server, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(toy_store / "toy", store / "toy")
    shutil.copytree(SHIPPED, store / "fashion-mnist" / "1")
    server = make_server(store)
    with server.client() as c:
        toy, shipped = c.get("/models/toy").json(), c.get("/models/fashion-mnist").json()
    stored = read_artifact(toy_store / "toy" / "1").manifest["exit_latency"]
    assert toy["exit_latency"] == stored
    per_batch = toy["exit_latency"]["ms"]
    assert set(per_batch) == {"1", "32"} and all(len(times) == 3 for times in per_batch.values())
    assert shipped["version"] == "1", shipped
    assert shipped["exit_latency"] is None
