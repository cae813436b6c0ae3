"""Spare inodes: the file a write replaces (or a record that is removed) is kept and reused by a later write.

Why: every status write made a new file (temp, fsync, rename) and freed the one it replaced; every worker record
was made and later removed. On ext4 without a journal (the benchmark machine's disk) each new inode costs a scan
of every inode freed in the last 60 seconds (`recently_deleted` in the allocator), and inside a run, where each
write frees one, that scan grows with the run: creating the temp file of a status write took 313 µs in B2 (cProfile,
1000 creates), more than its fsync. A write that reuses a spare creates and frees nothing.

A task file's next version is written and fsynced in the pool and exchanged into place from there (one
renameat2 RENAME_EXCHANGE across the two directories): the version it replaces lands in the pool under the
spare's name in the same step. No temp name appears beside the task file (its watchers see only its own name
change) and neither file needs a rename of its own: on B2's hand-over the status install took 0.14-0.16 ms
instead of 0.36-0.42 with a temp file beside it (handover_timeline.py, 2026-12-04).

Reuse must not change what anyone can still see:
- a replaced version becomes a spare only once its replacement is durable (the writer waits for the directory
  fsync): until then a power cut could bring the old name back onto it;
- a spare is reused only when no other process has it open (the kernel grants a write lease only then, and the
  lease must not be under a break when it is given back): a reader that opened the old version reads it to the end;
- its cached pages are dropped before it is written (`FALLOC_FL_ZERO_RANGE`, else a truncation): a pipe or
  socket that still holds them (`splice`, `sendfile`) delivers the old bytes, not the new ones;
- only a plain file of ours with one link and no extended attributes but security labels (a hard link elsewhere
  would see the new text; an ACL of one task file must not pass to another), and only the very inode we kept.
Where any of this fails, or the system cannot swap two names atomically, the write makes a new file as before.
A limit: a holder of a file *handle* (an NFS client, a fanotify indexer: no open descriptor, so no lease to refuse)
can read a reused inode's new contents through its handle to the old version. So a project the kernel's NFS
server exports gets no spares (exported()); an indexer that keeps handles is not detected.
"""

from __future__ import annotations

import itertools
import os
import re
import stat
from contextlib import suppress
from functools import lru_cache

from aipm.inodes import (EUID, Stamp, create, empty, fill, inherits, move_new, ours_alone, reusable,
                         stamp)
from aipm.offthread import Synced, fsync_later

# Spares per pool: one round of a run writes a few files, and its replaced versions may wait for the next round's
# fsync (durable.carry_over): at 4, B1 made a new file every other task (a create costs a scan here, see above).
KEEP = 8
_NAME = re.compile(r"\d+-\d+")
_EXPORTS = "/proc/fs/nfsd/exports"  # what the kernel NFS server exports, while it runs


class Pool:
    """The spares of one directory, reused for writes on its file system. One per directory and process."""

    def __init__(self, directory: str, ignored_by_git: bool):
        self.dir = directory
        self._ignored = ignored_by_git
        self._ready: list[tuple[str, int, str]] = []  # (name, inode, the path it was) ready for reuse
        self._kept = 0  # ready or waiting for their replacement to become durable
        self._serial = itertools.count(1)  # next() is one step: names are made in two threads (stock())
        self._checked = False
        self._blanks: list[tuple[str, int]] = []  # empty files made by stock(): (name, inode)
        self._devices: dict[str, bool] = {}  # directory → on the pool's file system (see replaces())

    def take(self, tmp: str, avoid: str | None = None) -> int | None:
        """A spare renamed to `tmp` and opened for writing, emptied; None when there is none that may be reused.
        `avoid`: not one that was this path (a record's own earlier version: after a power cut its old bytes
        would pass for the new record)."""
        found = self._take(tmp, avoid)
        return None if found is None else found[0]

    def take_here(self) -> tuple[int, str] | None:
        """A spare opened for writing and emptied where it is, in the pool: (descriptor, name), for a write that is
        exchanged into place straight from the pool (see replaces()); None when there is none."""
        return self._take(None, None)

    def _take(self, tmp: str | None, avoid: str | None) -> tuple[int, str] | None:
        for i in range(len(self._ready) - 1, -1, -1):
            name, ino, was = self._ready[i]
            if was == avoid:
                continue
            del self._ready[i]
            self._kept -= 1
            fd = self._claim(name, ino, tmp)
            if fd is not None:
                return fd, name
        return None

    def _claim(self, name: str, ino: int, tmp: str | None) -> int | None:
        try:
            # Checked under its name in the pool, before it is written and put in place. O_NONBLOCK:
            # a FIFO planted under the name would hold the open until someone reads it.
            fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            with suppress(OSError):
                os.unlink(name)  # a link or FIFO planted under the name (a directory stays), or it is gone
            return None
        try:
            info = ours_alone(fd, ino)
            if info is not None:
                if tmp is not None:
                    os.rename(name, tmp)
                if tmp is None or os.lstat(tmp).st_ino == ino:
                    empty(fd, info.st_size)
                    return fd
        except OSError:
            pass  # gone meanwhile, another file system (EXDEV), ...: a new file it is
        os.close(fd)
        with suppress(OSError):
            os.unlink(name)  # not reusable (or another file system): not to be left behind either
        return None

    def new_file(self, mode: int = 0o600) -> tuple[int, str]:
        """A new file of the pool, opened for writing, and its name (no spare to reuse). OSError when the pool's
        directory is not one of ours (replaced by a link, say)."""
        if not self._usable():
            raise NotADirectoryError(self.dir)
        name = self._name()
        return create(name, mode), name

    def replaces(self, directory: str) -> bool:
        """Whether a file of the pool may be exchanged straight into `directory` (the same file system, a usable
        pool, and not a directory that gives its new files something a file made in the pool would lack: a
        setgid directory's group, a default ACL): the next version is then written and fsynced in the pool, and
        the one it replaces comes back into the pool under its name (swapped()), with no temp name beside the
        file and no rename of either."""
        known = self._devices.get(directory)
        if known is None:
            try:
                known = (self._usable() and os.stat(self.dir).st_dev == os.stat(directory).st_dev
                         and not inherits(directory))
            except OSError:
                return False
            self._devices[directory] = known
        return known

    def swapped(self, name: str, was: str) -> tuple[str, int, str] | None:
        """`name`, a file of the pool just exchanged into place at `was`, holds the version that was there: kept
        as keep() keeps a replaced file (usable once ready() says its replacement is durable), or removed."""
        return self._keep(name, was, moved=True)

    def keep(self, old: str) -> tuple[str, int, str] | None:
        """Move the replaced file at `old` into the pool, not yet usable (see ready()); it is removed instead when
        the pool is full or it may not be reused. Returns its entry, or None."""
        return self._keep(old, old, moved=False)

    def _keep(self, path: str, was: str, moved: bool) -> tuple[str, int, str] | None:
        try:
            info = os.lstat(path)
            if self._kept < KEEP and reusable(info) and self._usable():
                name = path if moved else self._name()
                if not moved:
                    os.rename(path, name)
                self._kept += 1
                return name, info.st_ino, was
        except OSError:
            pass
        with suppress(OSError):
            os.unlink(path)
        return None

    def ready(self, kept: tuple[str, int, str] | None, durable: bool = True) -> None:
        """The write that replaced `kept` is durable: it may be reused (or, when it is not, it is removed)."""
        if kept is None:
            return
        if durable:
            self._ready.append(kept)
            return
        self._kept -= 1
        with suppress(OSError):
            os.unlink(kept[0])

    def write_ahead(self, data: bytes, mode: int, beside: str) -> tuple[str, Stamp, Synced] | None:
        """A file of the pool holding `data` (permissions `mode`): the next version of a file in the directory
        `beside`, written before its moment (writer.prepare). Its name and stamp for unchanged() (before it is
        exchanged into place) or give_back(), and its fsync, run off this thread: its result() says the file
        is on disk (or raises), and must be had before the file is put in place. None where the pool's files may
        not replace those of `beside` (see replaces()).

        The fsync waits for the disk, not the CPU: in the run's thread it held up a chain's hand-over, which on two
        CPUs is bound by that thread's work (the next status written ahead was often not ready when its worker
        ended)."""
        if not self.replaces(beside):
            return None
        found = self.take_here()
        fd, name = found if found is not None else self.new_file()
        try:
            try:
                fill(fd, data)
                os.fchmod(fd, mode)
                written = stamp(os.fstat(fd))
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            with suppress(OSError):
                os.unlink(name)
            raise
        return name, written, fsync_later(fd)

    def unchanged(self, name: str, version: Stamp) -> bool:
        """Whether a file written ahead is still exactly as it was written: the same inode with one link, size,
        mtime and ctime (any write or chmod since changes its ctime). Otherwise it is removed and False returned
        (the caller writes anew)."""
        try:
            info = os.lstat(name)
            if stamp(info) == version and reusable(info):
                return True
        except OSError:
            pass
        with suppress(OSError):
            os.unlink(name)
        return False

    def give_back(self, name: str, version: Stamp) -> None:
        """A file written ahead that will not be used: a spare (nobody ever saw it as a version), or removed."""
        if self._kept < KEEP:
            self._kept += 1
            self._ready.append((name, version[0], ""))
        else:
            with suppress(OSError):
                os.unlink(name)

    def stock(self, count: int) -> None:
        """Make empty files until `count` wait for place(), while nothing waits for them (each new file is a
        create, the dear step on ext4 without a journal: see above)."""
        try:
            if not self._usable():
                return
            while len(self._blanks) < count:
                name = self._name()
                fd = create(name, 0o644)
                self._blanks.append((name, os.fstat(fd).st_ino))
                os.close(fd)
        except OSError:
            pass  # a full disk, a removed directory: the opener creates the file as before

    def place(self, dest: str) -> None:
        """Put an empty file made by stock() at `dest`, which does not exist yet, so that opening `dest` with
        O_CREAT creates nothing. Not when none is left or `dest` exists (never replaced), nor
        where a file created in `dest`'s directory would get more than a blank has (a setgid directory's group,
        a default ACL)."""
        if not self._blanks or inherits(os.path.dirname(dest)):
            return
        while self._blanks:
            name, ino = self._blanks.pop()  # atomic: the spawn thread places, the main thread stocks
            if not move_new(name, dest):
                with suppress(OSError):
                    os.unlink(name)
                return
            with suppress(OSError):
                info = os.lstat(dest)
                if info.st_ino == ino and reusable(info) and info.st_size == 0:
                    return
                os.unlink(dest)  # not the file we made (changed, or replaced under its name): it is not a log

    def _name(self) -> str:
        return f"{self.dir}/{os.getpid()}-{next(self._serial)}"

    def _usable(self) -> bool:
        """The pool's directory is a real directory of ours (made if need be; never through a link), and so is the
        one it is in (`.aipm/`, the state directory): through a link the pool's writes and its sweep would land in
        whatever directory the link names."""
        try:
            if stat.S_ISLNK(os.lstat(os.path.dirname(self.dir)).st_mode):
                return False
        except FileNotFoundError:
            pass  # made below, with the pool's
        try:
            info = os.lstat(self.dir)
        except FileNotFoundError:
            os.makedirs(self.dir, exist_ok=True)
            info = os.lstat(self.dir)
            if self._ignored:
                with open(os.path.join(self.dir, ".gitignore"), "w") as handle:
                    handle.write("# aipm's spare files: never version-controlled\n*\n")
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != EUID:
            return False
        if not self._checked:
            self._checked = True
            sweep(self.dir)
        return True


def sweep(directory: str) -> None:
    """Remove the spares of processes that are gone (plain files named `<pid>-<serial>`)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not _NAME.fullmatch(name):
            continue
        pid = int(name.split("-")[0])
        try:
            if pid != os.getpid():
                os.kill(pid, 0)
            continue  # ours, or alive
        except ProcessLookupError:
            pass  # gone: its spares are nobody's
        except (PermissionError, OverflowError):
            continue  # alive (someone else's), or no pid at all
        path = os.path.join(directory, name)
        with suppress(OSError):
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.unlink(path)


@lru_cache(maxsize=16)
def exported(path: str) -> bool:
    """Whether the kernel NFS server exports `path` or a directory above it (its clients read by file handle)."""
    try:
        with open(_EXPORTS) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return False  # no NFS server running
    real = os.path.realpath(path)
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        export = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[0]).rstrip("/")
        if real == export or real.startswith(export + "/"):
            return True
    return False


_pools: dict[str, Pool] = {}


def in_tree(root: str | os.PathLike) -> Pool | None:
    """The pool of the project's runtime directory in its tree (`.aipm/spare`, ignored by git): on the file system
    of the task files and logs. None for a project the kernel's NFS server exports (see above)."""
    return None if exported(os.fspath(root)) else pool(f"{os.fspath(root)}/.aipm/spare", ignored_by_git=True)


def pool(directory: str, ignored_by_git: bool = False) -> Pool:
    """This process's pool for `directory`."""
    found = _pools.get(directory)
    if found is None:  # (setdefault: one step, so two threads asking at once get the same pool and its names)
        found = _pools.setdefault(directory, Pool(directory, ignored_by_git))
    return found
