"""The service's layers import only downwards (service/__init__.py, docs/architecture.md): the engine
never imports the edge, the API or the server; the edge never the API or the server; the API never
the server; the base modules none of them. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["engine", "edge", "api", "server"]  # each may import those before it
BASE = {"settings", "metrics", "errors", "record", "endpoints", "schemas", "numbers"}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "service" or len(parts) < 2:
        return None
    return "base" if parts[1] in BASE else parts[1] if parts[1] in LAYERS else None


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from service import metrics`
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


FILES = sorted((ROOT / "service").rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_a_module_imports_only_its_own_layer_and_those_below(path: Path) -> None:
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    own = layer_of(module)
    if own is None:  # service/__init__.py and __main__.py
        return
    allowed = {"base"} | ({"base"} if own == "base" else set(LAYERS[:LAYERS.index(own) + 1]))
    wrong = sorted(m for m in imports(path) if layer_of(m) not in (None, *allowed))
    assert not wrong, f"{module} ({own}) imports {wrong}"


def test_every_file_of_the_service_is_in_a_layer() -> None:
    stray = [p for p in FILES if p.parent == ROOT / "service" and p.stem not in BASE | {"__init__", "__main__"}]
    assert len(FILES) > 25 and not stray, stray
