"""The base image, made from Debian's packages: no registry serves python:3.11.9-slim here.

debootstrap builds a bookworm root filesystem with python3.11, venv and pip (`python` on PATH, as in
the slim image), which `podman import` turns into an image. It trusts the local CA certificates this
machine adds to Debian's (/usr/local/share/ca-certificates): pip in the build then reaches PyPI as pip
here does. Its tag is a hash of what went into it (this file, which holds the suite, mirror and
packages, debootstrap's version and those certificates), so it is built once per machine and again
only when one of them changes.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from tests.image.podman import image_exists, podman, run

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates")
# Left out of the image, as Debian's slim images leave them out: package caches, indexes and docs.
TRIM = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale")
LOCAL_CAS = Path("/usr/local/share/ca-certificates")
REPOSITORY = "localhost/erde-base"
LABEL = "erde-image-test=base"  # inherited by every image built on it: what prune() may remove


def local_cas() -> list[Path]:
    return sorted(LOCAL_CAS.glob("*.crt"))


def tag() -> str:
    debootstrap = run("dpkg-query", "-W", "-f", "${Version}", "debootstrap").stdout
    inputs = [Path(__file__).read_bytes(), debootstrap.encode(), *(ca.read_bytes() for ca in local_cas())]
    key = hashlib.sha256(b"\0".join(inputs)).hexdigest()[:12]
    return f"{REPOSITORY}:{SUITE}-{key}"


def base_image() -> str:
    """The base image's name, built first when this machine has none for the current inputs."""
    name = tag()
    if image_exists(name):
        return name
    with tempfile.TemporaryDirectory(prefix="erde-base-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run("debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(rootfs), MIRROR,
            timeout=900)
        for path in TRIM:
            shutil.rmtree(rootfs / path)
            (rootfs / path).mkdir()
        for ca in local_cas():
            shutil.copy(ca, rootfs / "usr/local/share/ca-certificates")
        run("chroot", str(rootfs), "update-ca-certificates")
        tarball = Path(tmp) / "rootfs.tar"
        run("tar", "-C", str(rootfs), "-cf", str(tarball), ".", timeout=300)
        podman("import", "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python"]', "--change",
               f"LABEL {LABEL}", str(tarball), name, timeout=300)
    return name


def prune(current: str) -> None:
    """Remove what earlier runs left and this one cannot use: base images of other inputs, and every
    untagged image built on a base of ours (each superseded torch layer is about 6 GB)."""
    for name in podman("images", "--format", "{{.Repository}}:{{.Tag}}", REPOSITORY).stdout.split():
        if name != current:
            podman("untag", name)
    podman("image", "prune", "--force", "--filter", f"label={LABEL}", timeout=600)
