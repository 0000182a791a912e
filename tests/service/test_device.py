"""ERDE_DEVICE (issue 21): the device is resolved once (erde/device.py), a device that is not there is
refused at start with what is missing, and the device is shown in /models/{name} and the metrics. The
CPU runs the same device path (one run_batch for every device); the CUDA check runs where CUDA is."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erde.calibrate import exit_outputs
from erde.data import load_fashion_mnist
from erde.device import pick_device
from erde.exits import exit_taken
from erde.store import read_artifact
from service.engine import forkserver
from tests.service import images
from tests.service.conftest import ROOT

MISSING = "cuda:99" if torch.cuda.is_available() else "cuda"  # a device this machine does not have


def test_devices_are_taken_as_asked_or_refused_with_what_is_missing() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="CUDA device"):
        pick_device(MISSING)
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", "cpu "):
        with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
            pick_device(bad)



def test_the_server_asks_a_child_with_torch_what_a_device_is() -> None:
    """The server imports no torch: a short-lived child of the fork server (or, before a service starts, a
    spawned one) answers for it, with pick_device's answer and its reason when the device is not there."""
    assert forkserver.resolve_device("auto") == str(pick_device("auto"))
    for via in (forkserver.context, multiprocessing.get_context("spawn")):
        with pytest.raises(ValueError, match=f"device '{MISSING}'"):
            forkserver.resolve_device(MISSING, via=via)

@pytest.mark.parametrize("device, says", [(MISSING, "CUDA device"), ("tpu", "String should match pattern")])
def test_a_server_asked_for_a_missing_device_refuses_to_start(device: str, says: str, toy_store: Path) -> None:
    env = {**os.environ, "ERDE_STORE": str(toy_store), "ERDE_HOST": "127.0.0.1", "ERDE_PORT": "0",
           "ERDE_DEVICE": device}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    done = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert says in done.stderr and "device" in done.stderr, done.stderr[-2000:]


def test_the_device_is_shown_and_each_stage_timed(make_server, toy_store: Path) -> None:
    server = make_server(toy_store, device="cpu")
    with server.client() as c:
        assert c.get("/models/toy").json()["device"] == "cpu"
        r = c.post("/classify", data={"threshold": "0"}, files={"image": ("x.png", images.encode(images.noise(16)),
                                                                          "image/png")})
        assert r.status_code == 200, r.text
    assert server.metric("erde_model_info", model="toy", device="cpu") == 1
    for stage in range(r.json()["exits"]):  # θ = 0 ran every stage
        assert server.metric("erde_network_stage_duration_seconds_count", model="toy", stage=str(stage)) >= 1
    assert server.metric("erde_device_memory_bytes", model="toy") == 0  # on the CPU: the process's RSS instead


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: this torch sees no CUDA device")
def test_on_cuda_the_shipped_student_takes_the_cpus_exits() -> None:
    """The exit rule is erde/exits.py on both (the host reads the device's logits), so only rows within
    a hair of θ may differ (bench/gpu_check.py counts them on both models)."""
    test = load_fashion_mnist("test")
    path = ROOT / "model_store" / "fashion-mnist" / "2"
    cpu, cuda = exit_outputs(read_artifact(path).model, test), exit_outputs(read_artifact(path).model.cuda(), test)
    for budget in (1.0, 0.5, 0.25):
        theta = read_artifact(path).calibration.choose(budget)[0].threshold
        differ = exit_taken(cpu.entropy, theta) != exit_taken(cuda.entropy, theta)
        assert (abs(cpu.entropy[differ] - theta).min(axis=1) < 1e-4).all()
