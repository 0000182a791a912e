"""Static checks of the deployment files: compose, Prometheus, Grafana dashboard, Dockerfile.

The tools that own each format judge it (docker-compose config, promtool); the tests then check
what docs/design.md §8 asks of the result.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_support import DOCKER, PROMETHEUS_DIR, ROOT, Query, panels, require_binary

GRAFANA_TEST_PASSWORD = "test-only-not-a-real-password"

# docs/design.md §7: every metric and whether it carries a `model` label.
METRICS_WITH_MODEL = {
    "erde_requests_total", "erde_exits_total", "erde_request_duration_seconds", "erde_stage_duration_seconds",
    "erde_macs_total", "erde_macs_full_total", "erde_budget", "erde_batch_size", "erde_queue_depth",
    "erde_rejected_total", "erde_model_info",
    "erde_budget_used", "erde_load_pressure", "erde_degraded_total", "erde_unsatisfiable_total",  # issue 12
    "erde_budget_spent_total", "erde_budget_replies_total", "erde_drift_macs_fraction",  # issue 19
    "erde_drift_theta_offset", "erde_accuracy_estimate",
}
METRICS_WITHOUT_MODEL = {"erde_inflight_requests", "erde_reloads_total"}
HISTOGRAMS = {"erde_request_duration_seconds", "erde_stage_duration_seconds", "erde_budget", "erde_budget_used",
              "erde_batch_size"}
METRIC_RE = re.compile(r"(?<![\w:])(erde_[a-z_]+)(\{[^}]*\})?")


def base_metric(name: str) -> str:
    """erde_budget_bucket -> erde_budget; names that are not histogram series come back unchanged."""
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS:
            return name.removesuffix(suffix)
    return name


# ---- docker-compose ----

def compose_config(tmp_path: Path, password: str | None) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` with an empty env file, so a developer's own .env cannot change the result."""
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    prefixes = ("GRAFANA_", "COMPOSE_", "ERDE_", "API_PORT", "PROMETHEUS_PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    if password is not None:
        env["GRAFANA_ADMIN_PASSWORD"] = password
    cmd = [require_binary("docker-compose"), "--env-file", str(env_file), "-f", str(ROOT / "docker-compose.yml"),
           "--project-directory", str(ROOT), "config"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    result = compose_config(tmp_path_factory.mktemp("compose"), GRAFANA_TEST_PASSWORD)
    assert result.returncode == 0, f"docker-compose config refused the file:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


def host_ips(ports: list[Any]) -> list[str]:
    """Host addresses of published ports, in both the short ("ip:host:container") and long syntax."""
    out = []
    for port in ports:
        if isinstance(port, dict):
            out.append(port.get("host_ip", "0.0.0.0"))
        else:
            parts = str(port).split(":")
            out.append(parts[0] if len(parts) == 3 else "0.0.0.0")
    return out


def is_read_only(volume: Any) -> bool:
    if isinstance(volume, dict):
        return bool(volume.get("read_only"))
    return str(volume).endswith((":ro", ":ro,z", ":ro,Z"))


def volume_target(volume: Any) -> str:
    return volume["target"] if isinstance(volume, dict) else str(volume).split(":")[1]


def duration_seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text))


def test_compose_services_and_loopback_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"api", "prometheus", "grafana"}
    expected = {"api": "8000", "prometheus": "9090", "grafana": "3000"}
    for name, service in services.items():
        assert service.get("ports"), f"{name} publishes no port"
        assert host_ips(service["ports"]) == ["127.0.0.1"], f"{name} must bind 127.0.0.1 only: {service['ports']}"
        assert any(expected[name] in str(p) for p in service["ports"]), f"{name} ports: {service['ports']}"


def test_compose_api(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    assert Path(api["build"]["context"]).resolve() == ROOT
    assert api["build"]["dockerfile"] == "docker/Dockerfile"
    store = [v for v in api.get("volumes", []) if volume_target(v) == "/app/model_store"]
    assert len(store) == 1, "model_store must be mounted at /app/model_store"
    assert is_read_only(store[0]), f"model_store must be mounted read-only: {store[0]}"
    assert Path(store[0]["source"]).resolve() == ROOT / "model_store"
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    # The service drains for at most ERDE_DRAIN_TIMEOUT_S; the grace period must outlast it.
    drain = float(api.get("environment", {}).get("ERDE_DRAIN_TIMEOUT_S", 10))
    assert duration_seconds(api["stop_grace_period"]) > drain


def test_compose_api_hardening(compose: dict[str, Any]) -> None:
    """Issue 11: a read-only root with a bounded tmpfs, no capabilities, bounded memory, CPU and
    processes, a Host allow-list that names the scraper, and every image pinned by digest."""
    api = compose["services"]["api"]
    assert api["read_only"] is True and api["cap_drop"] == ["ALL"]
    assert [t.split(":")[0] for t in api["tmpfs"]] == ["/tmp"] and "size=" in api["tmpfs"][0]
    assert api["mem_limit"] and float(api["cpus"]) > 0 and 0 < int(api["pids_limit"]) <= 4096
    assert "api" in json.loads(api["environment"]["ERDE_ALLOWED_HOSTS"])  # prometheus scrapes api:8000
    for name in ("prometheus", "grafana"):
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", compose["services"][name]["image"]), name


def test_compose_prometheus_and_grafana(compose: dict[str, Any]) -> None:
    prometheus, grafana = compose["services"]["prometheus"], compose["services"]["grafana"]
    assert prometheus["image"].startswith("prom/prometheus")
    assert prometheus["depends_on"]["api"]["condition"] == "service_healthy"
    mounts = {volume_target(v): Path(v["source"]).resolve() for v in prometheus["volumes"] if isinstance(v, dict)}
    assert mounts["/etc/prometheus"] == PROMETHEUS_DIR
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]

    assert grafana["image"].startswith("grafana/grafana")
    assert "prometheus" in grafana["depends_on"]
    env = grafana["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == GRAFANA_TEST_PASSWORD, "the admin password must come from the env"
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = {volume_target(v): Path(v["source"]).resolve() for v in grafana["volumes"] if isinstance(v, dict)}
    assert mounts["/etc/grafana/provisioning"] == DOCKER / "grafana" / "provisioning"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounts[home.rsplit("/", 1)[0]] == DOCKER / "grafana" / "dashboards", home


def test_compose_refuses_to_run_without_grafana_password(tmp_path: Path) -> None:
    result = compose_config(tmp_path, password=None)
    assert result.returncode != 0, "compose must not fall back to Grafana's admin/admin"
    assert "GRAFANA_ADMIN_PASSWORD" in result.stderr


def test_env_example_names_the_required_password() -> None:
    example = (ROOT / ".env.example").read_text()
    assert re.search(r"^GRAFANA_ADMIN_PASSWORD=\S+", example, re.M)
    assert not re.search(r"^GRAFANA_ADMIN_PASSWORD=admin$", example, re.M)


# ---- Prometheus ----

def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([require_binary("promtool"), *args], cwd=cwd, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_promtool_accepts_config_and_rules() -> None:
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml").stdout
    assert "SUCCESS" in promtool("check", "rules", "rules.yml").stdout


def test_alert_rules_fire_when_they_should() -> None:
    """rules_test.yml: an overloaded service fires every alert, a healthy one none."""
    promtool("test", "rules", "rules_test.yml")


def test_prometheus_scrapes_the_api() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "5s"
    assert config["rule_files"] == ["rules.yml"], "rule_files must stay relative (the live test copies both)"
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "erde"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert [t for sc in job["static_configs"] for t in sc["targets"]] == ["api:8000"]


def test_alerts_cover_errors_latency_and_saturation() -> None:
    rules = [r for g in yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())["groups"] for r in g["rules"]]
    alerts = [r for r in rules if "alert" in r]
    for r in alerts:
        assert r.get("for"), f"{r['alert']} fires on a single evaluation; give it a `for:`"
        assert {"summary", "description"} <= set(r.get("annotations", {})), r["alert"]
    exprs = " ".join(r["expr"] for r in alerts)
    assert re.search(r'erde_requests_total\{code=~"5\.\."[,}]', exprs), "no 5xx error-rate alert"
    assert re.search(r"histogram_quantile\(0\.99,\s*sum by \([^)]*\) \(rate\(erde_request_duration_seconds_bucket",
                     exprs), "no p99 latency alert"
    assert "erde_queue_depth" in exprs and "erde_rejected_total" in exprs, "no saturation alert"
    (degrading,) = [r for r in alerts if "erde_degraded_total" in r["expr"]]
    assert duration_seconds(degrading["for"]) >= 600, "degrading pages only after 10 minutes (issue 12)"


# ---- Grafana ----

def test_grafana_provisioning() -> None:
    provisioning = DOCKER / "grafana" / "provisioning"
    (ds,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert (ds["uid"], ds["type"], ds["url"]) == ("prometheus", "prometheus", "http://prometheus:9090")
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "erde.yml").read_text())["providers"]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"


def test_dashboard_variables(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    model = variables["model"]
    query = model["query"]["query"] if isinstance(model["query"], dict) else model["query"]
    assert model["type"] == "query" and query == "label_values(erde_model_info, model)"
    assert model["multi"] and model["includeAll"]
    assert model.get("allValue") == ".*", "All must match every model, also ones missing from erde_model_info"


def test_dashboard_panels_are_well_formed(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]] + [c["id"] for p in dashboard["panels"] for c in p.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(dashboard):
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, p["title"]
        assert p["datasource"]["uid"] == "${datasource}", f"{p['title']} must use the datasource variable"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", f"{p['title']} {t['refId']}"


def test_dashboard_queries_use_known_metrics_and_the_model_filter(dashboard_queries: list[Query]) -> None:
    for q in dashboard_queries:
        for name, selector in METRIC_RE.findall(q.expr):
            metric = base_metric(name)
            assert metric in METRICS_WITH_MODEL | METRICS_WITHOUT_MODEL, f"{name} is not a docs/design.md metric: {q}"
            if metric in METRICS_WITH_MODEL:
                assert 'model=~"$model"' in selector, f"{name} is not filtered by $model: {q}"
        for window in re.findall(r"\[([^\]]+)\]", q.expr):
            assert window in ("$__rate_interval", "$__range"), f"hard-coded range [{window}]: {q}"


def test_dashboard_queries_are_valid_promql(dashboard_queries: list[Query], tmp_path: Path) -> None:
    """promtool parses every query (as a recording rule) with the Grafana variables filled in."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"erde_dashboard_query_{i}", "expr": q.promql} for i, q in enumerate(dashboard_queries)]}]}
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)


# Each panel docs/design.md §8 asks for: allowed panel types, and patterns that must all appear in its queries.
HQ = r"histogram_quantile\({q}, sum by \([^)]*\ble\b[^)]*\) \(rate\({m}_bucket"
REQUIRED_PANELS = {
    "request rate by code": ({"timeseries"}, [r"sum by \(code\) \(rate\(erde_requests_total"]),
    "error share 4xx/5xx": ({"timeseries", "stat"}, [r'code=~"4\.\.".*\) / sum\(rate\(erde_requests_total',
                                                      r'code=~"5\.\.".*\) / sum\(rate\(erde_requests_total']),
    "end-to-end latency p50/p95/p99": ({"timeseries"}, [HQ.format(q=q, m="erde_request_duration_seconds")
                                                        for q in ("0.5", "0.95", "0.99")]),
    "stage latency p50/p99": ({"timeseries"}, [HQ.format(q=q, m="erde_stage_duration_seconds")
                                               for q in ("0.5", "0.99")] + [r"sum by \([^)]*\bstage\b"]),
    "exit distribution over time": ({"timeseries"}, [r"sum by \([^)]*\bexit\b[^)]*\) \(rate\(erde_exits_total"]),
    "exit share": ({"piechart", "bargauge"}, [r"erde_exits_total"]),
    "compute saved %": ({"stat", "timeseries", "gauge"},
                        [r"100 \* \(1 - sum.*erde_macs_total.*/ sum.*erde_macs_full_total"]),
    "budget distribution": ({"heatmap", "timeseries"}, [r"erde_budget_bucket"]),
    "batch size mean/p95": ({"timeseries"}, [r"rate\(erde_batch_size_sum.*/.*rate\(erde_batch_size_count",
                                             HQ.format(q="0.95", m="erde_batch_size")]),
    "queue depth and in-flight": ({"timeseries"}, [r"erde_queue_depth", r"erde_inflight_requests"]),
    "rejections by reason": ({"timeseries"}, [r"sum by \([^)]*\breason\b[^)]*\) \(rate\(erde_rejected_total"]),
    "model info": ({"table"}, [r"erde_model_info"]),
    # overload and floors (issue 12)
    "load pressure": ({"timeseries", "gauge", "stat"}, [r"max by \(model\) \(erde_load_pressure"]),
    "degraded share": ({"timeseries", "stat"},
                       [r"rate\(erde_degraded_total.*/ sum by \(model\) \(rate\(erde_exits_total"]),
    "unsatisfiable floors": ({"timeseries"}, [r"sum by \(model\) \(rate\(erde_unsatisfiable_total"]),
    "budget asked vs used": ({"timeseries"}, [r"rate\(erde_budget_sum.*/.*rate\(erde_budget_count",
                                              r"rate\(erde_budget_used_sum.*/.*rate\(erde_budget_used_count"]),
}


@pytest.mark.parametrize("name", list(REQUIRED_PANELS))
def test_dashboard_has_panel(name: str, dashboard: dict[str, Any]) -> None:
    types, patterns = REQUIRED_PANELS[name]
    candidates = [p for p in panels(dashboard) if p["type"] in types]
    for p in candidates:
        exprs = [t["expr"] for t in p["targets"]]
        if all(any(re.search(pat, e) for e in exprs) for pat in patterns):
            break
    else:
        pytest.fail(f"no {'/'.join(sorted(types))} panel for {name} (queries matching {patterns})")
    if name == "exit distribution over time":
        assert p["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal", "exits must be stacked"


def test_every_series_query_uses_rate_windows_from_grafana(dashboard_queries: list[Query]) -> None:
    counters = [q for q in dashboard_queries if re.search(r"_total|_bucket|_sum|_count", q.expr)]
    assert counters and all(re.search(r"\b(rate|increase)\(", q.expr) for q in counters), \
        [str(q) for q in counters if not re.search(r"\b(rate|increase)\(", q.expr)]


# ---- Dockerfile ----

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile, continuation lines joined, comments dropped."""
    lines = [ln for ln in (DOCKER / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)]


def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {m[1]: m[2] for d in deps if (m := re.fullmatch(r"([A-Za-z0-9_.-]+)==([^;\s]+)", d.strip()))}


def test_dockerfile_stages_user_cmd_and_healthcheck() -> None:
    ins = dockerfile_instructions()
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    assert re.fullmatch(r"python:3\.11[.\d]*-slim@sha256:[0-9a-f]{64}", args["BASE_IMAGE"]), args["BASE_IMAGE"]
    # The first stage starts from BASE_IMAGE, every later one from an earlier stage.
    froms = [a.split() for k, a in ins if k == "FROM"]
    assert froms[0][0] == "${BASE_IMAGE}" and all(f[1].upper() == "AS" for f in froms), froms
    assert all(f[0] in [g[2] for g in froms[:i]] for i, f in enumerate(froms) if i), froms
    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the runtime stage must run as a non-root USER"
    (cmd,) = [a for k, a in ins if k == "CMD"]
    assert json.loads(cmd) == ["erde", "serve"], "CMD must be exec form (JSON), so SIGTERM reaches the server"
    (health,) = [a for k, a in ins if k == "HEALTHCHECK"]
    probe = json.loads(health[health.index("CMD") + 3:])
    assert probe[0] == "python" and "/readyz" in " ".join(probe)
    env = " ".join(a for k, a in ins if k == "ENV")
    for setting in ("ERDE_HOST=0.0.0.0", "ERDE_PORT=8000", "ERDE_STORE=/app/model_store"):
        assert setting in env.split(), setting
    assert any(k == "COPY" and a.split()[-1].rstrip("/") == "/app/model_store" for k, a in ins)


def test_dockerfile_installs_cpu_torch_at_the_pyproject_pins() -> None:
    pins = pyproject_pins()
    ins = dockerfile_instructions()
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu", "users get PyTorch's CPU index"
    runs = [a for k, a in ins if k == "RUN"]
    (torch_run,) = [r for r in runs if "torch==" in r]
    assert "--index-url $TORCH_INDEX_URL" in torch_run
    for package in ("torch", "torchvision"):
        found = re.findall(rf"(?<![\w-]){package}==(\S+)", torch_run)
        assert found == [pins[package]], f"Dockerfile {package}=={found} but pyproject pins {pins[package]}"
    later = runs[runs.index(torch_run) + 1:]
    assert any("pip install -r" in r for r in later), "install CPU torch first, then the other dependencies"
    assert any("pip install --no-deps" in r for r in later), "and the project last, without its dependencies"


def test_dockerfile_copies_only_what_exists_and_dockerignore_excludes_local_state() -> None:
    ignored = {ln.strip().rstrip("/") for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert {".venv", "runs", ".git", "data"} <= ignored and any("__pycache__" in i for i in ignored)
    for k, args in dockerfile_instructions():
        if k == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert source.rstrip("/") not in ignored, f"COPY {source}: excluded by .dockerignore"
