"""`aipm diff TASK`: what a worktree task changed (its running or kept worktree, else its last attempt's patch)."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import BinaryIO

from aipm.cli.decl import Argument, command

from aipm import workspace
from aipm.cli.common import copy_out, get_project, json_option, print_json_text
from aipm.errors import UserError
from aipm.workerfiles import reading
from aipm.project import find_task
from aipm.store import own_task


@command()
def diff(
    task: str = Argument(..., help="Task id, ORDER/TASK, or path to the task file."),
    json_out: bool = json_option("the bare patch", "{order, task, source, also_kept, patch} as JSON"),
) -> None:
    """Show a worktree task's changes as a patch (apply it with `git apply` at the repository's top).

    A running task (or one whose failed attempt's worktree is kept) shows its worktree against the attempt's
    start (a worktree its worker moved off its start, by `git checkout` or `git reset --hard`, as its merge would
    take it: its changes since it left the start's history, so that the diff does not undo your uncommitted edits);
    a finished one shows the patch of its last attempt that has one, kept in .aipm/patches/ (one stopped in its
    workspace_setup has none), naming it when a later attempt has none. With no changes to show it prints no patch
    and exits 0, saying why on stderr.
    """
    project = get_project()
    order_dir, task_id = find_task(project, task)
    # Its own file and order.yaml only (as `cancel`): a sibling's file saved invalid mid-run hid this task's diff.
    order_id = own_task(order_dir, task_id, project.root)[0]
    source, patch, notes = workspace.diff(project.root, order_id, task_id)
    for note in notes:  # (a worktree its worker moved off its start: what is shown, and why; --json too)
        print(f"aipm: {order_id}/{task_id}: {note}", file=sys.stderr)
    # (the last attempt's patch alone: what else is kept of it is named, not left for its log to tell)
    beside = workspace.kept_beside(project.root, order_id, task_id, patch) if isinstance(patch, Path) else []
    instead = workspace.shown_instead(project.root, order_id, task_id, patch) if isinstance(patch, Path) else None
    if not json_out:
        if instead:
            print(f"aipm: {order_id}/{task_id}: {instead}", file=sys.stderr)
        for note in beside:
            print(f"aipm: {order_id}/{task_id}: also {note}", file=sys.stderr)
    with _opened(patch) as handle:
        if json_out:
            print_json_text({"order": order_id, "task": task_id, "source": source, "also_kept": beside}, "patch",
                            handle)
            return
        empty = os.fstat(handle.fileno()).st_size == 0 if isinstance(patch, Path) else not patch
        if empty:  # else nothing at all is printed, which reads as diff itself failing
            # None recorded is nothing to show too (a task not run yet), not a usage error (exit 2): workspaces.md.
            what = ("none recorded; only an attempt that ran its command with workspace: worktree has one"
                    if source is None else
                    f"its worktree ({source[len('worktree '):]}) has none against its attempt's start"
                    if source.startswith("worktree ") else f"its last attempt changed nothing ({source} is empty)")
            print(f"aipm: {order_id}/{task_id}: no changes to show: {what}", file=sys.stderr)
            return
        copy_out(handle)


def _opened(patch: bytes | Path) -> BinaryIO:
    """The patch to copy out: git's output as it is, or a kept patch's file (a FIFO a worker left there is not
    waited on)."""
    if not isinstance(patch, Path):
        return io.BytesIO(patch)
    try:
        return reading(patch)
    except OSError as exc:
        raise UserError(f"cannot read the patch {patch}: {exc.strerror}") from None
