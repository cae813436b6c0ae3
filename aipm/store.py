"""The only code that reads task files (writer.py is the only one that writes them).

Loading is fast (libyaml's CSafeLoader) and strict: every mistake is a ValidationError naming file and field.
"""

from __future__ import annotations

import datetime as dt
import difflib
import errno
import gc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from aipm import agents
from aipm.errors import ValidationError
from aipm.model import ID_PATTERN, Order, Priority, Resources, Status, Task
from aipm.parsecache import ParseCache
from aipm.patch import Unpatchable, check
from aipm.paths import PathError, normalize

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

MAX_FILE_BYTES = 1 << 20  # a task file is a page of YAML; anything bigger is a mistake (or an alias bomb)
_SYMLINK = "is a symlink; aipm rewrites task files, so keep the file itself in the order directory"
# The event loop waits at most 2**31 ms (24.8 days) at a time; a week is a generous bound for one attempt.
MAX_TIMEOUT = 7 * 24 * 3600
ORDER_FILE = "order.yaml"

TASK_KEYS = (
    "id", "title", "status", "priority", "depends_on", "target_files", "command", "prompt", "model",
    "review", "timeout", "max_attempts", "attempts", "reworks", "started_at", "finished_at", "exit_code",
    "resources",
    "max_rework", "reason",
    "agent", "max_cost_usd", "cost_usd", "tokens", "session_id",
    "preemptions",
    "confine",
    "workspace", "workspace_setup", "workspace_copy",
)
ORDER_KEYS = ("id", "title", "description", "max_cost_usd")


_STR = "tag:yaml.org,2002:str"
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"


def load_yaml(text: str) -> Any:
    """Parse with libyaml, then build plain data from the node tree ourselves.

    PyYAML's constructor is Python code per node and dominates loading large orders; plain strings, lists and
    maps are built here directly, every other scalar (int, bool, null, timestamp) by the safe constructor, and
    any other tag is refused by it. Nodes are memoised, so aliases are shared, never expanded (alias bombs).
    Duplicate keys are refused: with two `status:` lines the writer could not know which one to change.
    So are managed fields the writer could not change alone (aliases, anchors): see patch.check.
    """
    loader = Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if "&" in text or "*" in text:
            check(node, text)
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
                        raise DuplicateKey(key, key_node.start_mark)
                    value[key] = build(value_node)
            else:
                value = memo[id(n)] = loader.construct_object(n, deep=True)
            return value

        return build(node)
    finally:
        # `build` refers to itself through its closure: a cycle holding the loader and libyaml's buffers (~15 KB)
        # until the cyclic GC runs, which load_order keeps off. Break it so each file's parser is freed at once.
        build = None  # noqa: F841
        loader.dispose()


class DuplicateKey(Exception):
    def __init__(self, key: str, mark: Any):
        self.key, self.mark = key, mark


# What tells one version of a file from the next: a rename changes the inode, an edit in place size or mtime.
Identity = tuple[int, int, int]


def read_text(path: Path, follow: bool = True) -> str:
    """The file's text, refusing files too big to be task files or not UTF-8."""
    return read_versioned(path, follow)[0]


def read_versioned(path: Path, follow: bool = True) -> tuple[str, Identity]:
    """The file's text and identity, read through one descriptor. Task files are read with follow=False: a
    symlink is refused, because the writer would replace the link with a copy."""
    try:
        fd = os.open(path, os.O_RDONLY | (0 if follow else os.O_NOFOLLOW))
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise ValidationError(str(path), None, _SYMLINK) from None
        raise ValidationError(str(path), None, f"cannot read: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if info.st_size > MAX_FILE_BYTES:
            raise ValidationError(str(path), None, f"file is {info.st_size} bytes, over the 1 MiB limit; split it up")
        data = os.read(fd, info.st_size + 1)
        if len(data) > info.st_size:  # it grew since fstat: read the rest, within the limit
            data += os.read(fd, MAX_FILE_BYTES)
            if len(data) > MAX_FILE_BYTES:
                raise ValidationError(str(path), None, "file is over the 1 MiB limit; split it up")
    except OSError as exc:
        raise ValidationError(str(path), None, f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    identity = (info.st_ino, info.st_size, info.st_mtime_ns)
    try:
        return data.decode("utf-8"), identity
    except UnicodeDecodeError as exc:
        raise ValidationError(str(path), None, f"not UTF-8 (byte {exc.start}); save it as UTF-8") from None


def parse_mapping(path: Path, text: str) -> dict[str, Any]:
    """Parse YAML text into a mapping, turning every parser complaint into one ValidationError line."""
    try:
        data = load_yaml(text)
    except DuplicateKey as exc:
        raise ValidationError(
            str(path), exc.key, f"appears twice (line {exc.mark.line + 1}); keep one"
        ) from None
    except Unpatchable as exc:
        raise ValidationError(str(path), exc.key, exc.reason) from None
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


def _positive_int(path: Path, data: Mapping[str, Any], key: str, maximum: int | None = None) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(str(path), key, f"must be a positive integer, not {value!r}")
    if maximum is not None and value > maximum:
        raise ValidationError(str(path), key, f"{value} is more than the maximum {maximum}")
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
    if value is None:
        return value
    if isinstance(value, str):
        if not value.strip():
            raise ValidationError(str(path), key, "is empty; give a command, or leave the key out")
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value) and value[0]:
        return tuple(value)
    raise ValidationError(
        str(path), key, "must be a string (run by /bin/sh -c) or a list of strings (argv) naming a program"
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


def _flag(path: Path, data: Mapping[str, Any], key: str) -> bool | None:
    value = data.get(key)
    if value is not None and not isinstance(value, bool):
        raise ValidationError(str(path), key, f"must be true or false, not {value!r}")
    return value


def _timestamp(path: Path, data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if value is not None and not isinstance(value, str):
        raise ValidationError(str(path), key, f"must be a timestamp string, not {_kind(value)}")
    return value


def _money(path: Path, data: Mapping[str, Any], key: str, positive: bool) -> float | None:
    """US dollars: a positive budget, or a recorded cost (≥ 0)."""
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        value > 0 if positive else value >= 0) or value == float("inf"):
        what = "a positive number of US dollars" if positive else "a number of US dollars ≥ 0"
        raise ValidationError(str(path), key, f"must be {what}, not {value!r}")
    return float(value)


def _tokens(path: Path, data: Mapping[str, Any]) -> dict[str, int] | None:
    value = data.get("tokens")
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        k in agents.TOKEN_KINDS and not isinstance(n, bool) and isinstance(n, int) and n >= 0
        for k, n in value.items()
    ):
        raise ValidationError(str(path), "tokens", "must be a mapping of " + ", ".join(agents.TOKEN_KINDS)
                              + f" to whole numbers ≥ 0, not {value!r}")
    return value


def _agent(path: Path, data: Mapping[str, Any]) -> str | None:
    value = data.get("agent")
    if value is None:
        return None
    if value not in agents.NAMES:
        raise ValidationError(str(path), "agent", f"{value!r} is not one of {', '.join(agents.NAMES)}")
    if data.get("command") is not None and value != agents.COMMAND:
        raise ValidationError(str(path), "agent", f"{value!r} is set together with `command`; a task runs "
                              "either its command or an agent preset: drop one")
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
    if not ID_PATTERN.fullmatch(stem):
        raise ValidationError(str(path), "id", f"{stem!r} (the file name) is not a usable task id; rename the "
                              "file to letters, digits, '_', '.' and '-', starting with a letter or digit")
    task_id = data.get("id", stem)
    if task_id != stem:
        raise ValidationError(str(path), "id", f"{task_id!r} differs from the file name; use {stem!r} or rename")
    raw_targets = _str_list(path, data, "target_files")
    if any("\0" in raw for raw in raw_targets):
        raise ValidationError(str(path), "target_files", "a path holds a NUL byte (\\0)")
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
        timeout=_positive_int(path, data, "timeout", MAX_TIMEOUT),
        max_attempts=_positive_int(path, data, "max_attempts"),
        attempts=_count(path, data, "attempts"),
        reworks=_count(path, data, "reworks"),
        started_at=_timestamp(path, data, "started_at"),
        finished_at=_timestamp(path, data, "finished_at"),
        exit_code=exit_code,
        resources=_resources(path, data),
        max_rework=_count(path, data, "max_rework") if data.get("max_rework") is not None else None,
        reason=_str(path, data, "reason"),
        agent=_agent(path, data),
        max_cost_usd=_money(path, data, "max_cost_usd", positive=True),
        cost_usd=_money(path, data, "cost_usd", positive=False),
        tokens=_tokens(path, data),
        session_id=_str(path, data, "session_id"),
        preemptions=_count(path, data, "preemptions"),
        confine=_flag(path, data, "confine"),
        workspace=_workspace(path, data),
        workspace_setup=_command(path, data, "workspace_setup"),
        workspace_copy=_copy_globs(path, data),
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


WORKSPACES = ("shared", "worktree")


def copy_globs(value: Any) -> tuple[str, ...]:
    """Relative globs (of files to copy into a worktree): a list of strings, nothing absolute, no `..`."""
    if not isinstance(value, list) or not all(isinstance(g, str) and g.strip() for g in value):
        raise ValueError(f"{value!r} is not a list of globs (strings)")
    for glob in value:
        if os.path.isabs(glob) or ".." in glob.split("/"):
            raise ValueError(f"{glob!r} must be relative to the project root, without '..'")
    return tuple(value)


def _workspace(path: Path, data: Mapping[str, Any]) -> str | None:
    value = data.get("workspace")
    if value is not None and value not in WORKSPACES:
        raise ValidationError(str(path), "workspace", f"{value!r} is not one of {', '.join(WORKSPACES)}")
    return value


def _copy_globs(path: Path, data: Mapping[str, Any]) -> tuple[str, ...] | None:
    if data.get("workspace_copy") is None:
        return None
    try:
        return copy_globs(data["workspace_copy"])
    except ValueError as exc:
        raise ValidationError(str(path), "workspace_copy", str(exc)) from None


def load_task(path: Path, root: Path | None = None) -> Task:
    return task_from_mapping(path, parse_mapping(path, read_text(path, follow=False)), root)


def task_files(order_dir: Path) -> list[Path]:
    return [order_dir / name for name in task_names(order_dir)]


def task_names(order_dir: Path) -> list[str]:
    """The task file names of an order directory, sorted."""
    with os.scandir(order_dir) as entries:
        return sorted(
            e.name for e in entries
            if e.name.endswith(".yaml") and e.name != ORDER_FILE and not e.name.startswith(".") and e.is_file()
        )


def order_meta(order_dir: Path) -> tuple[str, str, Path | None, float | None]:
    """(id, title, the order.yaml that set the id or None, budget) of an order directory, validated."""
    order_id, title, id_from, budget = order_dir.name, "", None, None
    meta = order_dir / ORDER_FILE
    if meta.is_file():
        text = read_text(meta)
        data = parse_mapping(meta, text) if text.strip() else {}
        _check_keys(meta, data, ORDER_KEYS)
        if _str(meta, data, "id"):
            order_id, id_from = data["id"], meta
        title = _str(meta, data, "title") or ""
        _str(meta, data, "description")
        budget = _money(meta, data, "max_cost_usd", positive=True)
    if not ID_PATTERN.fullmatch(order_id):
        # The id names runtime files under .aipm/: `.`, `..` or `a/b` would leave the order's own directory there.
        raise ValidationError(str(id_from or order_dir), "id" if id_from else None,
                              f"{order_id!r} is not a usable order id; use letters, digits, '_', '.' and '-', "
                              "starting with a letter or digit" + ("" if id_from else f" (or set `id:` in {ORDER_FILE})"))
    return order_id, title, id_from, budget


def load_order(order_dir: Path, root: Path | None = None) -> Order:
    """Load and fully validate an order directory; raise the first ValidationError found."""
    order_dir = Path(order_dir)
    if not order_dir.is_dir():
        raise ValidationError(str(order_dir), None, "not an order directory")
    order_id, title, _, budget = order_meta(order_dir)
    order = Order(id=order_id, path=str(order_dir), title=title, max_cost_usd=budget)
    # Loading allocates many small objects that all stay alive: the cyclic GC would only rescan them.
    gc_was_on = gc.isenabled()
    gc.disable()
    cache = ParseCache.open(order_dir, root)
    base = os.path.join(order_dir, "")
    try:
        for name in task_names(order_dir):
            task = cache.recall(base + name, name, root) if cache else None
            if task is None:
                task = load_task(order_dir / name, root)
                if cache:
                    cache.learn(task)
            order.tasks[task.id] = task
    finally:
        if gc_was_on:
            gc.enable()
    check_links(order)
    if cache:  # after every check: a command refused for bad input changes nothing on disk
        cache.close()
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
