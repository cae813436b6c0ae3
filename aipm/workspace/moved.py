"""A worktree whose worker moved it off its start (`git checkout main`, `git reset --hard HEAD~1`: its refs of its own
let it check out your branch) and rewrote its files: they hold none of what the start held beside its commits, your
uncommitted edits, so against the start they undo them. They are taken as `git merge` takes a branch: their changes
since the fork of the worktree's history and the start's, onto the start. The end capture (capture.py: what is
merged, and the attempt's patch) and `aipm diff` of a running or kept worktree (kept.py) both take them so. Where their
changes overlap what the move dropped (tangled: the end is sent back), they are taken with each path of your edits
that they change as the start has it, so that neither that patch nor `diff` undoes your edits; the end keeps the
worktree's versions of those paths in the attempt's rest (kept.keep_tangled).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import NamedTuple

from aipm.model import some
from aipm.workspace import ownrefs
from aipm.workspace.places import scratch
from aipm.workspace.repo import Repo


class Onto(NamedTuple):
    """How a capture of a worktree's files is taken against its start (onto_start)."""

    # The tree taken for the files: their changes merged onto the start, or (tangled) the files with each path the
    # move dropped as the start has it (None: the files are taken as they are)
    tree: str | None = None
    note: str | None = None  # what was done, for the attempt's log
    tangled: str | None = None  # why they cannot be merged: their changes overlap what the move dropped
    # (tangled) each path taken as the start has it -> (mode, id) there: every one the start held beside the fork
    # that the files change (what the move dropped, and what they hold nearer the start's, which is not the start's)
    left: dict[str, tuple[str, str]] = {}
    # (tangled) each path where the tree taken differs from the files -> (mode, id) in the files (0s: absent)
    theirs: dict[str, tuple[str, str]] = {}


def onto_start(repo: Repo, tree: Path, base: str, files: str) -> Onto:
    """The capture `files` (a commit or a tree) of the worktree `tree`, whose start is the commit `base`, as it is
    taken against that start. A move that kept the files (`git reset --soft`, a mixed reset) dropped nothing: they
    are taken as they are. Tangled where their changes overlap what the move dropped, or a file tells neither way:
    taken with those paths (every one of your edits that they change) as the start has them, no patch of them
    undoing your edits. Writes objects only (no ref,
    no log)."""
    head = ownrefs.head_of(repo, tree)
    if head is None or head == base or repo.rev(head) is None or repo.descends(head, base):
        # On its start, or committed on top of it: nothing dropped. (Or a repository of its own, `rm .git && git
        # init`, whose commits are not ours: its files are captured as they are.)
        return Onto()
    tip = repo.git("commit-tree", f"{files}^{{tree}}", "-p", head, "-m", "aipm: a worktree's files on its HEAD"
                   ).decode().strip()
    fork = repo.merge_base(base, tip)
    if fork is None:  # (no history in common: what it checked out is all it has, taken as it is)
        return Onto(note=f"its worktree was moved off its start, to {head[:12]}, which shares no history with it: "
                         "its changes are taken as its files are")
    # What the start held beside the fork (your uncommitted edits, and commits the move went back past): each file
    # the files still have as the start had it (mode and content), have as the fork had it or nearer to that
    # (dropped), or nearer the start's (kept). Two listings of the trees, whatever the number of files.
    held, now = repo.entries(fork, base), repo.entries(base, files)
    dropped, kept = {}, []
    for path, (at_fork, start) in held.items():
        if path not in now:
            continue  # as the start had it
        at_end = now[path][1]
        if at_end == at_fork or _nearer(repo, at_end, at_fork, start):
            dropped[path] = start
        else:
            kept.append(path)
    if not dropped:
        return Onto()
    moved = f"its worktree was moved off its start (a `git checkout` or `git reset` to {head[:12]})"
    merged = repo.merge_tree(base, tip) if not kept else None
    if merged is None or merged[1]:
        # Here its changes cannot be told from the undoing of your edits: no patch of these paths may be taken (one
        # the files hold nearer the start's may still undo part of them), and the files' are kept aside (kept.py)
        left = {path: held[path][1] for path in [*dropped, *kept]}
        taken = repo.with_entries(files, left, scratch(repo.root))
        # Where a path put back as the start has it meets the files' as a file does a directory (a start's x/y and
        # the files' x), the index drops the files' entry: every path where the taken tree and the files differ is
        # one of theirs to keep, not only those put back. (merge-tree names a path on both sides, a file and a
        # directory, `x~<oid>` too: no one's path, not named.)
        overlap = [path for path in merged[1] if path in held or path in now] if merged else []
        # The paths first: the task file's reason keeps the first 160 characters of this (outcome.one_line).
        return Onto(tangled=(f"{moved}, and its changes overlap in {some(overlap or list(dropped))} what that undid "
                             "(the main tree's uncommitted edits, which its start held beside the commit it moved "
                             "to): keep the worktree on its start (commit on top of it) and leave your branches "
                             "alone"), left=left,
                    theirs={path: mine for path, (_, mine) in repo.entries(taken, files).items()}, tree=taken)
    return Onto(tree=merged[0], note=(f"{moved}: its changes are taken since its history left the start's, so that "
                                      f"what the move dropped ({some(list(dropped))}: the main tree's uncommitted "
                                      "edits, or commits it went back past) is not undone"))


_NEAR_BYTES = 4 << 20  # files compared by their lines; a bigger one counts as dropped (merged, or sent back)


def _nearer(repo: Repo, now: tuple[str, str], fork: tuple[str, str], start: tuple[str, str]) -> bool:
    """Whether the file `now` ((mode, id); an absent one's id is all zeros) is nearer, in lines, to its version at
    the fork than to the start's. A tie, a file too big to compare, or one absent on a side counts as nearer the
    fork: merged onto the start, or sent back where that conflicts, never written over your edit."""
    ids = [oid for _, oid in (now, fork, start)]
    if any(set(oid) == {"0"} for oid in ids) or now[0] != start[0]:
        return True
    texts = [repo.object_bytes(oid, _NEAR_BYTES) for oid in ids]
    if any(text is None for text in texts):
        return True
    now_lines, fork_lines, start_lines = (Counter(text.splitlines()) for text in texts)
    # Lines in one and not the other, counted as a multiset: linear, where a diff is quadratic on repeated lines
    # (a worker's file of 8,000 equal lines held the launch lock for 25 s).
    return _apart(now_lines, fork_lines) <= _apart(now_lines, start_lines)


def _apart(one: Counter, other: Counter) -> int:
    return sum((one - other).values()) + sum((other - one).values())
