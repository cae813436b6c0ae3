"""A worktree attempt that its review sent back is continued by the next attempt, not redone.

In the shared tree an attempt's work stays where it was written, and the next attempt reads the review's feedback
beside it. A worktree attempt's work was only in its patch: the next attempt started from the main tree, read
feedback about code it did not have, and could be approved without the work. So when a review sends a worktree
attempt back (mark), the next attempt's worktree is made from the main tree as it is then, with that attempt's
changes applied (its patch, then its later patch: what was changed in its kept worktree after its end, by its
review or by you; keep_before_removal writes it) once its start is captured (after `workspace_setup`, if any), so
that they are the new attempt's own changes: audited, reviewed and merged with it.

Only a review's verdict is carried: a scope audit's or a merge conflict's feedback asks for the work again from the
main tree as it is (docs/workspaces.md), and a failed attempt is a try, not work to build on. `aipm retry` drops the
mark with the feedback, and the task starts anew. Changes that do not apply to the main tree as it is now (edited
there meanwhile) are not carried at all (`git apply` applies all or nothing): the attempt starts from the main tree,
and its log and feedback say so and where the changes are.
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

from aipm.coverage import out_of_scope
from aipm.runtime import Runtime
from aipm.workerfiles import STATE_FILE_MAX, append_log, read_bytes, write_bytes
from aipm.workspace import orphans
from aipm.workspace.places import later_patch_path, patch_path, relative
from aipm.workspace.repo import Repo, WorkspaceError


def mark(rt: Runtime, order: str, task: str, serial: int) -> bool:
    """Attempt `serial` is sent back by its review: the next attempt continues its work. False where the mark
    cannot be written (a full disk, a directory a worker made in its place): the next attempt starts anew."""
    try:
        write_bytes(rt.carry_path(order, task, writing=True), f"{serial}\n".encode())
        return True
    except OSError:
        return False


def unmark(rt: Runtime, order: str, task: str) -> None:
    """The task was sent back for another reason (its scope, a merge conflict): its next attempt starts anew. (What
    cannot be removed, a directory a worker made there, is read as no mark: nothing stops the outcome's record.)"""
    if os.path.lexists(rt.carry_path(order, task)):
        with suppress(OSError):
            rt.carry_path(order, task, writing=True).unlink(missing_ok=True)


def carried(rt: Runtime, order: str, task: str) -> int | None:
    """The attempt whose work the next attempt continues: marked, and the feedback that asks for it still there."""
    if not os.path.isfile(rt.feedback_path(order, task)):
        return None
    try:
        text = read_bytes(rt.carry_path(order, task), 64).decode("ascii", "replace").strip()
    except OSError:  # none (or what a worker put in its place)
        return None
    return int(text) if text.isdecimal() else None


def resume(root: Path, repo: Repo, order: str, task: str, serial: int, tree: Path, targets: list[str],
           check: bool = False) -> str | None:
    """In the new worktree `tree` of attempt `serial` (its start captured), apply the changes of the attempt it
    continues, if any, within its `targets` (what its review or a person left beside them is in the later patch,
    not carried: the new attempt would be sent back for it). Its feedback (the prompt's, AIPM_REVIEW_FEEDBACK)
    says what happened; so does the returned note, for its log. `check`: only say whether they apply (the
    prompt is written before a `workspace_setup` runs, after which they are applied)."""
    rt = Runtime(root)
    earlier = carried(rt, order, task)
    if earlier is None or earlier >= serial:
        return None
    patch, later = patch_path(root, order, task, earlier), later_patch_path(root, order, task, earlier)
    patches = [p for p in (patch, later) if p.is_file() and p.stat().st_size]
    kept = " and ".join(map(str, patches))
    if not patch.is_file():
        note = (f"attempt {earlier}, which its review sent back, left no patch ({patch} is gone): this attempt "
                "starts from the main tree")
    elif not patches:
        note = f"attempt {earlier}, which its review sent back, changed nothing: this attempt starts from the main tree"
    else:
        try:
            outside = _outside(repo, patches, targets, tree)
            with orphans.marked(root, tree) as env:
                repo.git("apply", "--whitespace=nowarn", *(["--check"] if check else []),
                         *(f"--exclude={_literal(path)}" for path in outside), *map(str, patches), cwd=tree, env=env)
        except WorkspaceError as exc:
            note = (f"the changes of attempt {earlier}, which its review sent back, do not apply to the main tree as "
                    f"it is now ({exc}): this attempt starts from the main tree; they are kept in {kept}")
        else:
            note = (f"this attempt continues attempt {earlier}, which its review sent back: its changes ({kept}) "
                    + ("are applied in this worktree once its workspace_setup has run" if check
                       else "are in this worktree")
                    + (f", but for what is outside its target files: {', '.join(outside)}" if outside else ""))
    _tell(rt, order, task, note)
    return note


_notes: dict[str, str] = {}  # a start's log → what its carry came to, logged once the start is made


def hold_note(log: str, note: str | None) -> None:
    """Keep the note for the log of a start being made: written at once, the log of a start that was then rolled
    back, or killed, made the attempt look run (keep_before_removal)."""
    if note:
        _notes[log] = note


def log_note(log: str, keep: bool = True) -> None:
    """The start is made (`keep`): its log says what its carry came to. Else (rolled back) the note goes."""
    note = _notes.pop(log, None)
    if note and keep:
        append_log(log, note)


def _outside(repo: Repo, patches: list[Path], targets: list[str], tree: Path) -> list[str]:
    """The paths (from the repository's top) the patches change that no target covers."""
    listed = repo.git("apply", "--numstat", "-z", *map(str, patches), cwd=tree).decode("utf-8", "surrogateescape")
    # -z: "added\tdeleted\tpath\0" a line ("added\tdeleted\t\0old\0new\0" for a rename, which --no-renames leaves out)
    paths = {entry.split("\t", 2)[2] for entry in listed.split("\0") if entry.count("\t") >= 2}
    return sorted(path for path in paths if out_of_scope({relative(path, repo.prefix)}, targets))


def _literal(path: str) -> str:
    """A path as a pattern of `git apply --exclude` that matches it alone."""
    return "".join("\\" + c if c in "*?[\\" else c for c in path)


def _tell(rt: Runtime, order: str, task: str, note: str) -> None:
    """Add the note to the feedback the worker reads (once: a start rolled back and made again says it again)."""
    path = rt.feedback_path(order, task)
    line = f"\naipm: {note}\n".encode(errors="surrogateescape")
    try:
        feedback = read_bytes(path, STATE_FILE_MAX)
        if line not in feedback:
            write_bytes(rt.feedback_path(order, task, writing=True), feedback.rstrip(b"\n") + b"\n" + line)
    except OSError:
        pass  # (the log says it)
