"""Shared by the benchmarks: the default artifact, real images, and table printing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from erde.data import FASHION_MNIST_DIR, load_fashion_mnist
from erde.store import Artifact, list_versions, read_artifact

STORE = Path(os.environ.get("ERDE_STORE", "model_store"))
MODEL = os.environ.get("ERDE_DEFAULT_MODEL", "fashion-mnist")


def default_artifact() -> Artifact:
    versions = list_versions(STORE)
    if MODEL not in versions:
        raise SystemExit(f"no model {MODEL!r} in {STORE}; set ERDE_STORE / ERDE_DEFAULT_MODEL")
    return read_artifact(STORE / MODEL / versions[MODEL][-1])


def sample_images(n: int, size: int) -> list[Image.Image]:
    """Fashion-MNIST test images when installed (the real workload), else seeded noise."""
    if (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        data = load_fashion_mnist("test").images[:n, 0].numpy()
        return [Image.fromarray(a).resize((size, size)) for a in data]
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)) for _ in range(n)]


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])
