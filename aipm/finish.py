"""What happens to a task when its worker or its review ends: pure decisions, applied by the owner."""

from __future__ import annotations

import signal
from typing import Any

from aipm.model import Status, Task
from aipm.settings import Settings
from aipm.store import now


def review_command(task: Task, settings: Settings, no_review: bool) -> str | tuple[str, ...] | None:
    if no_review:
        return None
    return task.review if task.review is not None else settings.review_command


def after_work(task: Task, exit_code: int, settings: Settings, reviewing: bool) -> dict[str, Any]:
    """Updates for a worker that ended: IN_REVIEW, DONE, or QUEUED/FAILED by the attempts left."""
    updates: dict[str, Any] = {"exit_code": exit_code, "finished_at": now()}
    if exit_code == 0:
        updates["status"] = Status.IN_REVIEW if reviewing else Status.DONE
    else:
        limit = task.max_attempts or settings.max_attempts
        updates["status"] = Status.FAILED if task.attempts >= limit else Status.QUEUED
    return updates


def after_review(task: Task, exit_code: int, settings: Settings) -> list[dict[str, Any]]:
    """Updates, in order, for a review that ended: COMPLETED, or REWORK then QUEUED (REJECTED past max_rework)."""
    if exit_code == 0:
        return [{"status": Status.COMPLETED, "finished_at": now()}]
    reworks = task.reworks + 1
    # max_rework rounds of rework are allowed; the review after the last one decides for good.
    final = Status.REJECTED if reworks > settings.max_rework else Status.QUEUED
    return [{"status": Status.REWORK, "reworks": reworks, "finished_at": now()}, {"status": final}]


def describe_exit(exit_code: int, timed_out: bool, timeout: int | None) -> str:
    """The log's last line for an attempt: how it ended, in words."""
    if timed_out:
        return f"timed out after {timeout}s; process group killed (exit {exit_code})"
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return f"killed by {name}"
    if exit_code > 128:
        try:
            return f"exited with code {exit_code} ({signal.Signals(exit_code - 128).name})"
        except ValueError:
            pass
    return f"exited with code {exit_code}"
