"""The Open Inference Protocol (v2 REST) over real HTTP, spoken by a real third-party client
(tritonclient's InferenceServerClient, binary tensor data) and by hand (httpx: JSON and base64)."""

from __future__ import annotations

import base64
import struct

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.service import images
from tests.service.conftest import eventually

PNGS = [images.png(seed) for seed in range(3)]
OUTPUTS = {"label", "class_id", "probabilities", "exit", "macs", "expected_accuracy"}


def triton_client(server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=30)


def image_input(pngs: list[bytes], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(pngs)], "BYTES")
    tensor.set_data_from_numpy(np.array(pngs, dtype=np.object_), binary_data=binary)
    return tensor


def classify(server, png: bytes, **fields: str) -> dict:
    response = httpx.post(f"{server.url}/classify", data=fields, files={"image": ("x.png", png, "image/png")},
                          timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def infer_json(server, doc: dict, path: str = "/v2/models/toy/infer", **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=doc, timeout=30, **kwargs)


def error_of(response: httpx.Response, status: int) -> str:
    """The protocol's error shape, exactly: {"error": message}, with the request's id beside it."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "request_id"} and isinstance(body["error"], str), body
    assert body["request_id"] == response.headers["x-request-id"]
    return body["error"]


def test_triton_client_health_and_metadata(server) -> None:
    client = triton_client(server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("toy") and client.is_model_ready("toy", "1")
    assert not client.is_model_ready("toy", "2") and not client.is_model_ready("nope")
    assert set(client.get_server_metadata()["extensions"]) == {"binary_tensor_data", "classification"}
    meta = client.get_model_metadata("toy")
    assert client.get_model_metadata("toy", "1") == meta
    assert meta["name"] == "toy" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                              {"name": "budget", "datatype": "FP32", "shape": [-1]}]
    shapes = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
    assert shapes == {"label": ("BYTES", [-1]), "class_id": ("INT64", [-1]), "probabilities": ("FP32", [-1, 4]),
                      "exit": ("INT32", [-1]), "macs": ("INT64", [-1]), "expected_accuracy": ("FP32", [-1])}
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("toy", "2")
    assert unknown.value.status() == "404" and "serves version '1' only" in unknown.value.message()


def test_triton_binary_infer_matches_classify(server) -> None:
    """Same engine: every output, sent back as binary data, agrees with /classify on the same images."""
    result = triton_client(server).infer("toy", [image_input(PNGS)], parameters={"erde_threshold": 0})
    response = result.get_response()
    assert (response["model_name"], response["model_version"]) == ("toy", "1")
    assert {o["name"] for o in response["outputs"]} == OUTPUTS  # none asked for: all, in binary
    assert all("binary_data_size" in o["parameters"] and "data" not in o for o in response["outputs"])
    labels, class_ids = result.as_numpy("label"), result.as_numpy("class_id")
    probabilities, exits = result.as_numpy("probabilities"), result.as_numpy("exit")
    assert probabilities.shape == (3, 4) and probabilities.dtype == np.float32
    assert class_ids.dtype == np.int64 and exits.dtype == np.int32 and result.as_numpy("macs").dtype == np.int64
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    classes = httpx.get(f"{server.url}/models/toy").json()
    for row, png in enumerate(PNGS):
        mine = classify(server, png, threshold="0", top_k="4")
        assert labels[row].decode() == mine["label"] and class_ids[row] == mine["class_id"]
        assert exits[row] == mine["exit"] == 2 and result.as_numpy("macs")[row] == classes["macs_per_exit"][2]
        assert result.as_numpy("expected_accuracy")[row] == pytest.approx(mine["expected_accuracy"], rel=1e-6)
        for top in mine["top_k"]:
            assert probabilities[row, top["class_id"]] == pytest.approx(top["probability"], rel=1e-5)
        assert probabilities[row].argmax() == mine["class_id"]


def test_triton_json_outputs_classification_and_id(server) -> None:
    outputs = [triton.InferRequestedOutput("label", binary_data=False),
               triton.InferRequestedOutput("probabilities", class_count=2)]
    result = triton_client(server).infer("toy", [image_input(PNGS[:2])], model_version="1", outputs=outputs,
                                         request_id="req-7", parameters={"erde_budget": 0.6})
    response = result.get_response()
    assert response["id"] == "req-7" and [o["name"] for o in response["outputs"]] == ["label", "probabilities"]
    assert response["outputs"][0]["data"] == result.as_numpy("label").tolist()  # JSON BYTES come back as str
    ranked = result.as_numpy("probabilities")
    assert ranked.shape == (2, 2) and response["outputs"][1]["datatype"] == "BYTES"
    for row, png in enumerate(PNGS[:2]):
        mine = classify(server, png, budget="0.6", top_k="2")
        for entry, top in zip(ranked[row], mine["top_k"], strict=True):
            score, index, label = entry.decode().split(":")
            assert (int(index), label) == (top["class_id"], top["label"])
            assert float(score) == pytest.approx(top["probability"], abs=1e-6)


def test_triton_per_row_budgets_keep_their_own_operating_point(server) -> None:
    budgets = triton.InferInput("budget", [3], "FP32")
    budgets.set_data_from_numpy(np.array([0.1, 1.0, 0.1], dtype=np.float32))
    result = triton_client(server).infer("toy", [image_input(PNGS), budgets])
    accuracy = result.as_numpy("expected_accuracy")
    cheap = classify(server, PNGS[0], budget="0.1")["expected_accuracy"]
    full = classify(server, PNGS[1], budget="1.0")["expected_accuracy"]
    assert accuracy.tolist() == pytest.approx([cheap, full, cheap], rel=1e-6)


def test_triton_unknown_model_and_server_errors(server) -> None:
    client = triton_client(server)
    for model, version in (("nope", ""), ("toy", "2")):
        with pytest.raises(InferenceServerException) as refused:
            client.infer(model, [image_input(PNGS[:1])], model_version=version)
        assert refused.value.status() == "404"
    with pytest.raises(InferenceServerException) as bad:
        client.infer("toy", [image_input([b"not an image"])])
    assert bad.value.status() == "415"


def test_json_base64_request(server) -> None:
    doc = {"id": "42", "parameters": {"erde_budget": 0.6, "erde_max_exit": 0},
           "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [b64(p) for p in PNGS[:2]]}]}
    response = infer_json(server, doc, path="/v2/models/toy/versions/1/infer")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert "inference-header-content-length" not in response.headers
    reply = response.json()
    assert (reply["id"], reply["model_name"], reply["model_version"]) == ("42", "toy", "1")
    out = {o["name"]: o for o in reply["outputs"]}
    assert set(out) == OUTPUTS and out["probabilities"]["shape"] == [2, 4] and len(out["probabilities"]["data"]) == 8
    assert out["exit"]["data"] == [0, 0]  # erde_max_exit: the cap holds
    macs = httpx.get(f"{server.url}/models/toy").json()["macs_per_exit"]
    assert out["macs"]["data"] == [macs[0], macs[0]]
    mine = classify(server, PNGS[0], budget="0.6", max_exit="0")
    assert out["label"]["data"][0] == mine["label"] and out["class_id"]["data"][0] == mine["class_id"]
    assert out["expected_accuracy"]["data"][0] == pytest.approx(mine["expected_accuracy"])


def test_erde_top_k_and_min_accuracy_parameters(server) -> None:
    floor = classify(server, PNGS[0], budget="1.0")["expected_accuracy"] * 0.99
    doc = {"parameters": {"erde_top_k": 3, "erde_min_accuracy": floor},
           "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(PNGS[0])]}],
           "outputs": [{"name": "probabilities"}, {"name": "expected_accuracy"}]}
    out = {o["name"]: o for o in infer_json(server, doc).json()["outputs"]}
    assert out["probabilities"]["datatype"] == "BYTES" and out["probabilities"]["shape"] == [1, 3]
    mine = classify(server, PNGS[0], min_accuracy=str(floor))
    assert out["expected_accuracy"]["data"] == [pytest.approx(mine["expected_accuracy"])]
    assert mine["expected_accuracy"] >= floor


def _image(data: list | None = None, **fields) -> dict:
    return {"name": "image", "datatype": "BYTES", "shape": [1], "data": data or [b64(PNGS[0])], **fields}


def _doc(*inputs: dict, **fields) -> dict:
    return {"inputs": list(inputs) or [_image()], **fields}


BAD_JSON = {  # request -> status, a fragment of the error
    "bad base64": (_doc(_image(["not base64!"])), 400, "not a base64 string"),
    "image not an image": (_doc(_image([b64(b"hello")])), 415, "not a supported image"),
    "image as FP32": (_doc(_image(datatype="FP32")), 422, "datatype must be BYTES"),
    "shape and data disagree": (_doc(_image(shape=[2])), 422, "2 elements"),
    "shape of rank 2": (_doc(_image(shape=[1, 1])), 422, "shape must be [N]"),
    "no image input": (_doc({"name": "budget", "datatype": "FP32", "shape": [1], "data": [0.5]}), 422, "'image'"),
    "unknown input": (_doc(_image(), {"name": "x" * 500, "datatype": "FP32", "shape": [1], "data": [1]}), 422,
                      "at most once"),
    "no inputs": ({"inputs": []}, 422, "'image' input"),
    "too many images": (_doc(_image([b64(PNGS[0])] * 65, shape=[65])), 422, "at most 64 images"),
    "budget length": (_doc(_image(), {"name": "budget", "datatype": "FP32", "shape": [2], "data": [0.5, 0.5]}),
                      422, "2 budgets for 1 images"),
    "budget twice": (_doc(_image(), {"name": "budget", "datatype": "FP32", "shape": [1], "data": [0.5]},
                          parameters={"erde_budget": 0.5}), 422, "not both"),
    "budget out of range": (_doc(_image(), {"name": "budget", "datatype": "FP32", "shape": [1], "data": [0]}),
                            422, "budget"),
    "erde_budget 0": (_doc(parameters={"erde_budget": 0}), 422, "budget"),
    "erde_budget and erde_threshold": (_doc(parameters={"erde_budget": 0.5, "erde_threshold": 1}), 422,
                                       "either budget or threshold"),
    "erde_max_exit out of range": (_doc(parameters={"erde_max_exit": 3}), 422, "max_exit must be between 0 and 2"),
    "unknown erde_ parameter": (_doc(parameters={"erde_bugdet": 0.5}), 422, "known: erde_budget"),
    # on a tensor, ours were ignored: the request was served at the default budget
    "erde_budget on the image input": (_doc({**_image(), "parameters": {"erde_budget": 0.3}}), 422,
                                       "belong to the request's parameters"),
    "erde_top_k on an output": (_doc(outputs=[{"name": "probabilities", "parameters": {"erde_top_k": 2}}]), 422,
                                "erde_top_k belong to the request's parameters"),
    "parameter not a scalar": (_doc(parameters={"erde_budget": [0.5]}), 422, "must be a number"),
    "erde_top_k too large": (_doc(parameters={"erde_top_k": 100}), 422, "top_k must be between 1 and 4"),
    "classification on label": (_doc(outputs=[{"name": "label", "parameters": {"classification": 2}}]), 422,
                                "probabilities output only"),
    "classification 0": (_doc(outputs=[{"name": "probabilities", "parameters": {"classification": 0}}]), 422,
                         "top_k"),
    "unknown output": (_doc(outputs=[{"name": "logits"}]), 422, "each at most once"),
    "output named by a list": (_doc(outputs=[{"name": ["label"]}]), 422, "each at most once"),
    "input named by a list": (_doc({**_image(), "name": ["image"]}), 422, "at most once"),
    "binary_data_output not a bool": (_doc(parameters={"binary_data_output": "yes"}), 422, "binary_data_output"),
    "binary_data not a bool": (_doc(outputs=[{"name": "label", "parameters": {"binary_data": "yes"}}]), 422,
                               "binary_data"),
    "id not a string": (_doc(id=7), 422, "id must be a string"),
    "not an object": ([1, 2], 400, "JSON object"),
}


@pytest.mark.parametrize("doc, status, fragment", BAD_JSON.values(), ids=BAD_JSON.keys())
def test_bad_json_requests_are_refused_in_the_protocol_shape(server, doc, status, fragment) -> None:
    message = error_of(infer_json(server, doc), status)
    assert fragment in message and "x" * 100 not in message  # never echoes an unbounded client string


def _binary(header: dict, tail: bytes, header_length: int | None = None) -> tuple[bytes, dict]:
    raw = httpx.Request("POST", "/", json=header).content
    return raw + tail, {"Inference-Header-Content-Length": str(len(raw) if header_length is None else header_length)}


def _sized(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


BINARY_IMAGE = {"name": "image", "datatype": "BYTES", "shape": [1],
                "parameters": {"binary_data_size": 4 + len(PNGS[0])}}
BAD_BINARY = {  # body (alone, or with its Inference-Header-Content-Length) -> status, fragment
    "not JSON": (b"{nope", 400, "not valid JSON"),
    "header length past the body": (_binary(_doc(BINARY_IMAGE), _sized(PNGS[0]), 10**6), 400,
                                    "Inference-Header-Content-Length"),
    "tail longer than declared": (_binary(_doc(BINARY_IMAGE), _sized(PNGS[0]) + b"extra"), 400, "longer"),
    "size past the end": (_binary(_doc(BINARY_IMAGE), _sized(PNGS[0])[:-1]), 400, "past the end"),
    "fewer elements than the shape": (_binary(_doc({**BINARY_IMAGE, "shape": [2]}), _sized(PNGS[0])), 400,
                                      "fewer elements"),
    "data and binary_data_size": (_binary(_doc({**BINARY_IMAGE, "data": ["x"]}), _sized(PNGS[0])), 422,
                                  "not both"),
    "FP32 budget of the wrong size": (_binary(_doc(_image(), {"name": "budget", "datatype": "FP32", "shape": [1],
                                                              "parameters": {"binary_data_size": 3}}), b"\0\0\0"),
                                      400, "take 4 bytes"),
    "NaN budget": (_binary(_doc(_image(), {"name": "budget", "datatype": "FP32", "shape": [1],
                                           "parameters": {"binary_data_size": 4}}),
                           np.array([np.nan], "<f4").tobytes()), 422, "budget"),
}


@pytest.mark.parametrize("body, status, fragment", BAD_BINARY.values(), ids=BAD_BINARY.keys())
def test_bad_binary_requests_are_refused_in_the_protocol_shape(server, body, status, fragment) -> None:
    content, headers = body if isinstance(body, tuple) else (body, {})
    response = httpx.post(f"{server.url}/v2/models/toy/infer", content=content, headers=headers, timeout=30)
    assert fragment in error_of(response, status)


def test_binary_request_by_hand(server) -> None:
    """Two images and their budgets as binary data, outputs binary and JSON mixed (Triton's rules)."""
    tail = _sized(PNGS[0]) + _sized(PNGS[1]) + np.array([0.3, 0.3], "<f4").tobytes()
    header = {"inputs": [{**BINARY_IMAGE, "shape": [2], "parameters": {"binary_data_size": len(tail) - 8}},
                         {"name": "budget", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}],
              "parameters": {"binary_data_output": True},
              "outputs": [{"name": "exit"}, {"name": "label", "parameters": {"binary_data": False}}]}
    content, headers = _binary(header, tail)
    response = httpx.post(f"{server.url}/v2/models/toy/infer", content=content, headers=headers, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers["inference-header-content-length"])
    reply = httpx.Response(200, content=response.content[:length]).json()
    exit_out, label_out = reply["outputs"]
    assert exit_out["parameters"] == {"binary_data_size": 8} and "data" not in exit_out
    exits = np.frombuffer(response.content[length:], "<i4")
    assert len(response.content) == length + 8
    assert exits.tolist() == [classify(server, p, budget="0.3")["exit"] for p in PNGS[:2]]
    assert label_out["data"] == [classify(server, p, budget="0.3")["label"] for p in PNGS[:2]]


@pytest.mark.parametrize("bad_row", [1, 2])
def test_a_refused_row_is_named_by_its_place_in_the_request(server, bad_row) -> None:
    """Rows with different budgets go in separate infer calls; the error still names the request's row."""
    data = [b64(PNGS[0])] * 3
    data[bad_row] = b64(b"not an image")
    budgets = {"name": "budget", "datatype": "FP32", "shape": [3], "data": [0.5, 0.9, 0.5]}
    message = error_of(infer_json(server, _doc(_image(data, shape=[3]), budgets)), 415)
    assert message.startswith(f"image {bad_row}: ")


@pytest.mark.parametrize("path", ["/v2/models/nope/infer", "/v2/models/toy/versions/2/infer",
                                  "/v2/models/" + "x" * 300 + "/infer"])
def test_unknown_model_or_version_is_404(server, path) -> None:
    message = error_of(infer_json(server, _doc(), path=path), 404)
    assert "x" * 100 not in message
    assert error_of(httpx.get(f"{server.url}{path.removesuffix('/infer')}"), 404)


def test_too_large_is_413_whether_declared_or_streamed(server) -> None:
    big = _doc(_image([b64(b"\0" * 800_000)]))
    assert "larger than" in error_of(infer_json(server, big), 413)
    content = httpx.Request("POST", "/", json=big).content
    streamed = httpx.post(f"{server.url}/v2/models/toy/infer", timeout=30,
                          content=(content[i:i + 65536] for i in range(0, len(content), 65536)))
    assert "larger than" in error_of(streamed, 413)


def test_pixel_limits_hold_per_image_and_per_request(server) -> None:
    bomb = error_of(infer_json(server, _doc(_image([b64(images.pixel_bomb())]))), 413)
    assert "pixels" in bomb
    flat = images.encode(images.Image.new("L", (1500, 1500)))  # 2.25 M pixels in a few KB
    together = error_of(infer_json(server, _doc(_image([b64(flat)] * 2, shape=[2]))), 413)
    assert "together" in together


def test_requests_are_counted_under_v2_infer(server) -> None:
    ok = dict(model="toy", endpoint="v2_infer", code="200")
    missing = dict(model="unknown", endpoint="v2_infer", code="404")
    before_ok, before_missing = server.metric("erde_requests_total", **ok), server.metric("erde_requests_total",
                                                                                          **missing)
    assert infer_json(server, _doc()).status_code == 200
    assert infer_json(server, _doc(), path="/v2/models/nope/infer").status_code == 404
    eventually(lambda: server.metric("erde_requests_total", **ok) == before_ok + 1)
    eventually(lambda: server.metric("erde_requests_total", **missing) == before_missing + 1)
    assert "/v2/" not in httpx.get(f"{server.url}/metrics").text  # a label, never the raw path


def test_full_queue_is_503_with_retry_after(make_server) -> None:
    server = make_server(max_batch_size=1, queue_size=1)
    response = infer_json(server, _doc(_image([b64(PNGS[0])] * 2, shape=[2])))
    assert "queue is full" in error_of(response, 503) and response.headers["retry-after"] == "1"
    assert infer_json(server, _doc()).status_code == 200  # one row fits
