"""One inference process shared by every worker (ERDE_ENGINE=shared, issue 21): real processes, real sockets.

Two `ModelWorker`s on one loop stand for two server workers; then two real server workers over HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from bench.common import children, inference_processes
from erde.nets import NetConfig, build_model
from service.engine.batcher import Job
from service.engine.compute import run_batch
from service.engine.decode import decode_image
from service.engine.wire import ExitResult
from service.engine.worker import ModelWorker, Steering, shared_address
from service.errors import ServiceError
from tests.service import images
from tests.service.conftest import ROOT, eventually
from tests.service.test_engine import LIMITS, SPEC, make_worker, rule, sample, upload


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(NetConfig(depth=8, widths=(4, 8, 8), input_size=16, num_classes=4)).eval()


class Watching(Steering):
    """Every row a shadow pass; keeps the shadow rows and the stage times that come back."""

    def __init__(self) -> None:
        self.witnessed: list[list[int]] = []
        self.stages: list[list[float]] = []

    def adjust(self, jobs: list[Job], now: float, spare: bool, waited_s: float = 0.0) -> None:
        for j in jobs:
            j.shadow = True

    def on_finished(self, stage_s: list[float], device_bytes: int) -> None:
        self.stages.append(stage_s)

    def witness(self, answered: list[int], entropy: np.ndarray, prediction: np.ndarray) -> None:
        self.witnessed.append(answered)


def shared_workers(model, address: str, n: int = 2, **kwargs) -> list[ModelWorker]:
    return [make_worker(model, address=address, max_batch_size=8, hang_timeout_s=10, **kwargs) for _ in range(n)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def unique(name: str) -> str:
    return shared_address(str(time.time_ns()), name, "1", "cpu")


def stopped(pid: int) -> None:
    """SIGSTOP `pid` and wait until it is stopped: the signal is delivered when the kernel gets to it, and a
    busy machine's process read one worker's batch alone meanwhile (a CI run)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
        assert time.monotonic() < deadline, f"{pid} did not stop"
        time.sleep(0.001)


async def until(check, timeout: float = 10.0) -> None:
    """Poll on the loop: shadow rows come back once the process has idle time and shadow credit for them."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def save_shadow_credit(worker: ModelWorker, loop: asyncio.AbstractEventLoop, batches: int = 6) -> None:
    """Batches that run to the last exit: they earn the process shadow time (a share of their own) and leave no
    shadow work, so that a test's shadow rows are run on at once, however slow the machine (a CI run had
    too little credit for them)."""
    for i in range(batches):
        job = Job(upload(20 + i), rule(0.0), 0.0, future=loop.create_future())
        worker.submit([job])
        await job.future


def test_two_workers_run_their_batches_together_and_each_gets_its_own_rows(model) -> None:
    """With the shared process stopped, both workers send a batch; resumed, it runs them as one (one run: its
    stage times reach one worker, not both) and answers each row, refusal and shadow row to its own worker."""
    thresholds = [[0.0, 1e9, 0.7, 0.0, 1.1], [0.9, 0.0, 1e9, 0.3]]
    uploads = [[upload(i) for i in range(5)], [upload(10 + i) for i in range(4)]]
    uploads[1][2] = b"not an image"
    steers = [Watching(), Watching()]

    async def main() -> list[list]:
        loop = asyncio.get_running_loop()
        address = unique("merge")
        workers = [make_worker(model, address=address, max_batch_size=8, hang_timeout_s=10, steer=steer,
                               shadow_cpu=1.0) for steer in steers]
        for worker in workers:
            await loop.run_in_executor(None, worker.start, loop)
        try:
            assert workers[0]._pid == workers[1]._pid and workers[0]._proc is None  # one process, nobody's own
            await save_shadow_credit(workers[0], loop)
            await until(lambda: len(steers[0].witnessed) == 6)  # every message of those batches is in
            for steer in steers:
                steer.witnessed.clear()
                steer.stages.clear()
            stopped(workers[0]._pid)
            try:
                jobs = [[Job(data, rule(t, top_k=1 + k % 3), 0.0, future=loop.create_future())
                         for k, (data, t) in enumerate(zip(up, th, strict=True))]
                        for up, th in zip(uploads, thresholds, strict=True)]
                for worker, own in zip(workers, jobs, strict=True):
                    worker.submit(own)
                await asyncio.sleep(0.1)
            finally:
                os.kill(workers[0]._pid, signal.SIGCONT)
            answers = [await asyncio.gather(*(j.future for j in own), return_exceptions=True) for own in jobs]
            await until(lambda: all(steer.witnessed for steer in steers))  # the shadow rows run after the run
            return answers
        finally:
            for worker in workers:
                assert await loop.run_in_executor(None, worker.close, 10.0)

    answers = asyncio.run(main())
    assert isinstance(answers[1][2], ServiceError) and answers[1][2].status == 415  # refused to its own worker
    for up, th, got in zip(uploads, thresholds, answers, strict=True):
        rows = [(sample(t, top_k=1 + k % 3, x=decode_image(d, SPEC, LIMITS)), r)
                for k, (d, t, r) in enumerate(zip(up, th, got, strict=True)) if d != b"not an image"]
        expected: dict[int, ExitResult] = {}

        def keep(js: list, rs: list[ExitResult], into: dict[int, ExitResult] = expected) -> None:
            into.update({id(j): r for j, r in zip(js, rs, strict=True)})

        run_batch(model, [s for s, _ in rows], keep)
        for s, r in rows:
            want = expected[id(s)]
            assert (r.exit, r.top_ids) == (want.exit, want.top_ids)
            assert r.top_probs == pytest.approx(want.top_probs, abs=1e-5)
    assert sorted(bool(stages) for steer in steers for stages in steer.stages) == [False, True]  # one run
    assert [sum(map(len, steer.witnessed)) for steer in steers] == [5, 3]  # each its own shadow rows
    assert [a for steer in steers for answered in steer.witnessed for a in answered] == [
        r.exit for got in answers for r in got if isinstance(r, ExitResult)]


def test_the_shared_process_outlives_the_worker_that_started_it_and_ends_with_the_last(model) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        first, second = shared_workers(model, unique("lifetime"))
        await loop.run_in_executor(None, first.start, loop)
        await loop.run_in_executor(None, second.start, loop)
        pid = second._pid
        assert await loop.run_in_executor(None, first.close, 10.0)
        job = Job(upload(0), rule(0.0), 0.0, future=loop.create_future())
        second.submit([job])
        assert (await job.future).exit == 2 and alive(pid)
        assert await loop.run_in_executor(None, second.close, 10.0)
        for _ in range(100):
            if not alive(pid):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the shared process {pid} outlived its last worker")

    asyncio.run(main())


def test_a_killed_shared_process_is_replaced_by_one_process_for_every_worker(model) -> None:
    """Both workers see it end, fail what it held with 503 and race to start the next: one wins the address,
    the other connects to it."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        workers = shared_workers(model, unique("restart"))
        for worker in workers:
            await loop.run_in_executor(None, worker.start, loop)
        old = workers[0]._pid
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not all(w.live and w._pid != old for w in workers):
            assert time.monotonic() < deadline, "not replaced"
            await asyncio.sleep(0.05)
        assert workers[0]._pid == workers[1]._pid
        jobs = [Job(upload(i), rule(0.0), 0.0, future=loop.create_future()) for i in range(2)]
        for worker, job in zip(workers, jobs, strict=True):
            worker.submit([job])
        assert [r.exit for r in await asyncio.gather(*(j.future for j in jobs))] == [2, 2]
        for worker in workers:
            assert await loop.run_in_executor(None, worker.close, 10.0)

    asyncio.run(main())


def forkservers(server_pid: int) -> int:
    """The forkservers of a running server (its inference processes, forked from them, share their cmdline)."""
    count = 0
    for pid in children(server_pid):
        try:
            forked = b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
            count += forked and not Path(f"/proc/{pid}/comm").read_text().startswith("erde-")
        except OSError:
            continue
    return count


@pytest.mark.parametrize(("engine", "processes"), [("own", 2), ("shared", 1)])
def test_two_server_workers_share_one_inference_process_when_told(make_server, engine: str, processes: int) -> None:
    server = make_server(workers=2, engine=engine)
    eventually(lambda: len(inference_processes(server.proc.pid)) >= processes, timeout=30)  # every worker up
    assert inference_processes(server.proc.pid) == ["erde-toy"] * processes
    # Shared, the workers take turns to start it: one forkserver (with torch, 300 MB) and no process lost a race.
    assert forkservers(server.proc.pid) == processes
    png = images.encode(images.texture(1))
    replies = [httpx.post(f"{server.url}/classify", files={"image": ("a.png", png, "image/png")}, timeout=30)
               for _ in range(16)]  # each on a new connection: both workers take some
    assert {r.status_code for r in replies} == {200}
    assert len({(r.json()["class_id"], r.json()["exit"], r.json()["confidence"]) for r in replies}) == 1
    tree = children(server.proc.pid)
    server.proc.send_signal(signal.SIGTERM)  # a drain: every worker finishes, then its inference processes end
    assert server.proc.wait(30) == 0
    eventually(lambda: not [pid for pid in tree if alive(pid)])  # none outlives the server


STARTER = """
import asyncio, sys, torch
from erde.nets import NetConfig, build_model
from tests.service.test_engine import make_worker
torch.manual_seed(0)
model = build_model(NetConfig(depth=8, widths=(4, 8, 8), input_size=16, num_classes=4)).eval()

async def main():
    loop = asyncio.get_running_loop()
    worker = make_worker(model, address=sys.argv[1], max_batch_size=8, hang_timeout_s=10)
    await loop.run_in_executor(None, worker.start, loop)
    print(worker._pid, flush=True)
    sys.stdin.readline()
    assert await loop.run_in_executor(None, worker.close, 10.0)

asyncio.run(main())
"""


def test_the_worker_that_started_the_shared_process_exits_while_others_still_use_it(model) -> None:
    """Multiprocessing's exit hook joins a process's children: the starter of a shared process waited at exit,
    for as long as any other worker used it (a review found it so)."""
    address = unique("starter")
    starter = subprocess.Popen([sys.executable, "-c", STARTER, address], cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pid = int(await loop.run_in_executor(None, starter.stdout.readline))
        (other,) = shared_workers(model, address, n=1)
        await loop.run_in_executor(None, other.start, loop)
        assert other._pid == pid
        starter.stdin.write("\n")
        starter.stdin.flush()
        assert await loop.run_in_executor(None, starter.wait, 20) == 0  # it exits; the process goes on
        job = Job(upload(0), rule(0.0), 0.0, future=loop.create_future())
        other.submit([job])
        assert (await job.future).exit == 2 and alive(pid)
        assert await loop.run_in_executor(None, other.close, 10.0)

    try:
        asyncio.run(main())
    finally:
        if starter.poll() is None:
            starter.kill()


def test_a_worker_leaving_in_the_same_round_as_anothers_batch_leaves_the_process_serving(model) -> None:
    """One round reads worker A's batch and worker B's stop: B's connection closes, and the shadow rows of A's
    run are then run while no batch waits. Waiting on B's closed connection raised, and ended the process
    for A too (a review found it so)."""
    steer = Watching()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        address = unique("leaving")
        a = make_worker(model, address=address, max_batch_size=8, hang_timeout_s=10, steer=steer, shadow_cpu=1.0)
        (b,) = shared_workers(model, address, n=1)
        for worker in (a, b):
            await loop.run_in_executor(None, worker.start, loop)
        pid = a._pid
        await save_shadow_credit(a, loop)
        await until(lambda: len(steer.witnessed) == 6)  # every message of those batches is in
        steer.witnessed.clear()
        stopped(pid)
        try:
            jobs = [Job(upload(i), rule(1e9), 0.0, future=loop.create_future()) for i in range(3)]
            a.submit(jobs)
            closed = loop.run_in_executor(None, b.close, 10.0)  # B has nothing queued: it says STOP at once
            await asyncio.sleep(0.2)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert [r.exit for r in await asyncio.gather(*(j.future for j in jobs))] == [0, 0, 0]
        assert await closed
        await until(lambda: bool(steer.witnessed))  # the shadow rows run on
        assert steer.witnessed == [[0, 0, 0]] and alive(pid)
        again = Job(upload(9), rule(0.0), 0.0, future=loop.create_future())
        a.submit([again])
        assert (await again.future).exit == 2 and a._pid == pid
        assert await loop.run_in_executor(None, a.close, 10.0)

    asyncio.run(main())
