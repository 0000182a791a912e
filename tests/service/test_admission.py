"""Admission reads the model where the pipeline does: a form field, the query, or the OIP path."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import httpx

from erde.export import export_run
from tests.service import images
from tests.service.conftest import eventually

PNG = images.png()
QUEUE = 4
# Every batch takes 0.6 s: two in the inference process and QUEUE waiting fill a model's queue (an SLO of
# a minute: every row is in time, so the queue's room is what refuses; test_waiting.py tests the time).
FLOODABLE = {"max_batch_size": 1, "queue_size": QUEUE, "slow_batch_ms": 600, "hang_timeout_s": 10, "overload": "reject",
             "slo_ms": 60_000}


def post(url: str, params: dict[str, str] | None = None, **fields: str) -> httpx.Response:
    return httpx.post(f"{url}/classify", params=params, data=fields, timeout=30,
                      files={"image": ("a.png", PNG, "image/png")})


def oip_infer(url: str, model: str) -> httpx.Response:
    doc = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(PNG).decode()]}]}
    return httpx.post(f"{url}/v2/models/{model}/infer", json=doc, timeout=30)


def test_a_model_named_in_a_form_field_is_admitted_against_its_own_queue(make_server, tiny_pipeline, tmp_path) -> None:
    store = tmp_path / "store"
    for name in ("toy", "other"):
        export_run(tiny_pipeline.student_run, store, name, "1")
    server = make_server(store=store, **FLOODABLE)
    with ThreadPoolExecutor(QUEUE + 2) as pool:
        flood = [pool.submit(post, server.url) for _ in range(QUEUE + 2)]  # 2 in the process, 4 queued
        eventually(lambda: server.metric("erde_queue_depth", model="toy") == QUEUE)
        assert post(server.url).status_code == 503  # the default model is full ...
        refused_by_path = oip_infer(server.url, "toy")
        by_form = post(server.url, model="other")  # ... and the model the form names is idle
        by_query = post(server.url, params={"model": "other"})
        by_path = oip_infer(server.url, "other")  # the Open Inference Protocol names it in the path
        assert all(f.result().status_code == 200 for f in flood)
    assert (by_form.status_code, by_form.json()["model"]) == (200, "other"), by_form.text
    assert (by_query.status_code, by_query.json()["model"]) == (200, "other"), by_query.text
    assert (by_path.status_code, by_path.json()["model_name"]) == (200, "other"), by_path.text
    assert refused_by_path.status_code == 503 and refused_by_path.headers["retry-after"]
    assert isinstance(refused_by_path.json()["error"], str)  # in the protocol's own error shape
    eventually(lambda: server.metric("erde_rejected_total", model="toy", reason="queue_full") == 2)
    assert server.metric("erde_rejected_total", model="other") == 0


def test_a_full_model_named_in_a_form_field_is_refused_under_its_own_name(make_server, tiny_pipeline,
                                                                          tmp_path) -> None:
    store = tmp_path / "store"
    for name in ("toy", "other"):
        export_run(tiny_pipeline.student_run, store, name, "1")
    server = make_server(store=store, **FLOODABLE)
    with ThreadPoolExecutor(QUEUE + 2) as pool:
        flood = [pool.submit(post, server.url, model="other") for _ in range(QUEUE + 2)]
        eventually(lambda: server.metric("erde_queue_depth", model="other") == QUEUE)
        refused = post(server.url, model="other")
        assert all(f.result().status_code == 200 for f in flood)
    assert refused.status_code == 503 and refused.headers["retry-after"], refused.text
    assert refused.json()["error"]["code"] == "overloaded"
    eventually(lambda: server.metric("erde_rejected_total", model="other", reason="queue_full") == 1)
    assert server.metric("erde_rejected_total", model="toy") == 0
