"""The only code that reads or writes task files.

Loading is fast (libyaml's CSafeLoader) and strict: every mistake is a ValidationError naming file and field.
Writing changes only the managed lines (status, attempts, ...) so comments and every other byte survive, and
is atomic: temp file in the same directory, fsync, rename, directory fsync.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import gc
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from aipm.errors import ValidationError
from aipm.model import MANAGED_FIELDS, TRANSITIONS, Order, Priority, Resources, Status, Task
from aipm.paths import PathError, normalize

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

MAX_FILE_BYTES = 1 << 20  # a task file is a page of YAML; anything bigger is a mistake (or an alias bomb)
ORDER_FILE = "order.yaml"

TASK_KEYS = (
    "id", "title", "status", "priority", "depends_on", "target_files", "command", "prompt", "model",
    "review", "timeout", "max_attempts", "attempts", "reworks", "started_at", "finished_at", "exit_code",
    "resources",
    "max_rework", "reason",
)
ORDER_KEYS = ("id", "title", "description")


_STR = "tag:yaml.org,2002:str"
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"


def _load_yaml(text: str) -> Any:
    """Parse with libyaml, then build plain data from the node tree ourselves.

    PyYAML's constructor is Python code per node and dominates loading large orders; plain strings, lists and
    maps are built here directly, every other scalar (int, bool, null, timestamp) by the safe constructor, and
    any other tag is refused by it. Nodes are memoised, so aliases are shared, never expanded (alias bombs).
    Duplicate keys are refused: with two `status:` lines the writer could not know which one to change.
    """
    loader = Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        memo: dict[int, Any] = {}

        def build(n: Any) -> Any:
            if type(n) is yaml.ScalarNode:  # the common case first: no memo needed, scalars are immutable
                return n.value if n.tag == _STR else loader.construct_object(n, deep=True)
            hit = memo.get(id(n))
            if hit is not None:
                return hit
            if n.tag == _SEQ and type(n) is yaml.SequenceNode:
                value = memo[id(n)] = []
                for item in n.value:
                    value.append(item.value if item.tag == _STR and type(item) is yaml.ScalarNode else build(item))
            elif n.tag == _MAP and type(n) is yaml.MappingNode and not any(
                k.tag == "tag:yaml.org,2002:merge" for k, _ in n.value
            ):
                value = memo[id(n)] = {}
                for key_node, value_node in n.value:
                    key = build(key_node)
                    if isinstance(key, (list, dict)):
                        raise yaml.constructor.ConstructorError(
                            None, None, "a key must be a plain value", key_node.start_mark)
                    if key in value:
                        raise _DuplicateKey(key, key_node.start_mark)
                    value[key] = build(value_node)
            else:
                value = memo[id(n)] = loader.construct_object(n, deep=True)
            return value

        return build(node)
    finally:
        loader.dispose()


class _DuplicateKey(Exception):
    def __init__(self, key: str, mark: Any):
        self.key, self.mark = key, mark


def read_text(path: Path) -> str:
    """The file's text, refusing files too big to be task files or not UTF-8."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ValidationError(str(path), None, f"file is {size} bytes, over the 1 MiB limit; split it up")
        data = path.read_bytes()
    except OSError as exc:
        raise ValidationError(str(path), None, f"cannot read: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(str(path), None, f"not UTF-8 (byte {exc.start}); save it as UTF-8") from None


def parse_mapping(path: Path, text: str) -> dict[str, Any]:
    """Parse YAML text into a mapping, turning every parser complaint into one ValidationError line."""
    try:
        data = _load_yaml(text)
    except _DuplicateKey as exc:
        raise ValidationError(
            str(path), exc.key, f"appears twice (line {exc.mark.line + 1}); keep one"
        ) from None
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValidationError(
            str(path), None, f"unsupported YAML tag{where} ({exc.problem}); only plain data is allowed"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValidationError(str(path), None, f"broken YAML: {where}{problem}") from None
    if data is None:
        raise ValidationError(str(path), None, "file is empty; a task file is a mapping such as `command: make`")
    if not isinstance(data, dict):
        raise ValidationError(str(path), None, f"must be a mapping of keys to values, not a {type(data).__name__}")
    return data


def _check_keys(path: Path, data: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for key in data:
        if not isinstance(key, str) or key not in allowed:
            near = difflib.get_close_matches(str(key).replace("-", "_"), allowed, n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(allowed)}"
            raise ValidationError(str(path), str(key), f"unknown key{hint}")


def _str(path: Path, data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ValidationError(str(path), key, f"must be a string, not {_kind(value)}")
    return value


def _positive_int(path: Path, data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(str(path), key, f"must be a positive integer, not {value!r}")
    return value


def _count(path: Path, data: Mapping[str, Any], key: str) -> int:
    value = data.get(key, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationError(str(path), key, f"must be a whole number ≥ 0, not {value!r}")
    return value


def _command(path: Path, data: Mapping[str, Any], key: str) -> str | tuple[str, ...] | None:
    value = data.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValidationError(
        str(path), key, "must be a string (run by /bin/sh -c) or a non-empty list of strings (argv)"
    )


def _str_list(path: Path, data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValidationError(str(path), key, f"must be a list (e.g. [{value!r}]), not {_kind(value)}")
    for item in value:
        if not isinstance(item, str):
            raise ValidationError(str(path), key, f"every item must be a string; {item!r} is {_kind(item)}")
    return tuple(value)


def _timestamp(path: Path, data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if value is not None and not isinstance(value, str):
        raise ValidationError(str(path), key, f"must be a timestamp string, not {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean"}.get(type(value), type(value).__name__)


def _enum(path: Path, data: Mapping[str, Any], key: str, enum: type, default: Any) -> Any:
    value = data.get(key)
    if value is None:
        return default
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(e.value for e in enum)
        raise ValidationError(str(path), key, f"{value!r} is not one of {choices}") from None


def task_from_mapping(path: Path, data: Mapping[str, Any], root: Path | None) -> Task:
    """Validate one task's fields (not its links to other tasks) and build the Task."""
    _check_keys(path, data, TASK_KEYS)
    stem = path.name[: -len(".yaml")]
    task_id = data.get("id", stem)
    if task_id != stem:
        raise ValidationError(str(path), "id", f"{task_id!r} differs from the file name; use {stem!r} or rename")
    raw_targets = _str_list(path, data, "target_files")
    try:
        targets = tuple(normalize(raw, str(root) if root else None) for raw in raw_targets)
    except PathError as exc:
        raise ValidationError(str(path), "target_files", str(exc)) from None
    exit_code = data.get("exit_code")
    if exit_code is not None and (isinstance(exit_code, bool) or not isinstance(exit_code, int)):
        raise ValidationError(str(path), "exit_code", f"must be an integer, not {exit_code!r}")
    return Task(
        id=stem,
        path=str(path),
        title=_str(path, data, "title") or "",
        status=_enum(path, data, "status", Status, Status.QUEUED),
        priority=_enum(path, data, "priority", Priority, Priority.P1),
        depends_on=_str_list(path, data, "depends_on"),
        target_files=raw_targets,
        targets=targets,
        command=_command(path, data, "command"),
        prompt=_str(path, data, "prompt"),
        model=_str(path, data, "model"),
        review=_command(path, data, "review"),
        timeout=_positive_int(path, data, "timeout"),
        max_attempts=_positive_int(path, data, "max_attempts"),
        attempts=_count(path, data, "attempts"),
        reworks=_count(path, data, "reworks"),
        started_at=_timestamp(path, data, "started_at"),
        finished_at=_timestamp(path, data, "finished_at"),
        exit_code=exit_code,
        resources=_resources(path, data),
        max_rework=_count(path, data, "max_rework") if data.get("max_rework") is not None else None,
        reason=_str(path, data, "reason"),
    )


_RESOURCE_KEYS = {"cpus": float, "memory_mb": int, "gpus": float}


def _resources(path: Path, data: Mapping[str, Any]) -> Resources | None:
    """`resources: {cpus: 2, memory_mb: 4096, gpus: 1}`: positive numbers, memory_mb whole."""
    value = data.get("resources")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValidationError(str(path), "resources", f"must be a mapping such as {{cpus: 2, memory_mb: 4096}}, "
                                                      f"not {_kind(value)}")
    out = {}
    for key, item in value.items():
        kind = _RESOURCE_KEYS.get(key)
        if kind is None:
            raise ValidationError(str(path), f"resources.{key}", f"unknown resource; use {', '.join(_RESOURCE_KEYS)}")
        number_ok = isinstance(item, (int, float)) and not isinstance(item, bool) and item == item
        if not number_ok or item <= 0 or item > 1e9 or (kind is int and not isinstance(item, int)):
            what = "a positive whole number" if kind is int else "a positive number"
            raise ValidationError(str(path), f"resources.{key}", f"must be {what}, not {item!r}")
        out[key] = kind(item)
    return Resources(**out)


def load_task(path: Path, root: Path | None = None) -> Task:
    return task_from_mapping(path, parse_mapping(path, read_text(path)), root)


def task_files(order_dir: Path) -> list[Path]:
    with os.scandir(order_dir) as entries:
        names = sorted(
            e.name for e in entries
            if e.name.endswith(".yaml") and e.name != ORDER_FILE and not e.name.startswith(".") and e.is_file()
        )
    return [order_dir / name for name in names]


def load_order(order_dir: Path, root: Path | None = None) -> Order:
    """Load and fully validate an order directory; raise the first ValidationError found."""
    order_dir = Path(order_dir)
    if not order_dir.is_dir():
        raise ValidationError(str(order_dir), None, "not an order directory")
    order_id, title = order_dir.name, ""
    meta = order_dir / ORDER_FILE
    if meta.is_file():
        text = read_text(meta)
        data = parse_mapping(meta, text) if text.strip() else {}
        _check_keys(meta, data, ORDER_KEYS)
        order_id = _str(meta, data, "id") or order_id
        title = _str(meta, data, "title") or ""
        _str(meta, data, "description")
    order = Order(id=order_id, path=str(order_dir), title=title)
    # Loading allocates many small objects that all stay alive: the cyclic GC would only rescan them.
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        for path in task_files(order_dir):
            task = load_task(path, root)
            order.tasks[task.id] = task
    finally:
        if gc_was_on:
            gc.enable()
    check_links(order)
    return order


def check_links(order: Order) -> None:
    """Dependencies must name other tasks of the order and form no cycle."""
    tasks = order.tasks
    for task in tasks.values():
        for dep in task.depends_on:
            if dep == task.id:
                raise ValidationError(task.path, "depends_on", "a task cannot depend on itself")
            if dep not in tasks:
                near = difflib.get_close_matches(dep, [t for t in tasks if t != task.id], n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ValidationError(task.path, "depends_on", f"{dep!r} is not a task of order {order.id}{hint}")
    cycle = find_cycle(tasks)
    if cycle:
        first = tasks[cycle[0]]
        raise ValidationError(first.path, "depends_on", "dependency cycle: " + " → ".join(cycle + [cycle[0]]))


def find_cycle(tasks: Mapping[str, Task]) -> list[str] | None:
    """One dependency cycle as a list of ids, or None. Iterative, so 100k-task chains do not overflow."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    for start in sorted(tasks):
        if start in state:
            continue
        stack = [(start, iter(tasks[start].depends_on))]
        path = [start]
        state[start] = 1
        while stack:
            node, deps = stack[-1]
            for dep in deps:
                if state.get(dep) == 1:
                    return path[path.index(dep):]
                if dep not in state:
                    state[dep] = 1
                    stack.append((dep, iter(tasks[dep].depends_on)))
                    path.append(dep)
                    break
            else:
                state[node] = 2
                stack.pop()
                path.pop()
    return None


# ---- the one writer -------------------------------------------------------------------------------------


class StaleWrite(Exception):
    """The task file no longer holds what the caller expected (another process moved it on)."""


def _render(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (Status, Priority)):
        return value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    # Timestamps are quoted so YAML keeps them strings.
    return "'" + str(value).replace("'", "''") + "'"


def _line_pattern(key: str) -> re.Pattern[str]:
    return re.compile(rf"^{key}[ \t]*:(?P<value>[^\n#]*?)(?P<tail>[ \t]+#[^\n]*)?$", re.M)


def rewrite(text: str, updates: Mapping[str, Any]) -> str:
    """Change only the managed lines in `text`; append the ones that are missing."""
    for key, value in updates.items():
        if key not in MANAGED_FIELDS:
            raise KeyError(f"{key} is not a field aipm writes")
        rendered = _render(value)
        pattern = _line_pattern(key)
        if pattern.search(text):
            text = pattern.sub(lambda m: f"{key}: {rendered}{m.group('tail') or ''}", text, count=1)
        else:
            if text and not text.endswith("\n"):
                text += "\n"
            text += f"{key}: {rendered}\n"
    return text


def atomic_write(path: Path, text: str) -> None:
    """Replace `path` with `text` so that readers see the old file or the new one, never a mix."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        except FileNotFoundError:
            pass
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def update_task(
    path: Path,
    updates: Mapping[str, Any] | Callable[[Task], Mapping[str, Any]],
    expect: Status | None = None,
    root: Path | None = None,
) -> Task:
    """Re-read the task file, check its status, and write `updates` into the managed lines.

    `updates` may be a function of the task as read now, so a decision and its write share one read.
    `expect` guards against lost races: when given, the file must still hold that status, and a new status
    must be a legal transition from it. Callers serialise writers with the project's launch lock.
    """
    text = read_text(path)
    current = task_from_mapping(path, parse_mapping(path, text), root)
    if expect is not None and current.status != expect:
        raise StaleWrite(f"{current.id} is {current.status}, expected {expect}")
    if callable(updates):
        updates = updates(current)
    new_status = updates.get("status")
    if new_status is not None and new_status != current.status and new_status not in TRANSITIONS[current.status]:
        raise StaleWrite(f"{current.id}: {current.status} → {new_status} is not allowed")
    new_text = rewrite(text, updates)
    if new_text != text:
        atomic_write(path, new_text)
    # The managed fields hold plain scalars, so the new Task is the old one with them replaced: no re-parse.
    return dataclasses.replace(current, **updates)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")
