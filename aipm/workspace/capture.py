"""Capturing a worktree attempt's end: its files as a commit on its start (the merge's and the patch's source), what
of it no patch can hold (repositories in the worktree), and an end whose worker moved its worktree off its start
(`git checkout`, `git reset --hard`), taken since its history left the start's (moved.py) so that the main tree's
uncommitted edits are not undone by its merge; where that cannot be told (tangled), by its patch either, its
versions of those paths kept in its rest (kept.keep_tangled).
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

from aipm.record import Record
from aipm.workerfiles import append_log, write_stream
from aipm.workspace import ownrefs, stash
from aipm.workspace.kept import keep_rest, keep_tangled
from aipm.workspace.moved import onto_start
from aipm.workspace.places import make_own_dir, own_dir, patch_path, refname, scratch, tangled_path
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
    note = repo.note_of(tree)
    if note is not None:  # (what its git added to a store of its own: its index, which seeds the capture, names it)
        ownrefs.take_objects(repo, note)
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
    whose changes cannot be told from the undoing of the start's uncommitted edits (moved.onto_start). Such an end
    (strict or not) is the files with those paths as the start has them, and so is its patch: `git apply` of it
    never undoes those edits; the worktree's versions of them are kept in its rest (kept.keep_tangled)."""
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
        head = ownrefs.head_of(repo, tree)
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
    onto = onto_start(repo, tree, base, end)
    kept = keep_tangled(root, repo, rec, onto) if onto.tangled else ""
    with suppress(OSError):  # (an earlier capture of this attempt's, tangled: its note would be read of this patch)
        if not onto.tangled:
            tangled_path(root, rec.order, rec.task, rec.serial).unlink(missing_ok=True)
    if onto.note:
        append_log(rec.log, onto.note)
    if onto.tree is not None:
        # Taken onto its start (or, tangled, its files with the paths of those edits as the start has them); what its
        # files hold is kept for the changes made after its end (_keep_later)
        repo.set_ref(refname(rec.order, rec.task, "captured", prefix=repo.prefix), end)
        end = repo.git("commit-tree", onto.tree, "-p", base, "-m", message).decode().strip()
    repo.set_ref(refname(rec.order, rec.task, "end", prefix=repo.prefix), end)
    for note in stash.carry(repo, tree, base):
        append_log(rec.log, note)
    write_stream(patch, lambda out: repo.write_patch(base, end, out))
    if onto.tangled and strict:
        raise WorkspaceError(f"{onto.tangled}; nothing of attempt {rec.serial} was merged: {kept}")
    if onto.tangled:
        append_log(rec.log, f"{onto.tangled}; {kept}")
    return repo, base, end, left_out
