"""aipm's own output in the tree: files the scope audit never charges to a worker.

`aipm run ORD > run.log` (or `nohup aipm run`, or `| tee run.log`) in the project writes there while its workers
run; those writes are aipm's (or its user's), no worker's. Two sources tell them: the files the auditing process's
session holds open for writing now, and the files noted in the attempt's record by the aipm processes that started
and owned it (`files()`), so that an owner that adopts the attempt after the first one was killed (whose output file
nobody holds any more) still knows them. Only those: a file that was the output of no aipm running the attempt is
charged as any other.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from aipm.gitstatus import real_root
from aipm.liveness import read_small, stat_fields
from aipm.lockholders import open_under


def files(root: Path) -> list[list]:
    """[path relative to the real root, device, inode] of this process's standard output and error where they are
    regular files in the tree (none off Linux: /proc names them)."""
    opened = []
    for fd in (1, 2):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            opened.append((fd, st.st_dev, st.st_ino))
    if not opened:
        return []  # (a terminal or a pipe: every start asks)
    key = (os.fspath(root), *opened)
    if key not in _found:
        top = real_root(Path(root)) + "/"
        found: list[list] = []
        for fd, dev, ino in opened:
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            entry = [path[len(top):], dev, ino]
            if path.startswith(top) and entry not in found:
                found.append(entry)
        _found[key] = found
    return [list(entry) for entry in _found[key]]


# files() by (root, the regular files fds 1 and 2 are: descriptor, device, inode): its name is looked up once
_found: dict[tuple, list[list]] = {}


def with_ours(noted: list, root: Path) -> list:
    """`noted` and this process's output files: an owner adopting an attempt adds its own, should it die too."""
    return noted + [entry for entry in files(root) if entry not in noted]


def not_own_output(root: Path, paths: list[str], noted: list, owners: Iterable[int] = (),
                   workers: set[int] = frozenset()) -> list[str]:
    """`paths` without the files aipm's own output goes to: any file a process of this one's session holds open
    for writing, this one's standard output and error included (`nohup aipm run` writes nohup.out in the project
    root, `aipm run > run.log` likewise, `aipm run | tee run.log` through tee): workers run in sessions of their
    own, so those writes are the run's or its user's, no worker's; and the files `noted` (files() of the aipm
    processes that owned the attempt: a run killed while its worker ran holds its run.log no more; and of other
    aipm processes of the project, see audit._tree_findings). `owners`: the live aipm processes that own other
    attempts now (another `aipm run ORD2 | tee run2.log` in another terminal): the files their sessions write
    are theirs, but not in a session one of `workers` (pids) leads (an aipm a worker's command started). By inode:
    only the paths an audit found are looked at, so an audit that found nothing costs nothing here."""
    if not paths:
        return paths
    ours = _written_by_sessions(root, _sessions(owners, workers))
    kept = []
    for path in paths:
        try:
            st = os.stat(Path(root) / path)
        except OSError:
            kept.append(path)
            continue
        if (st.st_dev, st.st_ino) not in ours and [path, st.st_dev, st.st_ino] not in noted:
            kept.append(path)
    return kept


def _sessions(owners: Iterable[int], workers: set[int]) -> set[int]:
    """This process's session, and those of `owners` but the sessions `workers` lead (a worker runs in a session
    of its own: an aipm that a worker's command started writes what that worker does)."""
    sessions = {os.getsid(0)}
    for pid in owners:
        try:
            sid = os.getsid(pid)
        except OSError:
            continue  # gone meanwhile
        if sid not in workers:
            sessions.add(sid)
    return sessions


def _written_by_sessions(root: Path, sessions: set[int]) -> set[tuple[int, int]]:
    """(device, inode) of the regular files in the tree that processes of these sessions hold open for writing."""
    found = set()
    for pid, fd, _ in open_under(f"{os.path.realpath(root)}/", _members(sessions)):
        try:
            flags = int(read_small(f"/proc/{pid}/fdinfo/{fd}").split(b"flags:", 1)[1].split()[0], 8)
            if flags & os.O_ACCMODE == os.O_RDONLY:
                continue
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except (OSError, IndexError, ValueError):
            continue  # closed or gone meanwhile
        if stat.S_ISREG(st.st_mode):
            found.add((st.st_dev, st.st_ino))
    return found


def _members(sessions: set[int]) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if int(stat_fields(int(name))[3]) in sessions:
                    pids.append(int(name))
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile, or not ours to read
    return pids
