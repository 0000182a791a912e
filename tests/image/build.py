"""The image, built with podman from the repository's Dockerfile, torch taken from this machine's wheels.

PyTorch's CPU index cannot be reached here; torch and torchvision at the pyproject pins lie in pip's
configured indexes on this machine. `pip download` (with pip's own configuration) copies them and
their dependencies into a folder once, keyed by the pins, and the build mounts it read-only at
/wheels (TORCH_FIND_LINKS): the wheels are never part of the build context or of a layer.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
import time
import tomllib
from pathlib import Path

from tests.image.podman import CACHE, podman, run

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
PYTHON = "3.11"  # the base image's, whatever runs this


def torch_pins() -> list[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if re.match(r"torch(vision)?==", d)]


def torch_wheels() -> Path:
    """The folder of torch's wheels and their dependencies for the base image's Python, downloaded once."""
    pins = torch_pins()
    folder = CACHE / f"wheels-{hashlib.sha256(' '.join([*pins, PYTHON]).encode()).hexdigest()[:12]}"
    if not folder.is_dir():
        partial = folder.with_suffix(".partial")
        shutil.rmtree(partial, ignore_errors=True)
        run(sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--python-version", PYTHON,
            "--dest", str(partial), *pins, timeout=900)
        partial.rename(folder)
    return folder


def build(tag: str, base: str, dockerfile: Path = DOCKERFILE) -> float:
    """Build the image; returns the seconds it took. `--format docker` keeps the HEALTHCHECK, which
    OCI images have no field for."""
    wheels = torch_wheels()
    started = time.monotonic()
    result = podman("build", "--format", "docker", "--layers", "-f", str(dockerfile), "-t", tag,
                    "--build-arg", f"BASE_IMAGE={base}", "--build-arg", "TORCH_FIND_LINKS=/wheels",
                    "--volume", f"{wheels}:/wheels:ro", str(ROOT), timeout=1800, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"podman build failed ({result.returncode}):\n{(result.stdout + result.stderr)[-3000:]}")
    return time.monotonic() - started


def image_size(tag: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout)
