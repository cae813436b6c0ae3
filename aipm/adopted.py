"""What became of an attempt that had ended when `aipm recover` adopted it: its new owner (a detached aipm, which
takes the launch lock once the recovery lets it go) records the exit code the wrapper left. The recovery waits for
that write and says the status it came to; "adopted" alone read as if the worker still ran."""

from __future__ import annotations

import time
from pathlib import Path

from aipm.errors import UserError
from aipm.model import Task
from aipm.runtime import Runtime
from aipm.store import load_task

# Seconds a recovery waits at most for an ended attempt's outcome: a Python start, then one status write (and a
# worktree's merge) once its owner has the launch lock. Past it (the launch lock held long by another aipm), the
# recovery says what it did: adopted. An owner stopped (Ctrl-Z) is not waited for at all.
RECORDING = 30.0


def recorded(rt: Runtime, order_id: str, task_id: str, path: Path, ended: dict, limit: float = RECORDING
             ) -> tuple[Task, int | None] | None:
    """The task once the owner adopting its `ended` attempt (recover_order's {"attempt", "phase", "exit_code",
    "attempts", "started_at", "record"}) has recorded it: its record gone, or another's (its review's, or a later
    attempt's: that number, whose start the file shows now, not the ended attempt's outcome). None when that did not
    happen in `limit` seconds, or its new owner died first (the next recovery adopts it again)."""
    start = time.monotonic()
    while time.monotonic() < start + limit:
        rec = rt.read_record(order_id, task_id)
        if rec is None or (rec.serial, rec.phase) != (ended["attempt"], ended["phase"]):
            # Read as that owner's round left it: the outcome and what it started next (one launch-lock hold)
            with rt.launch_lock():
                rec = rt.read_record(order_id, task_id)
                try:
                    task = load_task(path, rt.root)
                except (UserError, OSError):
                    return None  # broken or gone meanwhile: nothing to say of it
                numbers = rt.logs(order_id, task_id)
            if rec is not None and rec.serial != ended["attempt"]:
                return task, rec.serial
            # A later attempt that started and ended between two looks left no record: the file's start tells it
            # (each start writes a new one; an outcome keeps it, or lowers the count of a capped attempt).
            if task.started_at != ended["started_at"] or task.attempts > ended["attempts"]:
                return task, max(numbers, default=task.attempts)  # (its log: the latest made)
            return task, None
        if not rec.alive() or rec.held_by_stopped_owner():
            return None
        time.sleep(0.05)
    return None
