"""How an error names a value YAML read, and the fix when YAML read it as something else than the user meant
(`command: true` is a boolean to YAML, `timeout: "10"` text, `5e2` a string): shared by task files and settings,
whose values may come from TOML instead (pyproject.toml's [tool.aipm]: `reading`).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import re
from typing import Any

from aipm import agents
from aipm.errors import shown


# What YAML read, as its kinds are called: `NoneType` (of `- ` with nothing after it) said nothing to a YAML writer.
_KINDS = {dict: "a mapping", list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean",
          type(None): "null", dt.date: "a date", dt.datetime: "a date", dt.time: "a time", bytes: "binary data",
          set: "a set", tuple: "a mapping"}  # (!!omap and !!pairs items are one-key mappings; a time is TOML's)


# The language the value being checked was read from: its errors name it ("TOML read 3 as a number" of a
# pyproject.toml, where "YAML read" sent the user looking for a YAML file).
reading: contextvars.ContextVar[str] = contextvars.ContextVar("reading", default="YAML")


def kind(value: Any) -> str:
    return _KINDS.get(type(value), "a value of another kind")


_QUOTED_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)\s*")


def as_number(value: Any) -> str:
    """A value given where a number is wanted, as an error shows it: `timeout: "10"` was said to be no positive
    integer with no word of the quotes, and `timeout: 2001-01-01` as `datetime.date(2001, 1, 1)`."""
    if isinstance(value, str) and _QUOTED_NUMBER.fullmatch(value):
        return f"{shown(value)}: {reading.get()} read it as text; write the number without quotes"
    if isinstance(value, dt.date):
        return f"{value}, which {reading.get()} read as a date"
    return shown(value)


def quote_hint(value: Any) -> str:
    """The fix for a value YAML read as no text where text is wanted (`command: true`, `depends_on: [1]`: an
    unquoted number, true/false, yes/no, on/off is no string to YAML); "" for any other value."""
    if isinstance(value, (bool, int, float)):
        return f"; {reading.get()} read {json.dumps(value)} as {kind(value)}, not text: put it in quotes"
    if isinstance(value, (dt.date, dt.time)):  # `title: 2026-01-01` was said to be "not date"
        return f"; {reading.get()} read {value} as {kind(value)}, not text: put it in quotes"
    return ""


def not_text(value: Any) -> str:
    return quote_hint(value) or f", not {kind(value)}"


def first_not_text(value: Any) -> Any:
    """The value, or a list's first item, that is no string (None if none is)."""
    if isinstance(value, list):
        return next((v for v in value if not isinstance(v, str)), None)
    return None if isinstance(value, str) else value


_EXPONENT = re.compile(r"[-+]?(\d+|\d+\.\d*|\.\d+)[eE][-+]?\d+")


def text_number(value: Any) -> str:
    """Why a number the user wrote is text: YAML 1.1 (PyYAML's) reads an exponent without a dot in its mantissa or
    a sign in its exponent (`5e2`, `1e-6`, `1.0e6`) as a string, where aipm.yaml's settings take it as a number."""
    if not (isinstance(value, str) and _EXPONENT.fullmatch(value.strip())):
        return ""
    number = float(value)
    plain = f"{number:.6f}".rstrip("0").rstrip(".") + " or " if abs(number) < agents.MAX_DOLLARS else ""
    return f" (YAML reads {value} as text: write {plain}{number:.1e})"
