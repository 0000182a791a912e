"""Write the README's settings table from the Settings fields (service/settings.py), the same text
`erde serve --help` prints; tests/service/test_cli.py checks the README holds exactly this table.

Usage: .venv/bin/python scripts/settings_table.py   (after adding or changing a setting)
"""

from __future__ import annotations

import re
from pathlib import Path

from service.server.cli import settings_table

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- settings:begin -->\n)(?:.*?\n)?(<!-- settings:end -->)", re.S)


def main() -> None:
    text = README.read_text()
    if not BLOCK.search(text):
        raise SystemExit("README.md has no <!-- settings:begin --> ... <!-- settings:end --> block")
    README.write_text(BLOCK.sub(lambda m: m[1] + settings_table() + "\n" + m[2], text))


if __name__ == "__main__":
    main()
