"""`aipm detect` and `aipm why`: what may start now, and why the rest may not."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from aipm.cli import app
from aipm.cli.common import JsonOpt, console, print_json, project_root
from aipm.cli.resource_options import MaxWorkersOpt
from aipm.launcher import Launcher
from aipm.plan import all_reasons, plan
from aipm.project import Project, find_task
from aipm.runtime import Runtime
from aipm.settings import load_settings
from aipm.store import load_order


def _plan(order_dir: Path, root: Path, max_workers: int | None):
    settings = load_settings(root, {"max_workers": max_workers})
    launcher = Launcher(Project(root, settings.orders_dir), settings, monitor=None)
    order = load_order(order_dir, root)
    busy, live, count = launcher.holders(order, Runtime(root).records())
    free = max(0, settings.max_workers - count)
    return order, plan(order, busy, live, free), free, busy


@app.command()
def detect(
    order: str = typer.Argument(..., help="Order id or directory."),
    summary: bool = typer.Option(False, "--summary", help="Counts only: queued, launchable, blocked, stale."),
    max_workers: int = MaxWorkersOpt,
    json_out: bool = JsonOpt,
) -> None:
    """List the tasks that may start now, in launch order, and why every other task may not. Never writes."""
    root = project_root()
    settings = load_settings(root, {"max_workers": max_workers})
    loaded, result, free, _ = _plan(Project(root, settings.orders_dir).order_dir(order), root, max_workers)
    if json_out:
        data = {
            "order": loaded.id,
            "free_slots": free,
            "launchable": [{"id": t.id, "priority": t.priority.value, "target_files": list(t.target_files)}
                           for t in result.launchable],
            "blocked": [b.as_dict() for b in result.blocked.values()],
            "stale": result.stale,
            "summary": result.summary(loaded),
        }
        print_json(data)
        return
    out = console()
    if summary:
        for key, value in result.summary(loaded).items():
            out.print(f"{key.replace('_', ' '):>26}: {value}")
        return
    table = Table(title=f"Launchable in {loaded.id} ({free} free worker slot(s))")
    for col in ("#", "task", "pri", "target files"):
        table.add_column(col)
    for i, t in enumerate(result.launchable, 1):
        table.add_row(str(i), t.id, t.priority.value, "\n".join(t.target_files))
    out.print(table)
    waiting = [b for b in result.blocked.values() if b.reason != "not_queued"]
    if waiting:
        out.print("[bold]Not launchable:[/]")
        for b in waiting:
            out.print(f"  {b.id}: {b.detail}", markup=False)
    if result.stale:
        out.print(f"[yellow]Stale (worker gone, files still busy): {', '.join(result.stale)} — run `aipm recover`[/]")


@app.command()
def why(
    task: str = typer.Argument(..., help="Task id, ORDER/TASK, or path to the task file."),
    max_workers: int = MaxWorkersOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Explain whether a task may start now, and if not, every reason."""
    root = project_root()
    settings = load_settings(root, {"max_workers": max_workers})
    order_dir, task_id = find_task(Project(root, settings.orders_dir), task)
    loaded, result, free, busy = _plan(order_dir, root, max_workers)
    launchable = any(t.id == task_id for t in result.launchable)
    reasons = all_reasons(loaded, result, task_id, [b for b in busy if b.order_id != loaded.id])
    if json_out:
        print_json({"order": loaded.id, "task": task_id, "launchable": launchable,
                    "reasons": [r.as_dict() for r in reasons],
                    "status": loaded.tasks[task_id].status.value})
        return
    if launchable:
        console().print(f"{task_id} can start now.")
    else:
        console().print(f"{task_id} cannot start:")
        for reason in reasons:
            console().print(f"  - {reason.detail}", markup=False)
