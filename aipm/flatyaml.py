"""The flat form of a task file, read without libyaml: one `key: value` line per key.

Most task files are a handful of lines like `id: T7`, `command: "make x"`, `depends_on: [T5, T6]`,
`started_at: '2026-12-01T10:00:00'`. For them libyaml's parser and node objects cost three times what reading the
lines does, and a cold load of a big order is mostly that. `mapping` reads exactly that form and nothing more: a
line it does not know for certain (an indented line, a comment after a value, an escape, a tab, a key given twice,
a number it would have to convert, ...) and it returns None, and the file goes through libyaml as before. So
what it returns is always what libyaml returns for the same text (tests/test_flatyaml.py compares the two).

Plain scalars are typed by PyYAML's own table of implicit resolvers (the one CSafeLoader uses), so `true`, `on`,
`null`, `1_000` or `2026-12-01` mean here what they mean there, or send the file to libyaml.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from yaml.resolver import Resolver

# Anything but printable ASCII and "\n" (a tab, "\r" or U+2028 that libyaml reads as a line break, a control
# character it refuses), even in a comment, sends the file to libyaml.
_OTHER = re.compile(r"[^\n -~]")
# A key, ": ", and the value, which must be the whole rest of the line (no trailing blanks, no comment).
_LINE = re.compile(r"([a-z_][a-z0-9_]*): (.+)")
_PLAIN = re.compile(r"-?[A-Za-z0-9_./](?:[A-Za-z0-9_./ +=-]*[A-Za-z0-9_./+=-])?")  # no `: `, ` #`, quote, indicator
_ITEM = re.compile(r"-?[A-Za-z0-9_./][A-Za-z0-9_./+=-]*")  # a plain item of a flow sequence: no blank, no `,[]{}`
_DOUBLE = re.compile(r'"([ !#-\[\]-~]*)"')  # printable ASCII, no `"`, no `\` (no escapes)
_SINGLE = re.compile(r"'([ -&(-~]*)'")  # printable ASCII, no `'` (so no `''`)
_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")  # decimal only: `007` is octal to YAML 1.1, `1_000` a thousand
_FLOAT = re.compile(r"-?[0-9]+\.[0-9]+")
_RESOLVERS = Resolver.yaml_implicit_resolvers
_STR, _NULL, _BOOL, _INT_TAG, _FLOAT_TAG = (
    f"tag:yaml.org,2002:{t}" for t in ("str", "null", "bool", "int", "float"))
_KEYS: dict[str, bool] = {}  # key → whether it is a string to YAML (`on:` is True), as looked up so far
_BOOLS = {"yes": True, "no": False, "true": True, "false": False, "on": True, "off": False}


class _Unsure(Exception):
    """Not certainly the flat form: leave the file to libyaml."""


# The last texts read and their mappings: a status write reads its file's text twice (its parse, then patch.py's
# edit) and proves the text it writes, which the next write of that file reads again, after the writes of the
# other running tasks' files (two were kept: with two workers the next write of a file found its text gone).
_known: dict[str, dict[str, Any]] = {}
_KNOWN_MAX = 16
# Held to drop the oldest and add (a parse's cost beside it is nothing): `aipm ui` reads task files in several
# threads, and two dropping the same oldest at once raised KeyError out of a read.
_keeping = threading.Lock()


def mapping(text: str) -> dict[str, Any] | None:
    """The mapping of a flat task file, or None when `text` is not certainly in the flat form."""
    known = _known.get(text)
    if known is not None:
        return _copy(known)  # a copy: what a caller does with its mapping is not the next caller's
    data = _read(text)
    if data is not None:
        kept = _copy(data)  # kept apart from the caller's, which is the caller's own
        with _keeping:
            if len(_known) >= _KNOWN_MAX:
                del _known[next(iter(_known))]  # the oldest
            _known[text] = kept
    return data


def _copy(data: dict[str, Any]) -> dict[str, Any]:
    """The mapping and its lists (the flat form's only containers, of scalars) copied."""
    return {key: list(value) if type(value) is list else value for key, value in data.items()}


def _read(text: str) -> dict[str, Any] | None:
    if _OTHER.search(text):
        return None
    data: dict[str, Any] = {}
    try:
        for line in text.split("\n"):
            if not line or line[0] == "#":  # a blank line, a comment line
                continue
            match = _LINE.fullmatch(line)
            if match is None:
                return None
            key, value = match.groups()
            known = _KEYS.get(key)
            if known is None:
                known = _tag(key) == _STR
                if len(_KEYS) < 4096:  # the keys of task files are few; a file of made-up keys must not grow it
                    _KEYS[key] = known
            if not known or key in data:
                return None
            data[key] = _value(value)
    except _Unsure:
        return None
    return data or None


def _value(text: str) -> Any:
    first = text[0]
    if first == "[":
        if text == "[]":
            return []
        if text[-1] != "]":
            raise _Unsure
        return [_item(item) for item in text[1:-1].split(", ")]
    if first == '"' or first == "'":
        return _quoted(text)
    if _PLAIN.fullmatch(text) is None:
        raise _Unsure
    return _plain(text)


def _item(text: str) -> Any:
    if text[:1] in ('"', "'"):
        return _quoted(text)
    if _ITEM.fullmatch(text) is None:
        raise _Unsure
    return _plain(text)


def _quoted(text: str) -> str:
    match = (_DOUBLE if text[0] == '"' else _SINGLE).fullmatch(text)
    if match is None:
        raise _Unsure
    return match.group(1)


def _plain(text: str) -> Any:
    """A plain scalar as SafeLoader types it: str, null, bool, or a number in its simplest spelling."""
    tag = _tag(text)
    if tag == _STR:
        return text
    if tag == _NULL:
        return None
    if tag == _BOOL:
        return _BOOLS[text.lower()]
    if tag == _INT_TAG and _INT.fullmatch(text):
        return int(text)
    if tag == _FLOAT_TAG and _FLOAT.fullmatch(text):
        return float(text)
    raise _Unsure


def _tag(text: str) -> str:
    """The tag PyYAML's resolver gives a plain scalar (Resolver.resolve, for a non-empty plain scalar)."""
    for tag, regexp in _RESOLVERS.get(text[0], ()):
        if regexp.match(text):
            return tag
    for tag, regexp in _RESOLVERS.get(None, ()):
        if regexp.match(text):
            return tag
    return _STR
