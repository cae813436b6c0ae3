"""What each key of a task file may hold: one validator per kind of value, and the Task they build.

Every mistake is a ValidationError naming the file and the field, so bad input is one line and exit code 2.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aipm import agents
from aipm.errors import ValidationError, did_you_mean, shown
from aipm.model import ID_PATTERN, ID_RULE, Priority, Resources, Status, Task, new_task
from aipm.paths import Normaliser, PathError
from aipm.yamlkinds import as_number, first_not_text, kind, not_text, quote_hint, text_number

# The event loop waits at most 2**31 ms (24.8 days) at a time; a week is a generous bound for one attempt.
MAX_TIMEOUT = 7 * 24 * 3600
# Bounds of max_attempts, max_rework and max_workers: far above any real use, so that a typo (`1000000`) is an
# error rather than a task retried for ever, and every count stays exact in JSON readers (jq, the dashboard).
MAX_COUNT = 1000
# Bound of the tallies aipm writes (attempts, reworks, preemptions), which `aipm retry` lets pass max_attempts: a
# hand-written absurd one is an error, not an attempt whose log name is too long to create.
MAX_TALLY = 10**9

TASK_KEYS = (
    "id", "title", "status", "priority", "depends_on", "target_files", "command", "prompt", "model",
    "review", "timeout", "max_attempts", "attempts", "reworks", "started_at", "finished_at", "exit_code",
    "resources",
    "max_rework", "reason",
    "agent", "max_cost_usd", "cost_usd", "cost_unreported_usd", "tokens", "session_id",
    "preemptions",
    "confine",
    "workspace", "workspace_setup", "workspace_copy",
)


# What other task runners and CI files call a task file's keys (hints only: the file must use our names).
SYNONYMS = {
    "dependencies": "depends_on", "deps": "depends_on", "needs": "depends_on", "requires": "depends_on",
    "after": "depends_on", "files": "target_files", "paths": "target_files", "outputs": "target_files",
    "cmd": "command", "run": "command", "script": "command", "name": "title", "retries": "max_attempts",
    "reviewer": "review", "budget": "max_cost_usd",
}


def check_keys(path: Path, data: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for key in data:
        if not isinstance(key, str) or key not in allowed:
            said = "null" if key is None else str(key).lower() if isinstance(key, bool) else str(key)  # as written
            hint = (did_you_mean(said.replace("-", "_"), allowed, SYNONYMS)
                    or f"; known keys: {', '.join(allowed)}")
            raise ValidationError(str(path), said, f"unknown key{hint}")


def str_field(path: Path, data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ValidationError(str(path), key, f"must be a string{not_text(value)}")
    return value


def one_line(path: Path, data: Mapping[str, Any], key: str, longer: str = "prompt") -> str:
    """A title: shown in one table cell and one log line (a trailing newline, as `>` gives, is dropped).
    `longer`: the file's key for longer text, which the error points to (`description` in order.yaml)."""
    value = (str_field(path, data, key) or "").rstrip("\n")
    if len(value.splitlines()) > 1:  # any line break Python knows (\r, \u2028 too)
        raise ValidationError(str(path), key, f"must be one line; longer text belongs in `{longer}` or a comment")
    return value


def _positive_int(path: Path, data: Mapping[str, Any], key: str, maximum: int | None = None,
                  besides: str = "") -> int | None:
    """`besides`: what else the key takes, for the message (" or none")."""
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(str(path), key, f"must be a positive integer{besides}, not {as_number(value)}")
    return _at_most(path, key, value, maximum)


NO_LIMIT = 0  # a task's `timeout: none`: no time limit, whatever the timeout setting says (Task.timeout)


def _timeout(path: Path, data: Mapping[str, Any], key: str) -> int | None:
    """Seconds, or `none` (NO_LIMIT), as aipm.yaml's timeout takes it: a task had no way to run without the
    project's limit (`timeout:` left empty means that limit)."""
    value = data.get(key)
    if isinstance(value, str) and value.lower() == "none":
        return NO_LIMIT
    return _positive_int(path, data, key, MAX_TIMEOUT, " or none")


def _count(path: Path, data: Mapping[str, Any], key: str, maximum: int | None = None) -> int:
    value = data.get(key, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationError(str(path), key, f"must be a whole number ≥ 0, not {as_number(value)}")
    return _at_most(path, key, value, maximum)


def _at_most(path: Path, key: str, value: int, maximum: int | None) -> int:
    if maximum is not None and value > maximum:
        raise ValidationError(str(path), key, f"{value} is more than the maximum {maximum}")
    return value


# A command line (argv, the environment) ends each string at a NUL: the worker ran `printf a` for "printf a\0b >
# out", exit 0, DONE. In double quotes YAML reads `\0` as a NUL, so a shell escape written there makes one.
NUL_WORD = ("holds a NUL byte (a string passed to a program or the system ends there); in double quotes YAML reads "
            "\\0 as one: write \\\\0, or use single quotes")


def _command(path: Path, data: Mapping[str, Any], key: str) -> str | tuple[str, ...] | None:
    value = data.get(key)
    if value is None:
        return value
    if isinstance(value, str):
        if not value.strip():
            raise ValidationError(str(path), key, "is empty; give a command, or leave the key out")
        if "\0" in value:
            raise ValidationError(str(path), key, NUL_WORD)
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value) and value[0]:
        if any("\0" in v for v in value):
            raise ValidationError(str(path), key, NUL_WORD)
        return tuple(value)
    raise ValidationError(
        str(path), key, "must be a string (run by /bin/sh -c) or a list of strings (argv) naming a program"
                        f"{quote_hint(first_not_text(value)) or _unnested(key, value)}"
    )


def _unnested(key: str, value: Any) -> str:
    """The fix for `review: {command: make}` (aipm.yaml's form) in a task file, whose key holds the command itself."""
    if isinstance(value, dict) and list(value) == ["command"]:
        return f"; a task file gives the command itself: {key}: {shown(value['command'])}"
    return ""


def _setup(path: Path, data: Mapping[str, Any], key: str) -> str | tuple[str, ...] | None:
    """A command, or "" for none (a task's way out of the project's `workspace_setup` or `review.command`; null
    means the setting)."""
    return "" if data.get(key) == "" else _command(path, data, key)


def _str_list(path: Path, data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        example = f" (e.g. [{json.dumps(str(value))}])" * isinstance(value, (str, int, float))
        raise ValidationError(str(path), key, f"must be a list{example}, not {kind(value)}")
    for item in value:
        if not isinstance(item, str):
            raise ValidationError(str(path), key, f"every item must be a string{not_text(item)}")
    return tuple(value)


def _depends_on(path: Path, data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    deps = _str_list(path, data, key)
    if len(deps) > 1 and len(set(deps)) < len(deps):  # a copy-paste slip, often for another id (`[A, A]`)
        twice = next(dep for i, dep in enumerate(deps) if dep in deps[:i])
        raise ValidationError(str(path), key, f"{shown(twice)} is listed twice; list each dependency once")
    return deps


def _model(path: Path, data: Mapping[str, Any], key: str) -> str | None:
    value = str_field(path, data, key)
    if value is not None and not value.strip():
        raise ValidationError(str(path), key, "empty; name a model, or remove the line for the default")
    if value is not None and "\0" in value:  # passed in argv ({model}) and the environment (AIPM_MODEL)
        raise ValidationError(str(path), key, NUL_WORD)
    return value


def _prompt(path: Path, data: Mapping[str, Any], key: str) -> str | None:
    value = str_field(path, data, key)
    if value is not None and not value.strip() and data.get("command") is None:  # an agent with nothing to do
        raise ValidationError(str(path), key, "empty; give the agent its instructions, or remove the line")
    return value


def _flag(path: Path, data: Mapping[str, Any], key: str) -> bool | None:
    value = data.get(key)
    if value is not None and not isinstance(value, bool):
        raise ValidationError(str(path), key, f"must be true or false, not {shown(value)}")
    return value


def _timestamp(path: Path, data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if value is not None and not isinstance(value, str):
        raise ValidationError(str(path), key, f"must be a timestamp string, not {kind(value)}")
    return value


def money_field(path: Path, data: Mapping[str, Any], key: str, positive: bool,
                none: float | None = None) -> float | None:
    """US dollars: a positive budget, or a recorded cost (≥ 0), below agents.MAX_DOLLARS: a budget is shared out
    in micro-dollars (1e308, meant as no limit, overflowed that), and costs are added up (two of 1e308 made an
    order's cost inf, which `status --json` wrote as Infinity, no JSON). A budget is a micro-dollar at least.
    `none`: what the word `none` gives, where it may be said (None: it may not)."""
    value = data.get(key)
    if value is None:
        return None
    if none is not None and isinstance(value, str) and value.strip().lower() == "none":
        return none
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (agents.MIN_DOLLARS if positive else 0) <= value < agents.MAX_DOLLARS):
        what = (f"a number of US dollars from {agents.MIN_DOLLARS:.6f}" if positive
                else "a number of US dollars from 0") + f" below {agents.MAX_DOLLARS:,.0f}"
        what += ", or none" if none is not None else ""
        raise ValidationError(str(path), key, f"must be {what}, not {as_number(value)}" + text_number(value))
    return float(value)


def _tokens(path: Path, data: Mapping[str, Any], key: str) -> dict[str, int] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        k in agents.TOKEN_KINDS and not isinstance(n, bool) and isinstance(n, int) and n >= 0
        for k, n in value.items()
    ):
        raise ValidationError(str(path), key, "must be a mapping of " + ", ".join(agents.TOKEN_KINDS)
                              + f" to whole numbers ≥ 0, not {shown(value)}")
    return value


def _agent(path: Path, data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if value not in agents.NAMES:
        raise ValidationError(str(path), key, f"{shown(value)} is not one of {', '.join(agents.NAMES)}")
    if data.get("command") is not None and value != agents.COMMAND:
        raise ValidationError(str(path), key, f"{shown(value)} is set together with `command`; a task runs "
                              "either its command or an agent preset: drop one")
    return value


def _enum(path: Path, data: Mapping[str, Any], key: str, enum: type, default: Any) -> Any:
    value = data.get(key)
    if value is None:
        return default
    try:
        return enum(value)
    except ValueError:
        choices = [e.value for e in enum]
        # `priority: p1`, `status: done`: the one value it is, in another case
        same = [c for c in choices if isinstance(value, str) and c.lower() == value.strip().lower()]
        hint = f"; write {same[0]}" if same else ""
        raise ValidationError(str(path), key, f"{shown(value)} is not one of {', '.join(choices)}{hint}") from None


def task_from_mapping(path: Path | str, data: Mapping[str, Any], root: Path | None,
                      normalise: Normaliser | None = None) -> Task:
    """Validate one task's fields (not its links to other tasks) and build the Task. `normalise`: the target
    paths already normalised during this load (loading an order passes one for all its files)."""
    check_keys(path, data, TASK_KEYS)
    stem = os.path.basename(path)[: -len(".yaml")]
    if not ID_PATTERN.fullmatch(stem):
        raise ValidationError(str(path), "id", f"{stem!r} (the file name) is not a usable task id; rename the "
                              f"file to {ID_RULE}")
    task_id = stem if data.get("id") is None else data["id"]  # (`id:` left empty says nothing, as for every key)
    if not isinstance(task_id, str) and json.dumps(task_id) == stem:  # `id: 1` in 1.yaml: said to differ from '1'
        raise ValidationError(str(path), "id", f"must be a string{not_text(task_id)}")
    if task_id != stem:
        raise ValidationError(str(path), "id", f"{shown(task_id)} differs from the file name; use {stem!r} or rename")
    raw_targets = _str_list(path, data, "target_files")
    if any("\0" in raw for raw in raw_targets):
        raise ValidationError(str(path), "target_files", "a path holds a NUL byte (\\0)")
    if any("\n" in raw or "\r" in raw for raw in raw_targets):  # a worker's AIPM_TARGET_FILES is one per line
        raise ValidationError(str(path), "target_files", "a path holds a line break")
    home = next((raw.strip() for raw in raw_targets if raw.strip().startswith("~")), None)
    if home is not None:  # the shell's home, which nothing expands here: it was a directory `~` in the project
        raise ValidationError(str(path), "target_files", f"{home!r} starts with ~, which aipm does not expand: a "
                              "target is a path in the project, relative to its root (a name beginning with ~ in "
                              f"the project is written ./{home})")
    try:
        normalise = Normaliser(root) if normalise is None else normalise
        targets = tuple(map(normalise.__getitem__, raw_targets))
    except PathError as exc:
        raise ValidationError(str(path), "target_files", str(exc)) from None
    # Only the keys the file has are validated (a file holds a handful of the thirty): an absent key leaves its
    # field at Task's default, which is what its validator returns for it (tests/test_fields_table.py).
    return new_task(id=stem, path=str(path), target_files=raw_targets, targets=targets,
                    **{key: check(path, data, key, *extra) for key, check, extra in _FIELDS if key in data})


def managed_values(path: Path | str, data: Mapping[str, Any]) -> dict[str, Any]:
    """The Task's fields that aipm writes (MANAGED_FIELDS), validated: after a write that changed only these, the
    new Task is the old one with them replaced (writer.update_task), no need to build it all again."""
    return {key: check(path, data, key, *extra) for key, check, extra in _MANAGED}


def _exit_code(path: Path | str, data: Mapping[str, Any], key: str) -> int | None:
    exit_code = data.get(key)
    if exit_code is not None and (isinstance(exit_code, bool) or not isinstance(exit_code, int)):
        raise ValidationError(str(path), key, f"must be an integer, not {shown(exit_code)}")
    return exit_code


_RESOURCE_KEYS = {"cpus": float, "memory_mb": int, "gpus": float}
RAY_SHARE = 0.0001  # Ray's smallest fraction of a CPU or GPU: it refuses a smaller nonzero request at every attempt


def _resources(path: Path, data: Mapping[str, Any], key: str) -> Resources | None:
    """`resources: {cpus: 2, memory_mb: 4096, gpus: 1}`: numbers ≥ 0 (0: none of it), memory_mb whole, cpus and gpus
    0 or at least RAY_SHARE, gpus whole above 1."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValidationError(str(path), key, f"must be a mapping such as {{cpus: 2, memory_mb: 4096}}, "
                                             f"not {kind(value)}")
    out = {}
    for name, item in value.items():
        number_kind = _RESOURCE_KEYS.get(name)
        if number_kind is None:
            raise ValidationError(str(path), f"{key}.{name}", f"unknown resource; use {', '.join(_RESOURCE_KEYS)}")
        number_ok = isinstance(item, (int, float)) and not isinstance(item, bool) and item == item
        if not number_ok or item < 0 or item > 1e9 or (number_kind is int and not isinstance(item, int)):
            what = "a whole number ≥ 0" if number_kind is int else "a number ≥ 0"
            raise ValidationError(str(path), f"{key}.{name}", f"must be {what}, not {shown(item)}")
        if number_kind is float and 0 < item < RAY_SHARE:
            raise ValidationError(str(path), f"{key}.{name}", f"must be 0 or at least {RAY_SHARE} (the smallest "
                                                               f"share Ray gives), not {item!r}")
        if name == "gpus" and item > 1 and item != int(item):  # Ray refuses it at every attempt, as the above
            raise ValidationError(str(path), f"{key}.{name}", f"must be a whole number when above 1 (Ray "
                                                               f"shares out fractions of one GPU only), not {item!r}")
        out[name] = number_kind(item)
    return Resources(**out)


WORKSPACES = ("shared", "worktree")


def copy_globs(value: Any) -> tuple[str, ...]:
    """Relative globs (of files to copy into a worktree): a list of strings, nothing absolute, no `..`."""
    if not isinstance(value, list) or not all(isinstance(g, str) and g.strip() for g in value):
        raise ValueError(f"{shown(value)} is not a list of globs (strings)")
    for glob in value:
        if os.path.isabs(glob) or ".." in glob.split("/"):
            raise ValueError(f"{glob!r} must be relative to the project root, without '..'")
    return tuple(value)


def _workspace(path: Path, data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and value not in WORKSPACES:
        raise ValidationError(str(path), key, f"{shown(value)} is not one of {', '.join(WORKSPACES)}")
    return value


def _copy_globs(path: Path, data: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
    if data.get(key) is None:
        return None
    try:
        return copy_globs(data[key])
    except ValueError as exc:
        raise ValidationError(str(path), key, str(exc)) from None


def _optional_count(path: Path | str, data: Mapping[str, Any], key: str, maximum: int) -> int | None:
    return _count(path, data, key, maximum) if data.get(key) is not None else None


# Each key a task file may hold besides id and target_files, in the order errors are looked for (the first wrong
# key in this order is the one reported): its validator, called as validator(path, data, key, *extra), and the
# extra arguments. The key is also the Task field it sets.
_DEFINED: tuple[tuple[str, Any, tuple], ...] = (
    ("title", one_line, ()), ("priority", _enum, (Priority, Priority.P1)), ("depends_on", _depends_on, ()),
    ("command", _command, ()), ("prompt", _prompt, ()), ("model", _model, ()), ("review", _setup, ()),
    ("timeout", _timeout, ()), ("max_attempts", _positive_int, (MAX_COUNT,)),
    ("resources", _resources, ()), ("max_rework", _optional_count, (MAX_COUNT,)), ("agent", _agent, ()),
    ("max_cost_usd", money_field, (True,)), ("confine", _flag, ()), ("workspace", _workspace, ()),
    ("workspace_setup", _setup, ()), ("workspace_copy", _copy_globs, ()),
)
_MANAGED: tuple[tuple[str, Any, tuple], ...] = (
    ("exit_code", _exit_code, ()), ("status", _enum, (Status, Status.QUEUED)), ("attempts", _count, (MAX_TALLY,)),
    ("reworks", _count, (MAX_TALLY,)), ("started_at", _timestamp, ()), ("finished_at", _timestamp, ()),
    ("reason", str_field, ()), ("cost_usd", money_field, (False,)),
    ("cost_unreported_usd", money_field, (False,)), ("tokens", _tokens, ()),
    ("session_id", str_field, ()), ("preemptions", _count, (MAX_TALLY,)),
)
_FIELDS = _DEFINED + _MANAGED
