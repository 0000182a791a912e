"""The happy paths over real HTTP: replies, image kinds, budgets, metrics, model listing."""

from __future__ import annotations

import math

import pytest

from tests.service import images
from tests.service.conftest import eventually

REPLY_KEYS = {"model", "version", "label", "class_id", "confidence", "top_k", "exit", "exits", "entropy",
              "threshold", "budget", "budget_clamped", "max_exit", "min_accuracy", "requested_budget", "degraded",
              "expected_accuracy", "expected_accuracy_offline", "expected_accuracy_live", "accuracy_source", "macs",
              "macs_fraction", "latency_ms"}


def classify(server, data: bytes, **fields: str) -> dict:
    with server.client() as c:
        response = c.post("/classify", data=fields, files={"image": ("x.png", data, "image/png")})
    assert response.status_code == 200, response.text
    return response.json()


def test_reply_has_the_contract_fields(server) -> None:
    reply = classify(server, images.png(), budget="0.6", top_k="3")
    assert set(reply) == REPLY_KEYS
    assert reply["model"] == "toy" and reply["version"] == "1" and reply["exits"] == 3
    assert 0 <= reply["exit"] < 3 and reply["budget"] == 0.6
    assert reply["top_k"][0]["class_id"] == reply["class_id"] and len(reply["top_k"]) == 3
    probs = [t["probability"] for t in reply["top_k"]]
    assert probs == sorted(probs, reverse=True) and reply["confidence"] == probs[0]
    models = server.client().get("/models/toy").json()
    assert reply["macs"] == models["macs_per_exit"][reply["exit"]]
    assert math.isclose(reply["macs_fraction"], reply["macs"] / models["macs_per_exit"][-1])
    assert set(reply["latency_ms"]) == {"decode", "queue", "inference", "total"}
    assert reply["latency_ms"]["total"] >= reply["latency_ms"]["inference"]


def test_default_budget_is_echoed(server) -> None:
    reply = classify(server, images.png())
    assert reply["budget"] == 0.5 and reply["threshold"] >= 0


def test_threshold_zero_is_full_depth_and_huge_is_first_exit(server) -> None:
    assert classify(server, images.png(1), threshold="0")["exit"] == 2
    reply = classify(server, images.png(1), threshold="1000")
    assert reply["exit"] == 0 and reply["budget"] is None and reply["threshold"] == 1000


def test_max_exit_caps_depth(server) -> None:
    for cap in (0, 1):
        reply = classify(server, images.png(2), threshold="0", max_exit=str(cap))
        assert reply["exit"] == cap and reply["max_exit"] == cap


def test_raw_body_with_query_options(server) -> None:
    with server.client() as c:
        response = c.post("/classify", params={"threshold": "0"}, content=images.png(),
                          headers={"content-type": "image/png"})
    assert response.status_code == 200 and response.json()["exit"] == 2


@pytest.mark.parametrize("make", [images.cmyk_jpeg, images.png16, images.rgba_png, images.palette_png])
def test_unusual_modes_are_converted(server, make) -> None:
    reply = classify(server, make(), threshold="0")
    assert reply["exit"] == 2 and 0 < reply["confidence"] <= 1


def test_exif_rotation_is_applied_before_classifying(server) -> None:
    upright = images.texture(0, 32)  # horizontal stripes; rotated they would read as vertical
    straight = classify(server, images.encode(upright, "JPEG", quality=100), threshold="0", top_k="4")
    rotated = classify(server, images.exif_rotated_jpeg(upright), threshold="0", top_k="4")
    sideways = classify(server, images.encode(upright.rotate(90, expand=True), "JPEG", quality=100),
                        threshold="0", top_k="4")
    probs = lambda r: {t["class_id"]: t["probability"] for t in r["top_k"]}  # noqa: E731
    p_straight, p_rotated, p_sideways = probs(straight), probs(rotated), probs(sideways)
    gap_rotated = max(abs(p_straight[k] - p_rotated[k]) for k in p_straight)
    gap_sideways = max(abs(p_straight[k] - p_sideways[k]) for k in p_straight)
    assert gap_rotated < 0.02 and gap_rotated < gap_sideways


def test_lower_budgets_spend_no_more_macs_on_average(server) -> None:
    data = [images.png(seed) for seed in range(12)] + [images.encode(images.noise(32, s)) for s in range(12)]
    calibration = {p["budget"]: p["threshold"] for p in server.client().get("/models/toy").json()["calibration"]}
    mean_macs = {}
    for budget in (1.0, 0.6, 0.3, 0.1):
        replies = [classify(server, d, budget=str(budget)) for d in data]
        assert {r["threshold"] for r in replies} == {calibration[budget]}  # θ from the calibration curve
        mean_macs[budget] = sum(r["macs"] for r in replies) / len(replies)
    values = [mean_macs[b] for b in (1.0, 0.6, 0.3, 0.1)]
    assert values == sorted(values, reverse=True), mean_macs
    # The strict version (lower budget, fewer MACs) runs on the shipped model: test_shipped_model.py.


def test_exit_counters_match_the_replies(server) -> None:
    before = [server.metric("erde_exits_total", model="toy", exit=str(i)) for i in range(3)]
    macs_before = server.metric("erde_macs_total", model="toy")
    seen, spent = [0, 0, 0], 0
    for seed in range(9):
        reply = classify(server, images.png(seed), threshold=["0", "1000", "0.3"][seed % 3])
        seen[reply["exit"]] += 1
        spent += reply["macs"]
    after = [server.metric("erde_exits_total", model="toy", exit=str(i)) for i in range(3)]
    assert [a - b for a, b in zip(after, before, strict=True)] == seen
    assert server.metric("erde_macs_total", model="toy") - macs_before == spent


def test_batch_endpoint_keeps_order(server) -> None:
    data = [images.png(seed) for seed in range(5)]
    singles = [classify(server, d, threshold="0")["class_id"] for d in data]
    with server.client() as c:
        response = c.post("/classify/batch", data={"threshold": "0"},
                          files=[("image", (f"{i}.png", d, "image/png")) for i, d in enumerate(data)])
    assert response.status_code == 200
    assert [r["class_id"] for r in response.json()["results"]] == singles


def test_models_listing_and_probes(server) -> None:
    with server.client() as c:
        listing = c.get("/models").json()
        assert [m["name"] for m in listing] == ["toy"]
        toy = c.get("/models/toy").json()
        assert toy["versions"] == ["1"] and toy["exits"] == 3 and len(toy["classes"]) == 4
        assert toy["input"]["mode"] == "L" and toy["calibration"][0]["budget"] == 1.0
        assert c.get("/models/nope").status_code == 404
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json()["status"] == "ready"
        assert "/classify" in c.get("/openapi.json").json()["paths"]
        assert c.get("/metrics").text.count("erde_model_info{") == 1


def test_a_request_id_is_echoed_in_the_reply_the_error_and_the_access_log(server) -> None:
    png = images.png()
    ok = server.client().post("/classify", files={"image": ("a.png", png, "image/png")},
                              headers={"X-Request-ID": "trace-42.a_b"})
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "trace-42.a_b"
    bad = server.client().post("/classify", files={"image": ("a.png", png, "image/png")}, data={"budget": "2"},
                               headers={"X-Request-ID": "trace-43"})
    assert bad.status_code == 422 and bad.headers["x-request-id"] == "trace-43"
    assert bad.json()["error"]["request_id"] == "trace-43"
    for sent in ("x" * 65, "has space", ""):  # too long, not printable: one is made here instead
        made = server.client().post("/classify", files={"image": ("a.png", b"not an image", "image/png")},
                                    headers={"X-Request-ID": sent})
        rid = made.headers["x-request-id"]
        assert made.status_code == 415 and len(rid) == 16 and int(rid, 16) >= 0 and rid != sent
        assert made.json()["error"]["request_id"] == rid
    unrouted = server.client().get("/nowhere")
    assert unrouted.status_code == 404 and unrouted.json()["error"]["request_id"] == unrouted.headers["x-request-id"]
    eventually(lambda: '"request_id":"trace-42.a_b"' in server.log.read_text()
               and '"request_id":"trace-43"' in server.log.read_text())
