"""Putting back what a running task's file must say, after something else rewrote it under its worker.

An agent's `git checkout -- .`, `git stash` or `git reset --hard` puts committed task files back, often
`status: QUEUED`, while their workers run; an agent may write a status of its own (CANCELLED, DONE) into its
file. The worker's record says what is true (this attempt runs), so its owner writes the status, attempt and
counters it knows back, through legal transitions only, and every other line keeps the version the file has now
(the human's edits stay).
"""

from __future__ import annotations

from pathlib import Path

from aipm.model import Status, Task
from aipm.record import Record
from aipm.runtime import Runtime
from aipm.writer import update_task


def known_status(rec: Record) -> Status:
    """What the task's file says while this record's attempt runs."""
    return Status.IN_REVIEW if rec.phase == "review" else Status.IN_PROGRESS


def counters(task: Task) -> dict:
    """What the limits and the budget are decided on, kept in the record at the start of each attempt: a reset
    that lost them would let a task be sent back, preempted or charged for ever. The usage totals (cost and tokens)
    are kept even when unknown: a file put back under its attempt gets exactly the totals it started with, to
    which the attempt's end adds its usage once."""
    return {"reworks": task.reworks, "preemptions": task.preemptions, "cost_usd": task.cost_usd,
            "cost_unreported_usd": task.cost_unreported_usd, "tokens": task.tokens}


def disowned(task: Task, rec: Record, rt: Runtime) -> bool:
    """The file no longer holds what aipm wrote for the running attempt. A cancel is the user's word, not this;
    a CANCELLED that `aipm cancel` did not mark is (a worker wrote it: the live worker outranks its file)."""
    if task.status == Status.CANCELLED:
        return not rt.cancelled(rec)
    return (task.status != known_status(rec) or task.attempts != rec.attempt
            or any(getattr(task, k) != v for k, v in rec.counters.items()))


def restore(task: Task, rec: Record, root: Path) -> Task:
    """Write back the owner's status, attempts, counters and start time. Caller holds the launch lock."""
    path, target = Path(task.path), known_status(rec)
    # The transition table has no shortcut from, say, DONE to IN_REVIEW: walk the legal way there.
    steps = []
    if task.status != target:
        if task.status not in (Status.QUEUED, Status.IN_PROGRESS):
            steps.append(Status.QUEUED)
        if task.status != Status.IN_PROGRESS or target == Status.IN_PROGRESS:
            steps.append(Status.IN_PROGRESS)
        if target == Status.IN_REVIEW:
            steps.append(Status.IN_REVIEW)
    for step in steps[:-1]:
        task = update_task(path, {"status": step}, expect=task.status, root=root)
    lost = {k: v for k, v in rec.counters.items() if getattr(task, k) != v}  # an unknown cost is no `null` line
    known = {"status": target, "attempts": rec.attempt, "started_at": rec.started_at, **lost}
    return update_task(path, known, expect=task.status, root=root)
