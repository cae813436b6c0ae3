"""Ending every process an attempt started, including the ones that left its process group.

A worker's command may start a daemon (`setsid`, a double fork): it leaves the worker's process group, so
killing the group misses it, and it keeps the inherited lock descriptors and keeps writing. Owners (`run`,
`exec`, the detached `aipm.work`) therefore make themselves child subreapers (PR_SET_CHILD_SUBREAPER): a process
orphaned below them is re-parented to them instead of to init, so it stays in their process tree, and a
process directly below an owner that is not one of its recorded workers is a *stray*.

When an attempt ends, its owner ends (SIGKILL, then waits until they are gone, so their locks are free):
- every stray that carries the attempt's marker in its environment (AIPM_ROOT, AIPM_ORDER_ID, AIPM_TASK_ID,
  AIPM_ATTEMPT are set for the worker and inherited by everything it starts) or holds one of its lock files;
- every stray at all when the owner runs no other attempt (a daemon may clear its environment);
- for an adopted worker, which was never below us, every process on the machine with the attempt's marker.
Strays still left when an owner is done are ended then. Why not cgroups: they need a delegated cgroup, which an
ordinary user rarely has; the subreaper and /proc work wherever aipm runs (Linux).
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Collection, Iterable
from pathlib import Path

from aipm import notify, runner
from aipm.lockholders import lock_holders
from aipm.locks import lock_nodes, node_path
from aipm.paths import normalize
from aipm.liveness import process_ctime, read_proc
from aipm.record import Record
from aipm.runtime import Runtime

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Adopt our orphaned descendants (Linux ≥ 3.4); False where the call is missing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def children(pid: int) -> list[int]:
    """Direct children of a process, from /proc/<pid>/task/<tid>/children (no scan of every process)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            out += [int(p) for p in read_proc(f"/proc/{pid}/task/{tid}/children").split()]
        except OSError:
            continue
    return out


def adopted_below() -> list[int]:
    """The children of this process's main thread: where the kernel puts every process orphaned below us (a
    subreaper's orphans go to its first live thread, the main one while it runs), beside what that thread started
    itself. The workers the spawn helper thread starts are that thread's children, not listed here. One file, where
    children() reads one per thread (B1: 4.3 reads a task, two looks of each end)."""
    me = os.getpid()
    try:
        return [int(p) for p in read_proc(f"/proc/{me}/task/{me}/children").split()]
    except OSError:
        return children(me)


def strays(me: int, known: Iterable[int]) -> list[int]:
    """Processes below `me` that are not below a known (recorded) worker or owner, parents first."""
    known = set(known)
    out: list[int] = []
    todo = [pid for pid in children(me) if pid not in known]
    while todo:
        pid = todo.pop(0)
        if _notifier(pid):
            continue  # a notify command (aipm.notify) is ours to let finish, not an attempt's leftover
        out.append(pid)
        todo += children(pid)
    return out


# The environment entry of a notify command and what it starts: detached on purpose, and re-parented to us.
NOTIFIER = frozenset({b"AIPM_NOTIFY=1"})


def _notifier(pid: int) -> bool:
    """A notify command this process started (its environment is unreadable while it execs), or one marked so."""
    if notify.STARTED:
        try:
            if (pid, process_ctime(pid)) in notify.STARTED:
                return True
        except (OSError, ValueError):
            pass
    return bool(marked(NOTIFIER, [pid]))


def marker(root: str, order: str, task: str, attempt: int) -> frozenset[bytes]:
    """The environment entries every process of one attempt inherits."""
    return frozenset(f"{k}={v}".encode(errors="surrogateescape") for k, v in (  # a root in any bytes
        ("AIPM_ROOT", root), ("AIPM_ORDER_ID", order), ("AIPM_TASK_ID", task), ("AIPM_ATTEMPT", attempt)))


def attempt_marker(root: Path, rec: Record) -> frozenset[bytes]:
    """The marker of `rec`'s attempt as its processes carry it: AIPM_ROOT is the worker's working directory (its
    worktree's copy of the root, for a worktree attempt) and AIPM_ATTEMPT the attempt's serial number."""
    from aipm import workspace  # not at import: the subreaper is loaded by every run, worktrees rarely

    where = str(root)
    if rec.workspace:
        try:
            where = workspace.directory(root, rec)
        except (workspace.WorkspaceError, OSError):
            pass
    return marker(where, rec.order, rec.task, rec.serial)


def marked(mark: frozenset[bytes], pids: Iterable[int] | None = None) -> list[int]:
    """The processes (of `pids`, default every one we may read) whose environment carries `mark`."""
    return [pid for pid, env in environs(pids) if mark <= env]


def task_runs(root: Path, order: str, task: str) -> bool:
    """Whether a process of some attempt of the task lives: its marker without AIPM_ATTEMPT (only a record knows
    the attempt's number), with AIPM_ROOT the root or below it (a worktree). For a running task whose record is
    gone (a worker deleted the state directory): its worker may run on, and then the task is not lost."""
    return bool(tasks_running(root, {(order, task)}))


def tasks_running(root: Path, tasks: Collection[tuple[str, str]]) -> set[tuple[str, str]]:
    """The (order, task) pairs of `tasks` that task_runs() finds running, in one look at every process."""
    at, below = (f"AIPM_ROOT={root}".encode(errors="surrogateescape"),
                 f"AIPM_ROOT={root}/".encode(errors="surrogateescape"))
    marks = {(o, t): {f"AIPM_ORDER_ID={o}".encode(errors="surrogateescape"),
                      f"AIPM_TASK_ID={t}".encode(errors="surrogateescape")} for o, t in tasks}
    found: set[tuple[str, str]] = set()
    for pid, env in environs() if marks else ():
        hits = [key for key, mark in marks.items() if mark <= env]
        if hits and (any(e == at or e.startswith(below) for e in env) or _works_in(pid, root)):
            found.update(hits)
    return found


def _works_in(pid: int, root: Path) -> bool:
    """Its working directory is the root or below it: a worker of a project moved (`mv`) since it started, whose
    AIPM_ROOT still names the old place (and whose records and locks are in the old place's state directory)."""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return cwd == str(root) or cwd.startswith(f"{root}/")


def environs(pids: Iterable[int] | None = None) -> Iterable[tuple[int, set[bytes]]]:
    """(pid, environment entries) of `pids`, default every process we may read."""
    if pids is None:
        pids = (int(name) for name in os.listdir("/proc") if name.isdigit())
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                env = handle.read()
        except OSError:
            continue
        yield pid, set(env.split(b"\0"))


def left_behind(rt: Runtime, known: set[int], rec: Record | None, alone: bool, adopted: bool) -> list[int]:
    """What to end when `rec`'s attempt is over (every stray below us when `rec` is None or we own nothing else).

    known   -- recorded workers and owners (and owners we started): neither they nor what runs below them is a stray
    alone   -- we own no other attempt, so every stray is this one's
    adopted -- the worker is not our child: look for its marker on the whole machine
    """
    me = os.getpid()
    below = strays(me, known)
    if rec is None:
        return below
    mark = attempt_marker(rt.root, rec)
    doomed = below if alone else marked(mark, below) + _holding(rt.state, rec, below)
    if adopted:  # its daemons were never below us: find them by their marker
        doomed += [pid for pid in marked(mark) if pid not in known and pid != me]
    return doomed


def _holding(state: Path, rec: Record, pids: list[int]) -> list[int]:
    """Which of `pids` hold one of the attempt's own (exclusive) lock files."""
    inodes = set()
    for node, exclusive in lock_nodes(normalize(t) for t in rec.targets).items():
        try:
            if exclusive:
                inodes.add(os.stat(node_path(state, node)).st_ino)
        except OSError:
            continue
    held = lock_holders(inodes, str(state), pids) if inodes and pids else {}
    return sorted({pid for holders in held.values() for pid in holders})


def end(pids: Iterable[int], timeout: float = 5.0) -> list[int]:
    """SIGKILL `pids` and wait (pidfd) until they are gone; reap the ones that are our children. Returns those
    that were still running: a zombie (a group member the group's kill ended, re-parented to us when its parent
    died first) is only reaped."""
    pids = [pid for pid in dict.fromkeys(pids) if pid != os.getpid()]
    running = [pid for pid in pids if not _zombie(pid)]
    for pid in running:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    runner.wait_all_gone(running, timeout)
    reap_zombies(pids)
    return running


def _zombie(pid: int) -> bool:
    """Ended, waiting to be reaped (or gone already)."""
    try:
        return read_proc(f"/proc/{pid}/stat").rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def reap_zombies(pids: Iterable[int]) -> None:
    """Collect the exit status of ended strays that were re-parented to us (else they stay zombies)."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
