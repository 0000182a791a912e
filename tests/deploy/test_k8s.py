"""The Kubernetes manifests (deploy/k8s): no cluster runs here, so every object is judged by the tool that
owns its format. kustomize (kubectl, pinned) renders each kustomization; yamllint lints the sources;
kubernetes-validate checks every core object strictly against the pinned Kubernetes versions; our JSON
schemas (written from the upstream CRDs) check the custom resources; promtool checks the rules and
evaluates the autoscaling queries; and the pod's security settings are tried for real: the service runs
with a read-only root filesystem, no capabilities and only the Deployment's volumes writable.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from service.engine.worker import SLOTS
from service.settings import Settings
from tests.deploy.deploy_support import DOCKER, PROMETHEUS_DIR, ROOT
from tests.deploy.k8s_support import (
    CRD_SCHEMAS,
    K8S,
    KUBERNETES_VERSIONS,
    PROMETHEUS_RULE,
    kustomizations,
    only,
    prometheus_rule_text,
    quantity,
    render,
    schema_validator,
)
from tests.deploy.test_configs import promtool
from tests.service.conftest import free_port
from tests.service.images import png

BASE, OVERLAYS = K8S / "base", K8S / "overlays"
CORE = {"Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"}
MONITORING = {"ServiceMonitor", "PrometheusRule"}
EXPECTED_KINDS = {
    "base": CORE,
    "monitoring": CORE | MONITORING,
    "keda": CORE | MONITORING | {"ScaledObject"},
    "hpa": CORE | MONITORING | {"HorizontalPodAutoscaler"},
    "kserve": {"Namespace", "ConfigMap", "InferenceService"},
}
QUEUE_TARGET = 16  # queued images per replica, the one target of the KEDA, HPA and KServe autoscalers


def dockerfile_uid() -> int:
    return int(re.search(r"--uid (\d+)", (DOCKER / "Dockerfile").read_text()).group(1))


def config(objects: list[dict[str, Any]]) -> dict[str, str]:
    return only(objects, "ConfigMap")["data"]


def pods() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """The pod spec and the settings of each way the service runs: base's Deployment, KServe's predictor."""
    base, kserve = render(BASE), render(OVERLAYS / "kserve")
    return {"deployment": (only(base, "Deployment")["spec"]["template"]["spec"], config(base)),
            "inferenceservice": (only(kserve, "InferenceService")["spec"]["predictor"], config(kserve))}


def container_env(pod: dict[str, Any], settings: dict[str, str]) -> dict[str, str]:
    """The environment the container starts with: the ConfigMap, then its own `env` on top."""
    (container,) = pod["containers"]
    return {**settings, **{e["name"]: e["value"] for e in container.get("env", [])}}


# ---- the tools that own the formats ----

def test_yamllint_passes_and_would_catch_a_mistake(tmp_path: Path) -> None:
    lint = [sys.executable, "-m", "yamllint", "--strict", "-c", str(K8S / "yamllint.yaml")]
    result = subprocess.run([*lint, str(K8S)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: Service \nmetadata:\n    name: erde\n")  # trailing space, 4-space indent
    assert subprocess.run([*lint, str(broken)], capture_output=True, timeout=60, check=False).returncode != 0


@pytest.mark.parametrize("name", sorted(EXPECTED_KINDS))
def test_each_kustomization_renders_what_it_promises(name: str) -> None:
    directory = BASE if name == "base" else OVERLAYS / name
    assert directory in kustomizations()
    objects = render(directory)
    assert sorted(o["kind"] for o in objects) == sorted(EXPECTED_KINDS[name])
    assert all(o["metadata"].get("namespace") == "erde" for o in objects if o["kind"] != "Namespace")
    assert all(o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "erde" for o in objects)


def unique_objects() -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for directory in kustomizations():
        for o in render(directory):
            seen.setdefault(repr(o), o)
    return list(seen.values())


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_core_object_validates_strictly(version: str) -> None:
    core = [o for o in unique_objects() if (o["apiVersion"], o["kind"]) not in CRD_SCHEMAS]
    assert {o["kind"] for o in core} == CORE | {"HorizontalPodAutoscaler"}
    for o in core:  # a kind kubernetes-validate has no schema for raises too: nothing passes unchecked
        assert kubernetes_validate.validate(o, version, strict=True) == version.rsplit(".", 1)[0]


def test_validation_knows_which_kubernetes_added_a_field() -> None:
    """The preStop `sleep` action is not in Kubernetes 1.28: the version pin decides, not a loose schema."""
    deployment = only(render(BASE), "Deployment")
    with pytest.raises(kubernetes_validate.ValidationError, match="'sleep' was unexpected"):
        kubernetes_validate.validate(deployment, "1.28.0", strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_custom_resource_matches_its_schema(version: str) -> None:
    crds = [o for o in unique_objects() if (o["apiVersion"], o["kind"]) in CRD_SCHEMAS]
    assert {o["kind"] for o in crds} == {"ScaledObject", "ServiceMonitor", "PrometheusRule", "InferenceService"}
    for o in crds:
        schema_validator(CRD_SCHEMAS[o["apiVersion"], o["kind"]], version).validate(o)


def set_path(obj: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    node: Any = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


# A mistake in each custom resource, and what its schema says about it.
CRD_MISTAKES = [
    ("keda", "ScaledObject", ("spec", "triggers", 0, "metadata", "treshold"), "16", "'treshold' was unexpected"),
    ("keda", "ScaledObject", ("spec", "triggers", 0, "metricType"), "Average", "is not one of"),
    ("keda", "ScaledObject", ("spec", "minReplicaCount"), "2", "is not of type 'integer'"),
    ("monitoring", "ServiceMonitor", ("spec", "endpoints", 0, "interval"), "10 seconds", "does not match"),
    ("monitoring", "ServiceMonitor", ("spec", "endpoints", 0, "targetPorts"), "http", "'targetPorts' was unexpected"),
    ("monitoring", "PrometheusRule", ("spec", "groups", 0, "rules", 0, "for"), "5 minutes", "does not match"),
    ("kserve", "InferenceService", ("metadata", "annotations", "serving.kserve.io/deploymentMode"), "Raw",
     "is not one of"),
    ("kserve", "InferenceService",
     ("spec", "predictor", "autoScaling", "metrics", 0, "external", "metric", "backend"), "influx", "is not one of"),
    ("kserve", "InferenceService", ("spec", "predictor", "containers", 0, "readinessProbe", "httpGet", "pathh"),
     "/readyz", "'pathh' was unexpected"),
]


@pytest.mark.parametrize(("overlay", "kind", "path", "value", "message"), CRD_MISTAKES,
                         ids=[f"{m[1]}-{m[2][-1]}" for m in CRD_MISTAKES])
def test_custom_resource_schemas_refuse_mistakes(overlay: str, kind: str, path: tuple[str | int, ...], value: Any,
                                                 message: str) -> None:
    obj = only(render(OVERLAYS / overlay), kind)
    validator = schema_validator(CRD_SCHEMAS[obj["apiVersion"], kind], KUBERNETES_VERSIONS[0])
    errors = [e.message for e in validator.iter_errors(set_path(obj, path, value))]
    assert any(message in e for e in errors), f"{kind}: {path}={value!r} gave {errors}"


# ---- what the pods run with ----

@pytest.mark.parametrize("where", ["deployment", "inferenceservice"])
def test_every_setting_is_real_and_the_set_validates(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pod, settings = pods()[where]
    env = container_env(pod, settings)
    fields = {k.removeprefix("ERDE_").lower(): v for k, v in env.items() if k.startswith("ERDE_")}
    assert set(fields) <= set(Settings.model_fields), f"not settings: {set(fields) - set(Settings.model_fields)}"
    for name in [n for n in os.environ if n.startswith("ERDE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    Settings()  # read as the service reads them (JSON lists included); raises on a value it would refuse
    (container,) = pod["containers"]
    assert int(env["ERDE_PORT"]) in {p["containerPort"] for p in container["ports"]}
    assert env["ERDE_HOST"] == "0.0.0.0" and env["ERDE_WORKERS"] == "1"


@pytest.mark.parametrize("where", ["deployment", "inferenceservice"])
def test_pod_runs_locked_down(where: str) -> None:
    pod, _ = pods()[where]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid()
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}


@pytest.mark.parametrize("where", ["deployment", "inferenceservice"])
def test_resources_are_requested_and_bounded(where: str) -> None:
    pod, _ = pods()[where]
    (container,) = pod["containers"]
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert set(requests) == set(limits) == {"cpu", "memory"}
    for key in ("cpu", "memory"):
        assert 0 < quantity(requests[key]) <= quantity(limits[key])
    memory_volumes = sum(quantity(v["emptyDir"]["sizeLimit"]) for v in pod["volumes"]
                         if v.get("emptyDir", {}).get("medium") == "Memory")
    assert quantity(limits["memory"]) - memory_volumes >= quantity(requests["memory"])  # /dev/shm counts too


@pytest.mark.parametrize("where", ["deployment", "inferenceservice"])
def test_probes_follow_the_drain_contract(where: str) -> None:
    """Started and ready on /readyz (503 while loading and draining), alive on /healthz (200 while draining)."""
    pod, _ = pods()[where]
    (container,) = pod["containers"]
    port_names = {p["name"] for p in container["ports"]}
    probes = ("startupProbe", "readinessProbe", "livenessProbe")
    paths = {probe: container[probe]["httpGet"]["path"] for probe in probes}
    assert paths == {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    assert all(container[probe]["httpGet"]["port"] in port_names for probe in paths)
    assert container["readinessProbe"]["failureThreshold"] == 1  # the first 503 takes the pod out
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60  # loading and warming the models


@pytest.mark.parametrize("where", ["deployment", "inferenceservice"])
def test_grace_period_outlasts_the_pause_and_the_drain(where: str) -> None:
    """SIGKILL comes terminationGracePeriodSeconds after the pod starts terminating: by then the preStop
    pause, the drain (ERDE_DRAIN_TIMEOUT_S) and uvicorn's close of what is left (drain + 1 s) are over."""
    pod, settings = pods()[where]
    (container,) = pod["containers"]
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(container_env(pod, settings)["ERDE_DRAIN_TIMEOUT_S"])
    assert pause >= 2 * container["readinessProbe"]["periodSeconds"]  # endpoints are updated meanwhile
    assert pod["terminationGracePeriodSeconds"] >= pause + drain + (drain + 1) + 5


@pytest.mark.parametrize("where", ["deployment", "inferenceservice"])
def test_only_volumes_are_writable_and_they_fit(where: str) -> None:
    pod, settings = pods()[where]
    (container,) = pod["containers"]
    env = container_env(pod, settings)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert all("emptyDir" in v for v in mounts.values())
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
    # Two batch arenas of ERDE_MAX_UPLOAD_BYTES per model and worker, twice while a reload swaps versions.
    arenas = 2 * SLOTS * int(env["ERDE_MAX_UPLOAD_BYTES"]) * int(env["ERDE_WORKERS"])
    assert quantity(mounts["/dev/shm"]["emptyDir"]["sizeLimit"]) >= arenas
    # Temporary files (TMPDIR unset: /tmp), among them the metrics several workers share, and $HOME.
    assert "TMPDIR" not in env and "/tmp" in mounts
    assert any(Path(env["HOME"]).is_relative_to(path) for path in mounts if path != "/dev/shm")
    # Set with one worker, it sends prometheus-client to a directory the service only makes for several.
    assert "PROMETHEUS_MULTIPROC_DIR" not in env


@pytest.mark.parametrize("name", ["base", "kserve"])
def test_the_pods_read_the_settings_kustomize_emits(name: str) -> None:
    """The ConfigMap's name carries a hash of its content; every reference must carry the same one."""
    objects = render(BASE if name == "base" else OVERLAYS / name)
    config_map = only(objects, "ConfigMap")["metadata"]["name"]
    assert re.fullmatch(r"erde-config-[a-z0-9]{10}", config_map)
    pod = pods()["deployment" if name == "base" else "inferenceservice"][0]
    (container,) = pod["containers"]
    assert container["envFrom"] == [{"configMapRef": {"name": config_map}}]


def test_objects_select_the_pods_and_ports_that_exist() -> None:
    objects = [*render(OVERLAYS / "keda"), only(render(OVERLAYS / "hpa"), "HorizontalPodAutoscaler")]
    deployment, service = only(objects, "Deployment"), only(objects, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]

    def selects_pods(labels: dict[str, str]) -> bool:
        return bool(labels) and labels.items() <= pod_labels.items()

    assert deployment["spec"]["selector"]["matchLabels"] == {k: v for k, v in pod_labels.items()
                                                             if k != "app.kubernetes.io/part-of"}
    assert selects_pods(service["spec"]["selector"])
    assert selects_pods(only(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    assert selects_pods(only(objects, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"])
    for spread in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]:
        assert selects_pods(spread["labelSelector"]["matchLabels"])
    container_ports = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    assert {p["port"] for r in only(objects, "NetworkPolicy")["spec"]["ingress"] for p in r["ports"]} <= container_ports
    monitor = only(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    for scaler in (only(objects, "ScaledObject"), only(objects, "HorizontalPodAutoscaler")):
        assert scaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                    "name": deployment["metadata"]["name"]}


# ---- alerts and autoscaling: the same rules and one signal everywhere ----

def test_prometheus_rule_is_generated_from_rules_yml() -> None:
    assert PROMETHEUS_RULE.read_text() == prometheus_rule_text(), \
        "deploy/k8s's PrometheusRule differs from docker/prometheus/rules.yml: run python -m tests.deploy.k8s_support"
    rule = only(render(OVERLAYS / "monitoring"), "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())


def test_prometheus_rule_passes_promtool_and_its_job_is_the_service(tmp_path: Path) -> None:
    objects = render(OVERLAYS / "monitoring")
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(only(objects, "PrometheusRule")["spec"]))
    assert "SUCCESS" in promtool("check", "rules", "rules.yml", cwd=tmp_path).stdout
    # Prometheus Operator names the job after the Service: that is the job the rules and scalers select.
    jobs = set(re.findall(r'job="([^"]+)"', PROMETHEUS_RULE.read_text()))
    assert jobs == {only(objects, "Service")["metadata"]["name"]}
    assert "jobLabel" not in only(objects, "ServiceMonitor")["spec"]


def adapter_values() -> dict[str, Any]:
    return yaml.safe_load((K8S / "components" / "hpa" / "prometheus-adapter-values.yaml").read_text())


def autoscaling_queries() -> dict[str, str]:
    """Every query an autoscaler runs, with prometheus-adapter's template filled in as it fills it
    for the HPA (two pods of namespace erde, one value per pod)."""
    (rule,) = adapter_values()["rules"]["custom"]
    adapter = (rule["metricsQuery"].replace("<<.Series>>", "erde_queue_depth")
               .replace("<<.LabelMatchers>>", 'namespace="erde",pod=~"erde-a|erde-b"').replace("<<.GroupBy>>", "pod"))
    (trigger,) = only(render(OVERLAYS / "keda"), "ScaledObject")["spec"]["triggers"]
    (metric,) = only(render(OVERLAYS / "kserve"), "InferenceService")["spec"]["predictor"]["autoScaling"]["metrics"]
    return {"keda": trigger["metadata"]["query"], "kserve": metric["external"]["metric"]["query"],
            "adapter": adapter}


def test_autoscalers_share_one_signal_and_one_target() -> None:
    (trigger,) = only(render(OVERLAYS / "keda"), "ScaledObject")["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert float(trigger["metadata"]["threshold"]) == QUEUE_TARGET
    (hpa_metric,) = only(render(OVERLAYS / "hpa"), "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert hpa_metric["pods"]["metric"]["name"] == "erde_queue_depth"
    assert hpa_metric["pods"]["target"] == {"type": "AverageValue", "averageValue": str(QUEUE_TARGET)}
    (kserve_metric,) = only(render(OVERLAYS / "kserve"), "InferenceService")["spec"]["predictor"]["autoScaling"][
        "metrics"]
    assert kserve_metric["external"]["target"] == {"type": "AverageValue", "averageValue": str(QUEUE_TARGET)}
    assert all("erde_queue_depth" in q for q in autoscaling_queries().values())
    adapter = schema_validator("prometheus-adapter-values.schema.json", KUBERNETES_VERSIONS[0])
    adapter.validate(adapter_values())
    misspelt = set_path(adapter_values(), ("rules", "custom", 0, "metricQuery"), "sum(erde_queue_depth)")
    assert any("'metricQuery' was unexpected" in e.message for e in adapter.iter_errors(misspelt))


def test_autoscaling_queries_compute_the_queue_depth(tmp_path: Path) -> None:
    """promtool evaluates each query over the series two replicas would expose (with the labels the
    ServiceMonitor and KServe's pod names give them) next to another namespace's: the KEDA and KServe
    queries sum our replicas' queues, the adapter's gives each pod its own."""
    queries = autoscaling_queries()
    pods_ = [('namespace="erde", job="erde", pod="erde-a"', 10), ('namespace="erde", job="erde", pod="erde-b"', 30),
             ('namespace="erde", pod="erde-predictor-a"', 10), ('namespace="erde", pod="erde-predictor-b"', 30),
             ('namespace="elsewhere", job="elsewhere", pod="other"', 500)]
    input_series = [{"series": f'erde_queue_depth{{{labels}, model="fashion-mnist"}}', "values": f"{depth}x5"}
                    for labels, depth in pods_]
    expected = {"keda": [("autoscaling:keda", 40)], "kserve": [("autoscaling:kserve", 40)],
                "adapter": [('autoscaling:adapter{pod="erde-a"}', 10), ('autoscaling:adapter{pod="erde-b"}', 30)]}
    rules = {"groups": [{"name": "autoscaling", "rules": [
        {"record": f"autoscaling:{name}", "expr": q} for name, q in queries.items()]}]}
    tests = {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": input_series, "promql_expr_test": [
            {"expr": f"autoscaling:{name}", "eval_time": "2m",
             "exp_samples": [{"labels": labels, "value": value} for labels, value in samples]}
            for name, samples in expected.items()]}]}
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    promtool("check", "rules", "rules.yml", cwd=tmp_path)
    promtool("test", "rules", "tests.yml", cwd=tmp_path)


# ---- the pod's security settings, tried for real ----

def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_service_runs_as_locked_down_as_the_pod(tmp_path: Path) -> None:
    """The Deployment's container, as far as one machine can make it: a private mount namespace where the
    root filesystem is read-only and only the pod's emptyDir volumes are writable (tmpfs of their
    sizeLimit), every capability dropped, no new privileges, and the pod's environment. The image's
    store (/app/model_store) is this repository's, read-only like everything else. Root stays root here
    (the interpreter lives under /root, mode 700); the image runs as uid 10001 (test_pod_runs_locked_down)."""
    pod, settings = pods()["deployment"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v["emptyDir"] for v in pod["volumes"]}
    port = free_port()
    env = {**container_env(pod, settings), "ERDE_STORE": str(ROOT / "model_store"), "ERDE_HOST": "127.0.0.1",
           "ERDE_PORT": str(port), "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}  # the last three as docker/Dockerfile sets them
    mounts = [f"mount -t tmpfs -o size={int(quantity(volumes[m['name']]['sizeLimit']))} tmpfs {m['mountPath']}"
              for m in container["volumeMounts"]]
    # A checkout under one of the pod's mount paths (a clone in /tmp) is hidden by that tmpfs: bind it back,
    # read-only, from the shell's working directory, which still holds it.
    hidden = any(str(ROOT).startswith(m["mountPath"].rstrip("/") + "/") for m in container["volumeMounts"])
    rebind = [f"mkdir -p {ROOT}", f"mount --no-canonicalize --bind /proc/self/cwd {ROOT}",
              f"mount -o remount,bind,ro {ROOT}"]
    script = "\n".join(["set -e", f"cd {ROOT}", "mount --bind -o ro / /", *mounts, *(rebind if hidden else []),
                         f"cd {ROOT}",
                         "exec setpriv --bounding-set -all --inh-caps -all --no-new-privs env -i "
                         + " ".join(f"'{k}={v}'" for k, v in env.items()) + f" {sys.executable} -m service"])
    log = tmp_path / "server.log"
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while not ready(url) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready(url), f"the service did not start:\n{log.read_text()[-3000:]}"
        reply = httpx.post(f"{url}/classify", files={"image": ("x.png", png(1, 28), "image/png")}, timeout=30)
        assert reply.status_code == 200, reply.text
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200
    finally:
        proc.terminate()  # SIGTERM: the service drains and exits
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert not re.search(r"Read-only file system|Errno 30|Permission denied", log.read_text()), log.read_text()
