"""`make image-test`: build the image with podman and run it as docker-compose.yml does.

1. The base image from Debian's packages (cached per machine), then docker/Dockerfile (or --dockerfile).
2. The api container twice, model_store baked in, then mounted: the image's HEALTHCHECK passes, it runs
   as the image's user, serves every model of model_store/, answers the README's quick start as the
   README says, /metrics has the series, and `podman stop` under load loses no request and exits 0
   within the grace period.
3. podman-compose: api and a Debian Prometheus scraping it with docker/prometheus.

Prints what it measured, one JSON object per step; any failed check exits non-zero with its reason.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from tests.image.base import base_image, prune
from tests.image.build import DOCKERFILE, build, image_size
from tests.image.checks import check_drain, check_metrics, check_models, check_quick_start, quick_start_png
from tests.image.compose import check_compose, prometheus_image
from tests.image.container import start
from tests.image.podman import podman

LATEST = "localhost/erde-serving:image-test"  # keeps the newest build's layers as the next run's cache
IMAGE_USER = "10001"  # the Dockerfile's erde user; docker-compose.yml sets none of its own
SLOW_MS = "30"  # ERDE_TEST_SLOW_MS: every batch 30 ms longer, so SIGTERM always finds requests in flight


def report(step: str, started: float, **facts: object) -> None:
    print(json.dumps({"step": step, "seconds": round(time.monotonic() - started, 1), **facts}), flush=True)


def check_container(image: str, png: Path, mount_store: bool) -> None:
    started = time.monotonic()
    kind = "mounted" if mount_store else "baked"
    container = start(image, f"erde-image-test-{os.getpid()}-{kind}", mount_store, {"ERDE_TEST_SLOW_MS": SLOW_MS})
    try:
        healthy_s = container.wait_healthy()
        user = podman("exec", container.name, "id", "-u").stdout.strip()
        assert user == IMAGE_USER, f"the service runs as uid {user}, not the image's {IMAGE_USER}"
        models = check_models(container)
        reply = check_quick_start(container, png)
        series = check_metrics(container)
        drain = check_drain(container)
    finally:
        container.remove()
    report(f"run, model_store {kind}", started, healthy_s=round(healthy_s, 1), models=models, label=reply["label"],
           metrics_series=series, drain=drain)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.image", description=__doc__.splitlines()[0])
    parser.add_argument("--dockerfile", type=Path, default=DOCKERFILE)
    args = parser.parse_args()
    begun = time.monotonic()

    started = time.monotonic()
    base = base_image()
    prune(base)
    report("base image", started, image=base)

    image = f"localhost/erde-serving:image-test-{os.getpid()}"  # this run's, whatever others build meanwhile
    started = time.monotonic()
    build(image, base, args.dockerfile)
    podman("tag", image, LATEST)
    report("build", started, image=image, size_mb=round(image_size(image) / 1e6))
    try:
        with tempfile.TemporaryDirectory(prefix="erde-image-test-") as tmp:
            png = quick_start_png(Path(tmp))
            check_container(image, png, mount_store=False)
            check_container(image, png, mount_store=True)
            started = time.monotonic()
            report("compose", started, **check_compose(image, prometheus_image(base), png, Path(tmp)))
    finally:
        podman("untag", image, image, check=False)
    report("image-test passed", begun)


if __name__ == "__main__":
    main()
