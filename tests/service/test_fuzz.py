"""No bytes a client sends give a 5xx (issue 20, findings 3 and 5): every numeric and string field of
both protocols, fuzzed with Unicode digits, signs, whitespace, huge values and exponents, against
the real app. A 5xx is counted by the alert on `erde_requests_total{code=~"5.."}`, so a client
that can make one at will can page whoever runs the service.

The one 5xx a client may ask for is its own deadline: a `timeout_ms` it sets and the service cannot
meet is refused at once (503 `overloaded`, issue 23) or, if admitted and then missed, 504
`deadline_exceeded`, by design (README, Errors).
"""

from __future__ import annotations

import base64

import orjson

from bench.probes import exchange
from service.api.oip import MAX_ID
from service.numbers import parse_decimal, parse_int
from tests.service import images
from tests.service.conftest import Server
from tests.service.contained import contained

PNG = images.png()
B64 = base64.b64encode(PNG).decode()
NUMBERS = [  # what a client may put where a number goes
    "1", "0", "-1", "+1", "0.5", ".5", "5.", "1e3", "1E-3", "1e999", "-1e999", "1e-999", "nan", "NaN", "inf",
    "-inf", "Infinity", "0x10", "1_0", "1,5", " 1", "1 ", "\t1", "1\n", "", " ", "\x00", "1\x00",
    "³", "²", "١٢", "１", "٣.٥", "½", "Ⅻ", "9" * 20, "9" * 5000, "1" + "0" * 400 + ".5", "0" * 5000 + "1",
    "-0", "00", "1e", "e1", "--1", "1..2", "true", "null", "[]", "{}", "\"1\"", "\ud7ff", "1" * 100_000,
]
JSON_NUMBERS = [b"0", b"1", b"-1", b"1.5", b"1e308", b"-1e308", b"1e-308", b"18446744073709551616", b"9" * 5000,
                b"1E400", b"true", b"false", b"null", b"[]", b"{}", b"[1]", b'"1"', b'"\\u00b3"', b'"\\u0661"']
OPTIONS = ["budget", "threshold", "min_accuracy", "max_exit", "top_k", "timeout_ms", "model"]


def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def no_5xx(reply, where: str) -> None:
    if reply.status_code == 504 and "timeout_ms" in where:  # the client's own deadline (module docstring)
        assert "deadline" in reply.text, reply.text
        return
    if reply.status_code == 503 and "timeout_ms" in where:  # a deadline too short to meet, refused at once
        assert "allow more with timeout_ms" in reply.text and reply.headers["retry-after"], reply.text
        return
    assert reply.status_code < 500, f"{where}: {reply.status_code} {reply.text[:300]}"
    if reply.status_code >= 400:
        assert reply.headers["content-type"].startswith("application/json"), where


def test_the_number_parser_takes_ascii_digits_only() -> None:
    assert [parse_int(v) for v in ("0", "42", "007", "9" * 18)] == [0, 42, 7, int("9" * 18)]
    for value in ("", "-1", "+1", " 1", "1 ", "1_0", "³", "١٢", "１", "9" * 19, "1.0", "0x1", b"\xb2"):
        assert parse_int(value) is None, value
    assert [parse_decimal(v) for v in ("0.5", "-1", ".5", "5.", "1e-3", "+2E2")] == [0.5, -1.0, 0.5, 5.0, 0.001, 200.0]
    for value in ("nan", "inf", "1e999", "٣.٥", "1_0", " 1", "1,5", "1e", "1" * 65, "0x1"):
        assert parse_decimal(value) is None, value


def test_every_classify_option_fuzzed_in_form_and_query(server: Server) -> None:
    before = server.metric("erde_requests_total", code="500")

    def fuzz() -> None:
        with server.client() as c:
            for name in OPTIONS:
                for value in NUMBERS:
                    form = c.post("/classify", data={name: value}, files={"image": ("x.png", PNG, "image/png")})
                    no_5xx(form, f"form {name}={value[:20]!r}")
                    query = c.post("/classify", params={name: value[:20_000]}, content=PNG,
                                   headers={"Content-Type": "image/png"})
                    no_5xx(query, f"query {name}={value[:20]!r}")

    contained(server, fuzz, seconds=120)
    assert server.metric("erde_requests_total", code="500") == before


def infer(c, header: dict | bytes, tail: bytes = b"", **headers: str):
    body = header if isinstance(header, bytes) else orjson.dumps(header)
    if tail:
        headers["Inference-Header-Content-Length"] = str(len(body))
    return c.post("/v2/models/toy/infer", content=body + tail, headers=headers)


def image_input(**extra) -> dict:
    return {"name": "image", "datatype": "BYTES", "shape": [1], "data": [B64], **extra}


def oip_cases() -> list[tuple[str, bytes]]:
    """(where, JSON body) for every numeric and string field of an infer request."""
    cases = []
    image = orjson.dumps(image_input()).decode()
    for value in JSON_NUMBERS + [orjson.dumps(v) for v in NUMBERS]:
        text = value.decode()
        for option in ("budget", "threshold", "min_accuracy", "max_exit", "top_k", "timeout_ms"):
            cases.append((f"erde_{option}={text[:20]}", f'{{"parameters": {{"erde_{option}": {text}}}, '
                                                        f'"inputs": [{image}]}}'))
        fields = {
            "shape": f'{{"name": "image", "datatype": "BYTES", "shape": [{text}], "data": ["{B64}"]}}',
            "shape list": f'{{"name": "image", "datatype": "BYTES", "shape": {text}, "data": ["{B64}"]}}',
            "data element": f'{{"name": "image", "datatype": "BYTES", "shape": [1], "data": [{text}]}}',
            "datatype": f'{{"name": "image", "datatype": {text}, "shape": [1], "data": ["{B64}"]}}',
            "name": f'{{"name": {text}, "datatype": "BYTES", "shape": [1], "data": ["{B64}"]}}',
            "binary_data_size": f'{{"name": "image", "datatype": "BYTES", "shape": [1], '
                                f'"parameters": {{"binary_data_size": {text}}}}}',
            "budget input": f'{{"name": "budget", "datatype": "FP32", "shape": [1], "data": [{text}]}}',
        }
        for where, spec in fields.items():
            inputs = spec if where != "budget input" else f'{image}, {spec}'
            cases.append((f"{where}={text[:20]}", f'{{"inputs": [{inputs}]}}'))
        outputs = f'[{{"name": "probabilities", "parameters": {{"classification": {text}}}}}]'
        cases.append((f"classification={text[:20]}", f'{{"outputs": {outputs}, "inputs": [{image}]}}'))
        cases.append((f"output name={text[:20]}", f'{{"outputs": [{{"name": {text}}}], "inputs": [{image}]}}'))
        cases.append((f"id={text[:20]}", f'{{"id": {text}, "inputs": [{image}]}}'))
        cases.append((f"binary_data_output={text[:20]}", f'{{"parameters": {{"binary_data_output": {text}}}, '
                                                        f'"inputs": [{image}]}}'))
    return [(where, body.encode()) for where, body in cases]


def test_every_oip_field_fuzzed(server: Server) -> None:
    before = server.metric("erde_requests_total", code="500")

    def fuzz() -> None:
        with server.client() as c:
            for where, body in oip_cases():
                no_5xx(infer(c, body), where)
            for name in ("toy", "tóy", "t" * 65, "²", "..", "%00"):
                no_5xx(c.get(f"/v2/models/{name}"), f"model name {name!r}")
                no_5xx(c.get(f"/v2/models/toy/versions/{name}"), f"version {name!r}")

    contained(server, fuzz, seconds=120)
    assert server.metric("erde_requests_total", code="500") == before


RAW = [b"\xb2", b"\xb3", b"\xd9\xa1", b"1\xb2", b"\xff" * 50, b"+5", b"-0", b" 5", b"5 ", b"0x5", b"5\x00"]


def test_numbers_in_headers_fuzzed_as_raw_bytes(server: Server) -> None:
    """Bytes no client library sends: the binary extension's header length (Latin-1 "²" once made a
    500) and Content-Length, each as every fuzz value in UTF-8 and as raw bytes."""
    body = orjson.dumps({"inputs": [image_input()]})
    values = RAW + [v.encode()[:8000] for v in NUMBERS if "\n" not in v]

    def fuzz() -> None:
        for value in values:
            oip = (b"POST /v2/models/toy/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nInference-Header-Content-Length: "
                   + value + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            classify = (b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                        b"Content-Length: " + value + b"\r\n\r\n" + PNG)
            for payload in (oip, classify):
                reply = exchange(port_of(server), payload, timeout=15)
                assert reply.status is not None and reply.status < 500, (payload[:150], reply.head)

    contained(server, fuzz, seconds=120)


def test_the_oip_id_is_echoed_up_to_its_cap_and_refused_above(server: Server) -> None:
    """The review's 7 MB id came back in a 7 MB reply."""
    with server.client() as c:
        at_cap = infer(c, {"id": "i" * MAX_ID, "inputs": [image_input()]})
        over = contained(server, lambda: infer(c, {"id": "i" * 900_000, "inputs": [image_input()]}), seconds=2.0)
    assert at_cap.status_code == 200 and at_cap.json()["id"] == "i" * MAX_ID
    assert over.status_code == 422 and len(over.content) < 200 and "iiii" not in over.text, over.text
