"""What happens to a task when its worker or its review ends: pure decisions, applied by the owner."""

from __future__ import annotations

from typing import Any

from aipm import outcome
from aipm.model import Status, Task
from aipm.record import Record
from aipm.settings import Settings
from aipm.writer import now


def review_command(task: Task, settings: Settings, no_review: bool, rec: Record | None = None
                   ) -> str | tuple[str, ...] | None:
    """The review that judges an attempt's work: with `rec` (its record), the one its task had when the attempt
    started (rec.review), so a worker that rewrites `review` in its own task file (or in aipm.yaml) while it runs
    does not choose its judge, nor a Ctrl-C during the review that runs it again; else (a start deciding, a record of
    an older aipm) the task's as it is now."""
    if no_review:
        return None
    if rec is not None and _well_formed(rec.review):
        return pinned(rec.review)
    # (`review: ""`: none, the task's way out of review.command)
    return (task.review if task.review is not None else settings.review_command) or None


def pin(command: str | tuple[str, ...] | None) -> list[str]:
    """A review command as a record keeps it (JSON): [] none, ["sh", text] a shell line, ["argv", *argv] a program."""
    return [] if command is None else ["sh", command] if isinstance(command, str) else ["argv", *command]


def pinned(kept: list[str]) -> str | tuple[str, ...] | None:
    return None if not kept else kept[1] if kept[0] == "sh" else tuple(kept[1:])


def _well_formed(kept: object) -> bool:
    """A pin as pin() writes it (the state directory is in an unconfined worker's reach: anything else is none)."""
    return isinstance(kept, list) and all(isinstance(part, str) for part in kept) and (
        not kept or kept[0] == "sh" and len(kept) == 2 or kept[0] == "argv" and len(kept) > 1)


def after_work(task: Task, exit_code: int | None, settings: Settings, reviewing: bool, reason: str,
               failed: bool = False) -> dict[str, Any]:
    """Updates for a worker that ended: IN_REVIEW, DONE, or QUEUED/FAILED by the tries left (`failed`: the
    attempt failed whatever its exit code, e.g. its work could not be captured).

    Only tries count against max_attempts: an attempt a review sent back is a rework, bounded by max_rework.
    """
    updates: dict[str, Any] = {"exit_code": exit_code, "finished_at": now(), "reason": reason}
    if exit_code == 0 and not failed:
        updates["status"] = Status.IN_REVIEW if reviewing else Status.DONE
    else:
        updates["status"] = Status.FAILED if task.tries >= attempt_limit(task, settings) else Status.QUEUED
    return updates


def after_cap(task: Task, exit_code: int | None, reason: str) -> dict[str, Any]:
    """Updates for an attempt its agent stopped at the cap aipm gave it (agents.stopped_at_cap): the budget's doing,
    not the task's failure. QUEUED again, the attempt not counted (as a preempted one): no try is spent, and the plan
    decides, its cost recorded, whether the budget has another share for it or is reached (raise it to go on)."""
    return {"exit_code": exit_code, "finished_at": now(), "reason": reason, "status": Status.QUEUED,
            "attempts": max(0, task.attempts - 1)}


def attempt_limit(task: Task, settings: Settings) -> int:
    return task.max_attempts or settings.max_attempts


def time_limit(task: Task, settings: Settings) -> int | None:
    """Seconds one attempt's work, and then its review, may run (None: no limit)."""
    return None if task.timeout == 0 else task.timeout or settings.timeout  # (0: the task's `timeout: none`)


def rework_limit(task: Task, settings: Settings) -> int:
    return task.max_rework if task.max_rework is not None else settings.max_rework


def after_review(task: Task, exit_code: int, settings: Settings, reason: str, lasting: bool = False
                 ) -> list[dict[str, Any]]:
    """Updates, in order, for a review that ended: COMPLETED, or REWORK then QUEUED (REJECTED past max_rework, or
    at once where no rework could help: `lasting`).

    `reworks` counts the times the task was sent back for another attempt, what max_rework bounds (status shows
    it so): a rejection for good is none, so REJECTED puts back the count REWORK raised. REWORK raises it first
    either way, so that a recovery that finds the task in REWORK (its owner died between the writes) can tell
    which second write was due (recovery._rework_on)."""
    if exit_code == 0:
        return [{"status": Status.COMPLETED, "finished_at": now(), "reason": reason}]
    rework = {"status": Status.REWORK, "reworks": task.reworks + 1, "finished_at": now(), "reason": reason}
    if lasting or rejects(task, settings):
        return [rework, {"status": Status.REJECTED, "reworks": task.reworks}]
    return [rework, {"status": Status.QUEUED}]


def rejects(task: Task, settings: Settings) -> bool:
    """Sending the task back now rejects it for good: no next attempt starts (until a person's `retry`)."""
    # max_rework rounds of rework are allowed; the review after the last one decides for good.
    return task.reworks + 1 > rework_limit(task, settings)


def attempt_reason(exit_code: int | None, timed_out: bool, timeout: int | None) -> str:
    """The reason an attempt's process ended: its timeout, the signal that killed it, or its exit code."""
    if timed_out:
        return outcome.timed_out(timeout)
    return outcome.lost() if exit_code is None else outcome.exited(exit_code)


def describe_exit(exit_code: int | None, timed_out: bool, timeout: int | None) -> str:
    """The log's last line for an attempt: how it ended, in words."""
    reason = attempt_reason(exit_code, timed_out, timeout)
    if timed_out:
        return reason + "; process group killed" + (f" (exit {exit_code})" if exit_code is not None else "")
    return reason
