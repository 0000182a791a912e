"""The demo page's server side: its files and headers, and /stats (the page's live state)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx
import pytest

from service.api.ui import CSP, STATIC, RateWindow, load_static, read_counters, summarize
from tests.service.conftest import ROOT, eventually
from tests.service.images import png

TEXT_FILES = sorted(p for p in STATIC.rglob("*") if p.suffix in (".html", ".js", ".css", ".svg"))


def classify(url: str, seed: int = 0, **fields: str) -> httpx.Response:
    return httpx.post(f"{url}/classify", files={"image": ("x.png", png(seed), "image/png")}, data=fields, timeout=30)


@pytest.mark.parametrize("path", ["/", "/ui"])
def test_the_page_is_served_at_root_and_ui_under_a_strict_csp(server, path: str) -> None:
    reply = httpx.get(server.url + path)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
    assert reply.headers["content-security-policy"] == CSP
    assert reply.headers["x-content-type-options"] == "nosniff"
    directives = dict(d.split(" ", 1) for d in CSP.split("; "))
    assert directives["default-src"] == "'none'" and directives["script-src"] == "'self'"
    assert directives["connect-src"] == "'self'" and directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in CSP and "http" not in CSP


def test_every_asset_the_page_names_is_served_with_its_type(server) -> None:
    page = httpx.get(f"{server.url}/").text
    assets = re.findall(r'(?:src|href)="(/ui/[^"]+)"', page)
    assert {"/ui/app.js", "/ui/style.css", "/ui/favicon.svg"} <= set(assets)
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for asset in assets:
        reply = httpx.get(server.url + asset)
        assert reply.status_code == 200 and reply.headers["content-type"].startswith(types[asset[asset.rindex("."):]])
    samples = httpx.get(f"{server.url}/ui/samples/samples.json").json()
    assert len(samples) == 12
    for sample in samples:
        reply = httpx.get(f"{server.url}/ui/samples/{sample['file']}")
        assert reply.status_code == 200 and reply.content.startswith(b"\x89PNG")


@pytest.mark.parametrize("path", ["/ui/nope.js", "/ui/../service/api/ui.py", "/ui/%2e%2e/ui.py", "/ui/samples",
                                  "/ui/samples/../../ui.py", "/ui/"])
def test_anything_else_under_ui_is_a_json_404(server, path: str) -> None:
    reply = httpx.get(server.url + path)
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "not_found"


def test_the_page_has_no_inline_script_style_or_handler_and_no_external_origin() -> None:
    """What the CSP would block must not be there at all, so the page runs without a console error."""
    page = (STATIC / "index.html").read_text()
    assert re.findall(r"<script\b[^>]*>", page) == ['<script src="/ui/app.js" defer>']
    assert not re.search(r"\sstyle=|\son[a-z]+=|javascript:", page)
    for path in TEXT_FILES:
        urls = set(re.findall(r"https?://[^\s\"'`)]+", path.read_text()))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)  # the SVG namespace is a name, not a fetch
    script = (STATIC / "app.js").read_text()
    assert re.findall(r"\bfetch\(([^,)]+)", script) == ["path", "`/ui/samples/${sample.file}`"]
    assert "innerHTML" not in script and "eval(" not in script and "setAttribute(\"style\"" not in script


def test_load_static_serves_only_known_types(tmp_path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.js").write_text("x")
    (tmp_path / "b.py").write_text("secret")
    assert load_static(tmp_path) == {"sub/a.js": (b"x", "text/javascript; charset=utf-8")}


def test_rates_come_from_samples_kept_over_time() -> None:
    window = RateWindow(span_s=10, min_gap_s=1)
    key = ("erde_requests_total", "m", "")
    assert window.rates(100.0, {key: 0}) is None  # nothing to compare with yet
    assert window.rates(100.5, {key: 5}) is None  # too soon after the first sample
    assert window.rates(102.0, {key: 20}) == ({key: 10.0}, 2.0)
    assert window.rates(104.0, {key: 40}) == ({key: 10.0}, 4.0)
    # After a quiet spell, the last sample before it is the base; then it ages out of the span.
    assert window.rates(115.0, {key: 150}) == ({key: 10.0}, 11.0)
    assert window.rates(118.0, {key: 180}) == ({key: 10.0}, 3.0)
    assert [t for t, _ in window.samples] == [115.0, 118.0]
    assert window.rates(120.0, {key: 0})[0] == {key: 0.0}  # a restarted worker's counter: no negative rate


def test_summary_per_model() -> None:
    totals = {("erde_requests_total", "m", ""): 4, ("erde_exits_total", "m", "0"): 3, ("erde_exits_total", "m", "2"): 1,
              ("erde_macs_total", "m", ""): 25, ("erde_macs_full_total", "m", ""): 100,
              ("erde_requests_total", "unknown", ""): 2, ("erde_budget_replies_total", "m", "0.25"): 4,
              ("erde_budget_spent_total", "m", "0.25"): 1.0}
    rates = {("erde_requests_total", "m", ""): 1.5, ("erde_requests_total", "unknown", ""): 0.5}
    reply = summarize(totals, rates, 2.0, {"m": 3, "idle": 2})
    assert reply.requests_per_s == 2.0 and reply.window_s == 2.0
    m, idle = reply.models
    assert (m.name, m.requests, m.requests_per_s, m.exits, m.exits_per_s, m.compute_saved) == \
        ("m", 4, 1.5, [3, 0, 1], [0.0, 0.0, 0.0], 0.75)
    assert [(b.budget, b.replies, b.spent) for b in m.budgets] == [(0.25, 4, 0.25)]  # spent against asked
    assert (idle.requests, idle.exits, idle.compute_saved, idle.budgets) == (0, [0, 0], None, [])
    first = summarize(totals, None, None, {"m": 3})
    assert first.requests_per_s is None
    assert first.models[0].requests_per_s is None and first.models[0].exits_per_s is None


def test_stats_counts_what_was_answered(server) -> None:
    """Deltas on the shared server: the tests run one at a time, so nothing else is answered meanwhile."""
    before = httpx.get(f"{server.url}/stats").json()["models"][0]
    replies = [classify(server.url, seed, threshold="0" if seed % 2 else "100").json() for seed in range(4)]
    exits = list(before["exits"])
    for reply in replies:
        exits[reply["exit"]] += 1
    found: dict = {}

    def counted() -> bool:
        found.update(httpx.get(f"{server.url}/stats").json()["models"][0])
        return found["exits"] == exits and found["requests"] == before["requests"] + 4

    eventually(counted)
    assert found["name"] == "toy" and found["compute_saved"] is not None
    time.sleep(1.1)  # the rate is taken against the first sample here, at least a second old by now
    later = httpx.get(f"{server.url}/stats").json()
    assert later["window_s"] >= 1 and 0 < later["requests_per_s"] <= 4 / later["window_s"] + 0.01  # both rounded


WORKER = """
from service import metrics
for exit_index in {exits}:
    metrics.REQUESTS.labels("m", "classify", "200").inc()
    metrics.EXITS.labels("m", str(exit_index)).inc()
    metrics.MACS.labels("m").inc(10 * (exit_index + 1))
    metrics.MACS_FULL.labels("m").inc(30)
metrics.REQUESTS.labels("unknown", "healthz", "200").inc()
"""


def test_counters_add_up_every_worker_in_multiprocess_mode(tmp_path, monkeypatch) -> None:
    """Two worker processes write their counters; /stats' reader sums them like /metrics does."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for exits in ([0, 0, 2], [1, 2]):
        subprocess.run([sys.executable, "-c", WORKER.format(exits=exits)], env=env, cwd=ROOT, check=True, timeout=120)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    reply = summarize(read_counters(), None, None, {"m": 3})
    (m,) = reply.models
    assert (m.requests, m.exits) == (5, [2, 1, 2])  # the healthz probes are not the service's work
    assert m.compute_saved == pytest.approx(1 - (10 + 10 + 30 + 20 + 30) / 150, abs=1e-4)
