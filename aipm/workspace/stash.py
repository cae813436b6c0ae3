"""A worker's `git stash`: each worktree has a stash of its own (ownrefs), so a worker pops only what it stashed,
never the user's entries nor another task's. What it leaves there holds work that is not in its worktree, so not
in its capture, and would go with the worktree: every capture of the attempt's end moves those entries to the
repository's stash (`carry`), where `git stash list` in the main tree shows them, and `left` names them for the log.
"""

from __future__ import annotations

import time
from pathlib import Path

from aipm.workspace import ownrefs
from aipm.workspace.places import seam
from aipm.workspace.repo import Repo, WorkspaceError

STASHED = ("stashed by the worker, so not merged; moved from its worktree's stash to the repository's (a `git stash "
           "pop` in the main tree applies it)")


def carry(repo: Repo, tree: Path, base: str) -> list[str]:
    """Move the entries of the worktree's own stash to the repository's, oldest first (the newest on top, as the
    worker left them). Notes for the log: the entries that could not be moved, and those made on a commit other
    than the attempt's start (a branch the worker checked out), which `left` does not tell from the user's."""
    note = repo.note_of(tree)
    if note is None:
        return []  # git's note of it is gone: so is its stash
    if not ownrefs.isolated(note):  # its stash is the repository's, the user's: nothing to move, and never to delete
        broken = ownrefs.broken(note)
        return [f"the worker's stash was not moved, and nothing was deleted there: {broken}, so its git reaches "
                "the repository's refs (its worker changed it)"] if broken else []
    with ownrefs.view(repo, note, tree) as env:  # (not git in its note: its worker may have named programs there)
        notes, moved = _moved(repo, env, base)
    if moved:
        ownrefs.drop_stash(note)
    return notes


def _moved(repo: Repo, env: dict[str, str], base: str) -> tuple[list[str], bool]:
    """carry(), its stash read in the view `env` of its worktree's git (ownrefs.view): (notes, whether every entry
    is in the repository's stash now, so that the worktree's is to be dropped)."""
    entries, unlogged = repo.stash(env), []
    if not entries:
        gone = _gone(repo, env)
        newest = None if gone else _unlogged(repo, env)
        if newest is None:
            return gone, False
        entries = [newest]
        unlogged = [f"the worker removed its stash's log, so only its newest entry ({newest[1]}) could be found, "
                    "and it is moved to the repository's stash"]
    present = {commit for _, commit, _ in repo.stash()}  # moved already, by a capture a crash cut short
    failed, elsewhere = [], []
    for _, commit, parents in reversed(entries):
        if commit in present:
            continue
        subject = repo.git("log", "-1", "--format=%s", commit).decode("utf-8", "replace").strip()
        try:
            _store(repo, subject, commit)
        except WorkspaceError as exc:  # a note, not the attempt's failure: the entry's commit is named
            failed.append(f"the worker's stash entry {commit} (\"{subject}\") could not be moved to the "
                          f"repository's stash ({exc}): `git stash store {commit}` in the main tree does it")
            continue
        if not repo.descends(parents[0], base):
            elsewhere.append(f"{commit[:10]} (\"{subject}\")")
    seam("carry")
    return unlogged + failed + ([f"the worker's stash entries made on another commit than its start: {', '.join(elsewhere)}: "
                      f"{STASHED}"] if elsewhere else []), not failed


def _gone(repo: Repo, env: dict[str, str]) -> list[str]:
    """A note when the worktree's stash names a commit that is not in the repository: a `git gc` or `git prune`
    elsewhere deleted it (with a git older than 2.20, or once the worker had dropped its stash's log), and what it
    stashed is lost. Said, never passed over as no stash."""
    gone = repo.missing("refs/stash", env)
    return [] if gone is None else [f"the worker's stash names a commit that is gone ({gone}): a `git gc` or "
                                    "`git prune` in the repository deleted it while the attempt ran, and what the "
                                    "worker stashed is lost"]


def _unlogged(repo: Repo, env: dict[str, str]) -> tuple[str, str, list[str]] | None:
    """The worktree's stash entry that refs/stash names where its log was removed (`git stash list` shows nothing,
    and the commit went with the worktree): (its name, commit, parents), None where there is no refs/stash."""
    try:
        commit, *parents = repo.git("log", "-1", "--format=%H %P", "refs/stash", "--", env=env).decode().split()
    except (WorkspaceError, ValueError):  # (no refs/stash)
        return None
    return "refs/stash", commit, parents


def _store(repo: Repo, subject: str, commit: str) -> None:
    """`git stash store`, which fails while another git (a user's, another task's capture) holds refs/stash."""
    for tries in range(50):
        try:
            repo.git("stash", "store", "-q", "-m", subject, commit)
            return
        except WorkspaceError:
            if tries == 49:
                raise
            time.sleep(0.1)


def left(repo: Repo, base: str, end: str) -> list[str]:
    """Notes of the entries the worker made (their first parent is the attempt's start, or a commit it made on it)
    whose changes its end does not hold as stashed (a `git stash apply` put them back: merged)."""
    notes = []
    for name, commit, parents in repo.stash():
        if repo.descends(parents[0], base):
            paths = sorted(_paths(repo, parents, commit) - _held(repo, parents, commit, end))
            if paths:
                notes.append(f"{', '.join(paths)} ({name}, {commit[:10]}): {STASHED}")
    return notes


def _paths(repo: Repo, parents: list[str], commit: str) -> set[str]:
    """What a stash entry changed: its tracked files since its first parent, and its untracked files (`git stash
    -u` keeps them in a third parent's tree)."""
    return {c.path for c in repo.changes(parents[0], commit)} | set(repo.files(parents[2]) if len(parents) > 2 else ())


def _held(repo: Repo, parents: list[str], commit: str, end: str) -> set[str]:
    """The paths of a stash entry that `end` holds as the entry does."""
    held = {c.path for c in repo.changes(parents[0], commit)} - {c.path for c in repo.changes(commit, end)}
    if len(parents) > 2:
        held |= set(repo.files(parents[2])) - {c.path for c in repo.changes(parents[2], end)}
    return held
