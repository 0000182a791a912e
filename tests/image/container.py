"""The api container, run as docker-compose.yml runs it, and how to talk to it.

The flags come from the compose file's `api` service, so a change there changes what is tested:
init, shm_size, environment, read_only (and no tmpfs but its own: podman's --read-only would add
/tmp, /var/tmp and /run), tmpfs, cap_drop, memory, CPU and process limits, security_opt, and in the
mounted run its volumes. The user is the image's own: compose names none.
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.image.build import ROOT
from tests.image.podman import podman

COMPOSE = ROOT / "docker-compose.yml"
HEALTHY_WITHIN_S = 120  # the image's HEALTHCHECK: 60 s of start period, then 3 failures 10 s apart


def compose_api() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())["services"]["api"]


def interpolate(value: Any) -> str:
    """Compose's ${NAME:-default}, from the environment."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m[1], m[2]), str(value))


def seconds(duration: str) -> float:
    """A compose duration: 30s, 1m30s."""
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)([hms])", duration))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_args(api: dict[str, Any], mount_store: bool) -> list[str]:
    """`podman run` flags for the compose service (ports and the healthcheck aside)."""
    args = ["--init"] if api.get("init") else []
    args += ["--shm-size", api["shm_size"]]
    args += [a for k, v in api["environment"].items() for a in ("-e", f"{k}={interpolate(v)}")]
    if api.get("read_only"):
        args += ["--read-only", "--read-only-tmpfs=false"]
    args += [a for t in api.get("tmpfs", []) for a in ("--tmpfs", t)]
    args += [a for c in api.get("cap_drop", []) for a in ("--cap-drop", c)]
    args += ["--memory", interpolate(api["mem_limit"]), "--cpus", interpolate(api["cpus"]),
             "--pids-limit", str(api["pids_limit"])]
    args += [a for opt in api.get("security_opt", []) for a in ("--security-opt", opt)]
    if mount_store:
        for v in api["volumes"]:
            source = (ROOT / v["source"]).resolve()
            args += ["--mount", f"type={v['type']},source={source},target={v['target']}"
                     + (",readonly" if v.get("read_only") else "")]
    return args


@dataclass
class Container:
    name: str
    port: int  # on 127.0.0.1

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def state(self, field: str) -> str:
        return podman("inspect", "--format", f"{{{{.State.{field}}}}}", self.name).stdout.strip()

    def logs(self) -> str:
        """The service's log without its access lines, which would bury why it is not ready."""
        result = podman("logs", self.name, check=False)
        lines = [ln for ln in (result.stdout + result.stderr).splitlines() if "erde.access" not in ln]
        return "\n".join(lines)[-6000:]

    def readyz(self) -> str:
        try:
            reply = httpx.get(f"{self.url}/readyz", timeout=5)
        except httpx.HTTPError as exc:
            return repr(exc)
        return f"{reply.status_code} {reply.text}"

    def wait_healthy(self, probe: list[str] | None = None) -> float:
        """Run the container's health check until it passes; returns the seconds it took. Without a
        probe, `podman healthcheck run` (the image's HEALTHCHECK); with one, that command in the container."""
        args = ["exec", self.name, *probe] if probe else ["healthcheck", "run", self.name]
        started = time.monotonic()
        while time.monotonic() - started < HEALTHY_WITHIN_S:
            if self.state("Status") != "running":
                raise AssertionError(f"{self.name} exited ({self.state('ExitCode')}) before it was healthy:\n"
                                     f"{self.logs()}")
            if podman(*args, check=False).returncode == 0:
                return time.monotonic() - started
            time.sleep(1)
        raise AssertionError(f"{self.name}: health check still failing after {HEALTHY_WITHIN_S} s; /readyz: "
                             f"{self.readyz()}\n{self.logs()}")

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name, check=False)


def start(image: str, name: str, mount_store: bool, extra_env: dict[str, str]) -> Container:
    api = compose_api()
    port = free_port()
    container_port = api["ports"][0].rsplit(":", 1)[1]
    podman("run", "--detach", "--name", name, "--publish", f"127.0.0.1:{port}:{container_port}",
           *run_args(api, mount_store), *[a for k, v in extra_env.items() for a in ("-e", f"{k}={v}")], image)
    return Container(name, port)


def classify(url: str, png: Path, **fields: str) -> httpx.Response:
    with png.open("rb") as f:
        return httpx.post(f"{url}/classify", files={"image": (png.name, f, "image/png")}, data=fields, timeout=30)
