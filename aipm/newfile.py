"""A new file that appears under its name only with its content: made without a name (O_TMPFILE), written, and
linked in. A reader never finds it empty, and one whose write fails (a full disk) never appears at all, so nothing
is removed again after others may have opened it (locks.py: a lock file removed once another process had locked it
let a third lock a new file of that name). Where the kernel or file system refuses a file without a name, or its
linking in by /proc, it is made under its name, and removed if that write fails.
"""

from __future__ import annotations

import errno
import os
from contextlib import suppress

from aipm.inodes import create

_PROC_FD = os.path.isdir("/proc/self/fd")  # where a file of no name can be linked in by its descriptor
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL)  # the kernel or file system has none
_NO_LINK = (errno.EPERM, errno.EXDEV, errno.ENOENT, errno.EACCES)  # /proc's link not followed here (a sandbox)


def create_whole(path: str, data: bytes, mode: int = 0o600) -> int:
    """A new file at `path` holding `data`, opened for writing by its name. FileExistsError where `path` exists (or
    came to meanwhile, or was replaced before it was opened: then whatever is there is someone else's);
    FileNotFoundError where its directory does not exist (or was removed meanwhile)."""
    if not _PROC_FD:
        return _create_named(path, data, mode)
    directory = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fd = os.open(".", os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, mode, dir_fd=directory)
        except OSError as exc:
            _gone(directory, path)  # (ext4 refuses a file of no name in a removed directory with EPERM)
            if exc.errno not in _NO_TMPFILE:
                raise
            return _create_named(path, data, mode)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            # By its descriptor's name in /proc, followed (a dir_fd makes it linkat, AT_SYMLINK_FOLLOW): no privilege
            # needed.
            try:
                os.link(f"/proc/self/fd/{fd}", os.path.basename(path), dst_dir_fd=directory)
            except FileExistsError:
                raise
            except OSError as exc:
                _gone(directory, path)
                if exc.errno not in _NO_LINK:
                    raise
                return _create_named(path, data, mode)
            return _opened_by_name(directory, path, fd)
        finally:
            os.close(fd)
    finally:
        os.close(directory)


def _gone(directory: int, path: str) -> None:
    """FileNotFoundError where the directory open as `directory` was removed."""
    if os.fstat(directory).st_nlink == 0:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)


def _opened_by_name(directory: int, path: str, made: int) -> int:
    """The file linked in as `path`, opened by its name: a descriptor of the file made without one reads in /proc as
    "#<inode> (deleted)", as a removed file's does (lockholders.py). Replaced meanwhile (a link, a FIFO: never waited
    on): FileExistsError, as if another had made it."""
    try:
        named = os.open(os.path.basename(path), os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC,
                        dir_fd=directory)
    except FileNotFoundError:
        raise
    except OSError:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path) from None
    try:
        if os.fstat(named).st_ino == os.fstat(made).st_ino:
            return named
    except BaseException:
        os.close(named)
        raise
    os.close(named)
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)


def _create_named(path: str, data: bytes, mode: int) -> int:
    fd = create(path, mode)
    try:
        os.write(fd, data)
    except BaseException:
        os.close(fd)
        with suppress(OSError):
            os.unlink(path)
        raise
    return fd
