"""What one request did, as one typed record: the pipeline and the error handlers fill it in, the
accounting middleware reads it once the reply is sent (metrics and the access-log line).

It lives in the ASGI scope's per-request `state` (uvicorn gives every request its own copy), so
the HTTP protocol, the middleware and the handlers reach the same record without a global.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Scope

from service.endpoints import OTHER, Endpoint

UNKNOWN_MODEL = "unknown"  # the model label when no served model answered
MAX_REQUEST_ID = 64  # characters of a client's X-Request-ID that is taken as is
_KEY = "erde"
_PREFIX = secrets.token_hex(4)  # this process's
_COUNTER = itertools.count()


@dataclass(slots=True)
class RequestRecord:
    model: str = UNKNOWN_MODEL  # served model that took the request (a bounded label)
    budget: float | None = None  # budget and θ the request was answered under
    threshold: float | None = None
    exits: int | list[int] | None = None  # exit of each image
    reason: str | None = None  # bounded erde_rejected_total reason of an error reply
    status: int | None = None  # the status the client got, when not the one the app sent (408 read timeout)
    sent: int | None = None  # the status the app sent, once it has
    admitted: bool = False  # admission already passed it (in the HTTP protocol, from its head)
    reserved: Any = None  # the model worker holding a row for it until its rows are queued (engine/worker.py)
    request_id: str = ""  # echoed in X-Request-ID, the access-log line and every error body
    endpoint: Endpoint = OTHER  # what the path is (service/endpoints.py), matched once by the accounting
    path_params: dict[str, str] = field(default_factory=dict)  # its parameters: the OIP path's model `name`


def request_id(sent: bytes | None) -> str:
    """The client's X-Request-ID when it is short and printable ASCII (so that it can be logged and
    echoed safely), else one made here: 16 hex digits, a random prefix per process and a counter, so
    unique within a process and across them with overwhelming probability. (It names a request, it
    guards nothing: a fresh random id per request cost 4% of the event loop under overload.)"""
    if sent is not None and 0 < len(sent) <= MAX_REQUEST_ID and all(0x21 <= b <= 0x7E for b in sent):
        return sent.decode("ascii")
    return f"{_PREFIX}{next(_COUNTER) & 0xFFFFFFFF:08x}"


def record_of(scope: Scope) -> RequestRecord:
    """The request's record, made on first use."""
    state = scope.setdefault("state", {})
    record = state.get(_KEY)
    if record is None:
        record = state[_KEY] = RequestRecord()
    return record
