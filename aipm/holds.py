"""Files held by the other orders of the project: their IN_PROGRESS and IN_REVIEW tasks, worker or not.

A person who marks a task IN_PROGRESS by hand says "I am editing these files": no agent may take them, whatever
order it belongs to. Worker records only know the tasks aipm started, so every other order directory under
`orders_dir` is read too. To keep detection fast, each order's held tasks are kept in a small index
(`.aipm/holds/<order dir>.json`) with the (inode, size, mtime) of every task file: a file is read again only when
its stat changed, and then fully parsed only if its bytes mention a running status. The index is runtime state:
written only by commands that may write (`launch`, `run`, `exec`, workers), and only into an existing `.aipm/`.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from aipm import workerfiles
from aipm.errors import ValidationError
from aipm.model import RUNNING
from aipm.paths import PathError, normalize
from aipm.plan import Busy
from aipm.store import MAX_FILE_BYTES, NOT_TASKS, ORDER_FILE, load_task, parse_mapping, read_text

_MARKS = tuple(status.value.encode() for status in RUNNING)
Stat = list  # [inode, size, mtime_ns]
RACY_NS = 2_000_000_000


def held_elsewhere(root: Path, order_dirs: list[Path], this_order: str, save: bool) -> list[Busy]:
    """Running tasks of every order directory in `order_dirs` except `this_order` (a path)."""
    mine = _same(this_order)
    out: list[Busy] = []
    for order_dir in order_dirs:
        if mine is None or _same(order_dir) != mine:
            out += _held(Path(root), Path(order_dir), save)
    return out


def _same(directory) -> tuple[int, int] | None:
    """What tells one directory from another, whatever path (or link) names it: device and inode."""
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _held(root: Path, order_dir: Path, save: bool) -> list[Busy]:
    index_path = root / ".aipm" / "holds" / f"{order_dir.name}.json"
    index = _read_index(index_path, order_dir)
    files: dict[str, Stat] = {}
    held: dict[str, list] = {}
    invalid: set[str] = set()  # of those, files that do not validate (kept apart: an older aipm reads `held`)
    changed = False
    try:
        entries = list(os.scandir(order_dir))
    except OSError:
        return []
    for entry in entries:
        name = entry.name
        if not name.endswith(".yaml") or name.startswith("."):
            continue
        try:
            st = entry.stat()
        except OSError:
            continue
        stamp = [st.st_ino, st.st_size, st.st_mtime_ns]
        files[name] = stamp
        if index["files"].get(name) == stamp:
            if name in index["held"]:
                held[name] = index["held"][name]
                if name in index.get("invalid", ()):
                    invalid.add(name)
            continue
        changed = True
        if name in NOT_TASKS:
            continue
        found = _running(root, Path(entry.path))
        if found:
            held[name] = found[:3]
            if found[3:]:
                invalid.add(name)
    changed = changed or files.keys() != index["files"].keys()
    order_id = index["order"] if not changed and index["order"] else _order_id(order_dir)
    if changed and save and index_path.parent.parent.is_dir():
        # Like git's racily clean entries: a stat from the last moments may not show an edit made in the
        # same clock tick, so such a file is read again next time.
        recent = time.time_ns() - RACY_NS
        files = {name: stamp if stamp[2] < recent else None for name, stamp in files.items()}
        _write_index(index_path, {"dir": str(order_dir), "order": order_id, "files": files, "held": held,
                                  "invalid": sorted(invalid)})
    return [Busy(order_id, task_id, tuple(normalize(t) for t in targets), status, invalid=name in invalid)
            for name, (task_id, status, targets) in held.items()]


def _running(root: Path, path: Path) -> list | None:
    """[task id, status, targets] when the file is a valid running task (a fourth item, true, when it says it
    is running but does not validate: _broken), else None."""
    try:  # a FIFO a worker left in an order directory must not hold every plan of the project for ever, nor a
        data = workerfiles.read_bytes(path, MAX_FILE_BYTES)  # sparse terabyte be read: no task file is that big
    except OSError:
        return None
    if not any(mark in data for mark in _MARKS):
        return None
    try:
        task = load_task(path, root)
    except ValidationError:
        return _broken(path, data)
    if task.status not in RUNNING:
        return None
    return [task.id, task.status.value, [str(t) for t in task.targets]]


_STATUS_LINE = re.compile(rb"^status[ \t]*:[ \t]*[\"']?(" + b"|".join(_MARKS) + rb")[\"']?[ \t]*(#.*)?\r?$", re.M)


def _broken(path: Path, data: bytes) -> list | None:
    """A file that says it is running but fails validation (a typo in a field a person set IN_PROGRESS by hand)
    still holds: what its target_files name if they can be read, else the whole tree (fail closed: dropped, its
    files went to agents without a word). `aipm validate` names the error; `why` names the file that holds."""
    try:
        fields = parse_mapping(path, data.decode("utf-8"))
    except (ValidationError, UnicodeDecodeError):
        found = _STATUS_LINE.search(data)
        return [path.stem, found.group(1).decode(), ["./"], True] if found else None
    status, targets = fields.get("status"), fields.get("target_files")
    if status not in {s.value for s in RUNNING}:
        return None
    targets = [targets] if isinstance(targets, str) else targets  # (`target_files: a.txt`, a list's typo)
    try:
        held = [str(normalize(t)) for t in targets] if isinstance(targets, list) and targets and all(
            isinstance(t, str) for t in targets) else ["./"]
    except PathError:
        held = ["./"]
    task_id = fields.get("id")
    return [task_id if isinstance(task_id, str) and task_id else path.stem, status, held, True]


def _order_id(order_dir: Path) -> str:
    meta = order_dir / ORDER_FILE
    try:
        data = parse_mapping(meta, read_text(meta)) if meta.is_file() else {}
    except ValidationError:
        data = {}
    value = data.get("id")
    return value if isinstance(value, str) and value else order_dir.name


def _read_index(path: Path, order_dir: Path) -> dict:
    try:
        # A worker can reach .aipm/: no FIFO waited for, no sparse terabyte read (it is written anew).
        data = json.loads(workerfiles.read_bytes(path, workerfiles.STATE_FILE_MAX))
        if data.get("dir") == str(order_dir) and isinstance(data.get("files"), dict):
            return data
    except (OSError, ValueError, AttributeError):
        pass
    return {"order": None, "files": {}, "held": {}}


def _write_index(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(exist_ok=True)
        workerfiles.write_bytes(path, json.dumps(data).encode())  # (its temp file never opened through a link)
    except OSError:
        pass  # only a cache: the next look reads the files again
