"""A person steering a run: cancel a task (stop its worker's whole process group) or retry it.

`aipm cancel`, `aipm retry` and the web dashboard's buttons call these, so they behave alike.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from aipm import outcome, subreaper, workspace, writtenlog
from aipm.agents import can_resume, session_agent
from aipm.errors import Unwritable, UserError
from aipm.liveness import LOOK_AFTER, how_to_go_on
from aipm.recovery import (end_remnants, forget, in_review, interrupt, outcome_left, settle_cancelled,
                            unrecorded, usage_left)
from aipm.restore import disowned, restore
from aipm.starting import cleared_reason
from aipm.model import RUNNING, Status, Task
from aipm.project import Project
from aipm.runner import terminate_group
from aipm.record import Record, same_attempt
from aipm.runtime import Runtime, StateWriteError, exit_file_written, read_exit_file
from aipm.workerfiles import append_log, write_bytes
from aipm.settings import Settings
from aipm.store import load_task, order_meta, own_task
from aipm.writer import StaleWrite, now, update_task
from aipm.worker import agent_for


@dataclass
class Cancelled:
    """What the person must know besides that the task is CANCELLED."""

    merge: str | None = None  # the task's merge cut short: the tree is half-merged
    held_by: int = 0  # the pid of a stopped owner (Ctrl-Z) that records the worker's end only once it goes on
    # The patch that keeps a worktree attempt's changes: its worktree goes with the next attempt or a recover, and
    # the log alone said where its work was
    kept: Path | None = None
    rest: Path | None = None  # and what no patch can hold (a repository made in the worktree)
    # How the attempt had ended, its owner dead before recording it: what `recover` would have recorded, which the
    # cancel replaces (kept in the file's exit_code and the log; dropped without a word, it was lost)
    ended: str | None = None
    unstarted: bool = False  # that owner was yet to start the worker: it records the cancel instead

    def kept_note(self) -> str | None:
        if not self.kept and not self.rest:
            return None
        return f"the changes of its attempt are kept in {workspace.kept_words(self.kept, self.rest)}" + (
            " (`git apply` the patch at the repository's top)" if self.kept else "")

    def notes(self) -> list[str]:
        held = self.held_by and held_note(self.held_by, self.unstarted)
        return [note for note in (self.ended, self.merge, self.kept_note(), held) if note]


def held_note(owner: int, unstarted: bool = False) -> str:
    if unstarted:
        return (f"its worker had not started; its owner records the cancel and starts none (aipm pid {owner}), "
                f"{how_to_go_on(owner)}; a retry waits for it")
    return (f"its worker has ended; its owner records that end (aipm pid {owner}), {how_to_go_on(owner)}; a retry "
            "waits for it")


def cancel(project: Project, order_dir: Path, task_id: str, grace: float = 5.0) -> Cancelled:
    """Mark the task CANCELLED, then stop its worker's group (SIGTERM, SIGKILL after `grace` seconds). A task
    already CANCELLED whose worker still runs (its first cancel was cut short) only has its worker stopped."""
    rt = Runtime(project.root)
    path = order_dir / f"{task_id}.yaml"
    current, order_id = _read(project, order_dir, path)  # bad input is refused before the lock makes .aipm/
    if rt.read_record(order_id, task_id) is None and current.status not in (*RUNNING, *CANCELLABLE):
        raise UserError(f"{path}: status: {current.status} cannot be cancelled")
    with rt.launch_lock():
        current = load_task(path, project.root)
        # Only order.yaml is read for the id: a sibling task file half-edited must not stop a cancel.
        order_id = order_meta(order_dir)[0]
        rec = rt.read_record(order_id, task_id)
        live = rec is not None and rec.pid and rec.worker_alive()
        again = current.status == Status.CANCELLED and live and rt.cancelled(rec)  # a cancel cut short
        if live and not again and disowned(current, rec, rt):  # its file rewritten under it (by the worker, say):
            current = restore(current, rec, project.root)  # the live worker is what is cancelled, as aipm knows it
        if not again and current.status not in (*RUNNING, *CANCELLABLE):
            raise UserError(f"{path}: status: {current.status} cannot be cancelled")
        if rec is not None:  # first: a cancel cut short after its write is still the user's
            try:
                rt.mark_cancelled(rec)
            except StateWriteError as exc:  # unmarked, a CANCELLED would be taken for the worker's own write
                raise _unmarkable(task_id, exc) from None
        ended = None if live or rec is None or rec.owner_alive() else _ended_unrecorded(current, rec, rt)
        if not again:
            try:
                update_task(path, {"status": Status.CANCELLED, "finished_at": now(), "reason": outcome.cancelled(),
                                   **({"exit_code": ended[0]} if ended and rec.phase == "work" else {})},
                            expect=current.status)
            except BaseException as exc:
                # Not written (a full disk, a worker's write first, Ctrl-C): its mark would have the attempt's own
                # end recorded as this cancel, which the user is told failed.
                if rec is not None and _not_cancelled(path, project):
                    rt.unmark_cancelled(rec)
                if isinstance(exc, OSError):
                    raise Unwritable(f"cannot cancel {task_id}: {path}: {exc.strerror}; nothing was changed (make "
                                     "room and cancel again)") from None
                raise
            writtenlog.note_order(rt, order_dir)  # not a worker's write
            if ended:
                append_log(rec.log, ended[1])
    if live:
        append_log(rec.log, "cancelled by the user: stopping the process group")
        terminate_group(rec.pgid, rec.pid, grace)
    if rec is not None and rec.pid and not rec.owner_alive():
        # No owner ends what the attempt left: its command, when only its wrapper died (`pkill -9 -f aipm`), and
        # what left the group (a `setsid` daemon). Recovery passes a CANCELLED task by, so they would run on,
        # holding its files, for ever. Found by the attempt's marker, as recovery finds a lost attempt's.
        end_remnants(rt, rec)
        _settle_unowned(rt, path, rec)
    held = None
    if live or (rec is not None and rec.owner_alive()):  # a worker that ended just before: its owner records it
        held = _until_released(rt, order_id, task_id, grace + 5)
    return Cancelled(workspace.note_pending_merge(project.root, order_id, task_id, "cancelled"),
                     held.owner_pid if held else 0, workspace.kept_patch(project.root, rec) if rec else None,
                     workspace.kept_rest(project.root, rec) if rec else None, ended[1] if ended else None,
                     bool(held and not held.pid))


def _ended_unrecorded(task: Task, rec: Record, rt: Runtime) -> tuple[int | None, str] | None:
    """The exit code its wrapper left for an attempt (or review) that ended after its owner died, and the line
    that says what the cancel does with it; None when it left none (lost without a trace: nothing to drop).
    `recover` would have recorded it (outcome_left: it adopts the attempt); the cancel stands instead."""
    if task.status not in RUNNING or not outcome_left(task, rec, rt):
        return None
    code, ended = _ended_words(rec)
    kept = f"exit_code {code} kept in its task file" if rec.phase == "work" and code is not None else "not recorded"
    return code, f"{ended}; cancelled by the user instead ({kept})"


def _ended_words(rec: Record) -> tuple[int | None, str]:
    """The exit code its wrapper left for an attempt (or review) that ended after its owner died, and the words
    for that end, which a cancel or retry replaces."""
    code = read_exit_file(rec.exit_file)
    how = f"exit {code}" if code is not None else "its exit code lost"
    what = "its review" if rec.phase == "review" else f"attempt {rec.serial}"
    if rec.unwritten:  # its owner lived, and handed the outcome over
        return code, f"{what} had ended ({how}); its owner could not record it ({rec.unwritten})"
    return code, f"{what} had ended ({how}) after its owner died, before that was recorded"


def _unmarkable(task_id: str, exc: StateWriteError) -> Unwritable:
    return Unwritable(f"cannot cancel {task_id}: {exc.filename}: {exc.strerror}; nothing was changed (make room in "
                      "the state directory and cancel again)")


def _not_cancelled(path: Path, project: Project) -> bool:
    try:
        return load_task(path, project.root).status != Status.CANCELLED
    except (UserError, OSError):
        return True  # (gone or broken: no CANCELLED of ours in it)


def cancel_fileless(project: Project, arg: str, grace: float = 5.0) -> Record | None:
    """Stop the live worker of `arg` (TASK or ORDER/TASK) whose task file is gone (deleted or moved while it
    ran: nothing to mark CANCELLED, yet its worker runs on, holding its files). None when no such worker is known
    by that name, or its file is there (cancel() is for that)."""
    task = arg.rpartition("/")[2]
    rt = Runtime(project.root)
    if not any(_names(project, arg, rec) for rec in rt.records()):  # (read without the lock, which makes .aipm/)
        return None  # no worker of that name: a mistyped `aipm cancel` made the runtime directory, and nothing else
    with rt.launch_lock():
        found = [rec for rec in rt.records() if _names(project, arg, rec) and rec.pid and rec.worker_alive()]
        if len(found) != 1 or os.path.lexists(found[0].task_file):
            return None
        rec = found[0]
        try:
            rt.mark_cancelled(rec)  # its owner records the end as the user's, not as a failure
        except StateWriteError as exc:
            raise _unmarkable(task, exc) from None
    append_log(rec.log, "cancelled by the user (its task file is gone): stopping the process group")
    terminate_group(rec.pgid, rec.pid, grace)
    if rec.owner_alive():
        _until_released(rt, rec.order, rec.task, grace + 5)
    else:  # what left its group ended too; the record stays, for recovery to write the cancel once the file is back
        end_remnants(rt, rec)
    return rec


def _names(project: Project, arg: str, rec: Record) -> bool:
    """`arg` names the attempt's task in any form find_task takes: TASK, ORDER/TASK (an order's id, or the path of
    its directory) or the path of the task file (an order's path, or the file's, named only its id: refused)."""
    if arg.endswith(".yaml"):
        return os.path.realpath(arg) == os.path.realpath(rec.task_file)
    order, _, task = arg.rpartition("/")
    if task != rec.task:
        return False
    if order in ("", rec.order):
        return True
    try:
        # (empty_ok: the order's task files may all be gone while its worker runs)
        return os.path.realpath(project.order_dir(order, empty_ok=True)) == os.path.realpath(rec.order_dir)
    except UserError:
        return False


def _settle_unowned(rt: Runtime, path: Path, rec: Record) -> None:
    """What an owner does when its cancelled worker ends, for an attempt whose owner is dead: its agent's usage
    added, a worktree attempt's changes kept, the record dropped. Left, the record of a dead worker outlived the
    task (recovery passes a CANCELLED task by): `aipm ps` said it was stale, `aipm recover` had nothing to do, and
    `aipm logs -f` followed it for ever."""
    with rt.launch_lock():
        now_rec = rt.read_record(rec.order, rec.task)
        if now_rec is None or now_rec.serial != rec.serial or now_rec.alive() or not rt.cancelled(now_rec):
            return  # gone already, another attempt's, adopted meanwhile, or not this cancel's
        try:
            task = load_task(path, rt.root)
        except (UserError, OSError):
            return  # broken meanwhile: recovery sees to it once it is fixed
        if task.status != Status.CANCELLED or not same_attempt(task, now_rec):
            return
        try:  # as the owner would
            settle_cancelled(rt, now_rec, task, lambda t, spent: update_task(path, spent, expect=Status.CANCELLED))
        except (StaleWrite, UserError, OSError):
            return  # the record stays: usage_left() has recovery add it
        append_log(now_rec.log, f"attempt {now_rec.serial} cancelled by the user after its owner died: ended")
        forget(rt, now_rec)
        rt.unmark_cancelled(now_rec)


def _resumable(path: Path, task: Task, settings: Settings, rt: Runtime, order_id: str) -> None:
    agent = agent_for(task, settings)
    if not can_resume(agent):
        raise UserError(f"{path}: agent: {agent} cannot resume a session; retry without --resume")
    if not task.session_id:
        raise UserError(f"{path}: session_id: no agent session recorded yet; retry without --resume")
    logs = rt.logs(order_id, task.id)
    made_by = session_agent((logs[n] for n in sorted(logs, reverse=True)), task.session_id)
    if made_by is not None and made_by != agent:  # (codex given claude's session fails its attempt)
        raise UserError(f"{path}: session_id: {task.session_id} is a session of {made_by}, and the task's agent is "
                        f"now {agent}; retry without --resume (or make its agent {made_by} again)")


CANCELLABLE = (Status.QUEUED, Status.REWORK, Status.INTERRUPTED)  # besides the running ones


def _read(project: Project, order_dir: Path, path: Path) -> tuple[Task, str]:
    """The task and its order's id, read to refuse bad input (UserError) before anything is written."""
    order_id, task = own_task(order_dir, path.stem, project.root)
    return task, order_id


def _lost_work(root: Path, task: Task, rec: Record | None) -> str | None:
    """For a running task no live worker or owner holds (the caller saw to that): what its lost attempt came to,
    for the log ("" when nothing is known of it), if a retry may recover it as `recover` would; None when only
    `recover` may: no record says the attempt is over (removed with the state directory while its worker may run
    on, or never written: a person's IN_PROGRESS by hand), a review to run again, a record of another attempt, or
    its command still running with its wrapper dead, holding its files until recover ends it."""
    if rec is None:
        return None
    if rec.phase != "work" or not same_attempt(task, rec) or subreaper.marked(subreaper.attempt_marker(root, rec)):
        return None
    return f"{_ended_words(rec)[1]}; retried by the user instead" if exit_file_written(rec.exit_file) else ""


def _until_released(rt: Runtime, order_id: str, task_id: str, limit: float) -> Record | None:
    """Wait (bounded) for the owner to see its worker end and drop the record, so that a `retry` right after a
    cancel is not refused as still running. An owner stopped (Ctrl-Z) records nothing until it goes on: its record
    is returned once the wait has been long (the cancel waited out its whole bound for it, in silence)."""
    start = time.monotonic()
    while time.monotonic() < start + limit:
        rec = rt.read_record(order_id, task_id)
        if rec is None or not rec.alive():
            return None
        if time.monotonic() > start + LOOK_AFTER and rec.held_by_stopped_owner():
            return rec
        time.sleep(0.05)
    return None


def retry(project: Project, order_dir: Path, task_id: str, resume_with: Settings | None = None,
          said: list[str] | None = None) -> Task:
    """Put a finished, failed, rejected or cancelled task back to QUEUED, as new: attempts, reworks, preemptions,
    times, exit code and reason cleared, the old review feedback dropped; and one whose worker was lost with its
    owner (shown INTERRUPTED), recovered first. With `resume_with` (the settings), the next attempt continues the
    agent's recorded session. Returns the task as it was; what the person must know besides goes to `said`."""
    said = [] if said is None else said
    path = order_dir / f"{task_id}.yaml"
    rt = Runtime(project.root)
    current, order_id = _read(project, order_dir, path)  # bad input is refused before the lock makes .aipm/
    if resume_with is not None:
        _resumable(path, current, resume_with, rt, order_id)
    with rt.launch_lock():
        current = load_task(path, project.root)
        order_id = order_meta(order_dir)[0]  # as for cancel: a broken sibling is no reason to refuse
        rec = rt.read_record(order_id, task_id)
        live = rec is not None and rec.alive()
        if current.status in RUNNING:
            if live:
                raise UserError(f"{path}: status: {current.status}; it is running (cancel it first)")
            lost = _lost_work(project.root, current, rec)
            if lost is None:
                review = rec is not None and in_review(current, rec)
                then = "runs its review again" if review else "puts it back in the queue"
                raise UserError(f"{path}: status: {current.status}, but no worker runs it (stale); "
                                f"`aipm recover {order_id}` {then}")
            # What `recover` does with a lost attempt: what it cost added, a worktree's changes kept, its record
            # dropped, the task QUEUED; and what it had come to said (recover would have recorded that, and the
            # retry replaces it). Then the retry's own write below, as for any retried task.
            if lost:
                append_log(rec.log, lost)
                said.append(lost)
            current = interrupt(rt, current, rec, "worker gone (retried by the user)")
            rec = None
        if live:
            if not rec.worker_alive():  # its owner records the end that it has come to: a moment, unless stopped
                held = f", {how_to_go_on(rec.owner_pid)}" if rec.held_by_stopped_owner() else ""
                doing = "its worker is about to start" if rec.starting() else "its attempt's end is being recorded"
                raise UserError(f"{path}: status: {current.status}, but {doing} (by aipm pid {rec.owner_pid}){held}; "
                                "retry it once that is done")
            raise UserError(f"{path}: status: {current.status}, but its worker pid {rec.pid} is still "
                            "running; wait for it to end (or cancel it)")
        if rec is not None:
            if unrecorded(current, rec, rt):
                raise UserError(f"{path}: status: {current.status}, but attempt {rec.attempt} ended after the "
                                f"file was put back and was never recorded; `aipm recover {order_id}` records it")
            if usage_left(current, rec):
                raise UserError(f"{path}: status: {current.status}, but attempt {rec.attempt} was cancelled and its "
                                f"supervisor died before recording its usage; `aipm recover {order_id}` records it")
            forget(rt, rec)  # left by an owner killed after its final write: the file has it
        marker = None
        if resume_with is not None:
            _resumable(path, current, resume_with, rt, order_id)
            marker = rt.resume_path(order_id, task_id)
            write_bytes(marker, (current.session_id + "\n").encode())  # (not opened through a worker's link)
        fresh = {"status": Status.QUEUED, "attempts": 0, "reworks": 0, "started_at": None, "finished_at": None,
                 "exit_code": None, "preemptions": 0, **cleared_reason(current)}
        # Only what differs: a task that never ran gets no lines of nulls and zeros in its versioned file.
        changes = {key: value for key, value in fresh.items() if getattr(current, key) != value}
        try:
            if changes:
                update_task(path, changes, expect=current.status)
        except StaleWrite as exc:
            if marker is not None:
                marker.unlink(missing_ok=True)
            raise UserError(f"{path}: status: {exc}") from None
        writtenlog.note_order(rt, order_dir)  # not a worker's write
        rt.drop_feedback(order_id, task_id)
        # A merge decided and cut short (its owner killed mid-way) is finished by the next attempt's start: said,
        # or the retried task's old work reached the main tree unasked.
        merge = workspace.note_pending_merge(project.root, order_id, task_id, "retried")
        if merge:
            said.append(merge)
    return current
