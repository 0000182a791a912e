"""Every bad input gets a JSON error with the right 4xx, and the server keeps serving."""

from __future__ import annotations

import base64
import gzip
import json

import httpx
import pytest

from bench.probes import exchange
from tests.service import images
from tests.service.conftest import eventually

PNG = images.png()
BAD_UPLOADS = {
    "empty file": (b"", 415, "empty_image"),
    "text named .png": (b"just some text, not an image\n" * 4, 415, "unsupported_image"),
    "truncated png": (PNG[: len(PNG) // 2], 415, "corrupt_image"),
    "truncated jpeg": (images.encode(images.noise(64), "JPEG")[:400], 415, "corrupt_image"),
    "1x1 image": (images.encode(images.noise(1)), 422, "image_too_small"),
    "pixel bomb 20000x20000": (images.pixel_bomb(), 413, "too_many_pixels"),
    "animated gif": (images.animated_gif(), 415, "animated_image"),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', 415, "unsupported_image"),
}
BAD_OPTIONS = {
    "budget 0": ({"budget": "0"}, 422, "budget"),
    "budget -1": ({"budget": "-1"}, 422, "budget"),
    "budget 1.5": ({"budget": "1.5"}, 422, "budget"),
    "budget nan": ({"budget": "nan"}, 422, "budget"),
    "budget abc": ({"budget": "abc"}, 422, "budget"),
    "budget and threshold": ({"budget": "0.5", "threshold": "0.2"}, 422, "either budget or threshold"),
    "threshold -0.1": ({"threshold": "-0.1"}, 422, "threshold"),
    "max_exit out of range": ({"max_exit": "3"}, 422, "max_exit must be between 0 and 2"),
    "max_exit negative": ({"max_exit": "-1"}, 422, "max_exit"),
    "unknown model": ({"model": "resnet-9000"}, 404, "unknown model"),
    "model with a path": ({"model": "../../etc/passwd"}, 422, "model"),
    "huge top_k": ({"top_k": "1000000"}, 422, "top_k must be between 1 and 4"),
    "unknown option": ({"bugdet": "0.5"}, 422, "bugdet"),
}


def assert_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"code", "message", "request_id"} and error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    assert "/tmp" not in error["message"] and "Traceback" not in error["message"]
    return error


def assert_still_serving(server) -> None:
    with server.client() as c:
        assert c.post("/classify", files={"image": ("ok.png", PNG, "image/png")}).status_code == 200


@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_bad_upload(server, case: str) -> None:
    data, status, code = BAD_UPLOADS[case]
    with server.client() as c:
        error = assert_error(c.post("/classify", files={"image": ("upload.png", data, "image/png")}), status)
    assert error["code"] == code
    assert_still_serving(server)


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_option(server, case: str) -> None:
    fields, status, message = BAD_OPTIONS[case]
    with server.client() as c:
        error = assert_error(c.post("/classify", data=fields, files={"image": ("a.png", PNG, "image/png")}), status)
        assert message in error["message"]
        raw = c.post("/classify", params=fields, content=PNG, headers={"content-type": "image/png"})
        assert_error(raw, status)  # the raw-body form checks the same options


def test_no_image_field(server) -> None:
    with server.client() as c:
        error = assert_error(c.post("/classify", data={"budget": "0.5"}, files={"other": ("a.txt", b"x")}), 422)
        assert error["code"] == "missing_image"
        error = assert_error(c.post("/classify", data={"image": "not a file"}, files={"x": ("a", b"1")}), 422)
        assert error["code"] == "missing_image"
        assert_error(c.post("/classify", content=b"{}", headers={"content-type": "application/json"}), 415)
        garbage = assert_error(c.post("/classify", content=b"--xx\r\ngarbage", headers={
            "content-type": "multipart/form-data; boundary=xx"}), 400)
        assert garbage["code"] == "malformed_multipart"
        two = [("image", ("a.png", PNG, "image/png")), ("image", ("b.png", PNG, "image/png"))]
        assert assert_error(c.post("/classify", files=two), 422)["code"] == "too_many_images"
    assert_still_serving(server)


def test_a_compressed_body_is_415_with_the_codings_accepted(server) -> None:
    """A client that gzips its upload (RFC 9110 allows it) is told the coding is the problem, on every work
    endpoint and in each protocol's shape, with Accept-Encoding naming what would do; read as it came, a
    gzipped form was 400 `malformed_multipart`."""
    form = httpx.Request("POST", "http://x/classify", files={"image": ("a.png", PNG, "image/png")})
    oip = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(PNG).decode()]}]}
    with server.client() as c:
        for encoding in ("gzip", "br", "GZIP"):
            for path, body, content_type in (
                    ("/classify", gzip.compress(form.read()), form.headers["content-type"]),
                    ("/classify/batch", gzip.compress(form.read()), form.headers["content-type"]),
                    ("/classify", gzip.compress(PNG), "image/png"),
                    ("/v2/models/toy/infer", gzip.compress(json.dumps(oip).encode()), "application/json")):
                r = c.post(path, content=body, headers={"content-type": content_type, "content-encoding": encoding})
                assert r.status_code == 415 and r.headers["accept-encoding"] == "identity", (path, r.text)
                if path.startswith("/v2"):
                    assert "compressed" in r.json()["error"]
                else:
                    assert assert_error(r, 415)["code"] == "unsupported_media_type"
        plain = c.post("/classify", files={"image": ("a.png", PNG, "image/png")},
                       headers={"content-encoding": "identity"})
        assert plain.status_code == 200, plain.text
    assert_still_serving(server)


def test_a_transfer_coding_other_than_chunked_is_501_on_every_protocol(server) -> None:
    """`Transfer-Encoding: gzip, chunked` (RFC 9112 section 6.1: 501 for a coding the server does not know):
    the parser reads the chunked framing only, and the gzipped image reached the decoder as it came, to be
    answered 415 "not a supported image". The same body chunked alone is served."""
    port = int(server.url.rsplit(":", 1)[1])
    oip = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(PNG).decode()]}]}
    for path, body, content_type in (("/classify", PNG, "image/png"),
                                     ("/v2/models/toy/infer", json.dumps(oip).encode(), "application/json")):
        for coding, data in ((b"gzip, chunked", gzip.compress(body)), (b"chunked", body)):
            reply = exchange(port, f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                             .encode() + b"Transfer-Encoding: " + coding + b"\r\n\r\n"
                             + b"%x\r\n" % len(data) + data + b"\r\n0\r\n\r\n")
            if coding == b"chunked":
                assert reply.status == 200, (path, reply)
                continue
            assert reply.status == 501, (path, reply)
            error = json.loads(reply.body)["error"]
            message = error if path.startswith("/v2") else error["code"]
            assert "transfer" in message, (path, reply)
    assert_still_serving(server)


def test_upload_over_the_byte_limit_is_refused_while_streaming(server) -> None:
    big = PNG + b"\0" * (2 * 1024 * 1024)
    with server.client() as c:
        assert_error(c.post("/classify", files={"image": ("big.png", big, "image/png")}), 413)

        def chunks():  # no Content-Length: only counting while streaming can catch it
            for _ in range(64):
                yield b"\0" * 65536

        response = c.post("/classify", content=chunks(), headers={"content-type": "image/png"})
        assert_error(response, 413)
    assert_still_serving(server)


def test_batch_names_the_bad_image_and_caps_the_count(server) -> None:
    with server.client() as c:
        files = [("image", ("a.png", PNG, "image/png")), ("image", ("b.png", b"nope", "image/png"))]
        error = assert_error(c.post("/classify/batch", files=files), 415)
        assert error["message"].startswith("image 1:")
        many = [("image", (f"{i}.png", PNG, "image/png")) for i in range(65)]
        assert "at most 64" in assert_error(c.post("/classify/batch", files=many), 422)["message"]
    assert_still_serving(server)


def test_rejections_are_counted_with_bounded_labels(server) -> None:
    before = server.metric("erde_rejected_total", reason="unknown_model")
    with server.client() as c:
        c.post("/classify", data={"model": "no-such-model"}, files={"image": ("a.png", PNG, "image/png")})
    eventually(lambda: server.metric("erde_rejected_total", reason="unknown_model") == before + 1)
    assert 'model="no-such-model"' not in server.client().get("/metrics").text
