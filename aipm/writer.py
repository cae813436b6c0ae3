"""The one writer of task files.

Writing changes only the managed lines (status, attempts, ...) so comments and every other byte survive; the
result is proven to parse to the old mapping plus the changes before it may replace the file; and the write is
atomic: temp file in the same directory, fsync, identity check, rename, directory fsync.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from aipm import durable, flatyaml
from aipm.errors import ValidationError
from aipm.model import MANAGED_FIELDS, TRANSITIONS, Priority, Status, Task
from aipm.patch import Unpatchable, patch
from aipm.fields import managed_values
from aipm.spares import Pool, exchange as swap, exported, fill, pool
from aipm.store import DuplicateKey, Identity, load_yaml, parse_task, read_versioned, remember


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
    if isinstance(value, float):
        return money(value)
    if isinstance(value, dict):  # token counts: a flow mapping keeps the value on its one line
        return "{" + ", ".join(f"{k}: {_render(v)}" for k, v in value.items()) + "}"
    # Timestamps are quoted so YAML keeps them strings.
    return "'" + str(value).replace("'", "''") + "'"


def money(value: float) -> str:
    """Dollars with at most six decimals and always a dot, so YAML reads a float back (`1e-05` is a string)."""
    text = f"{round(value, 6):.6f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def rewrite(text: str, updates: Mapping[str, Any], old: Mapping[str, Any] | None = None) -> str:
    """`text` with the managed fields in `updates` set (see aipm.patch), every other character kept.

    The result is proven before it is returned: it must parse to the old mapping (`old`, when the caller parsed
    it already) with exactly `updates` applied. Otherwise Unpatchable is raised and nothing may be written.
    """
    return _rewrite(text, updates, old)[0]


def _rewrite(text: str, updates: Mapping[str, Any], old: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
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


def atomic_write(path: Path, text: str, identity: Identity | None = None, spares: Pool | None = None) -> bool:
    """Replace `path` with `text` so that readers see the old file or the new one, never a mix.

    With `identity` (of the version the text was made from), the file must still be that version right before
    the rename; if someone changed it meanwhile nothing is written and False is returned (read it again).
    With `spares`, the temp file is a spare inode when one may be reused, and the replaced version becomes one
    once the directory fsync has made the new one durable (see spares.py); the steps stay the same.
    """
    directory = path.parent
    fd, tmp = _temp_file(path, spares)
    kept = None
    try:
        try:
            fill(fd, text.encode("utf-8"))
            try:
                os.fchmod(fd, os.stat(path).st_mode & 0o7777)
            except FileNotFoundError:
                pass
            os.fsync(fd)
        finally:
            os.close(fd)
        if identity is not None and _identity(path) != identity:
            os.unlink(tmp)
            return False
        if spares is not None and swap(tmp, str(path)):
            kept = spares.keep(tmp)  # the old version, out of the directory at once
        else:
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        durable.sync_dir(str(directory))  # now, or once for the whole wake-up (the launch lock's batch)
    except BaseException:
        if kept is not None:
            spares.ready(kept, False)  # its replacement may not be on disk: never to be reused
        raise
    if kept is not None:
        durable.once_durable(lambda ok: spares.ready(kept, ok))
    return True


_temp_serial = 0


def _temp_file(path: Path, spares: Pool | None = None) -> tuple[int, str]:
    """A file beside `path` for its next version: named after this process and a counter (no random name
    to draw, no retry loop unless a dead process with our pid left one behind); a spare when there is one."""
    global _temp_serial
    while True:
        _temp_serial += 1
        tmp = f"{path.parent}/.{path.name}.{os.getpid()}-{_temp_serial}.tmp"
        fd = spares.take(tmp) if spares is not None else None
        if fd is not None:
            return fd, tmp
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), tmp
        except FileExistsError:
            continue


def _identity(path: Path) -> Identity | None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns)


# A person saving the file over and over while aipm writes: give up (StaleWrite) rather than spin.
WRITE_ATTEMPTS = 50


def update_task(
    path: Path,
    updates: Mapping[str, Any] | Callable[[Task], Mapping[str, Any]],
    expect: Status | None = None,
    root: Path | None = None,
) -> Task:
    """Re-read the task file, check its status, and write `updates` into the managed fields.

    `updates` may be a function of the task as read now, so a decision and its write share one read.
    `expect` guards against lost races: when given, the file must still hold that status, and a new status
    must be a legal transition from it. Callers serialise writers with the project's launch lock; edits by
    people and their tools are not serialised, so a file changed between our read and our rename is read
    and rewritten again (no lost update).
    """
    for _ in range(WRITE_ATTEMPTS):
        text, identity = read_versioned(path, follow=False)
        data, current = parse_task(path, text, root)
        if expect is not None and current.status != expect:
            raise StaleWrite(f"{current.id} is {current.status}, expected {expect}")
        changes = updates(current) if callable(updates) else updates
        new_status = changes.get("status")
        if new_status is not None and new_status != current.status and new_status not in TRANSITIONS[current.status]:
            raise StaleWrite(f"{current.id}: {current.status} → {new_status} is not allowed")
        try:
            new_text, new_data = _rewrite(text, changes, data)
        except Unpatchable as exc:
            raise ValidationError(str(path), exc.key, f"aipm cannot write this field here ({exc.reason}); "
                                  f"write it as a plain `{exc.key or 'status'}: VALUE` line") from None
        # The task as a fresh load of the new text will give it (the text provably parses to new_data, which is
        # the old data with only managed fields changed): checked before it is written, remembered for the next
        # read of this file, and returned.
        fresh = dataclasses.replace(current, **managed_values(path, new_data))
        if new_text == text or atomic_write(path, new_text, identity, _spares(root)):
            remember(path, new_text, root, new_data, fresh)
            return fresh
    raise StaleWrite(f"{path}: the file kept changing while aipm tried to write it; nothing written")


def _spares(root: Path | None) -> Pool | None:
    """The pool of replaced task files: in the project's runtime directory, on the tree's file system (none for a
    project that NFS exports: see spares.py)."""
    return None if root is None or exported(str(root)) else pool(f"{root}/.aipm/spare", ignored_by_git=True)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")
