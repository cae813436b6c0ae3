"""Who holds which target-file lock, read without taking anything: from /proc/locks (locked inodes) and
/proc/<pid>/fd + fdinfo (which processes have the locked open file). Read-only commands never make a launcher see a
busy file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

_PROC_LOCKS = "/proc/locks"


def proc_locks() -> dict[int, bool]:
    """Inode → exclusive?, for every granted flock lock on the machine (waiters skipped)."""
    try:
        with open(_PROC_LOCKS) as handle:
            text = handle.read()
    except OSError:
        return {}
    out: dict[int, bool] = {}
    for line in text.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2171986 0 EOF"; a waiter reads "1: -> FLOCK ...".
        parts = line.split()
        if len(parts) < 6 or parts[1] != "FLOCK":
            continue
        ino = int(parts[5].rsplit(":", 1)[-1])
        out[ino] = out.get(ino, False) or parts[3] == "WRITE"
    return out


def lock_holders(inodes: set[int], prefix: str, pids: Iterable[int] | None = None) -> dict[int, set[int]]:
    """Inode → pids whose open file on it carries the lock (the pid in /proc/locks is only who took it first:
    an inherited lock lives on in every process that has the descriptor)."""
    out: dict[int, set[int]] = {}
    for pid, fd, _ in open_under(prefix, pids):
        try:
            ino = os.stat(f"/proc/{pid}/fd/{fd}").st_ino
            if ino in inodes and "\nlock:" in read_text(f"/proc/{pid}/fdinfo/{fd}"):
                out.setdefault(ino, set()).add(pid)
        except OSError:
            continue
    return out


def open_under(prefix: str, pids: Iterable[int] | None = None) -> Iterator[tuple[int, str, str]]:
    """(pid, descriptor number, what it names) of every descriptor of `pids` (default: every process we may read)
    naming a file under `prefix`."""
    if pids is None:
        pids = (int(name) for name in os.listdir("/proc") if name.isdigit())
    for pid in pids:
        base = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(base)
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"{base}/{fd}")
            except OSError:
                continue
            if link.startswith(prefix):
                yield pid, fd, link


def read_text(path: str) -> str:
    """A /proc file's text: a descriptor's fdinfo, or the file it names (a lock file holds its node)."""
    with open(path) as handle:
        return handle.read()
