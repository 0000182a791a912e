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


def imports(path: Path, typing_only: bool = True) -> set[str]:
    """The modules `path` imports anywhere in it; without `typing_only`, not those under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    if not typing_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                node.body = []
    found = set()
    for node in ast.walk(tree):
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


INFERENCE_SIDE = {"service.engine.process", "service.engine.compute", "service.engine.decode"}  # torch's side
HEAVY = ("torch", "torchvision", "safetensors.torch", "PIL")


def module_file(module: str) -> Path | None:
    base = ROOT / Path(*module.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def test_the_server_imports_no_torch_on_any_path() -> None:
    """docs/architecture.md, "No torch in the server": nothing the server process can import, at the top of a
    module or inside a function, pulls in torch or an image decoder; only the inference process's own modules
    do, which it reaches by name (`wire.run`). Names the chain of imports that would."""
    chains = {"service.__main__": ["service.__main__"], "service.server.cli": ["service.server.cli"]}
    todo = list(chains)
    while todo:
        module = todo.pop()
        path = module_file(module)
        if path is None:
            continue
        for imported in sorted(imports(path, typing_only=False)):
            heavy = imported.split(".")[0] in HEAVY or imported.startswith(HEAVY[2])
            assert not heavy and imported not in INFERENCE_SIDE, " -> ".join([*chains[module], imported])
            if imported.split(".")[0] in ("service", "erde") and imported not in chains and module_file(imported):
                chains[imported] = [*chains[module], imported]
                todo.append(imported)
    assert {"service.engine.worker", "service.engine.registry", "erde.artifact"} <= set(chains)
