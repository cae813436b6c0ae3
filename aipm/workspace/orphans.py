"""The git processes an owner killed mid-way left working on a worktree.

`git worktree add` checks the files out in a child of its own (`git reset --hard`): with its owner SIGKILLed, both
went on filling the directory, and the next owner, clearing the path to make the worktree again, collided with
them ("already exists"). A dead owner cannot stop them, and PR_SET_PDEATHSIG would reach git, not the checkout it
forks. So each git that writes a worktree's files carries, in an environment entry every process it starts
inherits, the worktree and its owner (pid, start time); before a worktree is removed or made again, those whose
owner is gone are ended.
"""

from __future__ import annotations

import os
from pathlib import Path

from aipm.liveness import process_alive, process_ctime

KEY = "AIPM_WORKTREE_GIT"
_ROUNDS = 10  # a checkout ended between two looks may have forked a child that the next look finds


def mark(tree: Path) -> dict[str, str]:
    """The environment entry of a git this process starts on the worktree at `tree`."""
    return {KEY: f"{os.getpid()} {process_ctime(os.getpid())} {os.path.realpath(tree)}"}


def end(tree: Path) -> None:
    """End (SIGKILL, then wait until gone) the git processes still at work on the worktree at `tree` whose owner
    died; a live owner's are its own. WorkspaceError: some outlived every kill (stuck in the kernel)."""
    from aipm import subreaper
    from aipm.workspace.repo import WorkspaceError

    for _ in range(_ROUNDS):
        left = _left(os.path.realpath(tree), subreaper.environs())
        if not left:
            return
        subreaper.end(left)
    raise WorkspaceError(f"{tree}: git processes of a killed run still work there (pid {', '.join(map(str, left))})")


def _left(where: str, environs) -> list[int]:
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
