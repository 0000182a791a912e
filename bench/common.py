"""Shared by the benchmarks: the default artifact, real images, table printing, and a service's processes
and their memory."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from erde.artifact import list_versions
from erde.data import FASHION_MNIST_DIR, load_fashion_mnist
from erde.store import Artifact, read_artifact

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


def children(pid: int) -> list[int]:
    """pid and all its descendants, from /proc (Ray's actors run under its raylet, BentoML's under circus)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = [pid], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        tree += kids
        frontier += kids
    return tree


def memory_kb(pid: int) -> dict[str, int]:
    """Pss and Rss from smaps_rollup, VmHWM from status (kB); empty if the process is gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    found = {k: re.search(rf"^{k}:\s+(\d+) kB", text, re.M) for k, text in
             (("Pss", rollup), ("Rss", rollup), ("VmHWM", status))}
    return {k: int(m.group(1)) for k, m in found.items() if m}


def inference_processes(server: int) -> list[str]:
    """The inference processes of a running service, as ps names them (each `erde-<model>`, 15 bytes)."""
    names = []
    for pid in children(server):
        try:
            names.append(Path(f"/proc/{pid}/comm").read_text().strip())
        except OSError:
            continue
    return sorted(n for n in names if n.startswith("erde-"))
