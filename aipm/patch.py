"""Minimal-diff edits of the managed fields of a task file's text, guided by the YAML parser's own positions.

libyaml reports where every value starts and ends (in characters, after a BOM), so a managed value is replaced
exactly where it is, whatever the file's form: quoted or spaced keys (`"status" : X`), flow mappings, document
markers, CRLF, tags, comments and block scalars around it. Every other character stays as it was. A missing key
is added after the last entry of the top-level mapping (the managed block, in files aipm creates).

The one form this cannot edit without changing other data is a managed value shared through YAML anchors and
aliases; `check` refuses it when the file is loaded, so a file `validate` accepted can always be written.
The store verifies every result by parsing it again before it replaces a file.

Why not a round-trip library: ruamel.yaml, measured on a commented task file, took ~18× longer per write and
changed bytes it had no business changing (dropped quotes, re-indented a list, moved comments, re-quoted a flow
mapping's values); the contract is that only the managed values change.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import yaml

from aipm import flatyaml
from aipm.model import MANAGED_FIELDS

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_MANAGED = frozenset(MANAGED_FIELDS)
_BREAKS = "\r\n\x85\u2028\u2029"  # what libyaml counts as a line break
_ANCHOR = re.compile(r"(?:![^\s&]*\s+)*&")  # node properties (tags, then an anchor) before the value
_BREAK = re.compile(f"[{_BREAKS}]")


class Unpatchable(Exception):
    """A managed field written in a form the writer cannot change without touching other data."""

    def __init__(self, key: str | None, reason: str):
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key, self.reason = key, reason


def check(root: yaml.Node, text: str) -> None:
    """Refuse managed values that are aliases or carry an anchor: changing one would change another key too."""
    if type(root) is not yaml.MappingNode:
        return
    off = 1 if text.startswith("\ufeff") else 0
    for key, value in root.value:
        if type(key) is yaml.ScalarNode and key.value in _MANAGED:
            start = value.start_mark.index + off
            if start < key.end_mark.index + off:
                raise Unpatchable(key.value, "is an alias (*name); aipm writes this field, so give its value")
            if _ANCHOR.match(text, start):
                raise Unpatchable(key.value, "carries an anchor (&name); aipm writes this field, so drop the anchor")


def patch(text: str, rendered: Mapping[str, str]) -> str:
    """`text` with each key of `rendered` set to that YAML text (a plain scalar); missing keys appended."""
    flat = _flat(text, rendered)
    if flat is not None:
        return flat
    loader = Loader(text)
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as exc:
        raise Unpatchable(None, f"does not parse: {exc}") from None
    finally:
        loader.dispose()
    if type(root) is not yaml.MappingNode:
        raise Unpatchable(None, "is not a mapping")
    check(root, text)
    off = 1 if text.startswith("\ufeff") else 0
    pairs = {k.value: (k, v) for k, v in root.value if type(k) is yaml.ScalarNode}
    edits: list[tuple[int, int, int, str]] = []  # start, order at the same start, end, replacement
    missing = []
    for key, value in rendered.items():
        if key not in pairs:
            missing.append(f"{key}: {value}")
            continue
        k, v = pairs[key]
        start, end = v.start_mark.index + off, v.end_mark.index + off
        if start == end:  # an empty value (`status:`, `{status: }`, `{status}`) is null: write after the colon
            colon = len(text[:start].rstrip(" \t"))
            if text[colon - 1] == ":":
                edits.append((colon, 0, colon, " " + value))
            else:
                edits.append((start, 0, end, ": " + value))
            continue
        span = text[start:end]
        # A block scalar's span ends with its line breaks: keep them, they end the line.
        body = span.rstrip(" \t" + _BREAKS)
        edits.append((start, 0, end, value + span[len(body):]))
    if missing:
        edits.append(_append(text, root, off, missing))
    # From the end backwards, so earlier positions stay valid; at one position the append goes last.
    for start, _, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def _flat(text: str, rendered: Mapping[str, str]) -> str | None:
    """patch() of a text in the flat form (flatyaml: one `key: value` line per key, "\n" line ends), where every
    value is the rest of its line: the same edits, found without libyaml. None for any other text."""
    if flatyaml.mapping(text) is None:
        return None
    spans: dict[str, tuple[int, int]] = {}
    pos = last = 0
    for line in text.split("\n"):
        if line and line[0] != "#":
            colon = line.index(": ")
            last = pos + len(line)
            spans[line[:colon]] = (pos + colon + 2, last)
        pos += len(line) + 1
    edits = [(*spans[key], value) for key, value in rendered.items() if key in spans]
    missing = "".join(f"\n{key}: {value}" for key, value in rendered.items() if key not in spans)
    if missing:  # after the last entry's line, as _append puts them
        edits.append((last, last, missing if last < len(text) else missing + "\n"))
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def _append(text: str, root: yaml.MappingNode, off: int, entries: list[str]) -> tuple[int, int, int, str]:
    """Where and what to insert so `entries` follow the mapping's last entry, in the mapping's own style."""
    if not root.value:  # `{}`: the only empty mapping there is
        pos = root.start_mark.index + off + 1
        return pos, 1, pos, ", ".join(entries)
    last_key, last_value = root.value[-1]
    pos = max(last_key.end_mark.index, last_value.end_mark.index) + off
    if root.flow_style:
        return pos, 1, pos, "".join(", " + entry for entry in entries)
    eol = "\r\n" if "\r\n" in text else "\r" if "\r" in text else "\n"
    indent = " " * root.start_mark.column
    lines = [indent + entry for entry in entries]
    if pos == 0 or text[pos - 1] in _BREAKS:  # the last value (a block scalar) ended its own line
        return pos, 1, pos, "".join(line + eol for line in lines)
    if getattr(last_value, "style", None) in ("|", ">"):
        # A block scalar that ends the file without a line break would gain one: go before its key instead.
        line_start = last_key.start_mark.index + off - last_key.start_mark.column
        return line_start, 1, line_start, "".join(line + eol for line in lines)
    # After the rest of the last value's line (its comment stays on it).
    found = _BREAK.search(text, pos)
    if found:
        return found.start(), 1, found.start(), "".join(eol + line for line in lines)
    return len(text), 1, len(text), "".join(eol + line for line in lines) + eol
