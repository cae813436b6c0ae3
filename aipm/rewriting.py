"""How the writer edits a task file's text: the managed values rendered as YAML scalars on their own lines, every
other character kept, and the result proven to parse to the old mapping with exactly the changes applied. Pure:
no file is read or written here (writer.py does that).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import Any

import yaml

from aipm import flatyaml
from aipm.model import MANAGED_FIELDS, Priority, Status
from aipm.patch import Unpatchable, patch
from aipm.store import DuplicateKey, load_yaml


def _render(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (Status, Priority)):
        return value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return money(value)
    if isinstance(value, dict):  # token counts: a flow mapping keeps the value on its one line
        return "{" + ", ".join(f"{k}: {_render(v)}" for k, v in value.items()) + "}"
    # Timestamps are quoted so YAML keeps them strings. A character YAML cannot hold as it is (a control character)
    # is escaped in a double-quoted string (JSON's is one): the file would not parse, and the write was refused.
    text = str(value)
    if (_UNPRINTABLE_ASCII if text.isascii() else _unprintable()).search(text):
        return json.dumps(text)
    return "'" + text.replace("'", "''") + "'"


# (a line break too, \x85 and \u2028 included: the value must stay on its key's line)
_UNPRINTABLE_ASCII = re.compile("[^\t\x20-\x7e]")


@functools.cache
def _unprintable() -> re.Pattern[str]:
    """The same for any text; compiled when first needed: its classes take ~5 ms to compile, a start-up cost of
    every aipm command, while the values aipm writes are nearly always ASCII."""
    return re.compile("[^\t\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def money(value: float) -> str:
    """Dollars with at most six decimals and always a dot, so YAML reads a float back (`1e-05` is a string)."""
    text = f"{round(value, 6):.6f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def rewrite(text: str, updates: Mapping[str, Any], old: Mapping[str, Any] | None = None) -> str:
    """`text` with the managed fields in `updates` set (see aipm.patch), every other character kept.

    The result is proven before it is returned: it must parse to the old mapping (`old`, when the caller parsed
    it already) with exactly `updates` applied. Otherwise Unpatchable is raised and nothing may be written.
    """
    return rewrite_proven(text, updates, old)[0]


def rewrite_proven(text: str, updates: Mapping[str, Any], old: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """rewrite(), and the mapping the new text was proven to parse to."""
    for key in updates:
        if key not in MANAGED_FIELDS:
            raise KeyError(f"{key} is not a field aipm writes")
    new = patch(text, {key: _render(value) for key, value in updates.items()})
    expected = dict(load_yaml(text) if old is None else old)
    expected.update(updates)  # Status and Priority are str enums: equal to the strings they parse back to
    try:
        got = flatyaml.mapping(new)  # what libyaml reads, where the new text is in the flat form (flatyaml.py)
        if got is None:
            got = load_yaml(new)
    except (yaml.YAMLError, DuplicateKey, Unpatchable) as exc:
        raise Unpatchable(next(iter(updates), None), f"the edited file would not parse ({exc})") from None
    if got != expected:
        wrong = sorted(str(k) for k in {*expected, *got} if k not in got or k not in expected or got[k] != expected[k])
        raise Unpatchable(wrong[0] if wrong else None, "the edited file would not hold the same data")
    return new, got
