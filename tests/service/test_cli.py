"""`erde serve`: the help lists every setting, flags override their ERDE_* variables in every worker
process, and a bad value is one clear line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.server.cli import FLAGS, flag, settings_table, shown_default, variable
from service.settings import Settings
from tests.service.conftest import ROOT, free_port, launch
from tests.service.images import png
from tests.service.test_registry import maps_torch, server_processes

ERDE = [sys.executable, "-m", "erde.cli"]


def test_help_lists_every_setting() -> None:
    result = subprocess.run([*ERDE, "serve", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for name, field in Settings.model_fields.items():
        assert field.description, f"give Settings.{name} a Field(description=...): the help and README show it"
        names = variable(name) + (f", {flag(name)}" if name in FLAGS else "")
        entry = f"{names} (default {shown_default(field.default)}) {' '.join(field.description.split())}"
        assert entry in text, entry
    for literal in ("ERDE_PORT, --port (default 8000)", 'ERDE_IMAGE_FORMATS (default ["PNG","JPEG",',
                    "ERDE_ACCESS_LOG (default true)", "--default-model DEFAULT_MODEL"):
        assert literal in text, literal


def test_readme_lists_the_same_settings() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- settings:begin -->\n", 1)[1].split("\n<!-- settings:end -->", 1)[0]
    assert block == settings_table(), "run .venv/bin/python scripts/settings_table.py to update README.md"


def _spawned_workers(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sum("spawn_main" in Path(f"/proc/{c}/cmdline").read_text() for c in children)


def test_flags_override_their_variables_in_every_worker(toy_store, tmp_path) -> None:
    port = free_port()
    env = {**os.environ, "ERDE_HOST": "192.0.2.1", "ERDE_PORT": "not-a-port", "ERDE_WORKERS": "0",
           "ERDE_STORE": str(tmp_path / "nowhere"), "ERDE_DEFAULT_MODEL": "nothing", "PYTHONUNBUFFERED": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    args = ["-m", "erde.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
            "--store", str(toy_store), "--default-model", "toy"]
    server = launch(args, env, port, tmp_path / "server.log")  # each worker builds its settings from the env
    try:
        assert _spawned_workers(server.proc.pid) == 2
        with server.client() as c:
            assert [m["name"] for m in c.get("/models").json()] == ["toy"]
            for _ in range(4):  # several connections, so more than one worker answers
                reply = c.post("/classify", files={"image": ("x.png", png(), "image/png")},
                               headers={"Connection": "close"})
                assert reply.status_code == 200 and reply.json()["model"] == "toy", reply.text
        # `erde serve`, as the image and `make serve` run it, holds no torch in its supervisor or workers
        # either: the training verbs, whose options need torch, are not built for a registered verb.
        own = server_processes(server.proc.pid)
        assert len(own) == 3 and not any(maps_torch(pid) for pid in own)
    finally:
        server.stop()


BAD_VALUES = [  # (flags, environment, the one line's start after "erde serve: error: ")
    (["--port", "70000"], {}, "--port 70000: Input should be less than or equal to 65535"),
    (["--port", "http"], {}, "--port http: Input should be a valid integer"),
    (["--workers", "0"], {}, "--workers 0: Input should be greater than or equal to 1"),
    ([], {"ERDE_QUEUE_SIZE": "lots"}, "ERDE_QUEUE_SIZE=lots: Input should be a valid integer"),
    ([], {"ERDE_QUEUE_SIZE": "8", "ERDE_MAX_BATCH_SIZE": "16"}, "queue_size must be at least max_batch_size"),
    ([], {"ERDE_MAX_UPLOAD_BYTES_IN_FLIGHT": "4096"}, "max_upload_bytes_in_flight must be at least max_upload_bytes"),
]


def test_the_default_bound_on_uploads_in_flight_follows_a_larger_upload_limit() -> None:
    """Only ERDE_MAX_UPLOAD_BYTES set above 64 MiB still starts: the largest upload can always be taken."""
    assert Settings(max_upload_bytes=100 * 2**20).max_upload_bytes_in_flight == 100 * 2**20
    assert Settings(max_upload_bytes=2**20).max_upload_bytes_in_flight == 64 * 2**20


@pytest.fixture(scope="module")
def bad_value_runs() -> list[tuple[int, str]]:
    """Every BAD_VALUES case run at once (each is a fresh interpreter): (exit code, stderr)."""
    procs = [subprocess.Popen([*ERDE, "serve", *args], cwd=ROOT, env={**os.environ, **env}, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for args, env, _ in BAD_VALUES]
    return [(p.wait(120), p.stderr.read()) for p in procs]


@pytest.mark.parametrize("case", range(len(BAD_VALUES)), ids=[m.split(":")[0] for *_, m in BAD_VALUES])
def test_bad_values_are_one_line_and_exit_2(bad_value_runs, case: int) -> None:
    code, stderr = bad_value_runs[case]
    assert code == 2, stderr
    line, = stderr.strip().splitlines()
    assert line.startswith(f"erde serve: error: {BAD_VALUES[case][2]}"), line
