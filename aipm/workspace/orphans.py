"""The git processes an owner killed mid-way left working on a worktree.

`git worktree add` checks the files out in a child of its own (`git reset --hard`): with its owner SIGKILLed, both
went on filling the directory, and the next owner, clearing the path to make the worktree again, collided with
them ("already exists"). A dead owner cannot stop them, and PR_SET_PDEATHSIG would reach git, not the checkout it
forks. So each git that writes a worktree's files carries, in an environment entry every process it starts
inherits, the worktree and its owner (pid, start time); before a worktree is removed or made again, those whose
owner is gone are ended. Finding them reads every process's environment (71 ms at 1,666 processes), so it is done
only where it can find something: while such a git runs, a file in the scratch directory names its owner and
worktree, removed once it is done; one left by an owner that died is what makes `end` look.
"""

from __future__ import annotations

import itertools
import os
import signal
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aipm.liveness import process_alive, process_ctime

KEY = "AIPM_WORKTREE_GIT"
_ROUNDS = 10  # a checkout ended between two looks may have forked a child that the next look finds
_counter = itertools.count()


@contextmanager
def marked(root: Path, tree: Path) -> Iterator[dict[str, str]]:
    """The environment entry of a git this process starts on the worktree at `tree` (of the project at `root`),
    with the file that says it may be running kept for as long as the block runs."""
    entry = f"{os.getpid()} {process_ctime(os.getpid())} {os.path.realpath(tree)}"
    where = _markers(root)
    from aipm.workspace.places import make_own_dir

    make_own_dir(root, where)
    marker = where / f"{os.getpid()}.{next(_counter)}"
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, entry.encode("utf-8", "surrogateescape"))
    finally:
        os.close(fd)
    try:
        yield {KEY: entry}
    finally:
        marker.unlink(missing_ok=True)


def end(root: Path, tree: Path) -> None:
    """End (SIGKILL, then wait until gone) the git processes still at work on the worktree at `tree` whose owner
    died; a live owner's are its own. WorkspaceError: some outlived every kill (stuck in the kernel)."""
    from aipm import subreaper
    from aipm.workspace.repo import WorkspaceError

    where = os.path.realpath(tree)
    left_by_dead = _left(where, _marked(root))
    if not left_by_dead:
        return  # no git of a dead owner's may be at work there: no process is looked at
    for _ in range(_ROUNDS):
        left = _left(where, subreaper.environs())
        if not left:
            for marker in left_by_dead:
                marker.unlink(missing_ok=True)
            return
        _kill(where, left)
    raise WorkspaceError(f"{tree}: git processes of a killed run still work there (pid {', '.join(map(str, left))})")


def _kill(where: str, pids: list[int]) -> None:
    """SIGKILL each of `pids` still marked for `where` by a dead owner, through a pidfd opened before that look
    (a pid freed and reused since the scan is not the process it names), then wait until they are gone."""
    from aipm import runner, subreaper

    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue  # gone
        try:
            if _left(where, subreaper.environs([pid])):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        except OSError:
            pass  # ended meanwhile
        finally:
            os.close(fd)
    runner.wait_all_gone(pids, 5.0)
    subreaper.reap_zombies(pids)


def _markers(root: Path) -> Path:
    from aipm.workspace.places import scratch

    return scratch(root) / "worktree-git"


def _marked(root: Path) -> list[tuple[Path, set[bytes]]]:
    """(marker, its entry as `_left` reads an environment) for each marker file there is; what a worker may have
    left there in place of one (a FIFO, a link) is not opened."""
    try:
        names = os.listdir(_markers(root))
    except OSError:
        return []
    found = []
    for name in names:
        marker = _markers(root) / name
        try:
            fd = os.open(marker, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        with open(fd, "rb") as handle:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                found.append((marker, {f"{KEY}=".encode() + handle.read(4096)}))
    return found


def _left(where: str, environs) -> list:
    """Of `environs` ((a process, or a marker file; its environment entries)), those marked for the worktree at
    `where` by an owner that died."""
    prefix = f"{KEY}=".encode()
    found = []
    for pid, env in environs:
        for entry in env:
            if entry.startswith(prefix):
                try:
                    owner, started, tree = entry[len(prefix):].decode("utf-8", "surrogateescape").split(" ", 2)
                    if tree == where and not process_alive(int(owner), float(started)):
                        found.append(pid)
                except ValueError:  # not ours: a worker may set any variable
                    pass
    return found
