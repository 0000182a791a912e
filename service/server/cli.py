"""`erde serve`: the service's verb of the `erde` command.

`erde` never imports `service` (docs/design.md §2), so the service registers this verb through the
`erde.commands` entry-point group (pyproject.toml), which `erde.cli` discovers. The help lists
every field of `Settings` with its variable, default and description; the common ones have flags.

A flag overrides its ERDE_* variable by being exported into the environment before the settings
are built: with ERDE_WORKERS > 1 every worker process builds its own settings from it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from typing import Any

from pydantic import ValidationError

from service.server.multiproc import prepare_metrics_dir
from service.settings import Settings

FLAGS = ("host", "port", "workers", "store", "default_model", "device")  # the settings users expect as flags


def variable(name: str) -> str:
    return f"ERDE_{name.upper()}"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown_default(value: Any) -> str:
    """A default written as the environment variable would hold it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list):
        return json.dumps(list(value), separators=(",", ":"))
    return str(value)


def settings_help(width: int = 100) -> str:
    """Every setting: its variable, its flag if it has one, its default, and its description."""
    lines = ["settings: each is read from its ERDE_* variable; a flag overrides the variable"]
    for name, field in Settings.model_fields.items():
        names = variable(name) + (f", {flag(name)}" if name in FLAGS else "")
        lines.append(f"  {names} (default {shown_default(field.default)})")
        lines.extend(textwrap.wrap(field.description or "", width, initial_indent=" " * 6, subsequent_indent=" " * 6,
                                   break_on_hyphens=False))
    return "\n".join(lines)


def settings_table() -> str:
    """The same as `settings_help`, as the README's markdown table (scripts/settings_table.py writes it)."""
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        option = f"`{flag(name)}`" if name in FLAGS else ""
        rows.append(f"| `{variable(name)}` | {option} | `{shown_default(field.default)}` | {field.description} |")
    return "\n".join(rows)


def add_command(commands: argparse._SubParsersAction) -> None:
    """The `erde.commands` entry point: adds `serve` to the `erde` command's verbs."""
    p = commands.add_parser("serve", help="run the HTTP service (settings from ERDE_* variables or flags)",
                            description="Serve every model in the store under uvicorn. SIGTERM drains, SIGHUP "
                                        "reloads the store.",
                            epilog=settings_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in FLAGS:
        field = Settings.model_fields[name]
        text = f"{field.description} ({variable(name)}; default {shown_default(field.default)})"
        p.add_argument(flag(name), dest=name, metavar=name.upper(), help=text.replace("%", "%%"))
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> None:
    given = {name: getattr(args, name) for name in FLAGS if getattr(args, name) is not None}
    for name, value in given.items():
        os.environ[variable(name)] = value
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"erde serve: error: {_first_problem(exc, given)}", file=sys.stderr)
        raise SystemExit(2) from None
    prepare_metrics_dir()  # before the server's modules create their metrics (see service/server/multiproc.py)
    from service.server.main import run  # only now: importing it creates the metrics

    run(settings)


def _first_problem(exc: ValidationError, given: dict[str, str]) -> str:
    """One line naming the flag or variable at fault, its value and what is wrong with it."""
    error = exc.errors()[0]
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if not error["loc"]:  # a rule across fields (the model validator)
        return error["msg"].removeprefix("Value error, ") + more
    name = str(error["loc"][0])
    source = f"{flag(name)} " if name in given else f"{variable(name)}="
    return f"{source}{str(error['input'])[:60]}: {error['msg']}{more}"
