"""erde's imports: it never imports service (service depends on erde, never the other way round),
and its modules import each other without a cycle, counting imports inside functions too."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULES = sorted(f"erde.{p.stem}" for p in (ROOT / "erde").glob("*.py") if p.stem != "__init__")


def test_importing_every_erde_module_imports_no_service_module() -> None:
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m == 'service' or m.startswith('service.')))")
    result = subprocess.run([sys.executable, "-c", code, *MODULES], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert len(MODULES) > 10  # the glob found the package


def _erde_imports(module: str) -> set[str]:
    tree = ast.parse((ROOT / Path(*module.split("."))).with_suffix(".py").read_text())
    found = set()
    for node in ast.walk(tree):  # every import, at the top or inside a function
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    assert not any(name == "service" or name.startswith("service.") for name in found), module
    return {name for name in found if name in MODULES}


def test_erde_modules_import_each_other_without_a_cycle() -> None:
    graph = {module: _erde_imports(module) for module in MODULES}
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None
    assert order.index("erde.calibrate") < order.index("erde.runs") < order.index("erde.train")
