"""Where a task works: the shared project tree, or a git worktree of its own that is merged back when approved.

The one door between the rest of aipm and git. The launcher asks `prepare` for a task's worktree when it starts
an attempt; the supervisor runs the worker and its review in `directory(...)`, asks `outside_targets` when the
worker ends (the exact scope check) and `merge` when the task is approved, then `remove`s the worktree once the
task's final status is written. `sweep` tidies after crashes; `diff` shows a task's changes. Where each thing
lives is places.py; making the worktree (and its `workspace_setup`) is start.py; capturing an attempt's end is
capture.py, and taking files its worker moved off its start (for that end, and for `diff`) is moved.py; what an
attempt that merged nothing keeps besides its patch, and `diff`, is kept.py; removing and sweeping is cleanup.py;
applying an approved merge is mergeback.py, and the plan it saves first is mergeplan.py; the worktree's own refs and
stash are ownrefs.py, and what a worker left in its stash is stash.py; the git processes a killed owner left on a
worktree are orphans.py.

On disk, under the project's runtime directory:
  .aipm/worktrees/<ORDER>/<TASK>/        the worktree (a detached checkout of the task's start)
  .aipm/merges/<ORDER>/<TASK>/           a merge plan being applied (see mergeplan.py)
  .aipm/patches/<ORDER>/<TASK>.<N>.patch what attempt N changed (`git apply` at the repository's top)
  .aipm/patches/<ORDER>/<TASK>.<N>.rest/ what no patch of it holds (kept.py), and <TASK>.<N>.tangled, the note of
                                         the paths its patch leaves as its start has them (kept.keep_tangled)
  refs/aipm/<ORDER>/<TASK>/{base,end}    the attempt's start and end, as commits no branch points to
                                         (refs/aipm/@<DIR>/... for a project in a directory DIR of its repo)
  <git dir>/worktrees/<ID>/aipm/         the worktree's own refs and stash (see ownrefs.py)

Test seam: AIPM_TEST_KILL_AT=prepare|carry|merge:N|cleanup makes the process that reaches that point SIGKILL
itself (prepare: worktree made, task not yet started; carry: the worker's stash entries stored in the repository's
stash, not yet dropped from its own; merge:N: N files of a merge applied; cleanup: final status written, worktree
not yet removed). Tests use it to prove that a rerun applies every change exactly once.
"""

from __future__ import annotations

from pathlib import Path

from aipm.errors import UserError
from aipm.model import Task, some
from aipm.record import Record
from aipm.runtime import Runtime
from aipm import writtenlog
from aipm.coverage import out_of_scope
from aipm.fields import WORKSPACES
from aipm.settings import Settings
from aipm.workspace.cleanup import finished, note_pending_merge, prune, remove, sweep, sweep_orphans
from aipm.workspace.places import (kept_words, later_patch_path, make_own_dir, merge_dir, patch_path, refname,
                                   relative, seam, worktree_path)
from aipm.workerfiles import append_log, write_stream
from aipm.workspace import carry, ownrefs, stash
from aipm.workspace.capture import capture, capture_end
from aipm.workspace.stash import STASHED
from aipm.workspace.repo import Repo, WorkspaceError
from aipm.workspace.start import (after_setup, directory, prepare, setup_of, setup_unfinished, start_message,
                                  with_setup)
from aipm.workspace.kept import (STAYS, WHOLE, diff, keep_rest, keep_whole, kept_beside, kept_patch, kept_rest,
                                 last_kept, shown_instead, left_out_note, tangled_again)
from aipm.workspace.ignored import IGNORED, NOT_MERGED, ignored_in_targets, keep_ignored, keep_ignored_with

SHARED, WORKTREE = WORKSPACES


class Conflict(Exception):
    """The task's changes cannot be merged: the message says which paths and why (it becomes the feedback)."""

    def __init__(self, message: str, paths: list[str], main_tree: bool = False, lasting: bool = False):
        super().__init__(message)
        self.paths = paths
        self.main_tree = main_tree  # the main tree changed meanwhile (a person's edit), not the attempt's own doing
        self.lasting = lasting  # what no capture holds is in the way (files git ignores): every attempt meets it


class NotCaptured(WorkspaceError):
    """The worker's end state cannot be captured whole (a repository without commits in its worktree): the
    attempt fails, as a try; the message says why, and where its changes are kept."""


class MergeStopped(UserError):
    """A planned merge could not write a path (the message names it); the rest of its plan stays pending. Not a
    WorkspaceError: part of the attempt may be in the main tree, so it is not a merge that wrote nothing."""


__all__ = ["Conflict", "MergeStopped", "NotCaptured", "WorkspaceError", "SHARED", "WORKTREE", "NOT_MERGED", "UNDONE",
           "STASHED", "kind", "prepare", "setup_of",
           "directory", "with_setup", "after_setup", "outside_targets", "keep", "keep_ignored", "merge", "stashed",
           "decided",
           "note_pending_merge", "finished", "keep_before_removal", "remove", "sweep", "sweep_orphans", "prune", "diff",
           "kept_beside", "last_kept", "shown_instead",
           "kept_patch", "kept_rest", "kept_words"]


def kind(task: Task, settings: Settings) -> str:
    """The task's own `workspace:`, else the setting (aipm.yaml < AIPM_WORKSPACE < --workspace)."""
    return task.workspace or settings.workspace


# -- an attempt's life -----------------------------------------------------------------------------------


def outside_targets(root: Path, rec: Record) -> list[str]:
    """The worker ended: record the attempt's end state and patch; the changed paths no target covers.

    The scope is exact: the difference between the attempt's start and end, nothing else. NotCaptured: part of
    the end cannot be captured, so the attempt cannot be merged (the rest is in its patch)."""
    repo, base, end, left_out = capture_end(root, rec)
    if left_out:
        # Not "commit in it": a repository with commits is a submodule to git, whose files are not merged either.
        raise NotCaptured(f"attempt {rec.serial} cannot be merged: {left_out_note(left_out)}; a worker that removes the "
                          ".git of such a repository has its files merged; the rest of its changes are kept in "
                          f"{patch_path(root, rec.order, rec.task, rec.serial)}"
                          + "".join(f"; {note}" for note in stash.left(repo, base, end)))
    changed = {relative(c.path, repo.prefix) for c in repo.changes(base, end)}
    # Its order's task files are aipm's state, whatever the targets cover (`./`): an edit of one is never merged.
    task_files = changed - set(out_of_scope(changed, writtenlog.order_files(root, rec.order_dir)))
    return sorted(set(out_of_scope(changed, rec.targets)) | task_files)


def keep(root: Path, rec: Record, removing: bool = False) -> str:
    """An attempt that failed, timed out, or was cancelled or interrupted: write its changes to its patch, as for
    one sent back, since its worktree goes when the next attempt starts. Returns a line for its log saying where
    they are (`removing`: its worktree is being removed now, so not when it will be)."""
    try:
        repo, base, end, left_out = capture_end(root, rec, strict=False)
    except (WorkspaceError, OSError) as exc:
        return f"the changes of attempt {rec.serial} could not be captured: {exc}{keep_whole(root, rec)}"
    if setup_unfinished(repo, base):  # (nor the ignored files it wrote in the targets: moved to the rest as work)
        return (f"attempt {rec.serial} ended in its workspace_setup, before its command ran: what the setup wrote "
                "is not the task's work, and none of it is kept")
    patch = patch_path(root, rec.order, rec.task, rec.serial)
    notes = stash.left(repo, base, end)
    try:
        # What it wrote in its targets that git ignores: what the task was asked to make, in no patch either
        ignored = dict.fromkeys(ignored_in_targets(repo, rec), IGNORED)
    except WorkspaceError as exc:
        ignored, notes = {}, [*notes, f"ignored files in its targets could not be listed, nor kept: {exc}"]
    keep_rest(root, rec.order, rec.task, rec.serial, Path(rec.workspace), ignored, held=False)
    left_out.update(ignored)
    rest = kept_rest(root, rec)
    also = f"; {left_out_note(left_out)}" if left_out else f"; what no patch can hold is kept in {rest}" if rest else ""
    also += "".join(f"; {note}" for note in notes)
    if not repo.changes(base, end):
        return f"attempt {rec.serial} changed nothing{' a patch can hold' * bool(rest)} in its worktree{also}"
    return (f"the changes of attempt {rec.serial} are kept in {patch} (`git apply` it at the repository's top)"
            + "; its worktree is removed when the next attempt starts or by `aipm recover`" * (not removing) + also)


def keep_before_removal(root: Path, order: str, task: str, repo: Repo) -> list[str]:
    """Before a task's worktree is removed: keep what it holds of its attempt's work that nothing kept yet.

    keep() its changes when no patch of that attempt holds them: every recorded end writes one, but an attempt
    whose record went with the state directory (/tmp emptied by a reboot) was re-queued with no one to capture it.
    And a git repository in it that no patch can hold (made after the end was captured: by its review, by a
    person looking into it) is moved to the attempt's rest. WorkspaceError: one that cannot be moved, so the
    worktree, its only copy, must stay. Returns what it kept, in words (also in the attempt's log): the removal's
    caller says it too (a person's fixes in a kept worktree went to a patch that only the old log named)."""
    tree = worktree_path(root, order, task)
    base = (repo.rev(refname(order, task, "base", prefix=repo.prefix))
            or (tree.is_dir() and ownrefs.head_of(repo, tree)))
    if not base or not tree.is_dir() or setup_unfinished(repo, base):  # (that: nothing in it is the task's work)
        return []
    subject = repo.git("log", "-1", "--format=%s", base).decode("utf-8", "surrogateescape")
    number = subject.removeprefix(start_message(order, task, "")).split(",")[0].strip()
    serial = int(number) if subject.startswith(start_message(order, task, "")) and number.isdigit() else None
    log = Runtime(root).log_path(order, task, serial) if serial is not None else None
    if log is not None and not log.exists():
        return []  # killed before its worker started, maybe half-way through making the worktree: nothing of its own
    if log is not None and not patch_path(root, order, task, serial).exists():
        rec = Record(order, "", task, "", serial, [], str(log), "", "", workspace=str(tree))
        note = keep(root, rec, removing=True)  # (its caller's line says the worktree is removed)
        append_log(str(log), f"no patch of attempt {serial} holds its changes (its end was never recorded, its record "
                             f"gone, or could not be captured); {note}")
        return [note]
    again = [note for note in [tangled_again(root, repo, order, task, serial, str(log))] if note] if log else []
    try:
        now, left_out = capture(repo, root, tree, base, None)
    except WorkspaceError:  # git cannot say what is in it (a path git refuses): all of it is kept
        now, left_out = None, dict.fromkeys(["./"], WHOLE)
    if not left_out:
        later = _keep_later(root, repo, order, task, serial, str(log), now) if now is not None and log else ""
        return again + ([later] if later else [])
    if log is None:
        raise WorkspaceError(f"{tree} holds {some(list(left_out))}, which no patch can hold, and its attempt is "
                             "unknown: move them out of it, then `aipm recover`")
    keep_rest(root, order, task, serial, tree, left_out)
    append_log(str(log), f"before its worktree was removed: {left_out_note(left_out)}")
    if any(STAYS in what for what in left_out.values()):
        raise WorkspaceError(f"{tree} is not removed: {left_out_note(left_out)}")
    return again + [left_out_note(left_out)]


def _keep_later(root: Path, repo: Repo, order: str, task: str, serial: int, log: str, now: str) -> str:
    """What was changed in a kept worktree after its attempt's end was captured (by its review, by a person fixing
    it by hand: `aipm diff` shows it) is in no patch: written to the attempt's later patch before the worktree
    goes, and the next attempt that continues the attempt's work carries it too (carry.py). Returns where, in
    words ("" for nothing)."""
    end = (repo.rev(refname(order, task, "captured", prefix=repo.prefix))  # (its files, where its end was taken
           or repo.rev(refname(order, task, "end", prefix=repo.prefix)))  # onto its start: capture.py)
    if end is None or repo.git("rev-parse", f"{end}^{{tree}}").decode().strip() == now:
        return ""  # no end recorded (a failed capture: its patch says what there is), or nothing changed since
    later = later_patch_path(root, order, task, serial)
    # (written over by a later removal that failed before: the same end, a worktree changed further since)
    write_stream(later, lambda out: repo.write_patch(end, now, out))
    # A review sent the attempt back: its next attempt applies this patch after its own (carry.py), so no one is
    # told to (its log said "`git apply` it after" of a patch already in its worktree).
    carried = carry.carried(Runtime(root), order, task) == serial
    then = (f"the next attempt continues attempt {serial} with it" if carried
            else f"`git apply` it after {patch_path(root, order, task, serial)}")
    note = (f"its worktree held changes made after attempt {serial}'s end (by its review, or by hand), kept in "
            f"{later} ({then})")
    append_log(log, f"before its worktree was removed: {note}")
    return note


def merge(root: Path, rec: Record, last: bool = False) -> list[str]:
    """Apply the approved attempt's changes to the main tree, exactly once. Conflict: nothing applied, unless a
    plan held up by a crash met a person's change it cannot merge with (then the rest of the plan was applied).
    `last`: a conflict rejects the task for good (max_rework reached), so no next attempt follows it.
    Caller holds the launch lock, and the task still holds its target files. Returns notes for the log."""
    from aipm.workspace import mergeback as merging, mergeplan  # (only here and in cleanup: a shared run needs neither)

    repo = Repo(root)
    plan_dir = merge_dir(root, rec.order, rec.task)
    make_own_dir(root, plan_dir.parent)  # a link there: a plan read from, and saved (rm -rf first) where it leads
    notes = []
    if not mergeplan.pending(plan_dir, rec.serial):
        if rec.phase == "review":
            try:
                notes = _reviewed(root, repo, rec)
            except Conflict as exc:
                raise _kept(root, rec, exc, last) from None
        base = repo.rev(refname(rec.order, rec.task, "base", prefix=repo.prefix))
        end = repo.rev(refname(rec.order, rec.task, "end", prefix=repo.prefix))
        if base is None or end is None:
            raise _kept(root, rec, Conflict(f"the start or end of attempt {rec.serial} "
                                            f"({refname(rec.order, rec.task, prefix=repo.prefix)}) is gone; nothing "
                                            "was merged", []), last)
        try:
            steps = merging.plan(repo, base, end, repo.changes(base, end))
        except Conflict as exc:
            raise _kept(root, rec, exc, last) from None
        mergeplan.save(plan_dir, rec.serial, steps)
        del steps  # (every result's content, saved now: not held while the plan is applied)
    seam("merge:0")
    applied = merging.apply(repo.top, plan_dir, after_each=lambda n: seam(f"merge:{n}"))
    # A shared task whose audit is in flight may see these files change once this record is gone.
    writtenlog.note_written(Runtime(root), rec.targets)
    notes += applied.notes
    if applied.conflicts:
        for note in notes:  # what was merged, said before the conflict that sends the attempt back
            append_log(rec.log, f"merge: {note}")
        paths = [path for path, _ in applied.conflicts]
        raise _kept(root, rec, Conflict(
            f"merge conflict in {', '.join(paths)}: the main tree changed there after this attempt's merge was "
            f"planned, and the changes cannot be combined; {applied.steps - len(paths)} of {applied.steps} paths "
            "were merged, these were left as the main tree has them\n"
            + "".join(f"  {path}: {why}\n" for path, why in applied.conflicts), paths, main_tree=True), last)
    return notes + keep_ignored_with(root, repo, rec) + stashed(root, rec)


def stashed(root: Path, rec: Record) -> list[str]:
    """Notes of the attempt's changes its worker stashed (stash.left): moved to the repository's stash, so in no
    merge and no patch of it. Said wherever the attempt's changes are said to be kept or merged."""
    try:
        repo = Repo(root)
        base, end = (repo.rev(refname(rec.order, rec.task, which, prefix=repo.prefix)) for which in ("base", "end"))
        return stash.left(repo, base, end) if base and end else []
    except WorkspaceError as exc:  # (a note beside the outcome, never its failure)
        return [f"the repository's stash could not be read for changes the worker stashed: {exc}"]


def _kept(root: Path, rec: Record, conflict: Conflict, last: bool) -> Conflict:
    """The conflict, saying where the attempt's changes are kept (its worktree goes with the next attempt) and
    whether one follows (`last`: none, the task is rejected; `aipm retry` starts it anew, from the main tree)."""
    ignored = keep_ignored(root, rec)  # (first: the rest it names holds them then)
    kept = kept_words(patch_path(root, rec.order, rec.task, rec.serial), kept_rest(root, rec))
    also = "".join(f"\n{note}" for note in [*ignored, *stashed(root, rec)])
    then = ("no next attempt starts, as each would meet the same" if conflict.lasting else
            "no next attempt starts: the task is rejected, its reworks spent (max_rework)" if last else
            "the next attempt starts from the main tree as it is now")
    return Conflict(f"{conflict}\nThis attempt's changes are kept in {kept}; {then}.{also}", conflict.paths,
                    conflict.main_tree, conflict.lasting)


def _reviewed(root: Path, repo: Repo, rec: Record) -> list[str]:
    """The review ran in the worktree after the end capture, and approved what it left there: capture it again.
    Its edits inside the targets are merged with the task's (as in the shared tree); one outside them sends the
    attempt back. Notes for the log."""
    before = repo.rev(refname(rec.order, rec.task, "end", prefix=repo.prefix))
    if before is None:
        return []  # gone: merge() says so
    _, base, end, left_out = capture_end(root, rec)
    if left_out:
        raise Conflict(f"the review left {left_out_note(left_out)}; nothing of this attempt was merged", list(left_out))
    changed = sorted({relative(c.path, repo.prefix) for c in repo.changes(before, end)})
    outside = out_of_scope(set(changed), rec.targets)
    if outside:
        raise Conflict("scope audit: the review wrote outside target_files: " + ", ".join(outside)
                       + "; nothing of this attempt was merged", outside)
    # Paths the task changed that the review put back as they were (a `git stash`, a `git checkout .` in it): the
    # approved state is merged, but the end capture wrote its patch over the task's, the only copy of its work.
    undone = sorted({relative(c.path, repo.prefix) for c in repo.changes(base, before)}
                    - {relative(c.path, repo.prefix) for c in repo.changes(base, end)})
    changed = [path for path in changed if path not in undone]
    notes = [f"the review changed {', '.join(changed)} in the worktree; merged with the task's changes"
             ] if changed else []
    if undone:
        patch = patch_path(root, rec.order, rec.task, rec.serial)
        write_stream(patch, lambda out: repo.write_patch(base, before, out))
        notes.append(f"{', '.join(undone)}: {UNDONE}; the task's changes are kept in {patch}")
    return notes


UNDONE = "put back as they were by the review, so the task's changes there are not merged"


def decided(root: Path, rec: Record) -> bool:
    """This attempt's merge plan is saved (its owner died applying it): it was approved, and only finishing it
    and writing the final status are left, whatever the options of the run that adopts it."""
    from aipm.workspace import mergeplan

    return mergeplan.pending(merge_dir(root, rec.order, rec.task), rec.serial)
