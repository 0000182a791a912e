"""A lean multipart/form-data parser for bodies already in memory (RFC 7578).

Why not Starlette's `request.form()`: for the small uploads this service takes, its streaming
parser, spooled temporary files and UploadFile objects cost more than the rest of a request
(measured: a constant-answer endpoint served 2-3x more requests/s reading the body alone than
parsing it with `form()`). The body is bounded by the upload limit before it gets here, so
splitting it with `bytes` operations is both faster and simpler.

Every header it parses is length-checked before any regex runs on it, and the parameter regex runs
in linear time with constant extra memory whatever it is given (issue 11: the former pattern cost
the regex engine about 165 bytes per character of a quoted value, 2 GB for one request header).
Names and file names are capped, and errors never echo what was sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

from service.errors import BadOptions, ServiceError, UnsupportedImage

MAX_SIMPLE_VALUE = 128  # longer values are left to the full parse

MAX_CONTENT_TYPE = 1024  # characters of the request's Content-Type (a boundary is at most 70)
MAX_PART_HEAD = 4096  # bytes of one part's header block
MAX_NAME = 128  # characters of a field name
MAX_FILENAME = 255  # characters of a file name (what file systems allow)
MAX_FIELDS = 16  # option fields a multipart request may carry besides its images

# A quoted value unrolled and possessive (`*+`, Python 3.11): no alternation inside a repetition and
# no backtracking state, so the regex engine needs constant memory whatever the value's length.
_PARAM = re.compile(r';\s*([A-Za-z0-9_*.-]+)\s*=\s*("[^"\\]*+(?:\\.[^"\\]*+)*+"|[^;\s]*)')


class MalformedMultipart(ServiceError):
    status, code = 400, "malformed_multipart"


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None  # set for file parts
    content_type: str | None
    data: bytes


def header_params(value: str) -> tuple[str, dict[str, str]]:
    """'form-data; name="a"; filename="b.png"' -> ('form-data', {'name': 'a', 'filename': 'b.png'}).

    Callers bound `value` first: the regex is linear, the caps keep its input small too."""
    kind, _, rest = value.partition(";")
    params = {}
    for key, raw in _PARAM.findall(";" + rest):
        params[key.lower()] = raw[1:-1].replace('\\"', '"').replace("\\\\", "\\") if raw.startswith('"') else raw
    return kind.strip().lower(), params


def boundary_of(content_type: str) -> bytes:
    if len(content_type) > MAX_CONTENT_TYPE:
        raise MalformedMultipart(f"the Content-Type header is longer than {MAX_CONTENT_TYPE} characters")
    kind, params = header_params(content_type)
    boundary = params.get("boundary", "")
    if kind != "multipart/form-data" or not 1 <= len(boundary) <= 70:
        raise MalformedMultipart("multipart/form-data needs a boundary of 1 to 70 characters")
    return boundary.encode("latin-1")


def _part(section: bytes) -> Part:
    head, sep, data = section.partition(b"\r\n\r\n")
    if not sep:
        raise MalformedMultipart("a multipart part has no header/body separator")
    if len(head) > MAX_PART_HEAD:
        raise MalformedMultipart(f"a multipart part's headers are longer than {MAX_PART_HEAD} bytes")
    headers = {}
    for line in head.decode("utf-8", errors="replace").split("\r\n")[1:]:  # [0]: the boundary line's rest
        key, colon, value = line.partition(":")
        if colon:
            headers[key.strip().lower()] = value.strip()
    kind, params = header_params(headers.get("content-disposition", ""))
    if kind != "form-data" or "name" not in params:
        raise MalformedMultipart("a multipart part lacks 'Content-Disposition: form-data; name=...'")
    name, filename = params["name"], params.get("filename")
    if len(name) > MAX_NAME or (filename is not None and len(filename) > MAX_FILENAME):
        raise MalformedMultipart(f"a multipart field name is longer than {MAX_NAME} characters "
                                 f"or a file name longer than {MAX_FILENAME}")
    return Part(name, filename, headers.get("content-type"), data)


def parse_multipart(body: bytes, boundary: bytes, max_parts: int) -> list[Part]:
    """Every part of a complete multipart body; refuses malformed bodies and too many parts."""
    # [0] is the preamble, [-1] the closing "--" and epilogue; split no further than the part limit
    # allows, so a body of many tiny parts never becomes many objects.
    sections = (b"\r\n" + body).split(b"\r\n--" + boundary, max_parts + 1)
    if len(sections) < 2 or not sections[-1].startswith(b"--"):
        if len(sections) == max_parts + 2:
            raise MalformedMultipart(f"too many parts: at most {max_parts}")
        raise MalformedMultipart("the multipart body is malformed or incomplete (no closing boundary)")
    return [_part(section) for section in sections[1:-1]]


ABSENT = ""  # `simple_field`: the form does not name the field


def simple_field(body: bytes, boundary: bytes, name: str) -> str | None:
    """The value of text field `name` when the body holds its name once, in a part written as client
    libraries write a text field (`Content-Disposition: form-data; name="..."`, no other header, a
    short non-empty ASCII value); ABSENT when the name is nowhere in the body; None when unsure, and
    then only `split_upload` can tell. Admission asks this of a refused request's form (does it name
    another model, or more time?) without parsing the whole form, a fifth of a refusal's cost under
    overload."""
    key = name.encode()
    count = body.count(key)
    if count == 0:
        return ABSENT
    head = b'\r\nContent-Disposition: form-data; name="' + key + b'"\r\n\r\n'
    start = body.find(head)
    if count != 1 or start < 0 or not body[:start].endswith(b"--" + boundary):
        return None
    start += len(head)
    end = body.find(b"\r\n--" + boundary, start)
    value = body[start:end] if end > start else b""
    if not value or len(value) > MAX_SIMPLE_VALUE or not value.isascii():
        return None
    return value.decode("ascii")


def query_fields(query_string: bytes) -> dict[str, str]:
    """A request's query options, read as the framework reads them (`parse_qsl`, blank values kept): a
    name given twice has its last value. Admission and the pipeline both read the query here, so that a
    request is weighed against the queue of the model that will serve it (`?model=a&model=b` was weighed
    against `a`'s and served by `b`)."""
    return dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)) if query_string else {}


def split_upload(content_type: str, body: bytes, query_string: bytes,
                 max_images: int) -> tuple[list[bytes], dict[str, str]]:
    """Images and option fields of a classify request: a multipart form's file parts named `image` and
    its text fields over the query's (`query_fields`), or a raw image/* body with the query's options.
    The one place the options (the model among them) are read from a request, by admission and by the
    pipeline alike; a field given twice has its last value, as in the query."""
    fields = query_fields(query_string)
    if content_type.startswith("image/"):
        return [body], fields
    if not content_type.startswith("multipart/form-data"):
        raise UnsupportedImage("send multipart/form-data with an 'image' file field, or a raw image/* body",
                               code="unsupported_media_type")
    images = []
    for part in parse_multipart(body, boundary_of(content_type), max_parts=max_images + MAX_FIELDS):
        if part.name != "image":
            fields[part.name] = part.data.decode("utf-8", errors="replace") if part.filename is None else ""
        elif part.filename is not None:
            images.append(part.data)
        else:
            raise BadOptions("image: must be a file part, not a text field", code="missing_image")
    if not images:
        raise BadOptions("image: a file field named 'image' is required", code="missing_image")
    if len(images) > max_images:
        raise BadOptions(f"at most {max_images} images per request", code="too_many_images")
    return images, fields
