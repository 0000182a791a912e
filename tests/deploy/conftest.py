"""Fixtures of the deployment tests: the dashboard, parsed once, and its queries."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.deploy.deploy_support import DASHBOARD, Query, dashboard_queries


@pytest.fixture(scope="session")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="session", name="dashboard_queries")
def dashboard_queries_fixture(dashboard: dict[str, Any]) -> list[Query]:
    return dashboard_queries(dashboard)
