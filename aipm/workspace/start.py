"""The start of a worktree attempt: its worktree made from what the main tree holds, ignored files it asks for copied
in, and its `workspace_setup` run before the command, after which the attempt's start is captured again.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

from aipm import confine
from aipm.model import Task
from aipm.record import Record
from aipm.settings import Settings
from aipm.workspace import carry, ownrefs
from aipm.workspace.cleanup import remove
from aipm.workspace.places import make_own_dir, refname, scratch, seam, worktree_path
from aipm.workspace.repo import RUNTIME_DIR, Repo, WorkspaceError


def prepare(root: Path, rec: Record, task: Task, settings: Settings) -> str:
    """Make the attempt's worktree from what the main tree holds now; returns its path. Caller holds the launch
    lock and the task's target locks, so no merge is half-way through and the capture is consistent."""
    repo = Repo(root)
    kept = remove(root, rec.order, rec.task, repo)  # the previous attempt's, kept for inspection until now
    # Marked as taken before a setup: until after_setup captures its successor, nothing in the worktree is the task's
    base = repo.capture(repo.top, scratch(root), repo.head(), start_message(rec.order, rec.task, rec.serial)
                        + (BEFORE_SETUP if setup_of(task, settings) else ""))
    repo.set_ref(refname(rec.order, rec.task, "base", prefix=repo.prefix), base)
    path = worktree_path(root, rec.order, rec.task)
    make_own_dir(root, path.parent)  # where remove() will remove it: not through a link a worker left there
    repo.add_worktree(path, base)
    # Confined, its git adds objects to a store of its own (the kernel cannot let it add to yours without letting it
    # rewrite or delete what is there), which aipm takes them from (objects.py)
    ownrefs.isolate(repo, path, own_objects=confine.wanted(task, settings))
    globs = task.workspace_copy if task.workspace_copy is not None else settings.workspace_copy
    _copy_ignored(Path(root), path / repo.prefix, globs)
    # With a setup, applied after it (after_setup: its capture is the start); said now, for the prompt.
    carried = carry.resume(Path(root), repo, rec.order, rec.task, rec.serial, path, rec.targets,
                           check=bool(setup_of(task, settings)))
    # What the removal kept (a person's fixes in that worktree: said only in the old attempt's log) said in this one's
    said = [f"the worktree of the attempt before was removed first: {note}" for note in kept]
    carry.hold_note(rec.log, "; ".join([*said, *([carried] if carried else [])]) or None)
    seam("prepare")
    return str(path)


def _copy_ignored(root: Path, dest: Path, globs: tuple[str, ...]) -> None:
    """Copy what `workspace_copy` names (ignored files git does not carry: .env, caches) into the worktree;
    a file the worktree already has (git carried it) is left as checked out."""
    for pattern in globs:
        for src in sorted(root.glob(pattern)):
            rel = src.relative_to(root)
            if rel.parts[0] in (RUNTIME_DIR, ".git"):  # aipm's, and git's (`.*` would copy .git over the
                continue                                  # worktree's own .git file: every launch failed)
            sources = [src] if not src.is_dir() or src.is_symlink() else [p for p in src.rglob("*")
                                                                            if not p.is_dir() or p.is_symlink()]
            for item in sources:
                target = dest / item.relative_to(root)
                if target.exists() or target.is_symlink():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(item, target, follow_symlinks=False)


def directory(root: Path, rec: Record) -> str:
    """The worker's (and reviewer's) working directory: the project root, or the same place in its worktree."""
    if not rec.workspace:
        return str(root)
    return str(Path(rec.workspace) / Repo(root).prefix)


def setup_of(task: Task, settings: Settings):
    """The task's `workspace_setup`, else the setting's (None: none)."""
    return task.workspace_setup if task.workspace_setup is not None else settings.workspace_setup


def with_setup(root: Path, command: str | list[str], rec: Record, task: Task, settings: Settings
               ) -> str | list[str]:
    """The worker's command, preceded by `workspace_setup` in a fresh worktree (its failure fails the attempt),
    then by a new capture of the attempt's start (after_setup)."""
    setup = setup_of(task, settings)
    if not rec.workspace or not setup:
        return command
    text = setup if isinstance(setup, str) else shlex.join(setup)
    then = command if isinstance(command, str) else "exec " + shlex.join(command)
    capture = shlex.join([sys.executable, "-c", "import sys; from aipm.workspace import after_setup; "
                          "after_setup(*sys.argv[1:])", str(root), rec.order, rec.task, str(rec.serial),
                          rec.workspace, *rec.targets])
    return (f"(\n{text}\n) </dev/null || {{ s=$?; echo \"aipm: workspace_setup failed (exit $s)\"; exit $s; }}\n"
            f"{capture} || exit $?\n{then}")


def after_setup(root: str, order: str, task: str, serial: str, worktree: str, *targets: str) -> None:
    """Run in the worker's shell once `workspace_setup` succeeded: capture the worktree again as the attempt's
    start, so that what the setup wrote (a lock file, generated code) is neither charged to the task by the
    scope check nor merged back."""
    try:
        repo = Repo(Path(root))
        base = repo.rev(refname(order, task, "base", prefix=repo.prefix))
        start = repo.capture(Path(worktree), scratch(Path(root)), base,
                             f"{start_message(order, task, serial)}, after workspace_setup")
        repo.set_ref(refname(order, task, "base", prefix=repo.prefix), start)
        # The worktree's HEAD too (its files stay as they are): a start ref deleted later is found there again.
        repo.git("update-ref", "--no-deref", "HEAD", start, cwd=Path(worktree))
        note = carry.resume(Path(root), repo, order, task, int(serial), Path(worktree), list(targets))
        if note:  # (the worker's own output goes to its log)
            print(f"aipm: {note}", flush=True)
    except (WorkspaceError, OSError) as exc:
        print(f"aipm: cannot capture the worktree after workspace_setup: {exc}", flush=True)
        sys.exit(1)


BEFORE_SETUP = ", before workspace_setup"  # the subject's tail of a start a setup still follows


def setup_unfinished(repo: Repo, start: str) -> bool:
    """Whether the attempt whose start commit is `start` never finished its `workspace_setup` (stopped by Ctrl-C
    or a cancel in it, or the setup failed): its command never ran, so nothing in its worktree is the task's work.
    What the setup had written there was kept as the attempt's patch, as if the task had written it."""
    subject = repo.git("log", "-1", "--format=%s", start).decode("utf-8", "surrogateescape").rstrip("\n")
    return subject.endswith(BEFORE_SETUP)


def start_message(order: str, task: str, serial: int | str) -> str:
    """The message of an attempt's start commit: how it is found again in its worktree's history."""
    return f"aipm: start of {order}/{task}, attempt {serial}"
