"""The one parser for the numbers a client sends: ASCII digits only, bounded length.

Python's `str.isdigit()` and `int()` accept far more than HTTP or JSON mean by a number:
`"²".isdigit()` is true and `int("²")` fails, `int("١٢")` is 12, `int(" 7 ")` and `int("1_0")`
succeed, and `int()` of more than 4,300 digits raises. Each of those once reached a 500. Here a
number is what RFC 9110 calls `1*DIGIT` (and, for a decimal, an optional sign, a fraction and an
exponent, in ASCII), and anything else is None, for the caller to refuse as a client error.
"""

from __future__ import annotations

import re

MAX_DIGITS = 18  # every integer the API reads fits in an int64; longer runs are refused unread
MAX_DECIMAL = 64  # characters of a decimal number: far more than a float64 needs to round-trip

_INTEGER = re.compile(rb"[0-9]{1,%d}" % MAX_DIGITS)
_DECIMAL = re.compile(rb"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?")


def _ascii(value: str | bytes) -> bytes | None:
    if isinstance(value, str):
        return value.encode("ascii") if value.isascii() else None
    return value


def parse_int(value: str | bytes | None) -> int | None:
    """A non-negative integer written as 1 to MAX_DIGITS ASCII digits, else None."""
    if value is None:
        return None
    raw = _ascii(value)
    return int(raw) if raw is not None and _INTEGER.fullmatch(raw) else None


def parse_decimal(value: str | bytes | None) -> float | None:
    """A finite decimal number in ASCII (`-0.5`, `1e-3`, `.25`), at most MAX_DECIMAL characters, else None."""
    if value is None:
        return None
    raw = _ascii(value)
    if raw is None or len(raw) > MAX_DECIMAL or not _DECIMAL.fullmatch(raw):
        return None
    number = float(raw)
    return number if number not in (float("inf"), float("-inf")) else None
