"""`aipm detect` and `aipm why`: what may start now, and why the rest may not."""

from __future__ import annotations

from pathlib import Path

from aipm.cli import grid
from aipm.cli.decl import Argument, Option, command

from aipm import outcome, recovery, workspace
from aipm.board import as_seen, survey, survey_about
from aipm.cli.common import JsonOpt, json_option, print_json, project_root, read_only, warn
from aipm.cli.resource_options import MaxWorkersOpt
from aipm.launcher import Launcher, Options
from aipm.model import DEAD_END, FINISHED_OK, RUNNING, Status
from aipm.plan import STALE
from aipm.project import Project, find_task
from aipm.reasons import Reasons, all_reasons
from aipm.settings import load_settings


def _launcher(max_workers: int | None) -> Launcher:
    """A launcher that only looks: detection never writes (dry-run rules for records, no lock) and takes no
    CPU or memory reading (its plan counts the slots max_workers leaves), so it imports no psutil (~30 ms here)."""
    root = project_root()
    settings = load_settings(root, {"max_workers": max_workers, "enable_monitoring": False})
    return Launcher(Project(root, settings.orders_dir), settings, Options(dry_run=True))


def reasons_for(launcher: Launcher, order_dir: Path, task_id: str):
    """(order, task id, launchable now?, every reason it is not, id → error of each other task file of the order
    that does not validate: planned as a task that cannot start, board.survey_about)."""
    order, result, _, busy, outside, invalid = survey_about(launcher, order_dir, task_id)
    launchable = any(t.id == task_id for t in result.launchable)
    elsewhere = [b for b in busy if b.order_id != order.id]
    planned = recovery.as_recovered(order, launcher.runtime)  # (as the plan saw it: board.survey)
    return order, task_id, launchable, all_reasons(planned, result, task_id, elsewhere, outside, invalid), invalid


def _stale_as_seen(launcher: Launcher, loaded, reasons: list):
    """`reasons` with each stale task's detail as `status` shows that task (lost: INTERRUPTED, or its review to
    run again), and the order as shown."""
    seen = as_seen(loaded, launcher.project.root)
    out = []
    for r in reasons:
        shown = seen.tasks[r.id]
        if r.reason == STALE and shown is not loaded.tasks[r.id]:
            r = r._replace(detail=f"status is {shown.status.value} ({shown.reason})")
        out.append(r)
    return out, seen


def _without_id(reason) -> dict:
    """A reason as `blocked` lists it, inside the entry that names its task."""
    return {k: v for k, v in reason.as_dict().items() if k != "id"}


def _paths(task) -> list[str]:
    """A task's target files as the overlap rule sees them (`./src/../a.py` is `a.py`)."""
    return [str(t) for t in task.targets]


def print_retry_hint(task_id: str, status: Status) -> None:
    if status in FINISHED_OK | DEAD_END | {Status.INTERRUPTED}:  # what `retry` takes: say so
        print(f"  `aipm retry {task_id}` queues it again")


def print_reasons(task_id: str, launchable: bool, reasons: list) -> None:
    if launchable:
        print(f"{task_id} can start now.")
        return
    grid.print_lines([f"{task_id} cannot start:", *(f"  - {grid.plain(reason.detail)}" for reason in reasons)])


@command()
def detect(
    order: str = Argument(..., help="Order id or directory."),
    summary: bool = Option(False, "--summary", help="Counts only: total, queued, launchable, blocked (by dependencies, files, the worker limit, the budget), stale. With --json the whole object still, its counts under `summary`."),
    max_workers: int = MaxWorkersOpt,
    json_out: bool = JsonOpt,
) -> None:
    """List the tasks that may start now, in launch order, and why every other task may not. Never writes."""
    read_only()
    launcher = _launcher(max_workers)
    loaded, result, free, busy, outside = survey(launcher, launcher.project.order_dir(order))
    if result.stale:  # a stale task as `status` and `why` show it
        result.blocked.update((b.id, b) for b in _stale_as_seen(launcher, loaded, list(result.blocked.values()))[0])
    # The plan names the first reason it meets; a task held by the budget and a dependency showed only the budget.
    reasons = Reasons(recovery.as_recovered(loaded, launcher.runtime), result,
                      [b for b in busy if b.order_id != loaded.id], outside)
    others = {tid: reasons.others(tid) for tid in result.blocked}
    if json_out:
        data = {
            "order": loaded.id,
            "free_slots": free,
            "launchable": [{"id": t.id, "priority": t.priority.value, "target_files": _paths(t)}
                           for t in result.launchable],
            "blocked": [{**b.as_dict(), **({"other_reasons": [_without_id(r) for r in others[b.id]]}
                                           if others[b.id] else {})} for b in result.blocked.values()],
            "stale": result.stale,
            "summary": result.summary(loaded),
        }
        print_json(data)
        return
    if summary:
        grid.print_lines(f"{key.replace('_', ' '):>26}: {value}" for key, value in result.summary(loaded).items())
        return
    styles = grid.Styles.of()
    slots = f"({free} free worker slot(s))"
    lines: list[str] = []
    if result.launchable:
        table = grid.Grid([grid.Column(name) for name in ("#", "task", "pri", "target files")],
                          title=f"Launchable in {loaded.id} {slots}")
        for i, t in enumerate(result.launchable, 1):
            table.add_row(str(i), t.id, t.priority.value, "\n".join(_paths(t)))
        lines += table.lines(grid.fitting(), styles)
    else:  # an empty table's frame said nothing
        lines.append(f"Nothing may start in {loaded.id} now {slots}")
    waiting = [b for b in result.blocked.values() if b.reason != "not_queued"]
    if waiting:
        lines.append(styles.paint([("Not launchable:", "bold")]))
        for b in waiting:
            lines.append(f"  {b.id}: {grid.plain(b.detail)}")
            lines += [f"     also: {grid.plain(other.detail)}" for other in others[b.id]]
    if result.stale:
        lines.append(styles.paint([(f"Stale (worker gone, files still busy): {', '.join(result.stale)} — run "
                                    "`aipm recover`", "yellow")]))
    grid.print_lines(lines)


@command()
def why(
    task: str = Argument(..., help="Task id, ORDER/TASK, or path to the task file."),
    max_workers: int = MaxWorkersOpt,
    json_out: bool = json_option("the explanation"),
) -> None:
    """Explain whether a task may start now, and if not, every reason. Another task file of its order that does
    not validate (being edited) counts as a task that cannot start, said on stderr."""
    read_only()
    launcher = _launcher(max_workers)
    loaded, task_id, launchable, reasons, invalid = reasons_for(launcher, *find_task(launcher.project, task))
    # A sibling's file being edited: planned as a task that cannot start, and said (unless a reason names it).
    warn([f"{error} (explained as a task that cannot start: a run going on waits for its fix; `launch` or a new "
          "`run` refuses the order until then)" for tid, error in invalid.items()
          if not any(tid in r.tasks for r in reasons)])
    current = loaded.tasks[task_id]
    reasons, seen = _stale_as_seen(launcher, loaded, reasons)
    shown = seen.tasks[task_id]
    # (attempts since the last retry: one that merged is DONE or COMPLETED, and a retry clears them)
    kept = (workspace.last_kept(launcher.project.root, loaded.id, task_id) if current.attempts
            and current.status not in FINISHED_OK and current.status not in RUNNING
            and workspace.kind(current, launcher.settings) == workspace.WORKTREE else None)
    # A running task's attempt as `ps` says it: "status is IN_PROGRESS" alone told nothing of a worker whose owner
    # died (no aipm records its end until `aipm recover` adopts it).
    rec = launcher.runtime.read_record(loaded.id, task_id) if current.status in RUNNING else None
    state = said = None
    if rec is not None:
        from aipm import workerstate  # (here: `why` of a task not running needs none of what it reads)

        state = workerstate.state(rec, launcher.project.root)[0]
        if state in workerstate.UNWATCHED:
            said = workerstate.describe(state, bool(rec.stopping), rec.phase)[0]
    if json_out:
        print_json({"order": loaded.id, "task": task_id, "launchable": launchable,
                    "reasons": [r.as_dict() for r in reasons],
                    "status": shown.status.value, "last_outcome": shown.reason, **({"kept": kept} if kept else {}),
                    **({"attempt_state": state} if state else {})})
        return
    failed = current.status == Status.QUEUED and (current.reason or "").startswith(outcome.LAUNCH_FAILED)
    if launchable and failed:  # the plan lets it start, but its last start failed: say why, and the fix
        print(f"{task_id} can start now, but its last launch failed: "
              f"{grid.plain(current.reason[len(outcome.LAUNCH_FAILED):])}")
    else:
        print_reasons(task_id, launchable, reasons)
        if current.reason and current.status == Status.QUEUED:  # other statuses name it in their reason already
            print(f"  last {'' if failed else 'attempt: '}{grid.plain(current.reason)}")
    if said:
        print(f"  its attempt: {said}")
    if kept:
        print(f"  its last attempt's changes are kept in {grid.plain(kept)}")
    print_retry_hint(task_id, current.status)
