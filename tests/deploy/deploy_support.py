"""Helpers of the deployment tests: where the deploy files are, the dashboard's queries, tool lookup."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
PROMETHEUS_DIR = DOCKER / "prometheus"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "erde.json"

# Grafana's variables as the tests evaluate them: every model, windows wide enough for a short test.
GRAFANA_VARIABLES = {
    "${model}": ".*",
    "$model": ".*",
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
}


@dataclass(frozen=True)
class Query:
    panel: str  # panel title
    panel_type: str  # timeseries, stat, bargauge, heatmap, table, ...
    ref: str  # target refId
    expr: str  # PromQL as written in the dashboard (Grafana variables and all)

    @property
    def promql(self) -> str:
        """The expression Prometheus itself can evaluate: Grafana variables replaced by fixed values."""
        out = self.expr
        for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
            out = out.replace(name, value)
        return out

    def __str__(self) -> str:
        return f"{self.panel!r} {self.ref}: {self.expr}"


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' collapsed children included, rows themselves excluded."""
    out = []
    for p in dashboard["panels"]:
        if p["type"] == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (make system-deps installs it)")
    return path


def dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    """Every Prometheus query of the dashboard; fails on a Grafana variable the tests cannot fill in."""
    queries = [Query(p["title"], p["type"], t["refId"], t["expr"])
               for p in panels(dashboard) for t in p.get("targets", []) if t.get("expr")]
    assert queries, "the dashboard has no Prometheus queries"
    for q in queries:
        assert not re.search(r"\$\w", q.promql), f"unknown Grafana variable left in {q}"
    return queries
