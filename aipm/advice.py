"""Warnings about task files that are valid but probably do not mean what they say. They never stop anything.

An agent task (no `command`: the worker template runs it) without `target_files` may edit any file, and, since
it claims no files, no lock keeps other tasks off the files it edits: aipm starts it beside anything.

A file in an order directory named like a task file but not `*.yaml` (`T1.yml`, `T2.YAML`) is no task at all: the
order runs without it, and an order of nothing but such files "succeeds" at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

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


def stray_files(order_dir: Path) -> list[str]:
    """Warnings for files of the order directory that look like task files but are not read as any."""
    try:
        names = sorted(e.name for e in os.scandir(order_dir) if e.is_file())
    except OSError:
        return []
    return [f"{order_dir / name}: not read: aipm reads only files ending in .yaml; rename it "
            f"{os.path.splitext(name)[0]}.yaml" for name in names
            if os.path.splitext(name)[1].lower() in (".yml", ".yaml") and not name.endswith(".yaml")]
