"""The multipart parser against bodies real clients encode, and against malformed ones."""

from __future__ import annotations

import httpx
import pytest
from starlette.datastructures import QueryParams

from service.edge.multipart import (
    ABSENT,
    MalformedMultipart,
    boundary_of,
    parse_multipart,
    query_fields,
    simple_field,
    split_upload,
)

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


def full_parse(body: bytes, content_type: str, name: str) -> str:
    fields = split_upload(content_type, body, b"", max_images=4)[1]
    return fields.get(name, ABSENT)


@pytest.mark.parametrize("data", [
    {"model": "fashion-mnist-teacher", "budget": "0.5"},
    {"timeout_ms": "2500"},
    {"budget": "0.25"},
    {"model": "other", "timeout_ms": "10", "top_k": "2"},
])
def test_a_simple_field_reads_what_the_whole_parse_reads_from_real_clients_bodies(data: dict) -> None:
    body, content_type = encoded(data, [("image", ("a.png", TRICKY, "image/png"))])
    for name in ("model", "timeout_ms"):
        assert simple_field(body, boundary_of(content_type), name) == full_parse(body, content_type, name)


@pytest.mark.parametrize("part", [
    b'Content-Disposition: form-data; name=model\r\n\r\nother',  # unquoted, as a hand-written client may
    b'Content-Disposition: form-data; name="model"\r\nContent-Type: text/plain\r\n\r\nother',  # another header
    b'content-disposition: form-data; name="model"\r\n\r\nother',  # other case
    b'Content-Disposition: form-data; name="model"\r\n\r\n',  # empty
])
def test_a_field_in_any_other_shape_is_left_to_the_whole_parse(part: bytes) -> None:
    image = b'Content-Disposition: form-data; name="image"; filename="a"\r\n\r\nx'
    body = b"--b\r\n" + part + b"\r\n--b\r\n" + image + b"\r\n--b--"
    assert simple_field(body, b"b", "model") is None


def test_a_field_named_twice_or_a_name_inside_the_image_is_left_to_the_whole_parse() -> None:
    twice, content_type = encoded({"model": ["a", "b"]}, [("image", ("a.png", b"x", "image/png"))])
    assert simple_field(twice, boundary_of(content_type), "model") is None
    inside, content_type = encoded({"model": "a"}, [("image", ("a.png", b'..name="model"..', "image/png"))])
    assert simple_field(inside, boundary_of(content_type), "model") is None
    absent, content_type = encoded({"budget": "1"}, [("image", ("a.png", b"x", "image/png"))])
    assert simple_field(absent, boundary_of(content_type), "model") == ABSENT


@pytest.mark.parametrize("query", [
    b"model=a&model=b", b"model=&budget=0.5", b"model", b"budget=0.5&timeout_ms=10&budget=0.25",
    b"model=fashion%2Dmnist+x&top_k=%32", b"a=1&&b=2", b"model=%C3%A9&model=%FF",
])
def test_the_query_is_read_as_the_framework_reads_it(query: bytes) -> None:
    """Admission reads the query before the framework exists for the request; a name given twice (the last
    wins), a blank value and percent-escapes must come out as they do in the framework's `query_params`."""
    assert query_fields(query) == dict(QueryParams(query))
    body, content_type = encoded({}, [("image", ("a.png", TRICKY, "image/png"))])
    assert split_upload(content_type, body, query, max_images=4)[1] == dict(QueryParams(query))
