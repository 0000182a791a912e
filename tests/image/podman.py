"""podman as this machine runs it: as root, runc, cgroupfs, no default ulimits.

crun fails here ("cgroups in hybrid mode not supported") and the default ulimits are refused
("setrlimit RLIMIT_NOFILE: Operation not permitted"); the settings live in a containers.conf of our
own, named by CONTAINERS_CONF, so the system's files stay as they are.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

# Built once per machine, outside the repository: the torch wheels and this containers.conf.
CACHE = Path(os.environ.get("ERDE_IMAGE_CACHE", Path.home() / ".cache" / "erde-image-test"))

CONTAINERS_CONF = """\
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
"""


def environment() -> dict[str, str]:
    """os.environ plus CONTAINERS_CONF, for podman and podman-compose alike."""
    conf = CACHE / "containers.conf"
    if not conf.is_file() or conf.read_text() != CONTAINERS_CONF:
        CACHE.mkdir(parents=True, exist_ok=True)
        conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def run(*cmd: str, timeout: float = 120, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command with CONTAINERS_CONF set; on failure the error carries the end of its output."""
    kwargs.setdefault("env", environment())
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}:\n{(result.stdout + result.stderr)[-4000:]}")
    return result


def podman(*args: str, timeout: float = 120, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run("podman", *args, timeout=timeout, check=check, **kwargs)


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0
