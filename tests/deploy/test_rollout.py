"""A rolling update, for real, on one machine: the drain contract the Kubernetes manifests rely on.

Two replicas (`python -m service` serving the shipped model, read-only) behind HAProxy from Debian,
driven as a Kubernetes ingress controller drives it. When a pod starts terminating, Kubernetes takes it
out of the Service's endpoints and, after the preStop pause, sends SIGTERM; here the replica leaves
HAProxy (runtime API, `state maint`, what HAProxy's own ingress controller does) and gets SIGTERM at the
same instant: no pause at all, the harshest case, so requests already on their way meet the drain.
A replacement starts on a new port (a new pod, a new address) and enters once /readyz has answered 200
twice (health checks every 200 ms; a replica answering 503 is out at once: the readinessProbe). A
request whose connection is refused goes to the other replica; nothing else is retried, since a POST
that reached a replica must not be sent twice. Under steady load from client threads, replica A, then
replica B. Every request is counted: each gets a reply, and every reply that is not a 200 is a 503
with Retry-After. Every batch takes 30 ms longer than it needs (bench/slow_service.py), so SIGTERM finds
requests in flight, which the drain must finish.

Without the endpoint removal, with HAProxy learning of the drain from /readyz alone, a replica that
drains in 60 ms exits before the next health check, and a request HAProxy sends at that instant on a
pooled keep-alive connection is lost (README "Rolling update"): that is the gap the preStop pause closes.
"""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.deploy.deploy_support import ROOT
from tests.service.conftest import Server, free_port, start_server
from tests.service.images import png

CLIENTS = 8  # client threads, each one request at a time
SLOW_MS = 30  # every batch takes this much longer (bench/slow_service.py): SIGTERM always finds work in flight
MAX_REQUESTS = 20_000  # per client: the load stops by itself whatever happens
DRAIN_TIMEOUT_S = 10  # as deploy/k8s/config/erde.env

HAPROXY_CONFIG = """\
global
    log stderr format raw local0 info
    stats socket {socket} mode 600 level admin
    maxconn 512

defaults
    mode http
    log global
    option httplog
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout check 1s
    # A refused connection goes to another replica (the request never reached the first); a request
    # that reached a replica is not retried, as Kubernetes Services and ingresses do for a POST.
    retries 3
    retry-on conn-failure
    option redispatch 1

frontend erde
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    # The readinessProbe: GET /readyz every 200 ms; out at the first answer that is not 200 (503 while
    # starting or draining), back after two 200s.
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 200ms fall 1 rise 2
    server a 127.0.0.1:{port_a} check
    server b 127.0.0.1:{port_b} check
"""


class HAProxy:
    """HAProxy in the foreground, its log in a file, driven through its runtime API (a Unix socket)."""

    def __init__(self, folder: Path, ports: dict[str, int]) -> None:
        self.port, self.socket, self.log = free_port(), folder / "haproxy.sock", folder / "haproxy.log"
        config = folder / "haproxy.cfg"
        config.write_text(HAPROXY_CONFIG.format(socket=self.socket, port=self.port, port_a=ports["a"],
                                                port_b=ports["b"]))
        binary = shutil.which("haproxy")
        assert binary, "haproxy is not installed (make system-deps installs it)"
        check = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT)
        wait_until(self.socket.exists, 10, "HAProxy's runtime API")
        self.url = f"http://127.0.0.1:{self.port}"

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket))
            s.sendall(line.encode() + b"\n")
            return b"".join(iter(lambda: s.recv(65536), b"")).decode()

    def status(self, server: str) -> str:
        """UP, DOWN, or a transition ("UP 1/2") of one server, from `show stat`."""
        header, *rows = self.command("show stat").splitlines()
        columns = header.lstrip("# ").split(",")
        for row in rows:
            fields = dict(zip(columns, row.split(","), strict=False))
            if fields.get("pxname") == "replicas" and fields.get("svname") == server:
                return fields["status"]
        raise AssertionError(f"HAProxy has no server {server}")

    def remove(self, server: str) -> None:
        """The pod left the endpoints: no new request goes to it; those under way finish."""
        assert self.command(f"set server replicas/{server} state maint").strip() == ""

    def add(self, server: str, port: int) -> None:
        """A new pod, a new address; it takes traffic once its health checks pass."""
        answer = self.command(f"set server replicas/{server} addr 127.0.0.1 port {port}")
        assert "changed" in answer, answer
        assert self.command(f"set server replicas/{server} state ready").strip() == ""

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not in {timeout} s"
        time.sleep(0.05)


@dataclass(frozen=True)
class Outcome:
    status: int | None  # None: no reply at all
    retry_after: str | None
    error_code: str | None  # the service's {"error": {"code"}}; None when the body is not ours
    failure: str | None  # the transport error, when there was no reply


class Load:
    """Client threads posting images through the load balancer until stopped; every outcome is kept."""

    def __init__(self, url: str) -> None:
        self.url, self.outcomes, self.lock = url, [], threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for t in self.threads:
            t.start()

    def _client(self, seed: int) -> None:
        image = png(seed, 28)
        with httpx.Client(base_url=self.url, timeout=30) as client:
            for _ in range(MAX_REQUESTS):
                if self.stopping.is_set():
                    return
                self._record(client, image)

    def _record(self, client: httpx.Client, image: bytes) -> None:
        try:
            reply = client.post("/classify", files={"image": ("x.png", image, "image/png")})
        except httpx.TransportError as exc:
            outcome = Outcome(None, None, None, repr(exc))
        else:
            try:
                code = reply.json().get("error", {}).get("code") if reply.status_code != 200 else None
            except json.JSONDecodeError:
                code = None
            outcome = Outcome(reply.status_code, reply.headers.get("retry-after"), code, None)
        with self.lock:
            self.outcomes.append(outcome)

    def count(self) -> int:
        with self.lock:
            return len(self.outcomes)

    def stop(self) -> list[Outcome]:
        self.stopping.set()
        for t in self.threads:
            t.join(60)
        return list(self.outcomes)


def served(server: Server) -> float:
    return server.metric("erde_requests_total", endpoint="classify")


def answered_while_draining(server: Server) -> Counter[int]:
    """The codes of the classify requests a replica answered after SIGTERM (its access log after "draining";
    HAProxy's health checks of /readyz are logged too, and left out)."""
    log = server.log.read_text()
    entries = [json.loads(line.split("erde.access ", 1)[1])
               for line in log[log.index("draining"):].splitlines() if "erde.access " in line]
    return Counter(e["code"] for e in entries if e["path"] == "/classify")


@pytest.fixture
def start_replica(tmp_path: Path) -> Iterator[Callable[[], Server]]:
    """Starts replicas of the shipped model (read-only store); stops whatever is left at the end."""
    started: list[Server] = []

    def start() -> Server:
        server = start_server(ROOT / "model_store", tmp_path, default_model="fashion-mnist",
                              drain_timeout_s=DRAIN_TIMEOUT_S, slow_batch_ms=SLOW_MS)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def port(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def test_rolling_update_loses_no_request(start_replica: Callable[[], Server], tmp_path: Path) -> None:
    began = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        replicas = dict(zip("ab", pool.map(lambda _: start_replica(), "ab"), strict=True))
    balancer = HAProxy(tmp_path, {name: port(s) for name, s in replicas.items()})
    retired: dict[str, Server] = {}
    drain_s: dict[str, float] = {}
    replace_s: dict[str, float] = {}  # from the old replica's exit to the new one taking traffic
    start_s = round(time.monotonic() - began, 1)
    load: Load | None = None
    try:
        wait_until(lambda: balancer.status("a") == balancer.status("b") == "UP", 10, "both replicas in")
        load = Load(balancer.url)
        wait_until(lambda: min(served(s) for s in replicas.values()) >= 20, 30, "both replicas serving")
        for name in ("a", "b"):
            old = retired[name] = replicas[name]
            signalled = time.monotonic()
            balancer.remove(name)
            old.signal(signal.SIGTERM)
            assert old.proc.wait(DRAIN_TIMEOUT_S + 15) == 0, old.log.read_text()[-2000:]
            exited = time.monotonic()
            drain_s[name] = round(exited - signalled, 2)
            new = replicas[name] = start_replica()
            balancer.add(name, port(new))
            wait_until(lambda n=name: balancer.status(n) == "UP", 10, f"new replica {name} in")
            wait_until(lambda s=new: served(s) >= 20, 30, f"new replica {name} serving")
            replace_s[name] = round(time.monotonic() - exited, 1)
    finally:
        outcomes = load.stop() if load else []
        balancer.stop()
    elapsed = time.monotonic() - began

    statuses = Counter(o.status for o in outcomes)
    drained = {name: answered_while_draining(s) for name, s in retired.items()}
    refusals = Counter((o.error_code, o.retry_after) for o in outcomes if o.status == 503)
    print(f"\nrolling update in {elapsed:.0f} s (two replicas up in {start_s} s, replacements {replace_s} s): "
          f"{len(outcomes)} requests, statuses {dict(statuses)}, 503s by (code, Retry-After) {dict(refusals)}; "
          f"SIGTERM to exit {drain_s} s; answered after SIGTERM { {n: dict(c) for n, c in drained.items()} }")
    lost = [o for o in outcomes if o.status is None]
    assert not lost, (f"{len(lost)} requests got no reply, e.g. {lost[0].failure}; HAProxy's log, all but 200s:\n"
                      + "".join(line for line in balancer.log.open() if " 200 " not in line)[-3000:])
    assert set(statuses) <= {200, 503}, statuses
    assert all(o.retry_after and o.error_code for o in outcomes if o.status == 503), refusals
    assert statuses[200] >= 200
    assert sum(c[200] for c in drained.values()) >= 1, "no request was in flight at SIGTERM: the drain went untested"
