"""What changed in the work tree during an attempt, from one inotify watch held for the whole of a `run`.

The scope audit's `git status` per wake-up costs a process per hand-over (a tenth of a short build's time).
Instead, `run` watches every directory of the tree that git does not ignore (not `.git`, not the runtime
directory, not below a nested repository's top) and logs each file event in order. An attempt's window opens when
it starts (`open_window`, before its go) and is sealed when it ends (`end_window`); the audit reads the paths
with events in it (`touched`). Only a path outside every allowed target costs anything more: a stat, and a
`git check-ignore` for what git may ignore.

Events are read only when a window opens or ends, never while workers run. Should the kernel's queue overflow
meanwhile, or a new directory not be watched (limits), a LOST mark goes into the log: the windows it falls in
are incomplete (the audit falls back to `git status`, scope.py), and the next window to open first walks the
tree again. A directory made in the tree is logged as "dir/" CREATED, one moved away as "dir/" REMOVED (the
files it held have no events of their own); a nested repository counts as one path, as git shows it.

Limits: a write through a hard link is seen only under the name it was made through (another name for the
same file, inside the tree or not, raises no event); nor are writes from another machine on a network file
system (`scope_watch: false` audits with `git status`).
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Callable, Iterable

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

Touched = dict[str, int]  # path relative to the root ("dir/" for a directory) -> kind of its first event


class TreeWatch:
    def __init__(self, root: str, libc: ctypes.CDLL, skip: set[str], ignored: Callable[[list[str]], set[str]]):
        self.root = root
        self._libc = libc
        self._fd = -1
        self._skip = skip  # directories not to watch, relative to the root: what git ignores
        self._ignored = ignored  # which of these new directories git ignores
        self._dirs: dict[int, str] = {}  # watch descriptor -> directory relative to the root ("" for the root)
        self._nested: set[str] = set()  # nested repositories met, relative to the root
        self._log: list[tuple[str, int]] = []  # (path relative to the root, kind), in the order they happened
        self._base = 0  # sequence number of _log[0]
        self._stale = False  # events were lost since the tree was last walked: the directories may be wrong
        self._windows: dict[str, int] = {}  # open windows: key -> sequence number of the first event they see
        self._stamps: dict[str, int] = {}  # key -> the caller's time stamp of its window's opening
        self._sealed: dict[str, Touched | None] = {}  # windows whose attempt has ended: what they saw

    @classmethod
    def open(cls, root: str, ignored_dirs: Iterable[str], runtime_dir: str,
             ignored: Callable[[list[str]], set[str]]) -> "TreeWatch | None":
        """A watch over `root` (a real path) without `ignored_dirs` (relative) and the runtime directory;
        `ignored` tells which directories made later git ignores. None where inotify is missing or the tree has
        more than MAX_DIRS directories to watch."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.inotify_init1  # missing outside Linux: AttributeError
        except (OSError, AttributeError):
            return None
        watch = cls(root, libc, {d.rstrip("/") for d in ignored_dirs} | {runtime_dir}, ignored)
        if not watch._walk():
            watch.close()
            return None
        return watch

    def open_window(self, key: str, stamp: int) -> None:
        """`key`'s attempt is about to begin: what happens from now on is in its window (`stamp`: when)."""
        self._drain()
        if self._stale and not self._walk():
            self._log.append(("", LOST))  # still not watched whole: this window is incomplete from its start
        self._windows[key] = self._base + len(self._log)
        self._stamps[key] = stamp
        self._sealed.pop(key, None)

    def opened(self, key: str) -> int | None:
        """The stamp `key`'s window was opened with; None when it was not opened here."""
        return self._stamps.get(key)

    def end_window(self, key: str) -> None:
        """`key`'s attempt has ended (its processes are gone): what happens from now on is not its doing. What
        it saw is kept apart, so the log need not be kept for it while its outcome and review follow."""
        if key in self._windows:
            self._sealed[key] = self.touched(key)
            self._forget(key)

    def touched(self, key: str) -> Touched | None:
        """Paths with events in `key`'s window, each with the kind of its first event there (CREATED: it did not
        exist when the window opened, unless a rename replaced it); None when the window is unknown here or
        incomplete (events were lost)."""
        if key in self._sealed:
            return self._sealed[key]
        if key not in self._windows:
            return None
        self._drain()
        first: Touched = {}
        for path, kind in self._log[self._windows[key] - self._base:]:
            if kind == LOST:
                return None
            first.setdefault(path, kind)
        return first

    def sees(self, path: str) -> bool:
        """Whether every change to the file `path` (relative) is logged under its name: no directory above it is
        one not watched (git ignores it, the runtime directory) nor a nested repository, and it is none itself."""
        parts = path.split("/")
        above = ("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        return not any(d in self._skip or d in self._nested for d in above)

    def close_window(self, key: str) -> None:
        """Forget `key`'s window."""
        self._forget(key)
        self._sealed.pop(key, None)
        self._stamps.pop(key, None)

    def close(self, at_exit: bool = False) -> None:
        """`at_exit`: this process ends soon; do not wait for the kernel's teardown (inotify.close_at_exit)."""
        if self._fd >= 0:
            close_at_exit(self._fd) if at_exit else os.close(self._fd)
            self._fd = -1

    def _forget(self, key: str) -> None:
        self._windows.pop(key, None)
        keep = min(self._windows.values(), default=self._base + len(self._log))
        del self._log[:keep - self._base]  # the events no open window needs any more
        self._base = keep

    # -- the directories watched ----------------------------------------------------------------------------

    def _walk(self) -> bool:
        """Watch the whole tree afresh (a new inotify instance: stale watches and queued events go with the
        old one); False when it cannot be watched whole."""
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            return False
        self.close()
        self._fd, self._dirs, self._nested = fd, {}, set()
        self._stale = self._add_tree("", None) is None
        return not self._stale

    def _add_tree(self, top: str, found: list[str] | None) -> list[str] | None:
        """Watch `top` and every directory below it we may watch, collecting into `found` the files (and nested
        repositories) met, when given; None when a directory could not be watched (limits) or there are too
        many."""
        pending = [top]
        while pending:
            rel = pending.pop()
            nested = bool(rel) and os.path.lexists(f"{self.root}/{rel}/.git")
            wd = self._libc.inotify_add_watch(self._fd, os.fsencode(f"{self.root}/{rel}" if rel else self.root),
                                              _MASK)
            if wd < 0:
                if ctypes.get_errno() in (2, 20):  # ENOENT, ENOTDIR: gone already, nothing to watch
                    continue
                return None
            self._dirs[wd] = rel
            if len(self._dirs) > MAX_DIRS:
                return None
            if nested:
                # git shows a nested repository as one path (fingerprinted by its directory): so do we, from
                # the events in its top directory; what happens deeper in it is its own git's business.
                self._nested.add(rel)
                if found is not None:
                    found.append(rel)
                continue
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

    # -- events ---------------------------------------------------------------------------------------------

    def _drain(self) -> None:
        log = self._log
        made: list[str] = []  # directories made since the last read, watched once git has said which it ignores
        while True:
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                wd, mask, _, length = _HEADER.unpack_from(data, offset)
                start = offset + _HEADER.size
                offset = start + length
                if mask & IN_Q_OVERFLOW:
                    self._lose()
                    continue
                if mask & IN_IGNORED:
                    self._dirs.pop(wd, None)
                    continue
                parent = self._dirs.get(wd)
                if parent is None:
                    continue  # a directory dropped from the watch (moved away) whose events were queued
                if parent in self._nested:
                    log.append((parent, WROTE))
                    continue
                name = data[start:start + length].rstrip(b"\0").decode("utf-8", "surrogateescape")
                path = f"{parent}/{name}" if parent else name
                if name == ".git" or path in self._skip:
                    continue
                if mask & IN_ISDIR:
                    self._directory_event(path, mask, made)
                elif mask & (IN_CREATE | IN_MOVED_TO):
                    log.append((path, CREATED))
                elif mask & (IN_DELETE | IN_MOVED_FROM):
                    log.append((path, REMOVED))
                else:
                    log.append((path, WROTE))
        if made:
            self._watch_made(made)

    def _directory_event(self, path: str, mask: int, made: list[str]) -> None:
        if mask & (IN_CREATE | IN_MOVED_TO):
            self._log.append((path + "/", CREATED))
            made.append(path)
        elif mask & (IN_DELETE | IN_MOVED_FROM):
            nested = path in self._nested
            if mask & IN_MOVED_FROM:
                # Its files moved with it, without events of their own; its watches follow it, so drop them.
                prefix = path + "/"
                for wd, d in list(self._dirs.items()):
                    if d == path or d.startswith(prefix):
                        self._libc.inotify_rm_watch(self._fd, wd)
                        del self._dirs[wd]
                self._nested = {n for n in self._nested if n != path and not n.startswith(prefix)}
                if not nested:
                    self._log.append((prefix, REMOVED))
            if nested:  # one path to git, as to us
                self._nested.discard(path)
                self._log.append((path, REMOVED))
            # IN_DELETE of a directory: it was empty by then; the files it held were each logged as removed.

    def _watch_made(self, made: list[str]) -> None:
        """Watch the directories made since the last read that git does not ignore. Files may have been made in
        them before their watch was added: every one found is new."""
        self._skip.update(self._ignored(made))
        for path in made:  # each in a watched directory: only its own name can be skipped
            if path in self._skip:
                continue
            found = self._add_tree(path, [])
            if found is None:
                self._lose()
            else:
                self._log.extend((f, CREATED) for f in found)

    def _lose(self) -> None:
        self._log.append(("", LOST))
        self._stale = True
