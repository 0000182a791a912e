"""The directory prometheus-client's multiprocess mode shares between server processes.

It imports nothing of the service's: prometheus-client picks its mode when it is first imported,
and a metric created with PROMETHEUS_MULTIPROC_DIR set writes into that directory at once, so the
entry points (`python -m service`, `erde serve`) prepare it before anything creates a metric.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

MARK = ".erde-metrics"  # marks a directory this service made for multiprocess metrics


def prepare_metrics_dir(fresh_if_unset: bool = False) -> str | None:
    """Make the directory PROMETHEUS_MULTIPROC_DIR names ready and empty (or, `fresh_if_unset`, make
    a fresh one and name it there). A named directory is emptied only if this service made it (its
    mark is there) or it is empty: never one that holds anything else. Returns the path, or None."""
    named = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not named and not fresh_if_unset:
        return None
    path = Path(named) if named else Path(tempfile.mkdtemp(prefix="erde-metrics-"))
    path.mkdir(parents=True, exist_ok=True)
    entries = {p.name for p in path.iterdir()}
    if entries and MARK not in entries:
        raise SystemExit(f"PROMETHEUS_MULTIPROC_DIR={path} holds files this service did not write; "
                         "name an empty directory")
    for stale in path.glob("*.db"):
        stale.unlink()
    (path / MARK).touch()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return str(path)
