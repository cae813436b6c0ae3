"""What each setting accepts: converters from a raw value (from YAML, TOML, the environment or a flag) to a typed
value, or ValueError with what is wrong (settings.py adds which setting and where it came from)."""

from __future__ import annotations

import os
import posixpath
import re
import shlex
import string
from typing import Any, Callable

from aipm import agents
from aipm.errors import shown
from aipm.fields import MAX_COUNT, MAX_TIMEOUT, NUL_WORD, WORKSPACES
from aipm.yamlkinds import first_not_text, quote_hint


_DIGITS = {int: re.compile(r"[-+]?[0-9]+"),
           float: re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")}


def number(value: Any, kind: type) -> Any:
    """`value` as an int or float, from a number or a string; None when it is neither (booleans are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (str, int) if kind is int else (str, int, float)):
        return None
    if isinstance(value, str):
        value = value.strip()
        if not (value.isascii() and _DIGITS[kind].fullmatch(value)):
            return None  # int() would read "٣" (Arabic-Indic three) as 3 and "1_0" as 10
    try:
        return kind(value)
    except ValueError:
        return None


def _integer(minimum: int, what: str, maximum: int | None = MAX_COUNT) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        found = number(value, int)
        if found is None or found < minimum:
            raise ValueError(f"{shown(value)} is not a {what} integer")
        if maximum is not None and found > maximum:
            raise ValueError(f"{shown(value)} is more than the maximum {maximum}")
        return found

    return convert


positive, non_negative = _integer(1, "positive"), _integer(0, "non-negative")
_seconds = _integer(1, "positive", maximum=None)  # the timeout has its own maximum and message


def percent(value: Any) -> float:
    found = number(value, float)
    if found is None or not 0 < found <= 100:  # NaN fails this test too
        raise ValueError(f"{shown(value)} is not a percentage above 0 and at most 100")
    return found


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"{shown(value)} is not a boolean (true/false, yes/no, on/off, 1/0)")


def timeout(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        return None
    try:
        seconds = _seconds(value)
    except ValueError:
        raise ValueError(f"{shown(value)} is not a positive whole number of seconds, or none") from None
    if seconds > MAX_TIMEOUT:
        raise ValueError(f"{seconds} is more than the maximum {MAX_TIMEOUT} seconds (a week); or say none")
    return seconds


def text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{shown(value)} is not a non-empty string{quote_hint(value)}")
    _no_nul(value)
    return value


def _no_nul(value: str) -> None:
    """Strings that reach a command line, the environment or a path: each ends at a NUL there (see NUL_WORD)."""
    if "\0" in value:
        raise ValueError(f"{shown(value)} {NUL_WORD}")


def orders_dir(value: Any) -> str:
    """A directory inside the project, written relative to its root: orders are version-controlled with it, and
    every order path (locks, the audit, the view) is taken relative to the root."""
    path = text(value)
    parts = posixpath.normpath(path.replace(os.sep, "/")).split("/")
    if os.path.isabs(path):
        raise ValueError(f"{path!r} is an absolute path; give a directory relative to the project root")
    if parts[0] == "..":
        raise ValueError(f"{path!r} is outside the project; give a directory relative to the project root")
    if parts == ["."]:  # every directory of the project an order (src/, docs/), refused one by one at validate
        raise ValueError(f"{path!r} is the project root itself; give a directory of its own (orders, the default)")
    if parts[0] in (".aipm", ".git"):
        raise ValueError(f"{path!r} is inside {parts[0]}/, which is not version-controlled with the project; give "
                         "a directory of its own (orders, the default)")
    return path


def argv(value: Any) -> tuple[str, ...]:
    """A command as argv: a list of strings, or a string split like a shell would."""
    given = value
    if isinstance(value, str):
        try:
            value = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"{shown(value)} cannot be split into arguments: {exc}") from None
    if not isinstance(value, list) or not value or not all(isinstance(a, str) and a for a in value):
        raise ValueError(f"{shown(given)} is not a command (a non-empty list of strings, or a string)"
                         f"{quote_hint(first_not_text(value))}")
    for word in value:
        _no_nul(word)
    return tuple(value)


# What aipm fills into worker.command: the worker module formats the template with exactly these.
PLACEHOLDERS = ("model", "task_id", "order_id", "prompt_file")


def _fields(text: str, inner: bool = False):
    """The placeholders in a format string, each as (name, whether it is nested in a format spec: `{model:{x}}`)."""
    for _, name, spec, _ in string.Formatter().parse(text):
        if name is not None:
            yield name, inner
            yield from _fields(spec or "", True)


def template(value: Any) -> tuple[str, ...]:
    """worker.command: an argv whose only placeholders are PLACEHOLDERS, so a typo fails every command (exit 2)
    rather than each launch of a task that uses it."""
    words = argv(value)
    for part in words:
        try:
            found = list(_fields(part))
            unknown = next((name for name, _ in found if name not in PLACEHOLDERS), None)
            # A spec made of a value (`{task_id:{model}}`) is a bad one for most values: no check here could pass it.
            inner = next((name for name, nested in found if nested), None)
            if unknown is None and inner is None:
                part.format(**dict.fromkeys(PLACEHOLDERS, ""))  # a format spec no string takes (`{model:d}`)
        except ValueError as exc:  # a lone brace, or that spec
            raise ValueError(f"{part!r}: {exc}; write {{{{ and }}}} for literal braces") from None
        if unknown is not None:
            raise ValueError(f"bad placeholder {{{unknown}}} in {part!r}; use {{model}}, {{task_id}}, {{order_id}} "
                             "or {prompt_file}")
        if inner is not None:
            raise ValueError(f"{{{inner}}} in a format spec in {part!r}; write each placeholder on its own")
    return words


def runner(value: Any) -> str:
    if value not in ("local", "ray"):
        raise ValueError(f"{shown(value)} is not a runner; use local or ray")
    return value


def workspace(value: Any) -> str:
    if value in WORKSPACES:
        return value
    raise ValueError(f"{shown(value)} is not one of {', '.join(WORKSPACES)}")


def review(value: Any) -> str | tuple[str, ...] | None:
    """A review command: null (no review), a string (run by the shell) or a list (argv)."""
    if value is None:
        return value
    if isinstance(value, str) and value.strip():
        _no_nul(value)
        return value
    if isinstance(value, list):
        return argv(value)
    raise ValueError(f"{shown(value)} is not a command (a string, a list of strings, or null){quote_hint(value)}")


def agent(value: Any) -> str:
    if value not in agents.NAMES:
        raise ValueError(f"{shown(value)} is not one of {', '.join(agents.NAMES)}")
    return value


def budget(value: Any) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        return None
    found = number(value, float)
    if found is None or not agents.MIN_DOLLARS <= found < agents.MAX_DOLLARS:  # (fields.money_field says why)
        raise ValueError(f"{shown(value)} is not a number of US dollars from {agents.MIN_DOLLARS:.6f} below "
                         f"{agents.MAX_DOLLARS:,.0f}, or none")
    return found
