"""Faults with real processes: a frozen inference process, deadlines, a broken newest version at
cold start, and several workers signalled under load."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.common import children
from erde.export import export_run
from tests.service import images
from tests.service.conftest import Server, eventually
from tests.service.steady_load import SteadyLoad

PNG = images.png()


def post(url: str, timeout: float = 30, **fields: str) -> httpx.Response:
    return httpx.post(f"{url}/classify", data=fields, files={"image": ("a.png", PNG, "image/png")}, timeout=timeout)


def inference_pids(server: Server) -> list[int]:
    return [int(p) for p in re.findall(r"inference process (\d+) serves toy", server.log.read_text())]


def wait_until_idle(pid: int) -> None:
    """Until the process sleeps in its read for the next batch. A reply reaches the client before the
    process has sent the batch's end; stopped in between, it would hold a done batch and no rows."""
    eventually(lambda: Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "S")


def forkserver_of(server: Server) -> int:
    """The server's forkserver (its child that forks the inference processes, which share its command line)."""
    [pid] = [p for p in children(server.proc.pid)
             if _parent(p) == server.proc.pid and b"forkserver" in Path(f"/proc/{p}/cmdline").read_bytes()]
    return pid


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def timed_post(url: str) -> tuple[int, float, str | None]:
    started = time.monotonic()
    reply = post(url)
    return reply.status_code, time.monotonic() - started, reply.headers.get("retry-after")


def test_a_frozen_inference_process_is_replaced_and_no_request_waits_past_its_deadline(make_server) -> None:
    server = make_server(request_timeout_s=3, hang_timeout_s=1)
    assert post(server.url).status_code == 200
    [frozen] = inference_pids(server)
    wait_until_idle(frozen)
    # No replacement can start until the forkserver resumes, once /readyz has been seen to say 503:
    # the time without a live process is otherwise a few ms, shorter than one poll.
    forkserver = forkserver_of(server)
    os.kill(forkserver, signal.SIGSTOP)
    os.kill(frozen, signal.SIGSTOP)  # holds whatever it is sent, answers nothing, stays "alive"
    try:
        with ThreadPoolExecutor(8) as pool:
            replies = [pool.submit(timed_post, server.url) for _ in range(8)]
            readiness = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (readiness and readiness[-1] == 200 and 503 in readiness):
                ready = httpx.get(f"{server.url}/readyz", timeout=5)
                readiness.append(ready.status_code)
                if ready.status_code == 503:
                    assert "toy" in ready.json()["error"]["message"] and ready.headers["retry-after"]
                    os.kill(forkserver, signal.SIGCONT)
                time.sleep(0.01)
            outcomes = [r.result() for r in replies]
    finally:
        os.kill(forkserver, signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError):  # killed by the watchdog, as it should be
            os.kill(frozen, signal.SIGCONT)
    for status, seconds, retry_after in outcomes:
        assert seconds < 3 + 1, outcomes  # within the deadline plus a second
        assert status == 200 or (status in (503, 504) and retry_after), outcomes
    assert any(status == 503 for status, _, _ in outcomes), outcomes  # the rows the frozen process held
    assert 503 in readiness and readiness[-1] == 200  # unready without a live process, ready after
    assert "made no progress" in server.log.read_text()
    eventually(lambda: len(set(inference_pids(server))) == 2)
    assert post(server.url).status_code == 200  # the replacement serves
    eventually(lambda: server.metric("erde_rejected_total", reason="worker_restart") >= 1)


def test_timeout_ms_on_a_busy_model_is_refused_at_once(make_server) -> None:
    server = make_server(slow_batch_ms=1500, hang_timeout_s=10, max_batch_size=1, slo_ms=5000)
    assert post(server.url).status_code == 200  # the server learns what a row costs
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(post, server.url)  # holds the process for 1.5 s
        time.sleep(0.3)
        started = time.monotonic()
        late = post(server.url, timeout_ms="1")  # it cannot be answered in 1 ms: it is not queued at all
        took = time.monotonic() - started
        assert busy.result().status_code == 200
    assert late.status_code == 503 and late.json()["error"]["code"] == "overloaded"
    assert "ms it may take; retry shortly or allow more with timeout_ms" in late.json()["error"]["message"]
    assert late.headers["retry-after"] and took < 1.0
    eventually(lambda: server.metric("erde_rejected_total", reason="queue_wait") == 1)
    bad = post(server.url, timeout_ms="0")
    assert bad.status_code == 422 and "timeout_ms" in bad.json()["error"]["message"]


def test_the_server_timeout_bounds_every_wait(make_server) -> None:
    server = make_server(slow_batch_ms=2500, hang_timeout_s=10, request_timeout_s=1, max_batch_size=1)
    started = time.monotonic()
    reply = post(server.url)
    assert reply.status_code == 504 and time.monotonic() - started < 2.0


def test_a_broken_newest_version_at_cold_start_serves_the_previous_one(make_server, tiny_pipeline, tmp_path) -> None:
    store = tmp_path / "store"
    export_run(tiny_pipeline.student_run, store, "toy", "1")
    shutil.copytree(store / "toy" / "1", store / "toy" / "2")
    manifest = json.loads((store / "toy" / "2" / "manifest.json").read_text())
    (store / "toy" / "2" / "manifest.json").write_text(json.dumps({**manifest, "version": "2"}))
    weights = store / "toy" / "2" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated: its sha256 no longer matches
    server = make_server(store=store)
    assert post(server.url).json()["version"] == "1"
    assert "refused toy/2" in server.log.read_text()
    assert server.metric("erde_reloads_total", result="failed") == 1
    assert server.metric("erde_model_info", model="toy", version="1") == 1


def test_two_workers_reload_on_sighup_and_drain_on_sigterm_under_load(make_server, tiny_pipeline, tmp_path) -> None:
    store = tmp_path / "store"
    export_run(tiny_pipeline.student_run, store, "toy", "1")
    server = make_server(store=store, workers=2, drain_timeout_s=10)
    with SteadyLoad(server.url, clients=6) as load:
        load.wait_for(20)
        export_run(tiny_pipeline.student_run, store, "toy", "2")
        server.signal(signal.SIGHUP)
        # Version 1 reads 0 only once no worker serves it (the max over live workers).
        eventually(lambda: server.metric("erde_model_info", model="toy", version="1") == 0
                   and server.metric("erde_model_info", model="toy", version="2") == 1, timeout=60)
        served = [post(server.url).json()["version"] for _ in range(12)]  # fresh connections: any worker
        assert served == ["2"] * 12
        before = load.count()
        load.wait_for(before + 20)
        server.signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0  # every worker drained, then the supervisor exited
    assert not load.unanswered(), load.summary()
    assert not load.dishonest(), load.summary()
    assert load.summary()[200] > 40
    log = server.log.read_text()
    assert log.count("draining: finishing queued and in-flight requests") == 2


def test_a_full_queue_refuses_from_the_headers_on_both_protocols(make_server) -> None:
    # One batch in each of the two process slots, one row in the queue: each batch takes 2 s.
    server = make_server(slow_batch_ms=2000, hang_timeout_s=10, request_timeout_s=20, max_batch_size=1, queue_size=1,
                         slo_ms=20_000)
    with ThreadPoolExecutor(3) as pool:
        held = [pool.submit(post, server.url) for _ in range(3)]
        eventually(lambda: server.metric("erde_queue_depth", model="toy") == 1)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            ours = client.post("/classify", files={"image": ("a.png", PNG, "image/png")})
            oip = client.post("/v2/models/toy/infer", json={"inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not even base64"]}]})
            assert not any(f.done() for f in held)
        assert [f.result().status_code for f in held] == [200] * 3
    assert ours.status_code == 503 and ours.json()["error"]["code"] == "overloaded" and ours.headers["retry-after"]
    assert "connection" not in ours.headers  # its small body was read: the connection stays for the retry
    assert oip.status_code == 503 and "queue is full" in oip.json()["error"] and oip.headers["retry-after"]
    eventually(lambda: server.metric("erde_rejected_total", reason="queue_full") == 2)


def test_a_killed_worker_is_replaced_by_the_supervisor(make_server) -> None:
    server = make_server(workers=2)
    workers = lambda: re.findall(r"Started server process \[(\d+)\]", server.log.read_text())  # noqa: E731
    eventually(lambda: server.log.read_text().count("Application startup complete.") == 2, timeout=60)
    os.kill(int(workers()[0]), signal.SIGKILL)
    eventually(lambda: "exited (code -9); starting another" in server.log.read_text(), timeout=30)
    eventually(lambda: len(workers()) == 3, timeout=60)
    eventually(lambda: httpx.get(f"{server.url}/readyz").status_code == 200, timeout=60)
    assert [post(server.url).status_code for _ in range(8)] == [200] * 8
    assert server.proc.poll() is None  # the supervisor itself carried on


def test_requests_sharing_a_failed_batch_each_get_their_own_image_numbers(make_server) -> None:
    # Two requests of two images each share one batch (it leaves full at 4); the process is killed while
    # it runs, and one error object reaches all four rows. Each request numbers its own failed image.
    server = make_server(slow_batch_ms=3000, hang_timeout_s=10, max_batch_size=4, max_batch_delay_ms=2000,
                         slo_ms=5000)
    files = [("image", (f"{i}.png", PNG, "image/png")) for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        replies = [pool.submit(httpx.post, f"{server.url}/classify/batch", files=files, timeout=30) for _ in range(2)]
        eventually(lambda: server.metric("erde_batch_size_count", model="toy") == 1)
        os.kill(inference_pids(server)[0], signal.SIGKILL)
        messages = [r.result().json()["error"]["message"] for r in replies]
    assert [r.result().status_code for r in replies] == [503, 503]
    for message in messages:
        assert re.fullmatch(r"image 0: [^:]*(?!image \d)", message.split("; ")[0]) and message.count("image ") == 1, \
            messages
