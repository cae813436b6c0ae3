"""Putting back what a running task's file must say, after something else rewrote it under its worker.

An agent's `git checkout -- .`, `git stash` or `git reset --hard` puts committed task files back, often
`status: QUEUED`, while their workers run. The worker's record says what is true (this attempt runs), so its
owner writes the status, attempt and rework count it knows back, through legal transitions only, and every other line keeps
the version the file has now (the human's edits stay).
"""

from __future__ import annotations

from pathlib import Path

from aipm.model import Status, Task
from aipm.runtime import Record
from aipm.store import update_task


def known_status(rec: Record) -> Status:
    """What the task's file says while this record's attempt runs."""
    return Status.IN_REVIEW if rec.phase == "review" else Status.IN_PROGRESS


def disowned(task: Task, rec: Record) -> bool:
    """The file no longer holds what aipm wrote for the running attempt. A cancel is the user's word, not this."""
    return task.status != Status.CANCELLED and (task.status != known_status(rec) or task.attempts != rec.attempt
                                                or rec.reworks is not None and task.reworks != rec.reworks)


def restore(task: Task, rec: Record, root: Path) -> Task:
    """Write back the owner's status, attempts, reworks and start time. Caller holds the launch lock.

    The rework count matters: without it a worker that resets its file on every attempt is sent back by its
    review for ever (the max_rework limit never bites)."""
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
    known = {"status": target, "attempts": rec.attempt, "started_at": rec.started_at}
    if rec.reworks is not None:
        known["reworks"] = rec.reworks
    return update_task(path, known, expect=task.status, root=root)
