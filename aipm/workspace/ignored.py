"""Ignored files a worktree attempt wrote in its targets: what the task was asked to make (build output, a .env),
though git ignores them, so no capture, merge or patch holds them. They are moved to the attempt's rest (kept.py)
before its worktree goes: when it is merged, sent back whole, or fails (workspace.keep).
"""

from __future__ import annotations

from pathlib import Path

from aipm.coverage import out_of_scope
from aipm.record import Record
from aipm.workspace.kept import keep_rest, left_out_note
from aipm.workspace.places import own_dir, relative
from aipm.workspace.repo import Repo, WorkspaceError

NOT_MERGED = "ignored by git, so not merged back"
IGNORED = "ignored by git, so in no patch"


def keep_ignored(root: Path, rec: Record) -> list[str]:
    """An attempt sent back whole (by its review, its scope audit, a merge conflict): the ignored files it wrote in
    its targets, moved to its rest as keep_ignored_with does (its worktree goes when the next attempt starts), and
    notes for its log."""
    if not rec.workspace or not own_dir(root, Path(rec.workspace)):
        return []  # (gone, or a link its worker or reviewer put there: another tree's files are not this attempt's)
    try:
        repo = Repo(root)
    except WorkspaceError as exc:
        return [f"ignored files in its targets could not be listed, nor kept: {exc}"]
    return keep_ignored_with(root, repo, rec, IGNORED)


def keep_ignored_with(root: Path, repo: Repo, rec: Record, why: str = NOT_MERGED) -> list[str]:
    """The ignored files in the task's targets (ignored_in_targets) that its merge leaves behind, moved out of the
    worktree into the attempt's rest (they went with the worktree, though the task was asked to make them), and the
    note that says where."""
    try:
        left = dict.fromkeys(ignored_in_targets(repo, rec), why)
    except WorkspaceError as exc:  # the merge is done: this is only a warning
        return [f"ignored files in its targets could not be listed, nor kept: {exc}"]
    if not left:
        return []
    keep_rest(root, rec.order, rec.task, rec.serial, Path(rec.workspace), left, held=False)
    return [left_out_note(left)]


def ignored_in_targets(repo: Repo, rec: Record) -> list[str]:
    """Ignored files inside the task's targets that its worktree holds and the main tree does not (or not so):
    they are not in the capture, so no merge or patch holds them, and the worktree's removal deletes them."""
    from aipm.workspace import mergeback as merging

    tree = Path(rec.workspace)
    if not rec.targets or not tree.is_dir():
        return []
    # The root target is "./", which no glob pathspec matches: its pathspec is the root's place itself.
    specs = [f":(top,glob){repo.prefix_pattern}{t}" if t != "./" else f":(top){repo.prefix}" for t in rec.targets]
    found = repo.ignored(tree, specs)
    # git also lists a directory that might hold a match of a glob (`build/` for `*.md`): only what the targets
    # cover counts, or a directory ignored whole that holds a target (`build/` for `build/gen.txt`: git names the
    # directory alone). Such a directory is named only when the main tree has none there: comparing it could mean
    # reading a whole node_modules/.
    found = [p for p in found if not out_of_scope({relative(p, repo.prefix).rstrip("/")}, rec.targets)
             or p.endswith("/") and any(t.startswith(relative(p, repo.prefix)) for t in rec.targets)]
    return [p for p in found if (not (repo.top / p).is_dir() if p.endswith("/")
                                 else not merging.same_state(tree / p, repo.top / p))]
