"""The multipart parser against bodies real clients encode, and against malformed ones."""

from __future__ import annotations

import httpx
import pytest

from service.edge.multipart import MalformedMultipart, boundary_of, parse_multipart

TRICKY = b"\r\n--not-the-boundary\r\n\r\n\x00\xff--\r\n"  # CRLFs, dashes and binary inside a file


def encoded(data: dict, files: list) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/", data=data, files=files)
    return request.read(), request.headers["content-type"]


def test_parses_what_httpx_sends() -> None:
    body, content_type = encoded({"budget": "0.5", "model": "fashion-mnist"},
                                 [("image", ("a.png", TRICKY, "image/png")), ("image", ("b é.png", b"2", "image/png"))])
    parts = parse_multipart(body, boundary_of(content_type), max_parts=8)
    assert [(p.name, p.filename, p.data) for p in parts] == [
        ("budget", None, b"0.5"), ("model", None, b"fashion-mnist"),
        ("image", "a.png", TRICKY), ("image", "b é.png", b"2")]
    assert parts[2].content_type == "image/png"


def test_curl_style_body_with_preamble_epilogue_and_quoted_boundary() -> None:
    body = (b"preamble\r\n--a'b(c)\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            b"Content-Type: image/png\r\n\r\nPNGDATA\r\n--a'b(c)\r\nContent-Disposition: form-data; name=budget\r\n\r\n"
            b"0.3\r\n--a'b(c)--\r\nepilogue")
    parts = parse_multipart(body, boundary_of("multipart/form-data; boundary=\"a'b(c)\""), max_parts=4)
    assert [(p.name, p.filename, p.data) for p in parts] == [("image", "x.png", b"PNGDATA"), ("budget", None, b"0.3")]


@pytest.mark.parametrize(("body", "message"), [
    (b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n", "closing boundary"),
    (b"no boundary at all", "closing boundary"),
    (b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n1\r\n--b--", "separator"),
    (b"--b\r\nContent-Disposition: attachment\r\n\r\n1\r\n--b--", "form-data"),
    (b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--b\r\nContent-Disposition: form-data; "
     b"name=b\r\n\r\n2\r\n--b--", "too many parts"),
])
def test_malformed_bodies_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(MalformedMultipart, match=message):
        parse_multipart(body, b"b", max_parts=1)


@pytest.mark.parametrize("content_type", ["multipart/form-data", "multipart/form-data; boundary=",
                                          "multipart/mixed; boundary=x", "multipart/form-data; boundary=" + "x" * 71])
def test_bad_boundaries(content_type: str) -> None:
    with pytest.raises(MalformedMultipart):
        boundary_of(content_type)
