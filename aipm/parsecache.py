"""The parse cache: validated task files remembered by their stat, so a big order loads without parsing.

One file per order directory, `<root>/.aipm/cache/<order dir name>-<hash of its real path>.tasks`: for each task
file its key (device, inode, size, mtime_ns, ctime_ns) and the Task's fields. Loading an order looks every file
up by a fresh `lstat`; a file whose key differs is parsed and validated as usual. Target paths are normalised
again on every load (they depend on the tree, not on the file), and links between tasks are checked again.

What the key can tell: any rename or replacement (inode), any edit of the bytes (ctime: unlike mtime, no tool can
set it, so an edit that keeps the size and restores the mtime still misses). What it cannot: an edit within the
same clock tick as the version it remembers. So a file is remembered only when its ctime is at least RACY_NS older
than the moment it was read (git's "racily clean" entries); a later edit then carries a later ctime. A clock set
back by more than that, or a file system without a real ctime, defeats the key: such setups can delete the
cache directory, or never run a command that writes it.

Who writes it: only commands that may write (`validate`, `launch`, `run`, `exec`; never `detect`, `status`, a dry
run), only into an existing `<root>/.aipm/` directory, atomically (temp file and rename; no fsync: a lost cache
costs one parse). Any unreadable, truncated, corrupt (checksum), foreign (another directory, another aipm) cache
is ignored whole, and so is one that is no regular file (a FIFO would block), too big to be one (_MAX_BYTES), or
reached through a symlink (`.aipm` or `.aipm/cache`: it would be read and written outside the project). A row of
the wrong types, or whose id is not its file's name, is a miss for its file. What a row forged with well-formed
values could say (another status, say), a worker able to write `.aipm/` can write into the task file itself; the
id is checked because a row's id, unlike a file's name, could hold `/` or `..` and name runtime files outside the
order's directories under `.aipm/`.
The format is `marshal` of plain tuples behind a CRC, read only after the checksum matches; never pickle (a
worker can write into `.aipm/`).
"""

from __future__ import annotations

import marshal
import operator
import os
import stat
import sys
import time
import zlib
from dataclasses import fields
from itertools import chain
from pathlib import Path

from aipm import agents, fields as fields_module, flatyaml, model, patch, paths
from aipm.model import Priority, Resources, Status, Task, new_task

RACY_NS = 2_000_000_000
_MAGIC = b"aipm-parse-cache-1\n"
_NAMES = tuple(f.name for f in fields(Task))
_ID, _PATH, _TARGETS, _TARGET_FILES, _STATUS, _PRIORITY, _RESOURCES = (
    _NAMES.index(n) for n in ("id", "path", "targets", "target_files", "status", "priority", "resources"))
_FIELDS = operator.attrgetter(*_NAMES)
_SCALARS = frozenset((str, int, float, bool))
_STATUSES = {s.value: s for s in Status}
_PRIORITIES = {p.value: p for p in Priority}
_RESOURCE_NAMES = tuple(f.name for f in fields(Resources))
_HEAD = len(_MAGIC) + 12  # magic, CRC, body length
# A cache file is read whole: a bigger one is neither read nor written, so that a file grown by mistake or on
# purpose (a sparse terabyte) costs a parse, never the memory. A row is ~200 bytes (a 100k-task order, the scale
# the cache is for, writes ~20 MB); 1 GiB still holds 100k rows of 10 KB (long inline prompts).
_MAX_BYTES = 1 << 30
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# The types a row may hold in each field (as_row's plain data: enums by value, Resources as a tuple, path and
# targets left out). The CRC tells a damaged file, not a well-formed one written wrong (a bug, a hand edit), whose
# wrong type would crash a command far from here; a field missing from this table fails at import.
_NONE = type(None)
_ROW_KINDS = {
    (_NONE,): ("path", "targets"),
    (str,): ("id", "title", "status", "priority"),
    (int,): ("attempts", "reworks", "preemptions"),
    (tuple,): ("depends_on", "target_files"),
    (str, _NONE): ("prompt", "model", "started_at", "finished_at", "reason", "agent", "session_id", "workspace"),
    (int, _NONE): ("timeout", "max_attempts", "exit_code", "max_rework"),
    (float, int, _NONE): ("max_cost_usd", "cost_usd", "cost_unreported_usd"),
    (str, tuple, _NONE): ("command", "review", "workspace_setup"),
    (tuple, _NONE): ("workspace_copy", "resources"),
    (dict, _NONE): ("tokens",),
    (bool, _NONE): ("confine",),
}
_ROW_TYPES = tuple(map({name: frozenset(kinds) for kinds, names in _ROW_KINDS.items() for name in names}.__getitem__,
                       _NAMES))
_WORDS = operator.itemgetter(*(_NAMES.index(n) for n in (
    "depends_on", "target_files", "command", "review", "workspace_setup", "workspace_copy")))  # tuples of str
_TOKENS = _NAMES.index("tokens")
_RESOURCE_TYPES = tuple(frozenset((int, _NONE) if n == "memory_mb" else (float, int, _NONE)) for n in _RESOURCE_NAMES)

# Whether this process may write the cache: commands that may write turn it on (see writable()).
_writable = False
# A long-lived reader's own cache, by order directory: what its last load recalled or parsed (see in_memory()).
_memory: dict[str, dict[str, tuple]] | None = None


def writable(on: bool = True) -> None:
    """Let this process write the cache (for commands that may write; read-only commands never call it)."""
    global _writable
    _writable = on


def in_memory() -> None:
    """Keep what each load recalled or parsed for the next load of this process, by the same keys and rules as the
    file (for the dashboard, which reads every order again at each change and may write nothing: while a run
    rewrites task files, the file's entries of them miss, and each read parsed again every task already run)."""
    global _memory
    if _memory is None:
        _memory = {}


def _fingerprint() -> tuple:
    """What a remembered validation depends on besides the file: the code that validates (by the stat of its
    source, as Python's own .pyc files do) and the shape of Task."""
    sources = []
    # store by its path: it imports this module (through readers), so it may not be in sys.modules yet.
    store = os.path.join(os.path.dirname(__file__), "store.py")
    for source in (store, model.__file__, agents.__file__, patch.__file__, fields_module.__file__, flatyaml.__file__,
                   __file__):
        try:
            st = os.stat(source)
            sources.append((st.st_size, st.st_mtime_ns))
        except (OSError, TypeError):
            sources.append(None)
    return (marshal.version, sys.version_info[:2], _NAMES, _RESOURCE_NAMES, tuple(sources))


# Once, as the code it names is imported: a long-running process must stamp what its code accepted with that
# code's fingerprint, not with that of sources upgraded underneath it since.
_FINGERPRINT = _fingerprint()


class ParseCache:
    """The cache of one order directory during one load: `recall` before parsing a file, `learn` after."""

    def __init__(self, runtime: str, name: str, directory: str, entries: dict, save: bool):
        self.runtime = runtime
        self.name = name
        self.directory = directory
        self.old = entries
        # (rows kept in memory are this process's own, checked when read or made by as_row)
        self.trusted = _well_typed([entry[1] for entry in entries.values() if _pair(entry)])
        self.kept = _memory.get(directory, {}) if _memory is not None else {}  # (see in_memory)
        self.new: dict[str, tuple] = {}
        self.save = save
        self.dirty = False
        self.started = time.time_ns()
        self._pending: dict[str, tuple] = {}  # file name → its key, from `recall` until `learn`

    @classmethod
    def open(cls, order_dir: Path, root: Path | None) -> "ParseCache | None":
        """The cache for `order_dir`, or None when there is nothing to read and nothing may be written."""
        if root is None:
            return None
        runtime = os.path.join(root, ".aipm")
        real = os.path.realpath(order_dir)
        name = f"{os.path.basename(real)}-{zlib.crc32(os.fsencode(real)):08x}.tasks"
        entries = _read(runtime, name, real)
        save = _writable and _is_real_dir(runtime)
        if entries is None and not save and _memory is None:
            return None
        return cls(runtime, name, real, entries or {}, save)

    def recall(self, path: str, name: str, normalise: paths.Normaliser) -> Task | None:
        """The remembered Task of the file `path` (named `name`) if it is still the version remembered, else None
        (parse it). `normalise`: the targets of this load."""
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):  # a symlink or worse: the parse refuses it
            return None
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        entry = self.old.get(name)
        if not _pair(entry) or entry[0] != key:
            entry = self.kept.get(name)
            trusted = True
        else:
            trusted = self.trusted
        try:
            if (entry is None or entry[0] != key or not (trusted or _well_typed([entry[1]]))
                    or not _named(entry[1], name)):
                self._pending[name] = key
                return None
            task = self._task(entry[1], path, normalise)
        except (paths.PathError, TypeError, ValueError, KeyError, IndexError):
            self._pending[name] = key
            return None  # e.g. a target that no longer normalises: the parse names the problem
        self.new[name] = entry
        return task

    def learn(self, task: Task) -> None:
        """Remember the Task parsed from a file `recall` did not know, if the file did not move since `recall`
        looked at it and is old enough for its key to tell every later edit."""
        name = os.path.basename(task.path)
        key = self._pending.pop(name, None)
        if key is None or not (self.save or _memory is not None):
            return
        try:
            st = os.lstat(task.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != key:
            return
        if key[4] >= self.started - RACY_NS:
            return
        values = as_row(task)
        if values is not None:
            self.new[name] = (key, values)
            self.dirty = True

    def close(self) -> None:
        """Write the cache when it changed (files learned or gone) and this process may write it."""
        if _memory is not None:
            _memory[self.directory] = self.new  # the files there now: one gone since is not kept
        if not self.save or not (self.dirty or self.new.keys() != self.old.keys()):
            return
        body = marshal.dumps((_FINGERPRINT, self.directory, self.new))
        if len(body) > _MAX_BYTES:  # it would never be read
            return
        folder = _cache_dir(self.runtime, make=True)
        if folder is None:
            return
        tmp = f".{self.name}.{os.getpid()}.tmp"
        try:
            # O_EXCL: whatever is at that name (a link leading out, a FIFO) is never opened, only removed below.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666, dir_fd=folder)
            with open(fd, "wb") as handle:  # header and body apart: no second copy of a body of megabytes
                handle.write(_MAGIC + zlib.crc32(body).to_bytes(4, "big") + len(body).to_bytes(8, "big"))
                handle.write(body)
            os.replace(tmp, self.name, src_dir_fd=folder, dst_dir_fd=folder)  # a FIFO there too is replaced
        except OSError:
            try:
                os.unlink(tmp, dir_fd=folder)
            except OSError:
                pass
        finally:
            os.close(folder)

    def _task(self, values: tuple, path: str, normalise: paths.Normaliser) -> Task:
        return task_of(values, path, tuple(map(normalise.__getitem__, values[_TARGET_FILES])))


def task_of(values: tuple, path: str, targets: tuple[paths.Target, ...]) -> Task:
    """The Task of a row of plain data (`as_row`) read from the file `path`, with its normalised `targets`."""
    row = list(values)
    if len(row) != len(_NAMES):
        raise ValueError("entry of another shape")
    row[_PATH] = path
    row[_TARGETS] = targets
    row[_STATUS] = _STATUSES[row[_STATUS]]
    row[_PRIORITY] = _PRIORITIES[row[_PRIORITY]]
    if row[_RESOURCES] is not None:
        row[_RESOURCES] = Resources(*row[_RESOURCES])
    return new_task(*row)


def as_row(task: Task) -> tuple | None:
    """The Task's fields as plain data for marshal (None when one is of a kind this cache does not know); its
    path and normalised targets are left out (None): they depend on where, and on the tree, not on the file."""
    out = list(_FIELDS(task))
    resources = out[_RESOURCES]
    out[_PATH] = out[_TARGETS] = out[_RESOURCES] = None
    out[_STATUS] = out[_STATUS].value
    out[_PRIORITY] = out[_PRIORITY].value
    for value in out:
        if value is not None and type(value) not in _SCALARS and not _plain(value):
            return None
    if resources is not None:
        out[_RESOURCES] = tuple(getattr(resources, n) for n in _RESOURCE_NAMES)
    return tuple(out)


def _plain(value) -> bool:
    if value is None or type(value) in _SCALARS:
        return True
    if type(value) is tuple:
        return all(type(v) is str for v in value)
    if type(value) is dict:
        return all(type(k) is str and type(v) is int for k, v in value.items())
    return False


def _pair(entry) -> bool:
    """Whether a cache file's entry has the shape of one (key, row): a file's other entry is a miss for it alone."""
    return type(entry) is tuple and len(entry) == 2


def _named(values: tuple, name: str) -> bool:
    """Whether the row's id is its file's name and a usable id, as the parse requires: a forged `../x` would name
    runtime files outside the order's directory under `.aipm/`."""
    task_id = values[_ID]
    return task_id == name[:-len(".yaml")] and model.ID_PATTERN.fullmatch(task_id) is not None


def _well_typed(rows: list) -> bool:
    """Whether every row read from a cache file holds what `as_row` writes (see _ROW_TYPES), so `task_of` may
    trust it. A column at a time: a load asks it of all its rows at once, and of one row only when that fails."""
    if not all(type(row) is tuple and len(row) == len(_ROW_TYPES) for row in rows):
        return False
    columns = tuple(zip(*rows)) or ((),) * len(_ROW_TYPES)
    if not all(set(map(type, column)) <= kinds for column, kinds in zip(columns, _ROW_TYPES)):
        return False
    words = chain.from_iterable(value for column in _WORDS(columns) for value in column if type(value) is tuple)
    if not set(map(type, words)) <= {str}:
        return False
    return all(tokens is None or _plain(tokens) for tokens in columns[_TOKENS]) and all(
        resources is None or (len(resources) == len(_RESOURCE_TYPES)
                              and all(map(operator.contains, _RESOURCE_TYPES, map(type, resources))))
        for resources in columns[_RESOURCES])


def _read(runtime: str, name: str, directory: str) -> dict | None:
    """The entries of the cache file `name` written by this aipm for `directory`, or None (missing, no regular
    file, too big, corrupt, foreign)."""
    folder = _cache_dir(runtime, make=False)
    if folder is None:
        return None
    try:  # O_NONBLOCK: a FIFO there must not wait for a writer; O_NOFOLLOW: nor may a link lead elsewhere
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
    except OSError:
        return None
    finally:
        os.close(folder)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > _HEAD + _MAX_BYTES:
            return None
        with open(fd, "rb", closefd=False) as handle:
            data = handle.read(info.st_size)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) < _HEAD or not data.startswith(_MAGIC):
        return None
    crc = int.from_bytes(data[len(_MAGIC):len(_MAGIC) + 4], "big")
    size = int.from_bytes(data[len(_MAGIC) + 4:_HEAD], "big")
    body = memoryview(data)[_HEAD:]
    if len(body) != size or zlib.crc32(body) != crc:
        return None
    try:
        fingerprint, where, entries = marshal.loads(body)
    except (ValueError, EOFError, TypeError):
        return None
    if fingerprint != _FINGERPRINT or where != directory or type(entries) is not dict:
        return None
    return entries


def _cache_dir(runtime: str, make: bool) -> int | None:
    """`<runtime>/cache` opened (made first if `make`), or None when it or `runtime` is missing or a symlink:
    the cache would be read and written wherever the link leads."""
    try:
        top = os.open(runtime, _DIR_FLAGS)
    except OSError:
        return None
    try:
        if make:
            try:
                os.mkdir("cache", dir_fd=top)
            except FileExistsError:
                pass
        return os.open("cache", _DIR_FLAGS, dir_fd=top)
    except OSError:
        return None
    finally:
        os.close(top)


def _is_real_dir(path: str) -> bool:
    """A directory, not a symlink to one (a `.aipm` link leading elsewhere is refused by the runtime)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False
