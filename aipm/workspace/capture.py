"""Capturing a worktree attempt's end: its files as a commit on its start (the merge's and the patch's source), what
of it no patch can hold (repositories in the worktree), and an end whose worker moved its worktree off its start
(`git checkout`, `git reset --hard`), taken since its history left the start's so that the main tree's uncommitted
edits are not undone by its merge.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from aipm.model import some
from aipm.record import Record
from aipm.workerfiles import append_log, write_stream
from aipm.workspace import stash
from aipm.workspace.kept import keep_rest
from aipm.workspace.places import make_own_dir, own_dir, patch_path, refname, scratch
from aipm.workspace.repo import GITLINK, Repo, UnbornRepositories, WorkspaceError
from aipm.workspace.start import setup_unfinished, start_message


_UNBORN = "a git repository without commits (a `git init` in the worktree), whose files git cannot capture"
_NESTED = ("a git repository with commits (made or checked out in the worktree), which git takes for a submodule: "
           "none of its files is merged")


def capture(repo: Repo, root: Path, tree: Path, base: str, message: str | None) -> tuple[str, dict[str, str]]:
    """Capture the worktree `tree` against its start `base` (a commit; `message` None: a tree, for a look only):
    (the capture, what of it no patch can hold, path -> why: the repositories in it, without commits (git cannot
    capture them) or with commits (a submodule to git: their files and commits are only in the worktree))."""
    left_out: dict[str, str] = {}
    parent = base if message is not None else None
    try:
        end = repo.capture(tree, scratch(root), parent, message or "")
    except UnbornRepositories as exc:
        left_out = dict.fromkeys(exc.paths, _UNBORN)
        end = repo.capture(tree, scratch(root), parent, message or "", leave_out=exc.paths)
    left_out.update((f"{c.path}/", _NESTED) for c in repo.changes(base, end) if c.new_mode == GITLINK)
    return end, left_out


def capture_end(root: Path, rec: Record, strict: bool = True) -> tuple[Repo, str, str, dict[str, str]]:
    """Capture the attempt's worktree as its end, and write its patch: (repo, start, end, what cannot be merged of
    it, path -> why: the repositories in the worktree, without commits (git cannot capture them) or with commits
    (a submodule to git: their files and commits are only in the worktree, which the next attempt removes)).
    `strict` (an end to be merged): WorkspaceError, after its patch is written, for a worktree moved off its start
    whose changes cannot be told from the undoing of the start's uncommitted edits (_onto_start)."""
    repo = Repo(root)
    start = refname(rec.order, rec.task, "base", prefix=repo.prefix)
    base = repo.rev(start)
    tree = Path(rec.workspace)
    if os.path.lexists(tree) and not own_dir(root, tree):
        # A worker that put a link in its worktree's place (to the main tree, another task's worktree): captured
        # through it, what a person or another task did there was taken for the attempt's work, and merged.
        raise WorkspaceError(f"the worktree of {rec.order}/{rec.task} ({tree}) was replaced by a link, to "
                             f"{os.path.realpath(tree)}: nothing of attempt {rec.serial} is captured or merged "
                             "through it")
    if base is None and tree.is_dir():
        # The ref was deleted (a person's clean-up of refs, an aipm of another version): the worktree was made
        # at its start, detached, so the start is its HEAD or, where the worker committed, in HEAD's history (not
        # HEAD: what it committed was in no patch, and the merge took the main tree for changed). Else (a worker's
        # reset past it) HEAD: better a patch against it than none, as the next attempt's start removes the work.
        head = repo.head_of(tree)
        base = head and repo.made_before(head, start_message(rec.order, rec.task, rec.serial))
        where = "its start in its worktree's history" if base else "its worktree's HEAD"
        base = base or head
        if base is not None:
            repo.set_ref(start, base)
            append_log(rec.log, f"{start} was gone: the attempt is captured against {where}")
    if base is None or not tree.is_dir():
        raise WorkspaceError(f"the worktree of {rec.order}/{rec.task} ({tree}) or its start ({start}) is gone; "
                             f"nothing of attempt {rec.serial} can be merged")
    if setup_unfinished(repo, base):  # its command never ran: no patch of its own, and `diff` shows the one before
        return repo, base, base, {}
    patch = patch_path(root, rec.order, rec.task, rec.serial)
    make_own_dir(root, patch.parent)  # (the only copy of the work: not where a worker's link leads)
    message = f"aipm: end of {rec.order}/{rec.task}, attempt {rec.serial}"
    end, left_out = capture(repo, root, tree, base, message)
    if left_out:
        # Kept at once, whole, and left out of the end: in the patch, a repository with commits was one
        # `Subproject commit` line, and the worktree holding its files went with the next attempt's start.
        keep_rest(root, rec.order, rec.task, rec.serial, tree, left_out)
        end = repo.capture(tree, scratch(root), base, message, leave_out=list(left_out))
    end, tangled = _onto_start(repo, rec, tree, base, end, message)
    repo.set_ref(refname(rec.order, rec.task, "end", prefix=repo.prefix), end)
    for note in stash.carry(repo, tree, base):
        append_log(rec.log, note)
    write_stream(patch, lambda out: repo.write_patch(base, end, out))
    if tangled and strict:
        raise WorkspaceError(f"{tangled}; nothing of attempt {rec.serial} was merged, its changes are kept in {patch}")
    if tangled:
        append_log(rec.log, tangled)
    return repo, base, end, left_out


def _onto_start(repo: Repo, rec: Record, tree: Path, base: str, end: str, message: str) -> tuple[str, str | None]:
    """The end of a worker that moved its worktree off its start and rewrote its files (`git checkout main`, `git
    reset --hard HEAD~1`: its refs of its own let it check out your branch) held none of what the start held beside
    its commits, your uncommitted edits: the end undid them, and the merge took that for the task's change and
    wrote it over your edits. Such an end is taken as `git merge` takes a branch: its changes since the fork of its
    history and the start's, merged onto the start. A move that kept the files (`git reset --soft`, a mixed reset)
    dropped nothing: its end is taken as it is. (end, None); or (its end as captured, why it cannot be merged) where
    its changes overlap what the move dropped, or a file tells neither way."""
    head = repo.head_of(tree)
    if head is None or head == base or repo.rev(head) is None or repo.descends(head, base):
        # On its start, or committed on top of it: nothing dropped. (Or a repository of its own, `rm .git && git
        # init`, whose commits are not ours: its files are captured as they are.)
        return end, None
    tip = repo.git("commit-tree", f"{end}^{{tree}}", "-p", head, "-m", message).decode().strip()
    fork = repo.merge_base(base, tip)
    if fork is None:  # (no history in common: what it checked out is all it has, taken as it is)
        append_log(rec.log, f"its worktree was moved off its start, to {head[:12]}, which shares no history with it: "
                            "its changes are taken as its files are")
        return end, None
    # What the start held beside the fork (your uncommitted edits, and commits the move went back past): each file
    # the end still has as the start had it (mode and content), has as the fork had it or nearer to that
    # (dropped), or nearer the start's (kept). Two listings of the trees, whatever the number of files.
    held, now = repo.entries(fork, base), repo.entries(base, end)
    dropped, kept = [], []
    for path, (at_fork, start) in held.items():
        if path not in now:
            continue  # as the start had it
        at_end = now[path][1]
        (dropped if at_end == at_fork or _nearer(repo, at_end, at_fork, start) else kept).append(path)
    if not dropped:
        return end, None
    moved = f"its worktree was moved off its start (a `git checkout` or `git reset` there, to {head[:12]})"
    merged = repo.merge_tree(base, tip) if not kept else None
    if merged is None or merged[1]:
        return end, (f"{moved}, which undid what the start held beside the commit it moved to (the main tree's "
                     f"uncommitted edits), and its changes overlap that in {some(merged[1] if merged else dropped)}: "
                     "keep the worktree on its start (commit on top of it) and leave your branches alone")
    append_log(rec.log, f"{moved}: its changes are taken since its history left the start's, so that what the move "
                        f"dropped ({some(dropped)}: the main tree's uncommitted edits, or commits it went back "
                        "past) is not undone")
    repo.set_ref(refname(rec.order, rec.task, "captured", prefix=repo.prefix), end)  # what its files hold (_keep_later)
    return repo.git("commit-tree", merged[0], "-p", base, "-m", message).decode().strip(), None


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
