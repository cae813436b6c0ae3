"""The one writer of task files.

Writing changes only the managed lines (status, attempts, ...) so comments and every other byte survive; the
result is proven to parse to the old mapping plus the changes before it may replace the file; and the write is
atomic: temp file in the same directory, fsync, identity check, rename, directory fsync.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import stat
import time
from collections.abc import Callable, Collection, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

from aipm import durable
from aipm.errors import UserError, ValidationError
from aipm.model import TRANSITIONS, Status, Task, evolve
from aipm.patch import Unpatchable
from aipm.rewriting import rewrite_proven
from aipm.offthread import Synced
from aipm.fields import managed_values
from aipm.inodes import Stamp, exchange as swap, fill, stamp
from aipm.spares import Pool, in_tree
from aipm.store import Identity, parse_task, read_versioned, remember


class StaleWrite(Exception):
    """The task file no longer holds what the caller expected (another process moved it on)."""


def atomic_write(path: Path, text: str, identity: Identity | None = None, spares: Pool | None = None) -> bool:
    """Replace `path` with `text` so that readers see the old file or the new one, never a mix.

    With `identity` (of the version the text was made from), the file must still be that version right before
    the rename; if someone changed it meanwhile nothing is written and False is returned (read it again).
    With `spares`, the new version is written in the pool (a spare inode when one may be reused) and exchanged
    into place from there, and the replaced version becomes a spare once the directory fsync has made the new one
    durable (see spares.py); the steps stay the same.
    """
    fd, tmp = _temp_file(path, spares)
    try:
        try:
            fill(fd, text.encode("utf-8"))
            _same_mode(fd, path)
            os.fsync(fd)
            ino = os.fstat(fd).st_ino
        finally:
            os.close(fd)
    except BaseException:
        _discard(tmp)
        raise
    return _install(path, tmp, identity, spares, ino)


def _same_mode(fd: int, path: Path) -> None:
    try:
        os.fchmod(fd, os.stat(path).st_mode & 0o7777)
    except FileNotFoundError:
        pass


def _discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def _install(path: Path, tmp: str, identity: Identity | None, spares: Pool | None, ino: int) -> bool:
    """The end of a write: `tmp` (inode `ino`), the new version beside `path` or in the pool and already on disk,
    put in its place, and the directory fsynced. False (nothing of ours left in place: read again) when `path` is
    no longer `identity`, or a file moved under either name in the instant around the exchange, or `tmp` is gone
    (a worker's `git clean`)."""
    kept = None
    try:
        if identity is not None and _identity(path) != identity:
            os.unlink(tmp)
            return False
        if os.lstat(tmp).st_ino != ino:  # another file renamed under our temp's name (into the pool): not ours
            _discard(tmp)
            return False
        if spares is not None and swap(tmp, str(path)):
            if not _exchanged(path, tmp, identity, ino):
                return False
            # The old version, now at `tmp`: out of the order's directory at once.
            kept = spares.swapped(tmp, str(path)) if os.path.dirname(tmp) == spares.dir else spares.keep(tmp)
        else:
            os.replace(tmp, path)
    except FileNotFoundError:
        _discard(tmp)
        return False
    except BaseException:
        _discard(tmp)
        raise
    try:
        durable.sync_dir(str(path.parent))  # now, or once for the whole wake-up (the launch lock's batch)
    except BaseException:
        if kept is not None:
            spares.ready(kept, False)  # its replacement may not be on disk: never to be reused
        raise
    if kept is not None:
        # (Not urgent: a spare may wait for a later wake-up's fsync; the pool keeps enough for that.)
        durable.once_durable(lambda ok: spares.ready(kept, ok), urgent=False)
    return True


def _exchanged(path: Path, tmp: str, identity: Identity | None, ino: int) -> bool:
    """After the exchange: whether ours is at `path` and the version we read at `tmp`. Else someone moved a file
    in the instant around it, and theirs is left at `path`: a rename over it after the exchange (a worker's save,
    a `git checkout`) stays, and the version ours replaced goes; one before it had put their version (or a
    directory) into the pool, so it is exchanged back and ours goes."""
    now, old = os.lstat(path), os.lstat(tmp)
    if now.st_ino != ino:
        if stat.S_ISREG(old.st_mode):
            _discard(tmp)
        return False
    # (Not its ctime: the exchange itself moved that on.)
    if identity is not None and (old.st_ino, old.st_size, old.st_mtime_ns) != identity[:3]:
        if swap(tmp, str(path)) and os.lstat(tmp).st_ino == ino:
            _discard(tmp)
        return False
    return True


_temp_serial = 0


def _temp_file(path: Path, spares: Pool | None = None) -> tuple[int, str]:
    """A file for `path`'s next version: in the pool when its versions can be exchanged in from there (a spare,
    else a new file of the pool); otherwise beside `path`, named after this process and a counter (no random name
    to draw, no retry loop unless a dead process with our pid left one behind)."""
    if spares is not None and spares.replaces(str(path.parent)):
        found = spares.take_here()
        if found is not None:
            return found
        try:
            return spares.new_file()
        except OSError:
            pass  # the pool's directory removed (a worker's `git clean`): beside the file, as without a pool
    while True:
        tmp = _temp_name(path)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), tmp
        except FileExistsError:
            continue


def _temp_name(path: Path) -> str:
    global _temp_serial
    _temp_serial += 1
    return f"{path.parent}/.{path.name}.{os.getpid()}-{_temp_serial}.tmp"


def _identity(path: Path) -> Identity | None:
    try:
        return stamp(os.lstat(path))
    except FileNotFoundError:
        return None


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
    and rewritten again (no lost update). A version prepare()d for exactly this write is moved into place.
    """
    done = _write_ahead_of_time(path, updates, expect, root)
    if done is not None:
        return done
    for _ in range(WRITE_ATTEMPTS):
        text, identity = read_versioned(path, follow=False)
        data, current = parse_task(path, text, root)
        if expect is not None and current.status != expect:
            raise StaleWrite(f"{current.id} is {current.status}, expected {expect}")
        changes = updates(current) if callable(updates) else updates
        new_status = changes.get("status")
        if not _allowed(current, new_status):
            raise StaleWrite(f"{current.id}: {current.status} → {new_status} is not allowed")
        try:
            new_text, new_data = rewrite_proven(text, changes, data)
        except Unpatchable as exc:
            raise ValidationError(str(path), exc.key, f"aipm cannot write this field here ({exc.reason}); "
                                  f"write it as a plain `{exc.key or 'status'}: VALUE` line") from None
        # The task as a fresh load of the new text will give it (the text provably parses to new_data, which is
        # the old data with only managed fields changed): checked before it is written, remembered for the next
        # read of this file, and returned.
        fresh = evolve(current, managed_values(path, new_data))
        if new_text == text or atomic_write(path, new_text, identity, _spares(root)):
            remember(path, new_text, root, new_data, fresh)
            return fresh
    raise StaleWrite(f"{path}: the file kept changing while aipm tried to write it; nothing written")


def _allowed(current: Task, new_status: Status | None) -> bool:
    return new_status is None or new_status == current.status or new_status in TRANSITIONS[current.status]


@dataclasses.dataclass
class _Ahead:
    """A task file's next version, made and on disk before it was asked for (prepare())."""

    expect: Status | None
    changes: Mapping[str, Any]
    current: Task  # the task as the version it was made from holds it
    version: Stamp  # of that version (its ctime too: a chmod, or an edit that puts the mtime back, changes it)
    text: str
    data: dict[str, Any]
    fresh: Task
    name: str  # in the pool
    written: Stamp  # of the prepared file
    synced: Synced  # its fsync (offthread.fsync_later): done before it is put in place
    spares: Pool
    root: Path

    def on_disk(self) -> bool:
        """Its fsync is done (waited for: it has had the time since it was made), and did not fail."""
        try:
            self.synced.result()
            return True
        except OSError:
            return False

    def unchanged(self, path: Path) -> bool:
        """The file is still the very version this was made from."""
        try:
            return stamp(os.lstat(path)) == self.version
        except OSError:
            return False


_ahead: dict[str, _Ahead] = {}
AHEAD_MAX = 16  # versions kept ready at once (a run prepares the next status of its running and next tasks)


def prepare(path: Path, updates: Callable[[Task], Mapping[str, Any]], expect: Status | None,
            root: Path, due: bool = False) -> None:
    """Write the task file's next version now, while nothing waits for it: the text made and proven as
    update_task() makes it, written and fsynced in the project's pool of spare files (outside the order's
    directory). An update_task() that later asks for exactly these changes of exactly this version only moves it
    into place: the status write on the hot path of a start or an outcome loses its file write and fsync (its
    directory fsync remains). Anything else (the file changed, other changes) writes as before, and the prepared
    version becomes a spare. Whatever goes wrong here leaves nothing prepared.

    Made once per version of the file: its timestamps are those of the second it was made in, so it serves a
    hand-over within that second (short tasks, whose hand-over this write dominates); a longer task's end writes
    as before rather than making its next status again on every wake-up. `updates` gets the task as the file
    holds it now.

    `due`: the write follows at once (a start, whose fsync here runs while the start's other steps do): a version
    prepared earlier with other changes (timestamps of an earlier second) is made again."""
    key = os.fspath(path)
    known = _ahead.get(key)
    if known is not None:
        if known.unchanged(path) and not (due and updates(known.current) != known.changes):
            return
        _drop(_ahead.pop(key))
    spares = _spares(root)
    if spares is None:
        return
    try:
        text, identity = read_versioned(path, follow=False)
        info = os.lstat(path)
        version = stamp(info)
        if version != identity:
            return  # changed while it was read
        data, current = parse_task(path, text, root)
        changes = dict(updates(current))
        if (expect is not None and current.status != expect) or not _allowed(current, changes.get("status")):
            return
        new_text, new_data = rewrite_proven(text, changes, data)
        if new_text == text:
            return
        written = spares.write_ahead(new_text.encode("utf-8"), info.st_mode & 0o7777, str(path.parent))
    except (UserError, Unpatchable, OSError):
        return
    if written is None:
        return
    while len(_ahead) >= AHEAD_MAX:
        _drop(_ahead.pop(next(iter(_ahead))))  # the oldest: the likeliest to have gone stale
    fresh = evolve(current, managed_values(path, new_data))
    _ahead[key] = _Ahead(expect, changes, current, version, new_text, new_data, fresh, *written, spares, root)


def keep_prepared(paths: Collection[str]) -> None:
    """Forget the prepared versions of files not in `paths` (tasks no longer about to end or start)."""
    for key in [key for key in _ahead if key not in paths]:
        _drop(_ahead.pop(key))


def forget_prepared(path: Path | str) -> None:
    """Forget the prepared version of this file, if any (a start that failed: its fsync is waited for and its
    descriptor closed now, not when the run ends)."""
    ahead = _ahead.pop(os.fspath(path), None)
    if ahead is not None:
        _drop(ahead)


def _write_ahead_of_time(path: Path, updates: Mapping[str, Any] | Callable[[Task], Mapping[str, Any]],
                         expect: Status | None, root: Path | None) -> Task | None:
    """update_task() through its prepared version, when there is one and it is exactly this write: the file is
    still the version it was made from, and these are its changes and expectation. None: write as usual."""
    ahead = _ahead.pop(os.fspath(path), None)
    if ahead is None:
        return None
    if (ahead.expect != expect or root != ahead.root or not ahead.unchanged(path)
            or (updates(ahead.current) if callable(updates) else updates) != ahead.changes):
        _drop(ahead)
        return None
    if not ahead.on_disk():
        _drop(ahead)
        return None  # its fsync failed: written as usual, with its own
    if not ahead.spares.unchanged(ahead.name, ahead.written):
        return None  # changed or gone in the pool (and removed): written as usual
    if not _install(path, ahead.name, ahead.version, ahead.spares, ahead.written[0]):
        return None  # changed in the instant before the rename: read again
    remember(path, ahead.text, root, ahead.data, ahead.fresh)
    return ahead.fresh


def _drop(ahead: _Ahead) -> None:
    if ahead.on_disk():  # (closed: a spare still open for its fsync would fail its reuse's lease check)
        ahead.spares.give_back(ahead.name, ahead.written)
    else:
        with suppress(OSError):
            os.unlink(ahead.name)


def drop_prepared() -> None:
    """Forget every prepared version (each becomes a spare): the run that prepared them ends."""
    keep_prepared(())


def _spares(root: Path | None) -> Pool | None:
    """The pool of replaced task files (none without a project root)."""
    return None if root is None else in_tree(root)


def now() -> str:
    """This second, as the task files say it (local time with its offset). Made once a second: each astimezone()
    has libc look at the time zone file again (a system call), and a run asks several times a start and an end."""
    global _said
    second = int(time.time())
    said = _said
    if said[0] != second:
        local = dt.datetime.fromtimestamp(second, dt.timezone.utc).astimezone()
        said = _said = (second, local.isoformat(timespec="seconds"))
    return said[1]


_said: tuple[int, str] = (-1, "")  # (the second now() last made, its text): one tuple, for the threads that ask
