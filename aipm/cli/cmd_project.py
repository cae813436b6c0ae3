"""`aipm init`, `aipm validate`, `aipm status`."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from aipm.board import task_row
from aipm.cli import app
from aipm.cli.common import JsonOpt, console, get_project, print_json, project_root
from aipm.errors import ValidationError
from aipm.model import FINISHED_OK, status_summary
from aipm.project import CONFIG_FILE
from aipm.runtime import Runtime
from aipm.store import load_order

CONFIG_TEMPLATE = """\
# aipm settings; every key is optional (defaults shown). See `aipm config`.
max_workers: 5
# max_cpu_percent: 85
# max_memory_percent: 85
# enable_monitoring: true
# enable_auto_scaling: true
# max_attempts: 1
# max_rework: 3
# timeout: 1800
# orders_dir: orders
# worker:
#   command: ["claude", "-p", "--model", "{model}"]   # for tasks without `command`; prompt on stdin
#   model: sonnet
# review:
#   command: null
"""

STATUS_STYLE = {
    "QUEUED": "cyan", "IN_PROGRESS": "yellow", "IN_REVIEW": "magenta", "DONE": "green", "COMPLETED": "green",
    "REWORK": "yellow", "REJECTED": "red", "FAILED": "red", "INTERRUPTED": "red", "CANCELLED": "dim",
}


@app.command()
def init() -> None:
    """Create aipm.yaml, orders/ and the runtime directory .aipm/ in the project root."""
    root = project_root()
    made = []
    config = root / CONFIG_FILE
    if not config.exists():
        config.write_text(CONFIG_TEMPLATE)
        made.append(CONFIG_FILE)
    orders = root / "orders"
    if not orders.exists():
        orders.mkdir()
        made.append("orders/")
    runtime = Runtime(root)
    if not runtime.dir.exists():
        made.append(".aipm/")
    runtime.ensure()
    out = console()
    if made:
        out.print(f"Initialised aipm in {root}: created {', '.join(made)}")
    else:
        out.print(f"{root} is already an aipm project; nothing changed.")


@app.command()
def validate(
    order: Optional[str] = typer.Argument(None, help="Order id or directory (default: every order)."),
    json_out: bool = JsonOpt,
) -> None:
    """Check task and order files. Exit 2, naming the file and the field, on any error."""
    project = get_project()
    dirs = [project.order_dir(order)] if order else project.order_dirs()
    results, errors = [], []
    for directory in dirs:
        try:
            loaded = load_order(directory, project.root)
            results.append({"order": loaded.id, "path": str(directory), "tasks": len(loaded.tasks), "ok": True})
        except ValidationError as exc:
            errors.append(str(exc))
            results.append({"order": directory.name, "path": str(directory), "ok": False, "error": str(exc),
                            "file": exc.file, "field": exc.field})
    if json_out:
        print_json({"orders": results, "ok": not errors})
    else:
        for item in results:
            if item["ok"]:
                console().print(f"ok  {item['order']} ({item['tasks']} tasks)")
        for line in errors:
            console(stderr=True).print(f"aipm: error: {line}", markup=False)
        if not dirs:
            console().print(f"no orders under {project.root / project.orders_dir}")
    if errors:
        raise typer.Exit(2)


@app.command()
def status(
    order: str = typer.Argument(..., help="Order id or directory."),
    json_out: bool = JsonOpt,
) -> None:
    """Show every task of an order: status, priority, what it waits on, target files."""
    project = get_project()
    loaded = load_order(project.order_dir(order), project.root)
    tasks = sorted(loaded.tasks.values(), key=lambda t: t.id)
    if json_out:
        print_json({"order": loaded.id, "tasks": [task_row(t) for t in tasks]})
        return
    table = Table(title=f"Order {loaded.id}" + (f" — {loaded.title}" if loaded.title else ""))
    for col in ("task", "status", "pri", "depends on / waiting on", "target files", "tries"):
        table.add_column(col)
    for t in tasks:
        deps = ", ".join(
            d if loaded.tasks.get(d) and loaded.tasks[d].status in FINISHED_OK else f"[bold]{d}…[/]"
            for d in t.depends_on
        )
        table.add_row(t.id, f"[{STATUS_STYLE[t.status.value]}]{t.status.value}[/]", t.priority.value, deps,
                      "\n".join(t.target_files), str(t.attempts))
    console().print(table)
    console().print(status_summary(loaded))
