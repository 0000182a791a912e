"""The registry: its answer when a model is not served; artifacts read as data, networks built elsewhere."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import httpx
import pytest

from bench.common import children, inference_processes
from erde.export import export_run
from service.engine.registry import ModelRegistry
from service.errors import UnknownModel
from service.settings import Settings
from tests.erde.test_store import wrong_shape
from tests.service import images
from tests.service.conftest import eventually


def test_an_empty_registry_names_what_is_missing_and_never_prints_none(tmp_path: Path) -> None:
    registry = ModelRegistry(Settings(store=tmp_path))
    with pytest.raises(UnknownModel, match=r"^no default model to serve; name one with `model`; available: none"):
        registry.get(None)
    with pytest.raises(UnknownModel, match=r"^unknown model 'resnet-9000'; available: none loaded$"):
        registry.get("resnet-9000")


def server_processes(server_pid: int) -> list[int]:
    """A running service's own processes (the supervisor and its workers): all but the fork servers, the
    inference processes forked from them and multiprocessing's resource trackers."""
    own = []
    for pid in children(server_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"forkserver" not in cmdline and b"resource_tracker" not in cmdline:
            own.append(pid)
    return own


def maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_the_server_imports_no_torch_and_still_says_where_each_model_runs(make_server) -> None:
    """docs/architecture.md, "No torch in the server": only the inference processes (and the fork servers they
    come from) load torch; the supervisor and its workers (each a one-worker server) read artifacts as data
    and learn the device from their processes. Every import path is held to it in test_layers.py."""
    workers = 2
    server = make_server(workers=workers)
    eventually(lambda: len(inference_processes(server.proc.pid)) == workers, timeout=30)
    png = images.encode(images.texture(1))
    reply = httpx.post(f"{server.url}/classify", files={"image": ("a.png", png, "image/png")}, timeout=30)
    assert reply.status_code == 200 and reply.json()["exits"] == 3
    own = server_processes(server.proc.pid)
    assert len(own) == 3  # the supervisor and its two workers
    assert not any(maps_torch(pid) for pid in own)
    forked = [pid for pid in children(server.proc.pid) if pid not in own]
    assert any(maps_torch(pid) for pid in forked)  # the check sees torch where it is
    assert httpx.get(f"{server.url}/models/toy").json()["device"] == "cpu"
    assert server.metric("erde_model_info", model="toy", version="1", device="cpu") == 1


@pytest.mark.parametrize("engine", ["own", "shared"])
def test_weights_that_do_not_fit_are_refused_by_the_process_with_the_reason(make_server, tiny_pipeline,
                                                                              tmp_path: Path, engine: str) -> None:
    """The server verifies every sha256 but builds no network: the inference process does, and a version
    whose weights do not fit it is refused with the reason while the old version serves on."""
    store = tmp_path / "store"
    export_run(tiny_pipeline.student_run, store, "toy", "1")
    server = make_server(store=store, engine=engine, workers=2 if engine == "shared" else 1)
    export_run(tiny_pipeline.student_run, store, "toy", "2")
    wrong_shape(store / "toy" / "2")  # its sha256 refreshed: only building the network can tell
    server.signal(signal.SIGHUP)
    eventually(lambda: server.metric("erde_reloads_total", result="failed") >= 1, timeout=30)
    png = images.encode(images.texture(1))
    reply = httpx.post(f"{server.url}/classify", files={"image": ("a.png", png, "image/png")}, timeout=30)
    assert reply.status_code == 200 and reply.json()["version"] == "1"
    assert re.search(r"refused toy/2: the inference process could not load it: weights\.safetensors does not fit "
                     r"the network: wrong shape", server.log.read_text())
