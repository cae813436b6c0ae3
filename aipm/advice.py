"""Warnings about task files that are valid but probably do not mean what they say. They never stop anything.

An agent task (no `command`: the worker template runs it) without `target_files` may edit any file, and, since
it claims no files, no lock keeps other tasks off the files it edits: aipm starts it beside anything.

An order with a budget whose agent tasks run an agent that reports no cost (the worker.command template, codex):
their attempts count as nothing against it and get no cap, so the budget cannot hold.

A file in an order directory named like a task file but not `*.yaml` (`T1.yml`, `T2.YAML`) is no task at all: the
order runs without it, and an order of nothing but such files "succeeds" at once.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from aipm import agents, budget
from aipm.model import Order, Task
from aipm.settings import Settings
from aipm.store import NOT_TASKS
from aipm.worker import agent_for


def unbounded_agent(task: Task) -> str | None:
    """The warning for an agent task that claims no files, or None."""
    if task.command is not None or task.target_files:
        return None
    return (f"{task.path}: target_files: empty on an agent task (no `command`): it may edit any file and "
            "conflicts with no other task, so aipm runs it beside tasks that edit the same files; list the files "
            "it may edit")


def warnings(tasks: Iterable[Task]) -> list[str]:
    return [w for w in map(unbounded_agent, tasks) if w]


def unenforced_budget(order: Order, tasks: Iterable[Task], settings: Settings) -> list[str]:
    """A warning per agent among `tasks` (of `order`) that reports no cost, when the order has a budget; and one per
    task with a budget of its own that nothing it runs reports a cost against (`validate` said `ok`, and `status`
    showed `- of $0.1000` as if it were kept)."""
    tasks = list(tasks)
    out = [_unenforced_own(task, settings) for task in tasks if task.max_cost_usd is not None and (
        task.command is not None or not agents.reports_cost(agent_for(task, settings)))]
    limit = budget.of(order, settings.max_cost_usd)
    if limit is None:
        return out
    blind: dict[str, list[str]] = {}
    for task in tasks:
        agent = agent_for(task, settings)
        if task.command is None and not agents.reports_cost(agent):
            blind.setdefault(agent, []).append(task.id)
    where = str(Path(order.path) / "order.yaml") if limit.source == "order.yaml" else "aipm.yaml"
    for agent, ids in blind.items():
        named = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
        runs = "the worker.command template (worker.agent: command)" if agent == agents.COMMAND else agent
        fix = ("set `worker.agent: claude` in aipm.yaml (Claude Code through its preset: cost, a cap per attempt, "
               "permission rules from target_files)" if agent == agents.COMMAND else
               f"run {'it' if len(ids) == 1 else 'them'} with an agent that reports cost (claude, aider)")
        run, their = ("runs", "its") if len(ids) == 1 else ("run", "their")
        out.append(f"{where}: max_cost_usd {budget.usd(limit.limit)} of order {order.id} cannot be enforced: "
                   f"{named} {run} {runs}, which reports no cost, so {their} attempts count as nothing against it; "
                   f"{fix}")
    return out


def _unenforced_own(task: Task, settings: Settings) -> str:
    agent = agent_for(task, settings)
    runs = ("its own command" if task.command is not None else "the worker.command template (worker.agent: "
            "command)" if agent == agents.COMMAND else agent)
    return (f"{task.path}: max_cost_usd {budget.usd(task.max_cost_usd or 0.0)} cannot be enforced: the task runs "
            f"{runs}, which reports no cost, so its attempts count as nothing against it")


def stray_files(order_dir: Path) -> list[str]:
    """Warnings for entries of the order directory that look like task files but are not read as any: `.yml`
    (or `.YAML`) files, and `*.yaml` names that are no regular file (a directory, a FIFO, a link to nothing)."""
    try:
        entries = sorted(os.scandir(order_dir), key=lambda e: e.name)
    except OSError:
        return []
    out = []
    for entry in entries:
        name = entry.name
        if name in NOT_TASKS:
            continue
        if name.endswith(".yaml"):
            kind = _not_a_file(entry)
            if kind:
                out.append(f"{order_dir / name}: not read: {kind}, not a task file")
        elif os.path.splitext(name)[1].lower() in (".yml", ".yaml") and _is_file(entry):
            out.append(f"{order_dir / name}: not read: aipm reads only files ending in .yaml; rename it "
                       f"{os.path.splitext(name)[0]}.yaml")
    return out


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _not_a_file(entry: os.DirEntry) -> str:
    """What a `*.yaml` entry is when it is no regular file (as the loader skips it), else ''."""
    try:
        if entry.is_file(follow_symlinks=False):
            return ""  # (the directory's listing says so: no stat per task file of a big order)
        st = os.stat(entry.path)
    except FileNotFoundError:
        return "a link to nothing" if entry.is_symlink() else ""
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if stat.S_ISREG(st.st_mode):
        return ""
    return "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a special file"
