"""Request accounting as one pure ASGI middleware: body limit while streaming, in-flight count,
request metrics, and one structured access-log line per request."""

from __future__ import annotations

import logging
import time

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import PayloadTooLarge, error_body

access_log = logging.getLogger("erde.access")
ENDPOINTS = {"/classify": "classify", "/classify/batch": "classify_batch"}


class RequestAccounting:
    def __init__(self, app: ASGIApp, runtime, max_body: int, log_requests: bool = True) -> None:
        self.app = app
        self.runtime = runtime
        self.max_body = max_body
        self.log_requests = log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = ENDPOINTS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.runtime.inflight += 1
        metrics.set_inflight(1)
        try:
            declared = _content_length(scope)
            if declared is not None and declared > self.max_body:
                state["erde_error"] = "too_large"
                message = self._too_large_message()  # in the Open Inference Protocol's shape on its path
                body = {"error": message} if endpoint == "v2_infer" else error_body("too_large", message)
                await _send_json(send_status, 413, body)
            else:
                await self.app(scope, self._limited(receive), send_status)
        finally:
            self.runtime.inflight -= 1
            metrics.set_inflight(-1)
            self._account(endpoint, status, state, time.perf_counter() - started, scope)

    def _too_large_message(self) -> str:
        return f"the request body is larger than {self.max_body} bytes"

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise PayloadTooLarge(self._too_large_message(), reason="too_large")
            return message

        return limited

    def _account(self, endpoint: str, status: int, state: dict, seconds: float, scope: Scope) -> None:
        model = state.get("erde_model", "unknown")
        metrics.observe_request(model, endpoint, status, seconds)
        if status >= 400:
            metrics.observe_rejected(model, state.get("erde_error", "error"))
        if self.log_requests:
            access_log.info(orjson.dumps({
                "method": scope.get("method"), "path": scope.get("path"), "code": status, "model": model,
                "exit": state.get("erde_exits"), "budget": state.get("erde_budget"),
                "threshold": state.get("erde_threshold"), "latency_ms": round(seconds * 1000, 3),
                "error": state.get("erde_error"),
            }).decode())


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_json(send: Send, status: int, body: dict) -> None:
    payload = orjson.dumps(body)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})
