"""The prepared GPU check (issue 21; run by scripts/gpu_serve_check.sh): exits, engine and HTTP on a device.

1. **Exits**: both shipped models over the Fashion-MNIST test split, every exit's logits on the CPU and on
   the device; the exit each image takes under the θ of budgets 1.0, 0.5 and 0.25, compared. The exit
   rule is erde/exits.py on both (float64 entropies from the float32 logits, on the host), so only the
   logits can differ; a differing row whose entropy lies within `TOLERANCE` of θ at an exit on either
   side is counted apart.
2. **Engine**: the serving loop (`service.engine.compute.run_batch`) in process on pre-decoded images, at
   batch 1, 32 and 256, full depth and budget 0.25, on the device and on the CPU: images/s.
3. **HTTP**: when the service's dependencies import here, `python -m service` with `ERDE_DEVICE` set,
   and a closed-loop client (the standard library only: raw keep-alive connections) at concurrency 64
   and 256, full depth and budget 0.25: requests/s against the engine's images/s at batch 256.
4. **Workers sharing the device**: 1 and 4 server workers, with an inference process per worker and model
   or one per model shared by all (ERDE_ENGINE): requests/s, device and host memory.

Writes a markdown report (`--out`). Runs on the pinned torch and on torch 2.11 (a GPU machine's own);
needs numpy, safetensors and Pillow besides (a GPU image with matplotlib has it), and the test split's
idx files (`--data-dir`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from bench.common import children, memory_kb, table
from bench.engine import run_for
from erde.artifact import list_versions
from erde.calibrate import exit_outputs
from erde.data import load_fashion_mnist
from erde.device import describe, pick_device
from erde.exits import exit_taken
from erde.nets import fuse_for_inference
from erde.store import read_artifact
from service.engine.compute import choose_stage_backends

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "model_store"
MODELS = ("fashion-mnist", "fashion-mnist-teacher")
BUDGETS = (1.0, 0.5, 0.25)
TOLERANCE = 1e-4  # nats: float32 logits from two kernels differ by about 1e-6; this is 100 times that
BATCHES = (1, 32, 256)
SHARING_WORKERS = 4


def exits_section(device: torch.device, data_dir: Path | None) -> str:
    test = load_fashion_mnist("test", data_dir)
    rows = []
    for name in MODELS:
        path = STORE / name / list_versions(STORE)[name][-1]
        art = read_artifact(path)
        cpu = exit_outputs(art.model, test)
        moved = exit_outputs(read_artifact(path).model.to(device), test)  # inputs follow the model's device
        for budget in BUDGETS:
            theta = art.calibration.choose(budget)[0].threshold
            a, b = exit_taken(cpu.entropy, theta), exit_taken(moved.entropy, theta)
            differ = np.flatnonzero(a != b)
            near = np.abs(np.concatenate([cpu.entropy[differ], moved.entropy[differ]], axis=1) - theta).min(axis=1) \
                if differ.size else np.zeros(0)
            answers = np.mean(cpu.prediction[np.arange(len(a)), a] == moved.prediction[np.arange(len(b)), b])
            rows.append([name, budget, f"{theta:.4f}", len(a), differ.size, int(np.sum(near <= TOLERANCE)),
                         int(np.sum(near > TOLERANCE)), f"{answers:.4%}",
                         f"{np.abs(cpu.entropy - moved.entropy).max():.2e}"])
    return "\n".join(["## Exits: the device against the CPU", "",
                      f"The whole test split per model; differing rows within {TOLERANCE:g} nats of θ at some exit "
                      "are the ones the issue allows.", "",
                      table(["model", "budget", "θ", "images", "exits differ", "within tolerance of θ",
                             "beyond it", "same answer", "max |Δ entropy|"], rows), ""])


def engine_section(device: torch.device, data_dir: Path | None, seconds: float) -> tuple[str, dict]:
    test = load_fashion_mnist("test", data_dir)
    rows, best = [], {}
    for name in MODELS:
        art = read_artifact(STORE / name / list_versions(STORE)[name][-1])
        xs = ((test.images[:2048].float() / 255 - art.spec.mean[0]) / art.spec.std[0])
        for where in ([device, torch.device("cpu")] if device.type != "cpu" else [device]):
            model = fuse_for_inference(read_artifact(STORE / name / list_versions(STORE)[name][-1]).model).to(where)
            backends = choose_stage_backends(model, 32) if where.type == "cpu" else None
            for budget in (1.0, 0.25):
                theta = 0.0 if budget == 1.0 else art.calibration.choose(budget)[0].threshold
                rates = [run_for(model, xs, theta, b, art.macs_per_exit, backends, seconds, where)[0]
                         for b in BATCHES]
                best[(name, where.type, budget)] = rates[-1]
                rows.append([name, describe(where), "full depth" if budget == 1.0 else budget,
                             *(f"{r:,.0f}" for r in rates)])
    text = "\n".join(["## Engine: the serving loop in process", "",
                      f"Pre-decoded test images, {seconds:g} s per cell; images/s.", "",
                      table(["model", "device", "budget", *(f"batch {b}" for b in BATCHES)], rows), ""])
    return text, best


async def closed_loop(port: int, request: bytes, concurrency: int, seconds: float) -> tuple[int, int]:
    """(replies with status 200, other replies) from `concurrency` keep-alive connections for `seconds`."""
    ok = other = 0
    end = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal ok, other
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < end:
            writer.write(request)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                await reader.readexactly(length)
            except (asyncio.IncompleteReadError, ConnectionError):  # closed by the server: counted, connect again
                other += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            if head.startswith(b"HTTP/1.1 200"):
                ok += 1
            else:
                other += 1
            if b"connection: close" in head.lower():
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return ok, other


def service_ready() -> str | None:
    """None when the service's dependencies import here, else why they do not."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
        from PIL import Image  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def serving(device_name: str, **settings: str) -> Iterator[subprocess.Popen]:
    """`python -m service` on `device_name` with ERDE_* `settings`, listening on `port` once it is up."""
    env = {**os.environ, "ERDE_STORE": str(STORE), "ERDE_HOST": "127.0.0.1", "ERDE_DEVICE": device_name,
           "ERDE_ACCESS_LOG": "false", "ERDE_SLO_MS": "5000"} | {f"ERDE_{k.upper()}": v for k, v in settings.items()}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            url = f"http://127.0.0.1:{settings['port']}/readyz"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as reply:  # 503: an OSError
                if reply.status == 200:
                    break
            time.sleep(0.2)
        time.sleep(3 * int(settings.get("workers", "1")))  # /readyz answers once one worker is ready: all of them
        yield proc
    finally:
        proc.terminate()
        proc.wait(60)


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def classify_request(name: str, budget: float, data_dir: Path | None) -> bytes:
    """One keep-alive POST /classify of a test image, as raw bytes."""
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(load_fashion_mnist("test", data_dir).images[0, 0].numpy(), "L").save(buf, "PNG")
    body = (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + buf.getvalue() + b"\r\n--b--\r\n")
    return (f"POST /classify?budget={budget}&model={name} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def http_section(device_name: str, engine: dict, data_dir: Path | None, seconds: float) -> str:
    missing = service_ready()
    if missing:
        return f"## HTTP\n\nSkipped: the service's dependencies do not import here ({missing}).\n"
    rows = []
    port = free_port()
    with serving(device_name, port=port):
        for name in MODELS:
            for budget in (1.0, 0.25):
                request = classify_request(name, budget, data_dir)
                for concurrency in (64, 256):
                    ok, other = asyncio.run(closed_loop(int(port), request, concurrency, seconds))
                    engine_rate = engine.get((name, pick_device(device_name).type, budget), float("nan"))
                    rows.append([name, "full depth" if budget == 1.0 else budget, concurrency, f"{ok / seconds:,.0f}",
                                 other, f"{engine_rate:,.0f}", f"{ok / seconds / engine_rate:.2f}"])
    worst = min(float(r[-1]) for r in rows)
    bottleneck = ("the server's event loop (one process: HTTP, multipart, JSON), not the network: the engine "
                  "alone runs the same images several times faster" if worst < 0.5 else
                  "the network: HTTP reaches most of what the engine does alone")
    return "\n".join(["## HTTP: the service on the device", "",
                      f"A closed loop of keep-alive connections (the standard library), {seconds:g} s per cell, one "
                      "server process; against the engine's images/s at batch 256 on the same device.", "",
                      table(["model", "budget", "concurrency", "requests/s", "non-200", "engine images/s",
                             "HTTP ÷ engine"], rows), "",
                      f"The bottleneck, where HTTP reaches {worst:.2f} of the engine at worst: {bottleneck}.", ""])


def device_memory_mb(pids: list[int]) -> str:
    """What nvidia-smi says `pids` hold on the GPUs (CUDA contexts included), or why it cannot say."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "n/a (no nvidia-smi)"
    used = dict(line.split(", ") for line in out.strip().splitlines() if ", " in line)
    return f"{sum(float(used[str(p)]) for p in pids if str(p) in used):,.0f}"


def sharing_section(device_name: str, data_dir: Path | None, seconds: float) -> str:
    """Several server workers on one device: an inference process per worker and model, or one per model that
    runs every worker's batches together (ERDE_ENGINE)."""
    missing = service_ready()
    if missing:
        return f"## Workers sharing the device\n\nSkipped: the service's dependencies do not import here ({missing}).\n"
    loads = (("fashion-mnist-teacher", 1.0), ("fashion-mnist", 0.25))
    rows = []
    for workers, engine in ((1, "own"), (SHARING_WORKERS, "own"), (SHARING_WORKERS, "shared")):
        port = free_port()
        with serving(device_name, port=port, workers=str(workers), engine=engine) as proc:
            tree = children(proc.pid)
            host_mb = sum(memory_kb(pid).get("Pss", 0) for pid in tree) / 1024
            rates = [asyncio.run(closed_loop(int(port), classify_request(name, budget, data_dir), 256, seconds))[0]
                     / seconds for name, budget in loads]
            rows.append([workers, engine, *(f"{r:,.0f}" for r in rates), device_memory_mb(tree), f"{host_mb:,.0f}"])
    return "\n".join(["## Workers sharing the device", "",
                      f"The service with 1 and {SHARING_WORKERS} workers, an inference process per worker and model "
                      "(`own`) or one per model for all of them (`shared`); a closed loop of 256 keep-alive "
                      f"connections, {seconds:g} s per cell. Device memory from nvidia-smi (CUDA contexts included), "
                      "host memory the PSS of the service's processes, both models loaded.", "",
                      table(["workers", "ERDE_ENGINE", "teacher full depth req/s", "student budget 0.25 req/s",
                             "device MiB", "host PSS MB"], rows), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST idx files (t10k-*)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = pick_device(args.device)
    started = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"# Serving on {describe(device)} (issue 21)", "",
             f"`scripts/gpu_serve_check.sh` ({time.strftime('%Y-%m-%d')}): torch {torch.__version__}, "
             f"Python {platform.python_version()}, {os.cpu_count()} CPUs.", ""]

    def written(section: str) -> None:  # after each section: a check cut short still leaves what it measured
        parts.append(section)
        args.out.write_text("\n".join(parts))

    written(exits_section(device, args.data_dir))
    engine, rates = engine_section(device, args.data_dir, args.seconds)
    written(engine)
    written(http_section(args.device, rates, args.data_dir, args.seconds))
    written(sharing_section(args.device, args.data_dir, args.seconds))
    written(f"Whole check: {time.perf_counter() - started:.0f} s.\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
