"""The demo page (`/` and `/ui`), its static files, and `/stats`: live exits and requests/s as JSON.

The page is plain files under service/api/static (no build step, nothing from the internet), read once
at start and served under a Content-Security-Policy that allows this origin only and no inline
script. `/stats` reads our own Prometheus collectors (every worker's in multiprocess mode), so the
page never scrapes `/metrics`; rates come from totals sampled at each call, over a short window.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from fastapi import APIRouter, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from service import metrics
from service.api.deps import RuntimeDep
from service.endpoints import STATS, UI, WORK

STATIC = Path(__file__).with_name("static")
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
               ".json": "application/json"}
CSP = "; ".join(("default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self' blob:",
                 "connect-src 'self'", "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'"))
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
# Counter samples /stats reads; each total is keyed by (sample name, model, exit or "").
COUNTERS = ("erde_requests_total", "erde_exits_total", "erde_macs_total", "erde_macs_full_total",
            "erde_budget_spent_total", "erde_budget_replies_total")  # the last two: by budget, not exit
Totals = dict[tuple[str, str, str], float]


def load_static(root: Path = STATIC) -> dict[str, tuple[bytes, str]]:
    """Every servable file under `root` by relative path: a request path is looked up, never joined onto the disk."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), MEDIA_TYPES[p.suffix])
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in MEDIA_TYPES}


def read_counters() -> Totals:
    """Our counters' totals (requests: the work endpoints', summed over code): this process's, or all workers'."""
    totals: Totals = defaultdict(float)
    for family in metrics.registry().collect():
        for sample in family.samples:
            endpoint = sample.labels.get("endpoint")  # requests: the work only, not the page's polling nor probes
            if sample.name in COUNTERS and (endpoint is None or endpoint in WORK):
                detail = sample.labels.get("exit", sample.labels.get("budget", ""))
                totals[sample.name, sample.labels.get("model", ""), detail] += sample.value
    return totals


@dataclass
class RateWindow:
    """Totals sampled at each /stats call; rates are taken against the oldest sample of the last `span_s`
    seconds (after a quiet spell, the one before it). Samples closer than `min_gap_s` are not kept."""

    span_s: float = 15.0
    min_gap_s: float = 1.0
    samples: deque[tuple[float, Totals]] = field(default_factory=deque)

    def rates(self, now: float, totals: Totals) -> tuple[Totals, float] | None:
        """Per-key rates since the base sample and the seconds they cover; None until there is a base."""
        while len(self.samples) > 1 and now - self.samples[0][0] > self.span_s:
            self.samples.popleft()
        base = self.samples[0] if self.samples else None
        if not self.samples or now - self.samples[-1][0] >= self.min_gap_s:
            self.samples.append((now, dict(totals)))
        if base is None or now - base[0] < self.min_gap_s:
            return None
        seconds = now - base[0]
        # A worker that restarts starts its counters again: a total can fall, a rate cannot.
        return {key: max(0.0, (value - base[1].get(key, 0.0)) / seconds) for key, value in totals.items()}, seconds


class BudgetSpent(BaseModel):
    budget: float = Field(description="budgets asked for up to this (the upper edge of an erde_budget bucket)")
    replies: int
    spent: float = Field(description="mean MACs fraction spent per reply, since start")


class ModelStats(BaseModel):
    name: str
    requests: int = Field(description="classify and infer requests for this model since the server started (all codes)")
    requests_per_s: float | None = Field(description="over the last `window_s` seconds; null on the first call")
    exits: list[int] = Field(description="images answered at each exit (0-based) since the server started")
    exits_per_s: list[float] | None = Field(description="images per second at each exit over the window")
    compute_saved: float | None = Field(description="1 − MACs spent / MACs at full depth, since start")
    budgets: list[BudgetSpent] = Field([], description="the budget spent against the budget asked (docs/budgets.md)")


class StatsReply(BaseModel):
    window_s: float | None = Field(description="seconds the rates cover; null on the first call")
    requests_per_s: float | None = Field(description="classify and infer requests per second, every model and code")
    models: list[ModelStats]


def summarize(totals: Totals, rates: Totals | None, window_s: float | None,
              models: dict[str, int]) -> StatsReply:
    """The /stats reply from counter totals and their rates; `models` maps each served name to its exit count."""
    rows = []
    for name, exits in models.items():
        spent = totals.get(("erde_macs_total", name, ""), 0.0)
        full = totals.get(("erde_macs_full_total", name, ""), 0.0)
        exit_keys = [("erde_exits_total", name, str(i)) for i in range(exits)]
        rows.append(ModelStats(
            name=name, requests=int(totals.get(("erde_requests_total", name, ""), 0)),
            requests_per_s=None if rates is None else round(rates.get(("erde_requests_total", name, ""), 0.0), 3),
            exits=[int(totals.get(k, 0)) for k in exit_keys],
            exits_per_s=None if rates is None else [round(rates.get(k, 0.0), 3) for k in exit_keys],
            compute_saved=round(1 - spent / full, 4) if full else None, budgets=_budgets(totals, name)))
    total_rate = None if rates is None else round(sum(v for k, v in rates.items() if k[0] == "erde_requests_total"), 3)
    return StatsReply(window_s=None if window_s is None else round(window_s, 3), requests_per_s=total_rate,
                      models=rows)


def _budgets(totals: Totals, name: str) -> list[BudgetSpent]:
    out = []
    for (metric, model, budget), replies in totals.items():
        if metric == "erde_budget_replies_total" and model == name and replies:
            spent = totals.get(("erde_budget_spent_total", model, budget), 0.0) / replies
            out.append(BudgetSpent(budget=float(budget), replies=int(replies), spent=round(spent, 4)))
    return sorted(out, key=lambda b: b.budget)


def _file(found: tuple[bytes, str]) -> Response:
    body, media_type = found
    return Response(body, media_type=media_type, headers=PAGE_HEADERS)


def ui_router() -> APIRouter:
    """The page, its files and /stats; each app gets its own files and rate window."""
    files = load_static()
    window = RateWindow()
    router = APIRouter()

    page_path, ui_path, file_path = UI.paths

    @router.get(page_path, include_in_schema=False)
    @router.get(ui_path, include_in_schema=False)
    async def page() -> Response:
        return _file(files["index.html"])

    @router.get(file_path, include_in_schema=False)
    async def static(name: str) -> Response:
        found = files.get(name)
        if found is None:
            raise HTTPException(404, "no such file")
        return _file(found)

    @router.get(STATS.path, response_model=StatsReply)
    async def stats(runtime: RuntimeDep) -> Response:
        """Live service state for the page: exit distribution, requests/s and compute saved per model."""
        totals = read_counters()
        measured = window.rates(time.monotonic(), totals)
        rates, seconds = measured if measured else (None, None)
        models = {n: len(runtime.registry.get(n).artifact.macs_per_exit) for n in runtime.registry.names}
        return Response(orjson.dumps(summarize(totals, rates, seconds, models).model_dump()),
                        media_type="application/json")

    return router
