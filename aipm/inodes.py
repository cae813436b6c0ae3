"""What aipm does to one inode below Python's os module: swap two names in one step, fill a file kept for reuse
and drop its cached pages, and tell whether a kept file is still ours alone. The spare-file pool (spares.py) and
the task-file writer (writer.py) build on these; each returns False (or truncates) where the kernel or libc lacks
the call, so the caller falls back to a plain write and rename.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import stat

_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_FALLOC_FL_ZERO_RANGE = 0x10
_PAGE = os.sysconf("SC_PAGE_SIZE")
_libc = None  # ctypes' libc, or False where it cannot be loaded
# Who this process is (a system call each time asked, several times per status write; aipm never changes them)
EUID, EGID = os.geteuid(), os.getegid()


def _c() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def exchange(a: str, b: str) -> bool:
    """Swap the files named `a` and `b` in one step (renameat2 RENAME_EXCHANGE): `b` gets `a`'s file, which
    readers see whole or not at all, as with a rename, and `a` keeps the old one. False where that cannot be done
    (no such call, a file system without it, `b` missing, ...): the caller renames instead."""
    libc = _c()
    return libc is not None and libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                                               _RENAME_EXCHANGE) == 0


Stamp = tuple[int, int, int, int]


def stamp(info: os.stat_result) -> Stamp:
    """What tells one version of a file from another: inode, size, mtime and ctime (no one sets a ctime back)."""
    return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def create(name: str, mode: int) -> int:
    """A new file, opened for writing (never through a link, never an existing file)."""
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def remove(name: str) -> None:
    """Unlink `name` if it is there. Looked up first: an unlink takes its directory's lock for writing even when
    it finds nothing, and spins while another process creates a file there (B1: the run's thread spun 0.39 ms a
    start behind a wrapper's exit-file create, on ext4 without a journal, whose creates scan the recently freed
    inodes with that lock held); a lookup of a name the kernel has just looked up (next_number did) takes none."""
    if os.path.lexists(name):
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass


def move_new(a: str, b: str) -> bool:
    """Rename `a` to `b` unless `b` exists (renameat2 RENAME_NOREPLACE); False where it exists or that cannot
    be done."""
    libc = _c()
    return libc is not None and libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                                               _RENAME_NOREPLACE) == 0


def inherits(directory: str) -> bool:
    """Whether a file created in `directory` gets something from it (setgid: its group; a default ACL)."""
    try:
        return bool(os.stat(directory).st_mode & stat.S_ISGID) or "system.posix_acl_default" in os.listxattr(directory)
    except OSError:
        return True


def reusable(info: os.stat_result) -> bool:
    # The group too: one task file's (a `chgrp` to share it) must not pass to another, as an ACL must not.
    return (stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and info.st_uid == EUID
            and info.st_gid == EGID)


def ours_alone(fd: int, ino: int) -> os.stat_result | None:
    """The descriptor's stat when it is the spare we kept (same inode, still one link, ours, no extended attribute of
    its old file but a security label) and no other process has it open; else None."""
    info = os.fstat(fd)
    if info.st_ino != ino or not reusable(info):
        return None
    if any(not name.startswith("security.") for name in os.listxattr(fd)):
        return None
    try:
        # A lease break (an open while we hold the lease) signals us: SIGURG is ignored by default, SIGIO would end
        # the process.
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)  # refused (EAGAIN) while anyone else has it open
    except OSError:
        return None
    alone = fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_WRLCK  # not being broken by someone's open meanwhile
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return info if alone else None


def fill(fd: int, data: bytes) -> None:
    """Write `data` from the start of the file and end the file there (a spare keeps its old length)."""
    size = len(data)
    while data:
        data = data[os.write(fd, data):]
    os.ftruncate(fd, size)


def empty(fd: int, size: int) -> None:
    """Drop the spare's cached pages, keeping its blocks where the file system can (a pipe that holds those pages
    keeps the old bytes; the new text goes into fresh ones); else truncate it. Whole pages: a partial one would be
    zeroed in place."""
    libc = _c()
    whole = -(-size // _PAGE) * _PAGE
    if whole and (libc is None or libc.fallocate(fd, _FALLOC_FL_ZERO_RANGE, 0, whole) != 0):
        os.ftruncate(fd, 0)
