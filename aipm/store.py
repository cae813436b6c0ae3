"""The only code that reads task files (writer.py is the only one that writes them).

Loading is fast (libyaml's CSafeLoader) and strict: every mistake is a ValidationError naming file and field.
"""

from __future__ import annotations

import errno
import gc
import os
import stat
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import yaml

from aipm import flatyaml, readers
from aipm.errors import ValidationError, did_you_mean
from aipm.fields import check_keys, money_field, one_line, str_field, task_from_mapping
from aipm.yamlkinds import kind
from aipm.model import ID_PATTERN, ID_RULE, NO_BUDGET, Order, Task
from aipm.parsecache import ParseCache
from aipm.paths import Normaliser, PathError
from aipm.patch import Unpatchable, check
from aipm.inodes import Stamp, stamp

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

MAX_FILE_BYTES = 1 << 20  # a task file is a page of YAML; anything bigger is a mistake (or an alias bomb)
_SYMLINK = "is a symlink; aipm rewrites task files, so keep the file itself in the order directory"
ORDER_FILE = "order.yaml"
SETTINGS_FILE = "aipm.yaml"
# `*.yaml` names in an order directory that are no task: the order's own file, and the settings file of a project
# whose root is the order directory (`aipm run .` there read aipm.yaml as a task named `aipm`).
NOT_TASKS = frozenset((ORDER_FILE, SETTINGS_FILE))

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

        def construct(n: Any) -> Any:
            try:
                return loader.construct_object(n, deep=True)
            except (ValueError, KeyError, AttributeError) as exc:
                # PyYAML's safe constructors raise Python's own errors for a value its type cannot hold (a 30
                # February, `!!int abc`): a mistake in the file, said at its line as the parser's are.
                raise BadValue(n, exc) from None

        def build(n: Any) -> Any:
            if type(n) is yaml.ScalarNode:  # the common case first: no memo needed, scalars are immutable
                return n.value if n.tag == _STR else construct(n)
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
                    if not isinstance(key, Hashable):  # a list or mapping, or a `!!set` (no dict key either)
                        raise yaml.constructor.ConstructorError(
                            None, None, "a key must be a plain value", key_node.start_mark)
                    if key in value:
                        raise DuplicateKey(key, key_node.start_mark)
                    try:
                        value[key] = build(value_node)
                    except BadValue as exc:
                        exc.key = key  # the outermost mapping's, set last: the field of the file
                        raise
            else:
                value = memo[id(n)] = construct(n)
            return value

        try:
            return build(node)
        except RecursionError:
            # libyaml nests up to 1000 levels, and building takes a frame a level: past Python's limit (~990 here).
            raise yaml.MarkedYAMLError(problem="nested too deeply", problem_mark=node.start_mark) from None
    finally:
        # `build` refers to itself through its closure: a cycle holding the loader and libyaml's buffers (~15 KB)
        # until the cyclic GC runs, which load_order keeps off. Break it so each file's parser is freed at once.
        build = None  # noqa: F841
        loader.dispose()


class BadValue(yaml.constructor.ConstructorError):
    """A value its (implicit or explicit) type cannot hold: `2026-13-45`, `!!int abc`."""

    def __init__(self, node: Any, exc: Exception):
        kind = node.tag.rsplit(":", 1)[-1]
        what = f"{node.value!r} is not a valid {kind}" if isinstance(node.value, str) else f"not a valid {kind}"
        why = f" ({exc})" if type(exc) is ValueError else ""  # the others' texts name PyYAML's internals
        super().__init__(None, None, what + why, node.start_mark)
        self.key: Any = None  # the key it is the value of, once known


class DuplicateKey(Exception):
    def __init__(self, key: str, mark: Any):
        self.key, self.mark = key, mark


# What tells one version of a file from the next: a rename changes the inode, an edit in place its size, mtime or
# ctime (`cp -p`, `rsync --inplace -t` or `touch -r` put a same-size edit's mtime back; no one sets a ctime back).
Identity = Stamp


_FIRST_READ = 1 << 16  # bytes a first read asks for: any real task file, in one call


def read_text(path: Path, follow: bool = True) -> str:
    """The file's text, refusing files too big to be task files or not UTF-8. A file shorter than _FIRST_READ is
    read in one call and no fstat (a cold load of a big order reads 100k of them: ~3 µs each); a longer one is
    read again as read_versioned() reads it, with its size checked first."""
    fd = _open(path, follow)
    try:
        data = os.read(fd, _FIRST_READ)
        if not data:  # empty, or no file at all: a FIFO (opened without waiting) reads as empty
            _regular(path, os.fstat(fd))
    except OSError as exc:
        raise ValidationError(str(path), None, f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    return _decoded(path, data) if len(data) < _FIRST_READ else read_versioned(path, follow)[0]


def read_versioned(path: Path, follow: bool = True) -> tuple[str, Identity]:
    """The file's text and identity, read through one descriptor. Task files are read with follow=False: a
    symlink is refused, because the writer would replace the link with a copy."""
    fd = _open(path, follow)
    try:
        info = os.fstat(fd)
        _regular(path, info)
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
    return _decoded(path, data), stamp(info)


def _open(path: Path, follow: bool) -> int:
    # O_NONBLOCK: a FIFO a worker put in a task file's place must not wait for a writer (the owner reads the file
    # to record its outcome, under the launch lock: every aipm command of the project hung). No effect on a file.
    try:
        return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise ValidationError(str(path), None, _SYMLINK) from None
        raise ValidationError(str(path), None, f"cannot read: {exc.strerror}") from None


def _regular(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise ValidationError(str(path), None, "not a regular file; it must be a file of YAML")


def _decoded(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(str(path), None, f"not UTF-8 (byte {exc.start}); save it as UTF-8") from None


def parse_mapping(path: Path, text: str, empty_ok: bool = False) -> dict[str, Any]:
    """Parse YAML text into a mapping, turning every parser complaint into one ValidationError line. `empty_ok`:
    no data at all (nothing, or only comments) is an empty mapping (order.yaml's keys are all optional)."""
    data = flatyaml.mapping(text)
    if data is not None:
        return data
    try:
        data = load_yaml(text)
    except DuplicateKey as exc:
        raise ValidationError(
            str(path), exc.key, f"appears twice (line {exc.mark.line + 1}); keep one"
        ) from None
    except Unpatchable as exc:
        raise ValidationError(str(path), exc.key, exc.reason) from None
    except BadValue as exc:
        mark = exc.problem_mark
        field = None if exc.key is None else str(exc.key)
        raise ValidationError(str(path), field, f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}; "
                              "quote it if it is text") from None
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
        if empty_ok:
            return {}
        raise ValidationError(str(path), None, "file is empty; a task file is a mapping such as `command: make`")
    if not isinstance(data, dict):
        raise ValidationError(str(path), None, f"must be a mapping of keys to values, not {kind(data)}")
    return data


def load_task(path: Path | str, root: Path | None = None, normalise: Normaliser | None = None) -> Task:
    return parse_task(path, read_text(path, follow=False), root, normalise)[1]


def own_task(order_dir: Path, task_id: str, root: Path | None = None) -> tuple[str, Task]:
    """(the order's id, the task) from order.yaml and the task's own file alone, each validated: a sibling task file
    being edited (saved invalid mid-run) stops no command about this task (`cancel`, `logs`, `diff`)."""
    task = load_task(order_dir / f"{task_id}.yaml", root)  # (first: its own error is the one said)
    return order_meta(order_dir)[0], task


# The last version of each task file this process wrote, with what it parses to: a `run` reads a task again
# when its worker ends and when it writes the outcome, and the same bytes need not be parsed twice. Keyed by the
# text itself, so a file changed in any way is parsed afresh. Filled only by the writer (remember), never by
# bulk loads, and kept small.
_written: dict[str, tuple[str, Path | None, dict[str, Any], Task]] = {}
_WRITTEN_MAX = 1024


def parse_task(path: Path | str, text: str, root: Path | None,
               normalise: Normaliser | None = None) -> tuple[dict[str, Any], Task]:
    """The mapping and Task of a task file's text (validated); `normalise`: the targets of this load."""
    known = _written.get(str(path))
    if known is not None and known[0] == text and known[1] == root:
        # The text is proven, but targets depend on the tree, not the file (a path made a directory, or a symlink
        # leading out of the root, since the write): normalised again as every load does. One lstat a target,
        # far less than the parse spared on this hot path (every status write of a run); any difference, or a
        # target that no longer normalises, goes to the full parse, which gives the Task or names the error.
        task = known[3]
        normalise = Normaliser(root) if normalise is None else normalise
        try:
            if tuple(map(normalise.__getitem__, task.target_files)) == task.targets:
                return known[2], task
        except PathError:
            pass
    data = parse_mapping(path, text)
    return data, task_from_mapping(path, data, root, normalise)


def remember(path: Path, text: str, root: Path | None, data: dict[str, Any], task: Task) -> None:
    """Note what the writer just put in `path`: `data` is what `text` was proven to parse to, `task` its Task."""
    if len(_written) >= _WRITTEN_MAX:
        _written.clear()
    _written[str(path)] = (text, root, data, task)


def task_files(order_dir: Path) -> list[Path]:
    return [order_dir / name for name in task_names(order_dir)]


def task_names(order_dir: Path) -> list[str]:
    """The task file names of an order directory, sorted."""
    with os.scandir(order_dir) as entries:
        return sorted(
            e.name for e in entries
            if e.name.endswith(".yaml") and e.name not in NOT_TASKS and not e.name.startswith(".") and e.is_file()
        )


def order_meta(order_dir: Path) -> tuple[str, str, Path | None, float | None]:
    """(id, title, the order.yaml that set the id or None, budget) of an order directory, validated."""
    order_id, title, id_from, budget = order_dir.name, "", None, None
    meta = order_dir / ORDER_FILE
    if meta.is_file():
        text = read_text(meta)
        data = parse_mapping(meta, text, empty_ok=True)
        check_keys(meta, data, ORDER_KEYS)
        given = str_field(meta, data, "id")  # null: not given (the schema allows it), the directory's name
        if given is not None:
            if not given.strip():
                raise ValidationError(str(meta), "id", "empty; give the order's id, or remove the line to use "
                                      f"the directory's name ({order_dir.name!r})")
            order_id, id_from = given, meta
        title = one_line(meta, data, "title", longer="description")
        str_field(meta, data, "description")
        # `none`: an order the max_cost_usd setting does not budget (else none could be left without a budget)
        budget = money_field(meta, data, "max_cost_usd", positive=True, none=NO_BUDGET)
    elif os.path.lexists(meta):  # a directory or a link to nothing: its id, title and budget went unread, unsaid
        raise ValidationError(str(meta), None, "not a file; make it the order's file (id, title, max_cost_usd), or "
                              "remove it")
    if not ID_PATTERN.fullmatch(order_id):
        # The id names runtime files under .aipm/: `.`, `..` or `a/b` would leave the order's own directory there.
        raise ValidationError(str(id_from or order_dir), "id" if id_from else None,
                              f"{order_id!r} is not a usable order id; use {ID_RULE}"
                              + ("" if id_from else f" (or set `id:` in {ORDER_FILE})"))
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
    normalise = Normaliser(root)
    base = str(order_dir / "_")[:-1]  # the files' paths as `order_dir / name` prints them, built as strings
    try:
        try:
            names = task_names(order_dir)
        except FileNotFoundError:  # removed since is_dir() above (a checkout meanwhile): as if it were then
            raise ValidationError(str(order_dir), None, "not an order directory") from None
        found = [cache.recall(base + name, name, normalise) for name in names] if cache else [None] * len(names)
        missing = [base + name for name, task in zip(names, found) if task is None]
        parsed = iter(readers.load_all(missing, lambda path: load_task(path, root, normalise)))
        for task in found:
            if task is None:
                task = next(parsed)
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
                hint = did_you_mean(dep, [t for t in tasks if t != task.id])
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
