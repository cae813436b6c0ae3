"""Repairing an order whose owners are gone, and putting a task back in the queue.

A worker that is still alive, or that left its exit code, is adopted so its real outcome is recorded; a reviewer
stopped or lost without a verdict is adopted to run the review again; a worker lost without a trace is INTERRUPTED,
then QUEUED (see docs/locks-review-recovery.md). Callers hold the launch lock.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from aipm import agents, cluster, confine, outcome, ownoutput, runner, spending, subreaper, workspace, writtenlog
from aipm.errors import UserError, said
from aipm.finish import review_command, rework_limit
from aipm.model import RUNNING, Order, Status, Task, definition
from aipm.lostreviews import as_review, cannot_review, in_review, review_unrecorded
from aipm.record import Record, same_attempt
from aipm.runtime import Runtime, exit_file_written, read_exit_file
from aipm.paths import as_path
from aipm.store import load_task
from aipm.workerfiles import append_log
from aipm.writer import StaleWrite, now, update_task

if TYPE_CHECKING:
    from aipm.launcher import Launcher
    from aipm.starting import Owner


def as_recovered(order: Order, rt: Runtime) -> Order:
    """The order with each INTERRUPTED task whose attempt's record is left QUEUED, as recover_order leaves it (a
    re-queue between its two writes: its owner died there, or is there now): no dead end for what waits on it
    (`logs X -f` of a dependant said `can never run`, `why X` too, and the next run went on with both)."""
    requeued = {}
    for tid, task in order.tasks.items():
        if task.status == Status.INTERRUPTED:
            rec = rt.read_record(order.id, tid)
            if rec is not None and rec.attempt == task.attempts:
                requeued[tid] = replace(task, status=Status.QUEUED)
    return replace(order, tasks={**order.tasks, **requeued}) if requeued else order


def recover_order(launcher: Launcher, order: Order, adopt: Owner | None = None,
                  only: Collection[str] | None = None) -> list[dict]:
    """Repair running tasks whose owner is gone. Caller holds the launch lock.

    A worker that is still alive, or that left its exit code, is adopted (by `adopt`, or by a new detached
    owner) so its real outcome is recorded; a worker lost without a trace is INTERRUPTED, then QUEUED. With
    `only` (exec's task), `adopt` takes only those: it ends with them, and would leave any other unrecorded.
    """
    out = []
    remove_temp_files(Path(order.path))
    workspace.sweep(launcher.project.root, order)
    records = {rec.task: rec for rec in launcher.runtime.records() if rec.order == order.id}
    for task in order.tasks.values():
        rec = records.get(task.id)
        if task.status == Status.REWORK and (rec is None or (rec.attempt == task.attempts and not rec.alive())):
            if rec is not None or not subreaper.task_runs(launcher.runtime.root, order.id, task.id):
                out.append({"id": task.id, "action": _rework_on(launcher, task, rec), **kept(launcher.runtime, rec)})
            continue
        # A live worker is adopted whatever its file says now (an agent's `git checkout` may have reset it), and so
        # is one that ended under such a reset: its outcome was never written. INTERRUPTED with its record left:
        # a re-queue (interrupt) killed between its two writes.
        stuck = task.status == Status.INTERRUPTED and rec is not None and rec.attempt == task.attempts
        if task.status not in RUNNING and not stuck and not (
            rec is not None
            and (rec.worker_alive() or unrecorded(task, rec, launcher.runtime) or usage_left(task, rec))
        ):
            continue
        if rec is not None and rec.owner_alive():
            continue
        if rec is not None and not rec.worker_alive() and not same_task(task, rec):  # (a live one: its owner's end)
            line = discard(launcher.runtime, rec, read_exit_file(rec.exit_file), another_task(task))
            out.append({"id": task.id, "action": "discarded", "detail": line, **kept(launcher.runtime, rec)})
            forget(launcher.runtime, rec)
            continue
        if rec is None and subreaper.task_runs(launcher.runtime.root, order.id, task.id):
            # Its record was deleted (a worker removed the state directory), not its worker: re-queued, it would
            # run twice at once. Its owner, if alive, writes the record again; else it is recovered once it ends.
            out.append({"id": task.id, "action": "left running: its worker runs without a record"})
            continue
        if rec is not None and review_unrecorded(task, rec):
            as_review(rec, task)  # and so adopted below, as a review lost without a verdict
        # An exit file, even an empty one (the worker ended; its code may be lost), goes to an owner to decide.
        # A worker its owner was stopping (Record.stopping) left no outcome of its own: re-queued below once it ended.
        again = rec is not None and in_review(task, rec) and not rec.worker_alive() and (
            rec.stopping or not exit_file_written(rec.exit_file))  # no verdict: the review is asked again
        if again and cannot_review(rec):
            again = False
        if rec is not None and (again or rec.worker_alive() or outcome_left(task, rec, launcher.runtime)
                                or usage_left(task, rec)):
            rec.borrowed = ""  # its exec is gone and the worker that lent it a slot went on: it takes its own
            try:
                if adopt is not None and not rec.encloses_us() and (only is None or task.id in only):
                    adopt.adopt(rec)  # else a detached owner: we cannot wait for it, or will not
                else:
                    launcher.spawn_detached(rec, adopt=True)  # (it tries again itself, under the lock)
                    # what we print meanwhile (`aipm recover > recover.log`) is aipm's too, though its owner's audit
                    # runs in another session
                    rec.own_output = ownoutput.with_ours(rec.own_output, launcher.project.root)
                    launcher.runtime.write_record(rec)
            except OSError as exc:  # a full state directory, or its log unusable: the record still names the dead
                # owner; tried again
                out.append({"id": task.id, "action": "not adopted", "error": f"cannot adopt its worker: {said(exc)}"})
                continue
            reviewing = review_command(task, launcher.settings, launcher.options.no_review, rec) is not None
            out.append({"id": task.id, "action": "adopted" if not again else "its review runs again" if reviewing
                        else "its work is kept, unreviewed (no review command now)",
                        # its end is only to be recorded: `aipm recover` waits for that and says what it was
                        **({"ended": {"attempt": rec.serial, "phase": rec.phase,
                                      "exit_code": read_exit_file(rec.exit_file), "attempts": rec.attempt,
                                      "started_at": rec.started_at, "record": rec}}
                           if not again and not rec.worker_alive() else {})})
            continue
        if rec is None and cancelled_while_gone(launcher.runtime, order.id, task):
            out.append({"id": task.id, "action": _cancel_returned(launcher.runtime, order.id, task)})
            continue
        if rec is not None:
            end_remnants(launcher.runtime, rec)  # its wrapper is gone, but its command may not be
        interrupt(launcher.runtime, task, rec, rec.stopping if rec is not None and rec.stopping else "worker gone")
        out.append({"id": task.id, "action": "requeued", **kept(launcher.runtime, rec)})
    launcher.runtime.remove_spent_exit_files(order.id)
    return out


def kept(rt: Runtime, rec: Record | None) -> dict:
    """For a recovery's line: the patch that keeps the work of a worktree attempt it ended without merging, and
    where what no patch can hold is kept (`kept`, `kept_rest`: its worktree goes at the next attempt's start, or by
    `aipm recover`'s sweep; the log alone said where)."""
    if rec is None:
        return {}
    found = {"kept": workspace.kept_patch(rt.root, rec), "kept_rest": workspace.kept_rest(rt.root, rec)}
    return {key: str(path) for key, path in found.items() if path}


def as_event(item: dict) -> dict:
    """`kept` and `kept_rest` of a recovery's item as a run's events have them (task -> path, as for the tasks a stop
    re-queued)."""
    return {key: {item["id"]: item[key]} for key in ("kept", "kept_rest") if key in item}


def _rework_on(launcher: Launcher, task: Task, rec: Record | None) -> str:
    """A rejected review is two writes, REWORK then QUEUED (REJECTED past max_rework): its owner died between
    them, so the task sat in REWORK, which nothing runs. The second is written now, as the owner would have."""
    final = Status.REJECTED if task.reworks > rework_limit(task, launcher.settings) else Status.QUEUED
    # (REJECTED puts back the count REWORK raised, as finish.after_review does: it sent the task to no attempt)
    again = {"reworks": task.reworks - 1} if final == Status.REJECTED else {}
    try:
        update_task(Path(task.path), {"status": final, **again}, expect=Status.REWORK)
    except (StaleWrite, UserError, OSError) as exc:
        return f"left in REWORK: {exc}"
    if rec is not None:
        append_log(rec.log, f"review sent the task back; its owner was gone before the task went on: {final}")
        confine.tidy(rec.log, rec.confined)
        forget(launcher.runtime, rec)
    return "requeued" if final == Status.QUEUED else "rejected"


def cancelled_while_gone(rt: Runtime, order: str, task: Task) -> bool:
    """The file holds the attempt that `aipm cancel` stopped while the file was gone, its record dropped since
    (drop_gone kept the cancel): the next recovery writes CANCELLED."""
    return rt.kept_cancel(order, task.id) == f"{task.attempts} {task.started_at}"


def _cancel_returned(rt: Runtime, order: str, task: Task) -> str:
    """The file of an attempt cancelled while it was gone is back as that attempt left it, its record dropped by a
    recovery meanwhile (drop_gone): the user's cancel is written now. Re-queued, the task ran again."""
    try:
        update_task(Path(task.path), {"status": Status.CANCELLED, "finished_at": now(),
                                      "reason": outcome.cancelled()}, expect=task.status)
    except (StaleWrite, UserError, OSError) as exc:
        return f"left {task.status}: cannot write its cancel: {exc}"
    rt.drop_kept_cancel(order, task.id)
    return "cancelled (its task file is back; it was cancelled while gone)"


def read_lost_usage_ahead(rt: Runtime) -> None:
    """Before a recovery takes the launch lock: read the usage of the agent attempts it may re-queue (owner and
    worker both gone), which it adds to their tasks (agents.read_ahead)."""
    for rec in rt.records():
        if agents.is_preset(rec.agent) and rec.phase == "work" and rec.pid and not rec.alive():
            agents.read_ahead(rec.agent, rec.log, rec.metered)


def outcome_left(task: Task, rec: Record, rt: Runtime) -> bool:
    """The attempt's worker ended and got as far as its exit file (its code may be lost): an owner records that
    outcome. Not so for a worker its owner was stopping: it is re-queued."""
    return (not rec.stopping and (rec.attempt == task.attempts or unrecorded(task, rec, rt))
            and exit_file_written(rec.exit_file))


def usage_left(task: Task, rec: Record) -> bool:
    """The agent attempt was cancelled and its owner died before adding its usage (it was dead at the cancel, or
    died right after): the file holds the usage totals of the attempt's start (an owner adds the attempt's usage,
    then removes the record), so an owner adopts it to add them."""
    return (task.status == Status.CANCELLED and rec.phase == "work" and bool(rec.pid) and agents.is_preset(rec.agent)
            and same_attempt(task, rec)
            and (task.cost_usd, task.tokens, task.cost_unreported_usd)
            == (rec.counters.get("cost_usd"), rec.counters.get("tokens"), rec.counters.get("cost_unreported_usd")))


def unrecorded(task: Task, rec: Record, rt: Runtime) -> bool:
    """The file, no longer running, is not this attempt's outcome: it was put back under it (an agent's `git
    checkout`, `git stash`) or its worker wrote a status there itself, so whatever the attempt came to was never
    written. An outcome written for it keeps its number
    and its start time; a version from before it (even one with a higher count, before a `retry`) does not. A
    later attempt would have replaced the record (one per task), and a re-queue removes it with its writes. A
    CANCELLED that `aipm cancel` did not mark was written by someone else (its worker): no outcome either."""
    if task.status in RUNNING:
        return False
    if not same_attempt(task, rec) or (task.status == Status.CANCELLED and not rt.cancelled(rec)):
        return True
    # This attempt's, and ended. aipm's outcome of it says when it ended, and never calls an attempt that failed (or
    # a review that rejected it) a success; a status its worker wrote into the file itself (`sed`) may do either.
    if rec.phase == "work" and task.finished_at is None:
        return True
    if task.status == Status.COMPLETED or (rec.phase == "work" and task.status == Status.DONE):
        return bool(read_exit_file(rec.exit_file))
    return False


def left_behind(rec: Record, rt: Runtime) -> bool:
    """A record left by an owner killed after its task's final write: worker and owner dead, its task no longer
    running this attempt (or gone). It holds nothing; a run or launch drops it, `aipm recover` too, and a follower
    (`logs -f`) has nothing left to wait for on its account."""
    if rec.alive():
        return False
    try:
        task = load_task(as_path(rec.task_file), rt.root)
    except (UserError, OSError):
        # Broken or gone (deleted or moved: it may be put back): its outcome is held, so it keeps its files until
        # the file is back and recovered (or a recovery drops it, drop_gone).
        return False
    if unrecorded(task, rec, rt) or usage_left(task, rec):
        # Its file was put back under it, or it was cancelled with its owner dead before its usage was added: what
        # it came to is recovery's to record (for its own order: this plan may be another's).
        return False
    # REWORK is the first of a rejected review's two writes: recovery writes the second (_rework_on) and drops it.
    return task.status not in RUNNING and task.status != Status.REWORK or task.attempts != rec.attempt


def followed(rec: Record, rt: Runtime) -> bool:
    """A record a follower (`logs -f`) waits on: its attempt runs, or its outcome is still to come (left_behind).
    Not one whose worker and owner ended with its task's file gone (its order's directory moved away): left_behind
    keeps it for the file's return, but nothing runs to write to its log, and `logs -f` waited on it for ever."""
    return rec.alive() or not left_behind(rec, rt) and os.path.lexists(as_path(rec.task_file))


def same_task(task: Task, rec: Record) -> bool:
    """The file holds the task the record's attempt ran, so what that attempt came to is the file's: it is the
    attempt's own version, or one put back under it (a `git checkout`: the definition it started with). A task
    made again under the same name with another definition (command, prompt, targets...) is another task."""
    return same_attempt(task, rec) or rec.definition in ("", definition(task))


def discard(rt: Runtime, rec: Record, code: int | None, why: str) -> str:
    """What an attempt came to (`code`) is not recorded, `why`: said in the attempt's log, with where its usage
    went (an agent's: added to no task, its cost to the order's spending ledger) and a worktree attempt's changes
    kept. Returns the line, for the caller's output; the caller drops the record."""
    ran = rec.phase == "work" and rec.pid
    usage = spending.settle(rt, rec, None)[0] if rec.pid else None  # (a review's cost goes to the ledger only)
    line = (f"attempt {rec.serial} (exit {code}) not recorded: {why}"
            + f"; its usage is added to no task, its cost still counts against the order's budget (see {rec.log})"
            * (usage is not None))
    append_log(rec.log, line)
    if rec.workspace and ran:
        confine.tidy(rec.log, rec.confined)  # as interrupt() does: before keep(), not in its patch
        append_log(rec.log, workspace.keep(rt.root, rec))
    return line


def another_task(task: Task) -> str:
    """Why an outcome held for the file's previous task is discarded (not same_task)."""
    return f"{task.path} now holds another task (its definition changed since the attempt started), which runs afresh"


def drop_gone(rt: Runtime, records: list[Record]) -> list[dict]:
    """`aipm recover`: drop the held outcomes of `records` whose task file is still gone (deleted or moved while
    the attempt ran, and not put back). They kept its files busy meanwhile, as a stale task does; a run or launch
    leaves them, so the file can still be put back."""
    out = []
    for rec in records:
        if not rec.alive() and not os.path.exists(rec.task_file):
            cancelled = rt.cancelled(rec)
            try:
                if cancelled:
                    rt.keep_cancel(rec)
            except OSError as exc:  # a full state directory: dropped unkept, the cancel would be lost
                out.append({"order": rec.order, "id": rec.task, "action": "not dropped",
                            "error": f"cannot keep its cancel: {exc.strerror or exc}"})
                continue
            why = f"its task file {rec.task_file} is still gone; put back now, it " + (
                "is CANCELLED by the next recover or run" if cancelled else "runs afresh")
            out.append({"order": rec.order, "id": rec.task, "action": "dropped",
                        "detail": discard(rt, rec, read_exit_file(rec.exit_file), why), **kept(rt, rec)})
            forget(rt, rec)
    return out


def end_remnants(rt: Runtime, rec: Record) -> None:
    """End what still runs of an attempt whose wrapper died without an exit code (killed along with its owner, as
    `pkill -f aipm` does): its command would otherwise run on beside the task's next attempt. Found by the
    attempt's marker in their environment. Its process group is killed whole (a shell loop forks while it is
    looked at) only when a marked process is still in it: a group's number is not reused while it has members."""
    mark = subreaper.attempt_marker(rt.root, rec)
    ended: list[int] = []
    for _ in range(3):  # again for what a process forked between the look and the kill
        left = subreaper.marked(mark)
        if not left:
            break
        if rec.pgid and rec.pgid != os.getpgid(0) and any(_group(pid) == rec.pgid for pid in left):
            ended += runner.group_members(rec.pgid)
            runner.kill_group(rec.pgid)
        ended += subreaper.end(left)
    if ended:
        shown = sorted(set(ended))
        append_log(rec.log, f"its wrapper gone, ended {len(shown)} process(es) of attempt {rec.serial} still "
                            f"running: pids {', '.join(map(str, shown))}")


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def interrupt(rt: Runtime, task: Task, rec: Record | None, why: str, count_attempt: bool = False) -> Task:
    """RUNNING → INTERRUPTED → QUEUED (from INTERRUPTED: the rest of one killed half-way); the attempt is not
    counted unless asked (it was aipm's fault). A preempted attempt (Record.preempted) is counted in `preemptions`
    by the first write, so whoever finishes the re-queue (its run, or the recovery after that run died) counts it
    once. Returns the task as last written."""
    path = Path(task.path)
    attempts = task.attempts if count_attempt else max(0, task.attempts - 1)
    try:
        # Put back under the attempt (QUEUED already): nothing to undo. INTERRUPTED: the second step is left.
        if task.status in RUNNING:
            # A stopped attempt (Ctrl-C, preempted, its owner gone) still cost what its agent reported so far, and
            # one that reported nothing its cap, unless its Ray task was never submitted; a stopped review what
            # its reviewer reported.
            ran = rec is not None and rec.pid
            spent = spending.settle(rt, rec, task, cluster.ran_nothing(rec.exit_file, rec.command))[1] if ran else {}
            counted = {"preemptions": task.preemptions + 1} if rec is not None and rec.preempted else {}
            task = update_task(path, {"status": Status.INTERRUPTED, "finished_at": now(),
                                      "reason": outcome.interrupted(why), **spent, **counted}, expect=task.status)
        if task.status == Status.INTERRUPTED:
            task = update_task(path, {"status": Status.QUEUED, "attempts": attempts}, expect=Status.INTERRUPTED)
    except (StaleWrite, UserError, OSError):
        pass  # moved on, broken or unwritable: a running status without a record is recovered later
    if rec is not None:
        append_log(rec.log, f"worker interrupted: {why}; task re-queued")
        # what was made for its rules and left untouched; before keep(), not in its patch
        confine.tidy(rec.log, rec.confined)
        if rec.workspace and rec.phase == "work" and rec.pid:  # the next attempt's start removes its worktree
            append_log(rec.log, workspace.keep(rt.root, rec))
        forget(rt, rec)
    return task


def settle_cancelled(rt: Runtime, rec: Record, task: Task, write: Callable[[Task, dict], Task]) -> Task:
    """A cancelled attempt's end, by its owner or, the owner dead, by the cancel: what its agent reported still
    cost (a claude attempt that reported nothing: its cap), and a worktree attempt's changes kept (a retry's start
    removes the worktree). `write` puts the usage in the task file; what it raises goes to the caller."""
    if rec.pid:  # (a review's: what its reviewer reported)
        spent = spending.settle(rt, rec, task, cluster.ran_nothing(rec.exit_file, rec.command))[1]
        task = write(task, spent) if spent else task
        if rec.workspace and rec.phase == "work":
            confine.tidy(rec.log, rec.confined)  # first: an empty file made for a rule is no change of its own
            append_log(rec.log, workspace.keep(rt.root, rec))
    return task


def forget(rt: Runtime, rec: Record) -> None:
    """Drop the record of an attempt that is over and has no owner (its locks went with its processes)."""
    # Its owner's _drop did not run: without the record, nothing would remove its TMPDIR in /tmp (nor the listing).
    confine.tidy(rec.log, rec.confined)
    writtenlog.note_ended(rt, rec)
    rt.remove_record(rec.order, rec.task)
    agents.forget(rec.log)


def remove_temp_files(order_dir: Path) -> None:
    """Temp files of task-file writes killed midway. Every writer holds the launch lock, as our caller does,
    so any such file is a leftover: the task file beside it is intact (it is replaced only by rename)."""
    for leftover in order_dir.glob(".*.yaml.*.tmp"):
        with suppress(FileNotFoundError, IsADirectoryError):  # a directory under such a name was planted: left
            leftover.unlink()
