"""What changed in the work tree during an attempt, from one inotify watch held for the whole of a `run`.

The scope audit's `git status` per wake-up costs a process per hand-over (a tenth of a short build's time).
Instead, `run` watches every directory of the tree that git does not ignore (not `.git`, not the runtime
directory, not a nested repository) and logs each file event in order. An attempt's window opens when it
starts (`open_window`, before its go) and the audit reads the paths with events since (`touched`). Only a path
outside every allowed target costs anything more: a stat, and a `git check-ignore` for what git may ignore.

Events are read only when a window opens or is audited, never while workers run. Should the kernel's queue
overflow meanwhile, or a new directory not be watched, a LOST mark goes into the log: the windows it falls in
are incomplete and the audit falls back to `git status` (scope.py). A directory moved away is logged as one
path ending in "/" (the files it held have no events of their own).

Limits: a write through a hard link whose other name is outside the watched directories, or from another
machine on a network file system, raises no event here (`scope_watch: false` audits with `git status`).
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterable

from aipm.inotify import close_at_exit

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x002, 0x004, 0x008
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x040, 0x080, 0x100, 0x200
IN_Q_OVERFLOW, IN_IGNORED, IN_ONLYDIR, IN_DONT_FOLLOW = 0x4000, 0x8000, 0x01000000, 0x02000000
IN_EXCL_UNLINK, IN_ISDIR = 0x04000000, 0x40000000
_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
         | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK)
_HEADER = struct.Struct("iIII")

WROTE, CREATED, REMOVED, LOST = 0, 1, 2, 3  # kinds of logged events
MAX_DIRS = 50_000  # a bigger tree is audited with git status: watching it would cost more than it saves


class TreeWatch:
    def __init__(self, root: str, fd: int, libc: ctypes.CDLL, skip: set[str]):
        self.root = root
        self._fd, self._libc = fd, libc
        self._skip = skip  # directories not to watch, relative to the root: what git ignores
        self._dirs: dict[int, str] = {}  # watch descriptor -> directory relative to the root ("" for the root)
        self._log: list[tuple[str, int]] = []  # (path relative to the root, kind), in the order they happened
        self._base = 0  # sequence number of _log[0]
        # Open windows: key -> (sequence number of the first event they see, the caller's time stamp of it).
        self._windows: dict[str, tuple[int, int]] = {}
        self._ends: dict[str, int] = {}  # windows whose attempt has ended: key -> sequence number after the last

    @classmethod
    def open(cls, root: str, ignored_dirs: Iterable[str], runtime_dir: str) -> "TreeWatch | None":
        """A watch over `root` (a real path) without `ignored_dirs` (relative) and the runtime directory; None
        where inotify is missing or the tree has more than MAX_DIRS directories to watch."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, AttributeError):
            return None
        if fd < 0:
            return None
        watch = cls(root, fd, libc, {d.rstrip("/") for d in ignored_dirs} | {runtime_dir})
        if watch._add_tree("", None) is None:
            watch.close()
            return None
        return watch

    def open_window(self, key: str, stamp: int) -> None:
        """`key`'s attempt is about to begin: what happens from now on is in its window (`stamp`: when)."""
        self._drain()
        self._windows[key] = (self._base + len(self._log), stamp)

    def opened(self, key: str) -> int | None:
        """The stamp `key`'s window was opened with; None when it is not open here."""
        window = self._windows.get(key)
        return window[1] if window is not None else None

    def end_window(self, key: str) -> None:
        """`key`'s attempt has ended (its processes are gone): what happens from now on is not its doing."""
        if key in self._windows:
            self._drain()
            self._ends[key] = self._base + len(self._log)

    def touched(self, key: str) -> dict[str, int] | None:
        """Paths with events in `key`'s window, each with the kind of its first event there (CREATED: it did not
        exist when the window opened, unless a rename replaced it); None when the window is unknown here or
        incomplete (events were lost)."""
        if key not in self._windows:
            return None
        since = self._windows[key][0]
        end = self._ends.get(key)
        if end is None:
            self._drain()
            end = self._base + len(self._log)
        first: dict[str, int] = {}
        for path, kind in self._log[since - self._base:end - self._base]:
            if kind == LOST:
                return None
            first.setdefault(path, kind)
        return first

    def close_window(self, key: str) -> None:
        """Forget `key`'s window, and the events no open window needs any more."""
        self._windows.pop(key, None)
        self._ends.pop(key, None)
        keep = min((seq for seq, _ in self._windows.values()), default=self._base + len(self._log))
        del self._log[:keep - self._base]
        self._base = keep

    def close(self, at_exit: bool = False) -> None:
        """`at_exit`: this process ends soon; do not wait for the kernel's teardown (inotify.close_at_exit)."""
        close_at_exit(self._fd) if at_exit else os.close(self._fd)

    # -- events ---------------------------------------------------------------------------------------------

    def _drain(self) -> None:
        log = self._log
        while True:
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                return
            offset = 0
            while offset < len(data):
                wd, mask, _, length = _HEADER.unpack_from(data, offset)
                start = offset + _HEADER.size
                offset = start + length
                if mask & IN_Q_OVERFLOW:
                    log.append(("", LOST))
                    continue
                if mask & IN_IGNORED:
                    self._dirs.pop(wd, None)
                    continue
                parent = self._dirs.get(wd)
                if parent is None:
                    continue  # a directory dropped from the watch (moved away) whose events were queued
                name = data[start:start + length].rstrip(b"\0").decode("utf-8", "surrogateescape")
                path = f"{parent}/{name}" if parent else name
                if name == ".git" or path in self._skip:
                    continue
                if mask & IN_ISDIR:
                    self._directory_event(path, mask)
                elif mask & (IN_CREATE | IN_MOVED_TO):
                    log.append((path, CREATED))
                elif mask & (IN_DELETE | IN_MOVED_FROM):
                    log.append((path, REMOVED))
                else:
                    log.append((path, WROTE))

    def _directory_event(self, path: str, mask: int) -> None:
        if mask & (IN_CREATE | IN_MOVED_TO):
            # Files may have been made in it before its watch was added: every one found is new.
            found = self._add_tree(path, [])
            if found is None:
                self._log.append(("", LOST))
            else:
                self._log.extend((f, CREATED) for f in found)
        elif mask & IN_MOVED_FROM:
            # Its files moved with it, without events of their own; its watches follow it, so drop them.
            prefix = path + "/"
            for wd, d in list(self._dirs.items()):
                if d == path or d.startswith(prefix):
                    self._libc.inotify_rm_watch(self._fd, wd)
                    del self._dirs[wd]
            self._log.append((prefix, REMOVED))
        # IN_DELETE of a directory: it was empty by then; the files it held were each logged as removed.

    def _add_tree(self, top: str, found: list[str] | None) -> list[str] | None:
        """Watch `top` and every directory below it we may watch, collecting into `found` the files met (when
        given); None when a directory could not be watched (limits) or there are too many."""
        pending = [top]
        while pending:
            rel = pending.pop()
            if rel and os.path.lexists(f"{self.root}/{rel}/.git"):
                continue  # a nested repository: git sees it as one path, and so do we (its own writes: not)
            wd = self._libc.inotify_add_watch(self._fd, os.fsencode(f"{self.root}/{rel}" if rel else self.root),
                                              _MASK)
            if wd < 0:
                if ctypes.get_errno() in (2, 20):  # ENOENT, ENOTDIR: gone already, nothing to watch
                    continue
                return None
            self._dirs[wd] = rel
            if len(self._dirs) > MAX_DIRS:
                return None
            try:
                entries = list(os.scandir(f"{self.root}/{rel}" if rel else self.root))
            except OSError:
                continue
            for entry in entries:
                path = f"{rel}/{entry.name}" if rel else entry.name
                if entry.name == ".git" or path in self._skip:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append(path)
                elif found is not None:
                    found.append(path)
        return found if found is not None else []
