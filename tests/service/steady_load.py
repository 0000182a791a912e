"""Steady load for the fault tests: client threads that POST real images until told to stop and
record how every request ended. A client waits out Retry-After after a 503, as well-behaved ones do,
unless told to retry at once (an impatient client, or a balancer's health-blind retries)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from tests.service import images

PNG = images.png()


@dataclass
class Outcome:
    status: int | None  # None: no reply
    error: str | None  # the exception's class name when there was no reply
    seconds: float
    version: str | None = None
    retry_after: str | None = None


@dataclass
class SteadyLoad:
    url: str
    clients: int = 4
    timeout: float = 30.0
    fields: dict[str, str] = field(default_factory=dict)
    honour_retry_after: bool = True
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)

    def _client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    reply = client.post("/classify", data=self.fields, files={"image": ("a.png", PNG, "image/png")})
                except (httpx.ConnectError, httpx.ConnectTimeout):  # nothing sent: the server is gone or not there yet
                    time.sleep(0.05)
                    continue
                except httpx.HTTPError as exc:
                    self._record(Outcome(None, type(exc).__name__, time.monotonic() - started))
                    continue
                version = reply.json().get("version") if reply.status_code == 200 else None
                self._record(Outcome(reply.status_code, None, time.monotonic() - started, version,
                                     reply.headers.get("retry-after")))
                if reply.status_code == 503 and self.honour_retry_after:
                    self._stop.wait(float(reply.headers.get("retry-after", "1")))

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def summary(self) -> Counter:
        with self._lock:
            return Counter(o.status if o.status is not None else o.error for o in self.outcomes)

    def unanswered(self) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.status is None]

    def dishonest(self) -> list[Outcome]:
        """Refusals without Retry-After, and anything that is neither an answer nor an honest refusal."""
        with self._lock:
            return [o for o in self.outcomes if o.status is not None and o.status != 200
                    and not (o.status in (503, 504) and o.retry_after)]

    def wait_for(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count() < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.count()} of {count} requests answered in {timeout} s")
            time.sleep(0.02)
