"""Real servers for the HTTP tests: `python -m service` under uvicorn on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from erde.export import export_run

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            # The second one skips the drain, once the first has started it: sent at once, both were often
            # pending together, taken as one, and every test's server drained a whole second to stop.
            deadline = time.monotonic() + 1.0
            while "draining" not in self.log.read_text() and time.monotonic() < deadline and self.proc.poll() is None:
                time.sleep(0.01)
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include `labels`, read from /metrics."""
        total = 0.0
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total


def eventually(check, timeout: float = 10.0) -> None:
    """Request metrics and the access log are written just after the reply is sent: poll for them."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def start_server(store: Path, log_dir: Path, slow_batch_ms: float = 0, slow_loop_ms: float = 0,
                 stall_period_ms: float = 10, **settings: object) -> Server:
    """`python -m service` with ERDE_* `settings`; with `slow_batch_ms`, the same service whose every
    batch takes that much longer, with `slow_loop_ms` one whose event loop stalls that long every
    `stall_period_ms` (0: at every turn) (bench/slow_service.py)."""
    port = free_port()
    env = {**os.environ, "ERDE_STORE": str(store), "ERDE_HOST": "127.0.0.1", "ERDE_PORT": str(port),
           "ERDE_DEFAULT_MODEL": "toy", "PYTHONUNBUFFERED": "1", "SLOW_BATCH_MS": str(slow_batch_ms),
           "SLOW_LOOP_MS": str(slow_loop_ms), "STALL_PERIOD_MS": str(stall_period_ms)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update({f"ERDE_{k.upper()}": str(v) for k, v in settings.items()})
    module = "bench.slow_service" if slow_batch_ms or slow_loop_ms else "service"
    return launch(["-m", module], env, port, log_dir / f"server-{port}.log")


def launch(args: list[str], env: dict[str, str], port: int, log: Path) -> Server:
    """Run `python <args>` as a server listening on `port`, and wait until /readyz answers 200."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server never became ready:\n{log.read_text()}")


@pytest.fixture(scope="session")
def toy_store(tiny_pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store serving the tiny ERDE student as model 'toy' (read-only for the tests)."""
    root = tmp_path_factory.mktemp("store")
    export_run(tiny_pipeline.student_run, root, "toy", "1")
    return root


@pytest.fixture(scope="session")
def server(toy_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One shared server with a 1 MiB upload limit."""
    srv = start_server(toy_store, tmp_path_factory.mktemp("logs"), max_upload_bytes=1024 * 1024)
    yield srv
    srv.stop()


@pytest.fixture
def make_server(toy_store: Path, tmp_path: Path) -> Iterator:
    """Servers with their own settings (and optionally their own store), stopped after the test."""
    started: list[Server] = []

    def make(store: Path | None = None, **settings: object) -> Server:
        srv = start_server(store or toy_store, tmp_path, **settings)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()
