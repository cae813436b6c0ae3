"""Spare inodes: the file a write replaces (or a record that is removed) is kept and reused by a later write.

Why: every status write made a new file (temp, fsync, rename) and freed the one it replaced; every worker record
was made and later removed. On ext4 without a journal (the benchmark machine's disk) each new inode costs a scan
of every inode freed in the last 60 seconds (`recently_deleted` in the allocator), and inside a run, where each
write frees one, that scan grows with the run: creating the temp file of a status write took 313 µs in B2 (cProfile,
1000 creates), more than its fsync. A write that reuses a spare creates and frees nothing, and overwrites it in
place (truncated afterwards to the new length), so its blocks stay allocated too.

Reuse must not change what anyone can still see:
- a replaced version becomes a spare only once its replacement is durable (the writer waits for the directory
  fsync): until then a power cut could bring the old name back onto it;
- a spare is reused only when no other process has it open (the kernel grants a write lease only then): a reader
  that opened the old version keeps reading the old version;
- only a plain file of ours with one link (a hard link elsewhere would see the new text), and only the very inode
  we put in the pool (nothing planted under its name).
Where any of this fails, or the system cannot swap two names atomically, the write makes a new file as before.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import stat
from contextlib import suppress

KEEP = 4  # spares per pool: one round of a run writes a few files
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2 = None  # the libc function, or False where there is none


def exchange(a: str, b: str) -> bool:
    """Swap the files named `a` and `b` in one step (renameat2 RENAME_EXCHANGE): `b` gets `a`'s file, which
    readers see whole or not at all, as with a rename, and `a` keeps the old one. False where that cannot be done
    (no such call, a file system without it, `b` missing): the caller renames instead."""
    global _renameat2
    if _renameat2 is None:
        try:
            _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
            _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        except (OSError, AttributeError):
            _renameat2 = False
    if _renameat2 is False:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOENT, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


class Pool:
    """The spares of one directory, reused for writes on its file system. One per directory and process."""

    def __init__(self, directory: str, ignored_by_git: bool):
        self.dir = directory
        self._ignored = ignored_by_git
        self._ready: list[tuple[str, int]] = []  # (name, inode) ready for reuse
        self._kept = 0  # ready or waiting for their replacement to become durable
        self._serial = 0
        self._swept = False

    def take(self, tmp: str) -> int | None:
        """A spare renamed to `tmp` and opened for writing, its old bytes still in it (write, then truncate to
        the new length); None when there is none that may be reused."""
        while self._ready:
            name, ino = self._ready.pop()
            self._kept -= 1
            try:
                os.rename(name, tmp)
            except OSError:
                continue  # removed by someone (a `git clean`)
            try:
                # O_NONBLOCK: a FIFO planted under the name would otherwise hold the open until someone reads it
                fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
                if _ours_alone(fd, ino):
                    return fd
                os.close(fd)
            except OSError:
                pass  # replaced by a link, or gone: not ours to write through
            with suppress(OSError):
                os.unlink(tmp)
        return None

    def keep(self, old: str) -> tuple[str, int] | None:
        """Move the replaced file at `old` into the pool, not yet usable (see ready()); it is removed instead when
        the pool is full or it may not be reused. Returns its name and inode in the pool, or None."""
        if not self._swept:
            self._swept = True
            sweep(self.dir)
        try:
            info = os.lstat(old)
            if self._kept < KEEP and _reusable(info) and self._move(old, name := self._name()):
                self._kept += 1
                return name, info.st_ino
        except OSError:
            pass
        with suppress(OSError):
            os.unlink(old)
        return None

    def ready(self, kept: tuple[str, int] | None, durable: bool = True) -> None:
        """The write that replaced `kept` is durable: it may be reused (or, when it is not, it is removed)."""
        if kept is None:
            return
        if durable:
            self._ready.append(kept)
            return
        self._kept -= 1
        with suppress(OSError):
            os.unlink(kept[0])

    def _name(self) -> str:
        self._serial += 1
        return f"{self.dir}/{os.getpid()}-{self._serial}"

    def _move(self, old: str, name: str) -> bool:
        try:
            os.rename(old, name)
            return True
        except FileNotFoundError:
            if not os.path.exists(old):
                raise
        except OSError as exc:  # another file system (EXDEV): this pool cannot serve that directory
            if exc.errno != errno.EXDEV:
                raise
            return False
        self._make()  # the pool's directory is not there (first use, or a `git clean` removed it)
        os.rename(old, name)
        return True

    def _make(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        if self._ignored:
            ignore = os.path.join(self.dir, ".gitignore")
            if not os.path.exists(ignore):
                with open(ignore, "w") as handle:
                    handle.write("# aipm's spare files: never version-controlled\n*\n")


def _reusable(info: os.stat_result) -> bool:
    return stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and info.st_uid == os.geteuid()


def _ours_alone(fd: int, ino: int) -> bool:
    """The descriptor is the spare we kept (same inode, still one link, ours) and no other process has it open."""
    info = os.fstat(fd)
    if info.st_ino != ino or not _reusable(info):
        return False
    try:
        # A lease break (an open in the microsecond we hold the lease) signals us; SIGURG is ignored by default,
        # SIGIO would end the process.
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)  # refused (EAGAIN) while anyone else has it open
    except OSError:
        return False
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return True


def sweep(directory: str) -> None:
    """Remove the spares of processes that are gone (named `<pid>-<serial>`)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        pid = name.split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with suppress(OSError):
                os.unlink(os.path.join(directory, name))
        except PermissionError:
            pass  # alive, someone else's


_pools: dict[str, Pool] = {}


def pool(directory: str, ignored_by_git: bool = False) -> Pool:
    """This process's pool for `directory`."""
    found = _pools.get(directory)
    if found is None:
        found = _pools[directory] = Pool(directory, ignored_by_git)
    return found
