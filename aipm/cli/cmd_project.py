"""`aipm init`, `aipm validate`, `aipm status`."""

from __future__ import annotations

import os
from typing import Optional

from aipm.cli import grid
from aipm.cli.decl import Argument, Exit, Option, command

from aipm import budget, parsecache, readers, recovery
from aipm.board import as_seen, order_totals, task_row
from aipm.advice import stray_files, unenforced_budget, warnings
from aipm.cli.common import (JsonOpt, console, get_project, json_option, print_json, project_root,
                             read_only, warn)
from aipm.errors import SettingsError, UserError, ValidationError
from aipm.model import FINISHED_OK, status_summary
from aipm.finish import attempt_limit, rework_limit
from aipm.deadends import NAMED, dead_end, never_run_notes, never_runs
from aipm.project import CONFIG_FILE, IdClash, Project
from aipm.runtime import Runtime
from aipm.settings import in_pyproject, load_settings
from aipm.spending import charged
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
#   agent: command       # or a preset: claude (cost, budget caps, permission rules), codex, aider (docs/workers.md)
# review:
#   command: null
# max_cost_usd: null     # budget in US dollars of orders whose order.yaml sets none
# notify: null           # command run when a task fails or is rejected, a run waits for a person, a budget
#                        # stops an order, a run ends
# scope_audit: true      # in a git tree: a task that wrote outside its target_files is sent back
# scope_watch: true      # run audits its attempts from inotify events (false: git status snapshots)
# scope_ignore: []       # globs never charged to a task: files you edit while agents run (NOTES.md, "docs/**")
# preempt: false         # run: an urgent task stops lower-priority work that holds its files
# confine: false         # Landlock holds each worker to its target files (docs/confinement.md)
# workspace: shared      # or worktree: a git worktree per task, merged back (docs/workspaces.md)
# workspace_setup: null  # command run in each new worktree before the worker
# workspace_copy: []     # ignored files (globs) copied into each new worktree
# runner: local          # or ray: attempts run on a Ray cluster (docs/cluster.md)
# ray:
#   address: auto        # the cluster for runner: ray; RAY_ADDRESS, when set, wins
"""

STATUS_STYLE = {
    "QUEUED": "cyan", "IN_PROGRESS": "yellow", "IN_REVIEW": "magenta", "DONE": "green", "COMPLETED": "green",
    "REWORK": "yellow", "REJECTED": "red", "FAILED": "red", "INTERRUPTED": "red", "CANCELLED": "dim",
}


@command()
def init() -> None:
    """Create aipm.yaml, orders/ and the runtime directory .aipm/ in the project root (--root: made if missing)."""
    root = project_root(create=load_settings)
    made, note = [], ""
    config = root / CONFIG_FILE
    if os.path.islink(config) and not config.exists():  # written through, the template landed where it led
        raise UserError(f"{config}: a link to nothing ({os.readlink(config)}); remove it, or give it its file")
    # A broken aipm.yaml, [tool.aipm] or AIPM_* variable is named (exit 2) rather than called a project; a good
    # setting may move the orders.
    orders_dir = load_settings(root).orders_dir
    if not config.exists() and in_pyproject(root):
        # An aipm.yaml is read instead of [tool.aipm], never merged with it: writing one would silently drop
        # every setting there (max_workers, notify, orders_dir: the orders themselves would not be found).
        note = "; its settings are in pyproject.toml [tool.aipm]"
    orders = root / orders_dir  # where `new` puts orders and every command looks for them, not always orders/
    # Before any write: a file or a link to nothing there, or one that leads out of the project, and a `.aipm`
    # link that does, are named (exit 2), not taken for done or a traceback.
    Project(root, orders_dir).order_dirs()
    runtime = Runtime(root)
    if not orders.exists():
        try:
            orders.mkdir(parents=True)
        except OSError as exc:  # a file on the way (orders_dir: a/b, a a file)
            raise UserError(f"{orders}: cannot create the orders directory ({exc.strerror}); move what is in "
                            "the way, or fix orders_dir (`aipm config` says where it is set)") from None
        made.append(f"{orders_dir.rstrip('/')}/")
    if not config.exists() and not note:
        config.write_text(CONFIG_TEMPLATE)
        made.insert(0, CONFIG_FILE)
    if not runtime.dir.exists():
        made.append(".aipm/")
    runtime.ensure()
    out = console()
    if made:
        out.print(f"Initialised aipm in {root}: created {', '.join(made)}{note}", markup=False)
    else:
        out.print(f"{root} is already an aipm project; nothing changed{note}.", markup=False)


@command()
def validate(
    order: Optional[str] = Argument(None, help="Order id or directory (default: every order)."),
    json_out: bool = json_option("a line per order"),
) -> None:
    """Check task and order files. Exit 2, naming the file and the field, on any error.

    Remembers what it checked in the parse cache (in an existing .aipm/ only), so later loads skip parsing.
    """
    parsecache.writable()
    readers.allow()
    try:
        project = get_project()
        settings = load_settings(project.root)
    except SettingsError as exc:
        if not json_out:
            raise
        # The settings file is one of the files checked: a script reading the JSON got nothing at all.
        print_json({"orders": [], "ok": False, "error": str(exc)})
        raise Exit(2) from None
    dirs = [project.order_dir(order)] if order is not None else project.order_dirs()  # ("": refused)
    ids = project.order_ids()
    results, errors, clashed = [], [], set()
    for directory in dirs:
        try:
            project.check_unique(directory, ids)
            loaded = load_order(directory, project.root)
            advice = (stray_files(directory) + warnings(loaded.tasks.values())
                      + unenforced_budget(loaded, loaded.tasks.values(), settings))
            warn(advice)
            results.append({"order": loaded.id, "path": str(directory), "tasks": len(loaded.tasks), "ok": True,
                            "warnings": advice})
        except ValidationError as exc:
            if not isinstance(exc, IdClash) or exc.order_id not in clashed:  # one line names every order of an id
                errors.append(str(exc))
            if isinstance(exc, IdClash):
                clashed.add(exc.order_id)
            results.append({"order": directory.name, "path": str(directory), "ok": False, "error": str(exc),
                            "file": exc.file, "field": exc.field})
    if json_out:
        print_json({"orders": results, "ok": not errors})
    else:
        for item in results:
            if item["ok"]:
                console().print(f"ok  {item['order']} ({item['tasks']} task{'' if item['tasks'] == 1 else 's'})")
        for line in errors:
            console(stderr=True).print(f"aipm: error: {line}", markup=False)
        if not dirs:
            console().print(f"no orders under {project.root / project.orders_dir}", markup=False)  # a path: no markup
    if errors:
        raise Exit(2)


@command()
def status(
    order: str = Argument(..., help="Order id or directory."),
    wide: bool = Option(False, "--wide", help="One line per task, however wide (for grep and wide "
                                              "terminals); by default long cells wrap to the terminal (in a "
                                              "pipe or a file: to COLUMNS if set, else not at all)."),
    json_out: bool = JsonOpt,
) -> None:
    """Show every task of an order: status and why, priority, what it waits on, target files, tries, reworks.

    Tries count attempts against max_attempts; reworks count the times a review sent the task back for another
    attempt (against max_rework); together they make every attempt, and neither passes its limit. `reason`
    says why the latest attempt ended as it did.
    """
    read_only()
    root = project_root()
    settings = load_settings(root)
    # (the costs as the budget counts them: spending.charged)
    rt = Runtime(root)
    on_file = charged(load_order(Project(root, settings.orders_dir).order_dir(order), root), rt)
    loaded = as_seen(on_file, root)
    tasks = sorted(loaded.tasks.values(), key=lambda t: t.id)
    # Behind a dead-end dependency (through any chain): never waited on, it never finishes. Judged by the files as
    # a recovery leaves them: an interrupted attempt whose record is left is re-queued, and a task shown INTERRUPTED
    # for its lost worker (as_seen) is adopted or re-queued, neither a dead end (F4 showed `F2✗` of an F2 whose
    # worker had ended 0).
    recovered = recovery.as_recovered(on_file, rt)
    behind = {tid: roots for roots, ids in never_runs(recovered).items() for tid in ids}
    if json_out:
        rows = [task_row(t, settings) for t in tasks]
        for row in rows:
            if row["id"] in behind:  # the first dead end in its way, and `all` of them (up to deadends.NAMED)
                dead = [{"task": r, "status": loaded.tasks[r].status.value} for r in behind[row["id"]][:NAMED]]
                row["never_runs"] = {**dead[0], "all": dead}
        print_json({"order": loaded.id, "tasks": rows, **order_totals(loaded, settings)})
        return
    cost = budget.recorded(loaded)
    unreported = budget.unreported(loaded)
    limit = budget.of(loaded, settings.max_cost_usd)
    costs = (any(t.cost_usd is not None or t.cost_unreported_usd or t.max_cost_usd is not None for t in tasks)
             or limit is not None)  # else dashes
    reasons = any(t.reason for t in tasks)  # else an empty column, taking the width the paths need
    # A path keeps up to 30 characters on a line, so that the other columns (dependencies wrap at their commas)
    # give way first on a narrow terminal; a path longer than its cell breaks across lines instead of being cut
    # off; a status is one word, never broken (`IN_PROGR` / `ESS`).
    paths = min(30, max((len(path) for t in tasks for path in t.target_files), default=0))
    names = ["task", "status", "pri", "depends on", "target files", "tries", "reworks"]
    table = grid.Grid([grid.Column(name, no_wrap=wide or name == "status",
                                   min_width=paths if name == "target files" else None)
                       for name in names + ["reason"] * reasons + ["cost"] * costs],
                      title=f"Order {loaded.id}" + (f" — {loaded.title}" if loaded.title else ""))

    def dependency(d: str) -> tuple[str, str]:
        """A dependency as it stands: finished, waited on (…), or never finishing (✗)."""
        dep = loaded.tasks.get(d)
        if dep is not None and dep.status in FINISHED_OK:
            return d, ""
        if dep is not None and (dead_end(recovered.tasks[d]) or d in behind):
            return f"{d}✗", "red"
        return f"{d}…", "bold"

    for t in tasks:
        deps = [run for n, d in enumerate(t.depends_on) for run in ([(", ", "")] if n else []) + [dependency(d)]]
        row = [t.id, [(t.status.value, STATUS_STYLE[t.status.value])], t.priority.value, deps,
               "\n".join(t.target_files), f"{t.tries}/{attempt_limit(t, settings)}",
               f"{t.reworks}/{rework_limit(t, settings)}", *[t.reason or ""] * reasons]
        cell = "-" if t.cost_usd is None else budget.usd(t.cost_usd)
        if t.cost_unreported_usd:  # attempts that did not report their cost: at most their caps more
            cell += f" (+ up to {budget.usd(t.cost_unreported_usd)})"
        if t.max_cost_usd is not None:  # its own budget: QUEUED for good once reached, which the status cannot say
            cell += f" of {budget.usd(t.max_cost_usd)}" + (" (reached)" if budget.task_reached(t) else "")
        table.add_row(*row, *[cell] * costs)
    line = status_summary(loaded)
    if cost is not None or unreported or limit is not None:
        line += "; cost " + budget.spent_text(cost, unreported)
    if limit is not None:
        line += f" of max_cost_usd {budget.usd(limit.limit)}" + (" (reached)" if limit.reached else "")
    grid.print_lines([*table.lines(grid.fitting(wide), grid.Styles.of()), line, *never_run_notes(recovered)])
