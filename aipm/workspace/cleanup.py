"""Tidying a task's workspace: remove its worktree, refs and merge plan once its attempt has served (a pending
merge plan is applied first: it was decided), sweep what crashes left, and say when a merge was cut short."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from aipm import writtenlog
from aipm.errors import UserError
from aipm.model import FINISHED_OK, RUNNING, Order, Task
from aipm.record import Record, same_attempt
from aipm.runtime import Runtime
from aipm.workerfiles import append_log
from aipm.workspace import orphans
from aipm.workspace.places import (component, merge_dir, own_dir, ref_space, refname, relative, runtime_dir, scratch,
                                   seam, worktree_path)
from aipm.workspace.repo import Repo, WorkspaceError


def note_pending_merge(root: Path, order: str, task: str, why: str) -> str | None:
    """A task's merge cut short and still pending: say so in its attempt's log (after `why`) and return the
    sentence; None when there is none. A person who stops such a task must know the tree is half-merged."""
    plan_dir = merge_dir(root, order, task)
    if not plan_dir.is_dir():
        return None  # the usual case, asked of every task at the end of a run: without loading the merge's code
    from aipm.workspace import MergeStopped, mergeplan

    try:
        progress = mergeplan.progress(plan_dir)
    except MergeStopped as exc:  # said as it is: which attempt's log it belongs in, the unreadable plan would say
        return str(exc)
    if progress is None:
        return None
    attempt, done, steps = progress
    if done == steps:
        return None  # applied whole; only its removal was cut short
    note = (f"the merge of attempt {attempt} was cut short with {done} of {steps} paths written; the rest is "
            f"planned in {plan_dir} and is written when its worktree is removed (`aipm recover`, its next attempt)")
    append_log(str(Runtime(root).log_path(order, task, attempt)), f"{why}: {note}")
    return note


def finished(root: Path, rec: Record) -> str | None:
    """The task's final status (DONE, COMPLETED) is written: its worktree has served. Returns why it could not
    be removed (the next `aipm run` or `aipm recover` tries again), else None."""
    seam("cleanup")
    try:
        remove(root, rec.order, rec.task)
    except (UserError, OSError) as exc:  # MergeStopped included: the plan stays for the next try
        return f"worktree not removed yet: {exc}"
    return None


def remove(root: Path, order: str, task: str, repo: Repo | None = None) -> list[str]:
    """Remove a task's worktree, refs and merge plan (a pending plan is applied first: it was decided). Returns
    what of its work it kept first that nothing kept yet, in words (keep_before_removal)."""
    from aipm.workspace import mergeback as merging, mergeplan

    plan_dir, tree = merge_dir(root, order, task), worktree_path(root, order, task)
    orphans.end(root, tree)  # a killed owner's checkout still filling it would race what follows
    # Nothing through a link a worker left on the way (own_dir): a link at the worktree's own name goes alone.
    own_plan, own_tree = own_dir(root, plan_dir.parent), own_dir(root, tree)
    if not own_tree and own_dir(root, tree.parent) and os.path.islink(tree):
        os.unlink(tree)
    repo = repo or repo_or_none(root)
    kept: list[str] = []
    if repo is not None:
        progress = mergeplan.progress(plan_dir) if own_plan else None
        if progress is not None:
            attempt, done, steps = progress
            applied = merging.apply(repo.top, plan_dir)
            notes = applied.notes + [f"{path}: {why}; left as it is (the attempt's change is in its patch)"
                                     for path, why in applied.conflicts]
            if done < steps:  # else merge() applied it all, and its log says so
                append_log(str(Runtime(root).log_path(order, task, attempt)),
                           f"merge: the rest of attempt {attempt}'s saved merge plan ({steps - done} of {steps} "
                           "paths) was written when its worktree was removed" + "".join(f"; {n}" for n in notes))
            # A shared task's audit in flight sees these files change: they are no one's stray writes.
            writtenlog.note_merged(Runtime(root), [relative(p, repo.prefix) for p in mergeplan.paths(plan_dir)])
        if own_tree:
            from aipm.workspace import keep_before_removal

            kept = keep_before_removal(root, order, task, repo)
        repo.delete_refs(repo.refs(refname(order, task, prefix=repo.prefix)))
        if own_tree:
            repo.remove_worktree(tree)
        elif own_dir(root, tree.parent):
            repo.prune_worktrees(tree.parent)
    if own_tree:
        shutil.rmtree(tree, ignore_errors=True)
    if own_plan:
        shutil.rmtree(plan_dir, ignore_errors=True)
    return kept


def sweep(root: Path, order: Order, everything: bool = False) -> list[tuple[str, str]]:
    """Tidy the order's workspaces after crashes: remove those of finished tasks (of every task not running,
    with `everything`: `aipm recover`). Cheap when worktrees were never used. Returns (task id, what happened)
    for each tried; one that cannot be removed is reported and the rest are still tidied."""
    if not everything and not (runtime_dir(root) / "worktrees").is_dir():
        return []
    return _sweep(root, repo_or_none(root), order.id, list(order.tasks.values()), everything)


def sweep_orphans(root: Path, known: list[str]) -> list[tuple[str, str, str]]:
    """`aipm recover` of every order: remove the workspaces of orders that no longer exist (their directory
    deleted), which no per-order sweep sees. Returns (order, task, what happened) for each tried."""
    repo = repo_or_none(root)
    orders = set()
    for base in (runtime_dir(root) / "worktrees", runtime_dir(root) / "merges"):
        if own_dir(root, base):
            orders.update(p.name for p in base.iterdir())
    if repo is not None:
        space = ref_space(repo.prefix)  # this project's: another project of the repository has its own
        orders.update(name for ref in repo.refs(space) if not (name := ref[len(space):].split("/")[0]).startswith("@"))
    # An order run from outside orders_dir (a path argument) is not in `known`: its records say it still exists.
    orders -= {component(order) for order in known}
    orders -= {component(r.order) for r in Runtime(root).records()}  # an order with a record holds its work (_sweep)
    tidied = []
    for name in sorted(orders):
        tidied += [(name, *item) for item in _sweep(root, repo, name, [], True)]
        for base in (runtime_dir(root) / "worktrees" / name, runtime_dir(root) / "merges" / name):
            with contextlib.suppress(OSError):  # absent, or holding what could not be removed (reported)
                if own_dir(root, base):
                    base.rmdir()
    return tidied


def repo_or_none(root: Path) -> Repo | None:
    try:
        return Repo(root)
    except WorkspaceError:
        return None  # git gone or the repository deleted: only our directories are left to remove


def _sweep(root: Path, repo: Repo | None, order: str, tasks: list[Task], everything: bool) -> list[tuple[str, str]]:
    by_name = {component(t.id): t for t in tasks}
    names = set()
    for base in (worktree_path(root, order, "x").parent, merge_dir(root, order, "x").parent):
        if own_dir(root, base):  # (a link there: what it leads to is no one's worktree)
            names.update(p.name for p in base.iterdir())
    if repo is not None:
        mine = refname(order, "", prefix=repo.prefix)[:-1]  # `.../<ORDER>/`
        names.update(ref[len(mine):].split("/")[0] for ref in repo.refs(mine))
    # An attempt with a record is judged by it, not by its file's status (a `git checkout` may have reset it, or
    # the file is gone): live, it works in its worktree; dead, its work is in the worktree alone until its outcome
    # is recorded (or the record dropped, `aipm recover`, which keeps it as a patch) — unless the file holds that
    # outcome already (a record left by an owner killed after writing it).
    held = {component(r.task) for r in Runtime(root).records() if component(r.order) == component(order)
            and (r.alive() or not _recorded(by_name.get(component(r.task)), r))}
    tidied = []
    for name in sorted(names):
        task = by_name.get(name)
        if name in held or task is not None and task.status in RUNNING:
            continue
        if task is None or task.status in FINISHED_OK or everything:
            try:
                kept = remove(root, order, task.id if task else name, repo)
            except (UserError, OSError) as exc:
                tidied.append((task.id if task else name, f"worktree not removed: {exc}"))
            else:
                tidied.append((task.id if task else name, "; ".join(["worktree removed", *kept])))
    return tidied


def _recorded(task: Task | None, rec: Record) -> bool:
    return task is not None and task.status not in RUNNING and same_attempt(task, rec)


def prune(root: Path) -> None:
    """Drop git's notes of worktrees whose directories were deleted (`git clean -fdx` of .aipm/, say), and the
    temporary indexes of captures whose process was killed."""
    import psutil  # only here: a run's start-up does without it

    for index in scratch(root).glob("index.*"):
        pid = index.name.split(".")[1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            index.unlink(missing_ok=True)
    try:
        if own_dir(root, runtime_dir(root) / "worktrees"):  # (through a link: the notes of worktrees elsewhere)
            Repo(root).prune_worktrees(runtime_dir(root) / "worktrees")
    except WorkspaceError:
        pass
