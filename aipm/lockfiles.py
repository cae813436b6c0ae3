"""The lock files locked so far in a state directory, each with its inode: how a lock file that was removed and
made again is told from a new one.

aipm never removes a lock file it locked, so a name listed with another inode than its file's now was removed by
someone (a worker's `rm`), maybe while a process held its lock; statedir.py then looks for such holders (a scan of
every process), which a new file never costs: its first taker appends one line. The list (`made.txt`, one
"<file name> <inode>" a line) is only appended to, or written anew when it went missing; each process reads on
from where it left off.
"""

from __future__ import annotations

import errno
import os
from contextlib import suppress
from functools import lru_cache
from pathlib import Path

from aipm.workerfiles import STATE_FILE_MAX, open_checked, open_regular, write_bytes

MADE = "made.txt"
GLOB_FILE = ".glob.lock"  # how a glob's own lock file is named (locks.node_file)


class LockFiles:
    """This process's reading of one state directory's list."""

    def __init__(self, state: Path):
        self.path = f"{state}/{MADE}"
        self.locks = f"{state}/locks"
        self.inodes: dict[str, int] = {}  # lock file path → inode, as listed
        self.globs: set[str] = set()  # of those, the globs' own (GLOB_FILE), looked for at every take
        self._read = (0, 0, 0)  # device, inode and length of the list read so far

    def unlisted(self, locked: dict[str, int]) -> dict[str, int]:
        """Of lock file path → inode, those not listed so (as this process read the list last)."""
        return {path: ino for path, ino in locked.items() if self.inodes.get(path) != ino}

    def read(self) -> bool:
        """Read what was appended since; False when there is no list (removed, or made before aipm kept one)."""
        try:
            fd, st = open_checked(self.path)
        except OSError:  # none, or no file (a FIFO a worker left): written anew
            return False
        try:
            dev, ino, length = self._read
            if (st.st_dev, st.st_ino) != (dev, ino) or st.st_size < length:
                self.inodes, self.globs, length = {}, set(), 0  # written anew
            if st.st_size - length > STATE_FILE_MAX:  # a worker's sparse terabyte, no list aipm wrote: written anew
                return False
            data = os.pread(fd, st.st_size - length, length)  # (what is appended since its fstat: read next time)
        finally:
            os.close(fd)
        whole = data.rfind(b"\n") + 1  # a line still being appended is read next time
        for line in data[:whole].decode(errors="replace").splitlines():
            name, _, number = line.partition(" ")
            with suppress(ValueError):  # not as written (any worker can write here)
                self.inodes[f"{self.locks}/{name}"] = int(number)
                if name.endswith(GLOB_FILE):
                    self.globs.add(f"{self.locks}/{name}")
        self._read = (st.st_dev, st.st_ino, length + whole)
        return True

    def add(self, locked: dict[str, int]) -> bool:
        """Append lock files to the list; False when there is none to append to."""
        try:
            fd = open_regular(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError:  # none, or no file
            return False
        try:
            os.write(fd, _lines(locked))  # one write: appenders never interleave
        finally:
            os.close(fd)
        self.inodes.update(locked)
        self.globs.update(path for path in locked if path.endswith(GLOB_FILE))
        return True

    def present(self) -> dict[str, int]:
        """Every lock file there now → its inode."""
        found: dict[str, int] = {}
        with suppress(OSError), os.scandir(self.locks) as entries:
            for entry in entries:
                if entry.name.endswith(".lock"):
                    with suppress(OSError):  # removed meanwhile
                        found[entry.path] = entry.stat(follow_symlinks=False).st_ino
        return found

    def write(self, locked: dict[str, int]) -> None:
        """The list written anew, of `locked` alone."""
        write_bytes(Path(self.path), _lines(locked))
        self.read()


@lru_cache(maxsize=64)
def of(state: Path) -> LockFiles:
    """This process's reading of a state directory's list (kept: it is read on, not again)."""
    return LockFiles(state)


def make(state: Path) -> None:
    """An empty list, for a `locks/` about to be made (a list still there is kept: what it names was removed)."""
    path = f"{state}/{MADE}"
    try:
        os.close(open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENXIO, errno.ELOOP):
            raise
        os.unlink(path)  # no file (a FIFO, a link a worker left): the list starts again, as when it is missing
        os.close(open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _lines(locked: dict[str, int]) -> bytes:
    return "".join(f"{os.path.basename(path)} {ino}\n" for path, ino in locked.items()).encode()
