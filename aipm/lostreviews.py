"""Reviews that stopped or were lost without a verdict: a reviewer stopped with its `run` (Ctrl-C), killed with
its owner, or never recorded (a full state directory). The attempt's work is done and kept, so its review runs
again (recovery adopts it as a review) unless the work is gone with its worktree; readers (`status`, `why`, `ps`)
say which.
"""

from __future__ import annotations

import os

from aipm.model import Status, Task
from aipm.record import Record, same_attempt
from aipm.restore import counters
from aipm.runtime import exit_file_written
from aipm.workerfiles import append_log


def in_review(task: Task, rec: Record) -> bool:
    """The record is the review of the attempt the file holds: that attempt's work is done (and paid for)."""
    return rec.phase == "review" and task.status == Status.IN_REVIEW and task.attempts == rec.attempt


def review_unrecorded(task: Task, rec: Record) -> bool:
    """The attempt's work ended with exit 0 and its outcome was written (the file says IN_REVIEW for this attempt:
    only its owner writes that, after the exit), but its reviewer's record never was (a full state directory, or
    the owner killed in between): the attempt's review is lost without a verdict, its work kept."""
    return (rec.phase == "work" and task.status == Status.IN_REVIEW and not rec.worker_alive()
            and same_attempt(task, rec))


def as_review(rec: Record, task: Task) -> None:
    """Make `rec` the record of its attempt's review, no reviewer started yet. Its counters are what the file says
    now (the attempt's usage was added when its work ended): the start's would read as a reset (restore.disowned)."""
    rec.phase = "review"
    rec.counters = counters(task)
    rec.exit_file = rec.exit_file.removesuffix(".review") + ".review"  # (`.review` may be in an order's or task's name)
    rec.pid = 0
    rec.timed_out, rec.deadline = False, None  # the review's own limit starts with its reviewer (Recording._record)


def cannot_review(rec: Record, stopped: str = "") -> str:
    """Why the work of a review stopped (`stopped`: by what) or lost without a verdict is gone ("" if it is kept),
    said in the attempt's log. With no review command now (`--no-review`) kept work is finished unreviewed
    (Reviewing._unreviewed)."""
    why = review_work_gone(rec)
    if why:
        append_log(rec.log, f"review of {rec.task} " + f"stopped ({stopped}); it " * bool(stopped)
                   + f"cannot run again: {why}; its work runs again")
    return why


def review_work_gone(rec: Record) -> str:
    """cannot_review() without saying it: a worktree task's work is only in its worktree; a shared-tree task's
    targets stayed busy (IN_REVIEW) meanwhile, so its work is still there."""
    if not rec.workspace or os.path.isdir(rec.workspace):
        return ""
    return f"its worktree {rec.workspace} is gone"


def review_pending(task: Task, rec: Record) -> str:
    """For readers (`status`, `why`, `ps`): what becomes of a task whose review was stopped (Ctrl-C of its `run`)
    or lost without a verdict, no owner left: the next run or `aipm recover` runs it again (recover_order's
    `again`), the task IN_REVIEW meanwhile, its work kept. "" when the record is no such review."""
    if rec.alive() or review_work_gone(rec):
        return ""
    if in_review(task, rec) and (rec.stopping or not exit_file_written(rec.exit_file)):
        what = f"review {rec.stopping}" if rec.stopping else "review lost without a verdict"
    elif review_unrecorded(task, rec):
        what = "review lost without a verdict"
    else:
        return ""
    return f"{what}; it runs again on the next run, its work kept"
