"""Every reason the service counts in erde_rejected_total is classified for the alerts (issue 11):
server-caused reasons page (rules.yml's ErdeRequestsRejected allow-list, each one proved to fire in
rules_test.yml), client-caused ones never do (rules_test.yml's client group, proved silent). A new
reason that is in neither fails here, before it can page someone or hide an outage.

The reasons are read from the source: `reason=`/`code=` keywords (a ServiceError's reason defaults
to its code), error classes' `code = ...`, and the literals the record, middleware and HTTP protocol set.
"""

from __future__ import annotations

import re

import yaml

from tests.deploy.deploy_support import PROMETHEUS_DIR, ROOT

SOURCES = [
    r'reason="(\w+)"', r'code="(\w+)"', r'code = (?:\d+, )?"(\w+)"', r'\.reason = "(\w+)"', r'reason or "(\w+)"',
    r'_refuse\(\d+, "(\w+)"', r'observe_rejected\([^,()]+, "(\w+)"\)',
]
NOT_REASONS = {"overloaded", "deadline_exceeded"}  # codes whose errors always carry another reason


def reasons_in_code() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "service").rglob("*.py"):
        text = path.read_text()
        for pattern in SOURCES:
            found.update(re.findall(pattern, text))
    return found - NOT_REASONS


def rule_reasons() -> set[str]:
    rules = [r for g in yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())["groups"] for r in g["rules"]]
    (rule,) = [r for r in rules if r.get("alert") == "ErdeRequestsRejected"]
    (allowed,) = re.findall(r'erde_rejected_total\{reason=~"([^"]+)"\}', rule["expr"])
    return set(allowed.split("|"))


def group_reasons(name: str) -> set[str]:
    tests = yaml.safe_load((PROMETHEUS_DIR / "rules_test.yml").read_text())["tests"]
    (group,) = [t for t in tests if t["name"] == name]
    return {m for s in group["input_series"] for m in re.findall(r'erde_rejected_total\{.*reason="(\w+)"', s["series"])}


def test_every_reason_in_the_code_is_classified() -> None:
    code = reasons_in_code()
    assert {"queue_full", "client_disconnect", "header_too_large", "invalid_host"} <= code, code  # the scan works
    server, client = rule_reasons(), group_reasons("client-caused refusals and disconnects page no one")
    assert not server & client, server & client
    assert code - server - client == set(), "classify these reasons in rules.yml or rules_test.yml"


def test_every_server_reason_is_proved_to_page() -> None:
    assert rule_reasons() == group_reasons("every refusal the service causes pages")
