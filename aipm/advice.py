"""Warnings about task files that are valid but probably do not mean what they say. They never stop anything.

An agent task (no `command`: the worker template runs it) without `target_files` may edit any file, and, since
it claims no files, no lock keeps other tasks off the files it edits: aipm starts it beside anything.
"""

from __future__ import annotations

from collections.abc import Iterable

from aipm.model import Task


def unbounded_agent(task: Task) -> str | None:
    """The warning for an agent task that claims no files, or None."""
    if task.command is not None or task.target_files:
        return None
    return (f"{task.path}: target_files: empty on an agent task (no `command`): it may edit any file and "
            "conflicts with no other task, so aipm runs it beside tasks that edit the same files; list the files "
            "it may edit")


def warnings(tasks: Iterable[Task]) -> list[str]:
    return [w for w in map(unbounded_agent, tasks) if w]
