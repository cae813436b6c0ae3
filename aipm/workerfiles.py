"""The files of an attempt in `.aipm/` that its worker can reach (logs, review logs, usage, feedback): the worker
may have replaced any of them, and open() of a FIFO it left waits for a peer that never comes (an owner stuck for
ever, the launch lock held). They are opened without blocking or following a link; what is not a regular file is
refused (OSError), and aipm's own files are written beside and renamed over whatever is there."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

# Flags for a log a child is given: a FIFO in its place fails the spawn (ENXIO) where it held spawner and child.
NO_WAIT = os.O_NONBLOCK | os.O_NOFOLLOW


def open_regular(path: str | os.PathLike, flags: int = os.O_RDONLY, mode: int = 0o666) -> int:
    fd = os.open(path, flags | NO_WAIT | os.O_CLOEXEC, mode)
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    if not regular:
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file (its worker replaced it)", str(path))
    return fd


def reading(path: str | os.PathLike) -> BinaryIO:
    return open(path, "rb", opener=lambda name, _: open_regular(name))  # named by its path, as open()'s are


def read_bytes(path: str | os.PathLike) -> bytes:
    with reading(path) as handle:
        return handle.read()


def write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with os.fdopen(open_regular(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
