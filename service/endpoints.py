"""Every endpoint of the service, once: its metrics label, its route paths, its protocol, and whether it
holds the service's work. Routing (the route decorators), accounting (the `endpoint` label),
admission (which requests it may refuse, and where their model is named) and /stats read this table;
a test checks it against the app's routes. To add a route, add its path here first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Protocol = Literal["erde", "oip", "page", "docs", "ops"]


@dataclass(frozen=True)
class Endpoint:
    label: str  # the bounded `endpoint` label of erde_requests_total
    paths: tuple[str, ...]  # route templates, as the routes declare them ("/models/{name}")
    protocol: Protocol  # whose error shape its replies take ("oip": the Open Inference Protocol's)
    work: bool = False  # classify work: admitted by queue, counted in flight and by /stats
    # A health or readiness probe: answered past the connection cap, which refuses everything else. Refused,
    # a liveness probe restarts the pod in the middle of its overload, and a readiness probe (failureThreshold
    # 1 in deploy/k8s) takes it out of rotation, pushing its load onto the other pods.
    probe: bool = False

    @property
    def path(self) -> str:
        """The endpoint's one path, for a route declared once."""
        (path,) = self.paths
        return path


CLASSIFY = Endpoint("classify", ("/classify",), "erde", work=True)
CLASSIFY_BATCH = Endpoint("classify_batch", ("/classify/batch",), "erde", work=True)
MODELS = Endpoint("models", ("/models", "/models/{name}"), "erde")
HEALTHZ = Endpoint("healthz", ("/healthz",), "ops", probe=True)
READYZ = Endpoint("readyz", ("/readyz",), "ops", probe=True)
METRICS = Endpoint("metrics", ("/metrics",), "ops")
STATS = Endpoint("stats", ("/stats",), "page")
UI = Endpoint("ui", ("/", "/ui", "/ui/{name:path}"), "page")
V2_INFER = Endpoint("v2_infer", ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"), "oip",
                    work=True)
V2 = Endpoint("v2", ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}",
                     "/v2/models/{name}/versions/{version}", "/v2/models/{name}/ready",
                     "/v2/models/{name}/versions/{version}/ready"), "oip")
DOCS = Endpoint("docs", ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc",
                        "/static-offline-docs/{path:path}"), "docs")
OTHER = Endpoint("other", (), "erde")  # anything else, unknown paths included
ENDPOINTS = (CLASSIFY, CLASSIFY_BATCH, MODELS, HEALTHZ, READYZ, METRICS, STATS, UI, V2_INFER, V2, DOCS)
WORK = frozenset(e.label for e in ENDPOINTS if e.work)


def _pattern(template: str) -> str:
    """A route template as a regex: `{x}` one path segment (captured), `{x:path}` the rest."""
    parts = re.split(r"(\{\w+(?::path)?\})", template)
    return "".join((".*" if p.endswith(":path}") else f"(?P<{p[1:-1]}>[^/]+)") if p.startswith("{") else re.escape(p)
                   for p in parts)


_EXACT = {path: e for e in ENDPOINTS for path in e.paths if "{" not in path}
_TEMPLATES = [(re.compile(_pattern(path)), e) for e in ENDPOINTS for path in e.paths if "{" in path]
_V2_ANY = re.compile(r"/v2/.*")  # an unknown path under the protocol's prefix still answers in its shape


def match(path: str) -> tuple[Endpoint, dict[str, str]]:
    """The endpoint a request path belongs to, and the path's parameters (the model's `name`, say)."""
    endpoint = _EXACT.get(path)
    if endpoint is not None:
        return endpoint, {}
    for pattern, endpoint in _TEMPLATES:
        found = pattern.fullmatch(path)
        if found is not None:
            return endpoint, found.groupdict()
    return (V2 if _V2_ANY.fullmatch(path) else OTHER), {}


def endpoint_of(path: str) -> str:
    """The fixed label a path is counted under."""
    return match(path)[0].label
