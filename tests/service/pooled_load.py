"""A pool of kept-alive connections shared by many concurrent clients, as a load balancer or a
client library (`httpx.AsyncClient`) talks to a server: the head and the body of each request go in
separate writes, and a connection the server closes is replaced in the pool."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import httpx

from tests.service import images

PNG = images.png()


class PooledLoad:
    """`clients` coroutines sharing one `httpx.AsyncClient`, on their own thread and event loop, until
    stopped. Each outcome is a status, or the class name of the error when no reply was read."""

    def __init__(self, url: str, clients: int = 32, fields: dict[str, str] | None = None) -> None:
        self.url, self.clients, self.fields = url, clients, fields or {}
        self.outcomes: list[tuple[int | str, str | None]] = []  # (status or error, Retry-After)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> PooledLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        async with httpx.AsyncClient(base_url=self.url, timeout=30, limits=limits) as client:
            await asyncio.gather(*(self._client(client) for _ in range(self.clients)))

    async def _client(self, client: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            try:
                reply = await client.post("/classify", data=self.fields, files={"image": ("a.png", PNG, "image/png")})
            except (httpx.ConnectError, httpx.ConnectTimeout):  # nothing sent: the server is gone
                await asyncio.sleep(0.05)
                continue
            except httpx.HTTPError as exc:
                self.outcomes.append((type(exc).__name__, None))
                continue
            self.outcomes.append((reply.status_code, reply.headers.get("retry-after")))

    def wait_for(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < count:
            assert time.monotonic() < deadline, f"only {len(self.outcomes)} of {count} requests answered"
            time.sleep(0.02)

    def summary(self) -> Counter:
        return Counter(status for status, _ in self.outcomes)

    def unanswered_or_dishonest(self) -> list[tuple[int | str, str | None]]:
        """Requests with no reply read, and replies that are neither 200 nor a 503 with Retry-After."""
        return [(s, r) for s, r in self.outcomes if s != 200 and not (s == 503 and r)]
