"""HEAD wherever GET works (RFC 9110 section 9.3.2): a HEAD request is routed as a GET, and the
HTTP server (uvicorn, which still sees HEAD) sends the reply's status and headers without its body."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class HeadAsGet:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}  # a copy: the server's own scope keeps HEAD
        await self.app(scope, receive, send)
