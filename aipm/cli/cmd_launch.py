"""`aipm launch`, `aipm run`, `aipm exec`: start work through the one launch transaction."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path
from typing import Optional

from aipm.cli.decl import Argument, Exit, Option, command

from aipm import budget, parsecache, recovery, standby, writtenlog
from aipm.cluster import check, require_ray
from aipm.errors import UserError
from aipm.advice import stray_files, unenforced_budget, warnings
from aipm.cli.common import console, json_option, print_json, project_root, warn
from aipm.cli.display import Display, mode_for, plain_line, summary_event
from aipm.cli.resource_options import (
    ConfineOpt, MaxCpuOpt, MaxMemoryOpt, MaxWorkersOpt, NoAutoScalingOpt, NoMonitoringOpt, PreemptOpt, RunnerOpt,
    WorkspaceOpt, settings_from_flags,
)
from aipm.budget import HELD
from aipm.launcher import Launcher, LaunchReport, Options
from aipm.model import DEAD_END, FINISHED_OK, RUNNING, Order, Status, Task
from aipm.deadends import never_run_notes, never_runs
from aipm.plan import BUDGET, FILE_BUSY, LIMIT, NOT_QUEUED, after_starts
from aipm.project import Project, find_task
from aipm.runloop import supervise
from aipm.settings import Settings
from aipm.slots import refusal_note
from aipm.spending import charged
from aipm.view import OrderView

ModelOpt = Option(None, "--model", help="Model for worker templates (overrides the task and aipm.yaml).")
NoReviewOpt = Option(False, "--no-review", help="Skip review: a task that exits 0 becomes DONE.")


def _launcher(max_workers, max_cpu, max_memory, no_monitoring, no_auto_scaling, options: Options,
              runner: str | None = None, preempt: bool = False, confine: bool = False,
              workspace: str | None = None) -> Launcher:
    if options.model is not None and not options.model.strip():
        raise UserError("--model: empty; name a model, or leave the option out for the task's or aipm.yaml's")
    parsecache.writable(not options.dry_run)  # commands that may write keep the parse cache up to date
    root = project_root()
    settings = settings_from_flags(root, max_workers, max_cpu, max_memory, no_monitoring, no_auto_scaling, runner,
                                   preempt, confine, workspace)
    if settings.runner == "ray":
        require_ray()
    return Launcher(Project(root, settings.orders_dir), settings, options)


def warn_unbounded(order: Order, tasks: Iterable[Task], settings: Settings) -> None:
    """Files of the order that are no task files, and among the tasks that may still run, agent tasks that
    claim no files or that its budget cannot count."""
    tasks = [t for t in tasks if t.status not in FINISHED_OK | DEAD_END]
    warn(stray_files(Path(order.path)) + warnings(tasks) + unenforced_budget(order, tasks, settings))


def reach_cluster(launcher: Launcher, tasks: Iterable[Task]) -> None:
    """With --runner ray, the cluster reached once before anything starts, where a task may still run (cluster.check):
    one that cannot be reached is one line and exit 2, not a failed attempt for every task."""
    if launcher.settings.runner == "ray" and not launcher.options.dry_run and any(
            t.status not in FINISHED_OK | DEAD_END for t in tasks):
        check(launcher.settings.ray_address, launcher.settings.sources["ray_address"])


@command()
def launch(
    order: str = Argument(..., help="Order id or directory."),
    dry_run: bool = Option(False, "--dry-run", help="Show what would start; change nothing anywhere."),
    model: Optional[str] = ModelOpt,
    no_review: bool = NoReviewOpt,
    max_workers: Optional[int] = MaxWorkersOpt,
    max_cpu: Optional[float] = MaxCpuOpt,
    max_memory: Optional[float] = MaxMemoryOpt,
    no_monitoring: bool = NoMonitoringOpt,
    no_auto_scaling: bool = NoAutoScalingOpt,
    runner: Optional[str] = RunnerOpt,
    confine: bool = ConfineOpt,
    workspace: Optional[str] = WorkspaceOpt,
    json_out: bool = json_option("a line per task"),
) -> None:
    """Start the launchable tasks as detached workers and exit at once.

    Each worker finishes its own task (review, status) and then starts the successors that became launchable.
    Tasks that wait for capacity alone (a worker slot, the load, a budget running attempts hold), or for files
    another order's running task holds, get the order's standby owner, which starts them as room frees, whichever
    order's worker frees it (`aipm ps` lists it).
    """
    launcher = _launcher(max_workers, max_cpu, max_memory, no_monitoring, no_auto_scaling,
                         Options(no_review, model, dry_run), runner, confine=confine, workspace=workspace)
    view = OrderView(launcher.project.order_dir(order), launcher.project.root, watch=False)
    warn_unbounded(view.order, view.order.tasks.values(), launcher.settings)
    reach_cluster(launcher, view.order.tasks.values())
    if not dry_run:
        recovery.read_lost_usage_ahead(launcher.runtime)
    report = launcher.launch_ramped(view)
    if report.plan and not dry_run:
        after_starts(report.plan, report.order, {item["id"] for item in report.launched})
    waiting = [b.as_dict() for b in report.plan.waiting] if report.plan else []
    held = _stand_by(launcher, view, report)
    if json_out:
        print_json({"order": view.order.id, "dry_run": dry_run, "launched": report.launched,
                    "deferred": report.deferred, "failed": report.failed, "recovered": report.recovered,
                    "budget_stop": report.plan.budget_stop, "waiting": waiting,
                    "spent": [b.as_dict() for b in report.plan.spent], "standby": held,
                    "blocked": [b.as_dict() for b in report.plan.blocked.values() if b.reason != NOT_QUEUED]})
    else:
        say_launched(report, waiting, view.order.id, dry_run, held)
    # A task held by its own reached max_cost_usd never starts, as the order's budget holds them all: said the same.
    if report.failed or report.plan.budget_stop or report.plan.spent:
        raise Exit(1)


def _stand_by(launcher: Launcher, view: OrderView, report: LaunchReport) -> dict | None:
    """A launch that left tasks held by capacity alone, or by another order's files, leaves the order a standby
    owner (standby.py), or names the one it has: {tasks, detail, pid, capacity} (pid None: a dry run; capacity
    False: one waits for another order's files), or None when no task waits so. (A launch that started nothing
    said `nothing to launch`, exit 0, and nothing ever started them; an owner starts only its own order's tasks, at
    its end, so a slot or a file another order's task freed stayed unused.)"""
    held = standby.held(report)
    if not held:
        return None
    out = {"tasks": list(held), "detail": next(iter(held.values())), "details": held, "pid": None,
           "capacity": standby.for_capacity(report)}
    if launcher.options.dry_run:
        return out
    with launcher.runtime.launch_lock():
        there = standby.current(launcher.runtime, view.order.id)
        # One started with other settings (`--no-resource-monitoring`, `--max-workers`, ...) is replaced: this launch
        # said its tasks would start, and they started as that one's settings allowed (one at a time, on a load
        # this launch had said not to read). It leaves at its next look, no longer named.
        if there and there.get("settings") == launcher.work_flags():
            out["pid"] = there["pid"]
        else:
            out["pid"] = launcher.spawn_standby(str(view.dir), view.order.id)
            standby.claim(launcher.runtime, view.order.id, out["pid"], list(held), launcher.work_flags())
    return out


SHOWN = 10  # the queued tasks `launch` says why it did not start; `detect` lists every one


def say_launched(report: LaunchReport, waiting: list[dict], order_id: str, dry_run: bool,
                 held: dict | None = None) -> None:
    """`launch`'s lines, as they are: a detail may name a lock node, whose path may hold `[...]` (no markup)."""
    out = console()
    verb = "would start" if dry_run else "started"
    for item in report.launched:
        out.print(f"{verb} {item['id']}" + (f" (pid {item['pid']})" if item.get("pid") else ""), markup=False)
    for item in report.deferred:
        out.print(f"deferred {item['id']}: {item['detail']}", markup=False)
    for item in report.failed:
        console(stderr=True).print(f"failed {item['id']}: {item['error']}", markup=False)
    for item in waiting:
        out.print(f"waiting {item['id']}: {item['detail']}", markup=False)
    if report.plan.budget_stop:
        console(stderr=True).print(f"aipm: {order_id}: {report.plan.budget_stop}", markup=False)
    for blocked in report.plan.spent:
        console(stderr=True).print(f"aipm: {order_id}/{blocked.id}: {blocked.detail}", markup=False)
    if held:
        # (capacity: a slot, the load, a budget; else files another order's task holds, for which it waits too)
        one = len(held["tasks"]) == 1
        what = "capacity" if held["capacity"] else "room"
        when = "there is" if held["capacity"] else "it can" if one else "they can"
        them = "it" if one else "them"
        then = (f"a standby owner would start {them} once {when}" if dry_run else
                f"its standby owner (pid {held['pid']}) starts {them} once {when} (`aipm ps` shows it)")
        # A line per reason: B1 waiting for a slot and B2 for another order's file were both said to wait for the file.
        reasons: dict[str, list[str]] = {}
        for tid, detail in held["details"].items():
            reasons.setdefault(detail, []).append(tid)
        lines = [f"{', '.join(ids)} {'waits' if len(ids) == 1 else 'wait'} for {what} ({detail})"
                 for detail, ids in reasons.items()]
        for line in [f"{lines[0]}; {then}"] if len(lines) == 1 else [*lines, then]:
            out.print(line, markup=False)
    elif not (report.launched or report.deferred or report.failed or waiting or report.plan.budget_stop
              or report.plan.spent):
        # Why, as detect says it: a bare "nothing to launch" read as aipm ignoring the queued tasks (their running
        # dependency's owner, or the holder of their files, starts them at its end).
        why = [b for b in report.plan.blocked.values() if b.reason != NOT_QUEUED]
        out.print(f"nothing to launch in {order_id} now" + (":" if why else f": no task of {order_id} is QUEUED"),
                  markup=False)
        for blocked in why[:SHOWN]:
            out.print(f"  {blocked.id}: {blocked.detail}", markup=False)
        if len(why) > SHOWN:
            out.print(f"  and {len(why) - SHOWN} more (`aipm detect {order_id}` lists them)", markup=False)


@command()
def run(
    order: str = Argument(..., help="Order id or directory."),
    model: Optional[str] = ModelOpt,
    no_review: bool = NoReviewOpt,
    max_workers: Optional[int] = MaxWorkersOpt,
    max_cpu: Optional[float] = MaxCpuOpt,
    max_memory: Optional[float] = MaxMemoryOpt,
    no_monitoring: bool = NoMonitoringOpt,
    no_auto_scaling: bool = NoAutoScalingOpt,
    runner: Optional[str] = RunnerOpt,
    preempt: bool = PreemptOpt,
    confine: bool = ConfineOpt,
    workspace: Optional[str] = WorkspaceOpt,
    json_out: bool = Option(False, "--json", help="Stream one JSON object per event, then a summary event."),
) -> None:
    """Run an order to the end: launch, watch, review, start successors as soon as they are unblocked.

    Every event is one line (on a terminal, above a live table of the running tasks); the last line counts the
    tasks by status.

    Exit 0 when every task is DONE/COMPLETED, 1 when some failed or stay blocked (or the order's
    budget, max_cost_usd, stopped new attempts or the order ended over it, or its Ray cluster was lost mid-run: its
    tasks QUEUED again, attempts not counted), 130 when interrupted.
    Safe to kill: a new `aipm run` re-attaches to the workers that are still running.
    """
    launcher = _launcher(max_workers, max_cpu, max_memory, no_monitoring, no_auto_scaling,
                         Options(no_review, model), runner, preempt, confine, workspace)
    view = OrderView(launcher.project.order_dir(order), launcher.project.root)
    warn_unbounded(view.order, view.order.tasks.values(), launcher.settings)
    reach_cluster(launcher, view.order.tasks.values())
    display = Display(mode_for(json_out), view)
    try:
        code = supervise(launcher, view, display)
    finally:
        display.close()
    counted = charged(view.order, launcher.runtime)
    stop = budget.of(counted, launcher.settings.max_cost_usd)
    if not json_out and code == 1 and stop is not None and stop.reached and any(
            t.status == Status.QUEUED for t in view.order.tasks.values()):
        console(stderr=True).print(f"aipm: {view.order.id} stopped: {stop.detail}", markup=False)
    if not json_out and code == 1:
        _never_run(counted)
    if not json_out and code == 1:
        _running_unrecorded(launcher, view.order)
    if code == 1:
        for event in _held_elsewhere(launcher, view):
            display(event) if json_out else console(stderr=True).print(f"aipm: {event['detail']}", markup=False)
    _pending_merges(launcher.project.root, view.order)
    summary = summary_event(view.order, code)
    if json_out:
        display(summary)
    else:
        print(plain_line(summary), file=sys.stderr if code != 0 else sys.stdout)  # plain text: no rich needed
    said_last(launcher)
    raise Exit(code)


def said_last(launcher: Launcher) -> None:
    """The run has printed its last line: its output files in the tree (`aipm run > run.log`) are noted for the
    audits of other runs in flight, whose windows its last lines may fall in (writtenlog.note_output). Best effort:
    none where its output is no file in the tree (no lock taken), and nothing it meets (a closed pipe, a state
    directory gone) changes how it exits."""
    with suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
        if writtenlog.has_output(launcher.runtime):
            with launcher.runtime.launch_lock():
                writtenlog.note_output(launcher.runtime)


def _never_run(order: Order) -> None:
    """The tasks left QUEUED behind a dead end (deadends.dead_end: a dependency that ended FAILED, REJECTED or
    CANCELLED, or one past its own budget; `order`'s costs as the budget counts them): the closing counts alone do
    not say why they never started, nor what would start them."""
    for note in never_run_notes(order):
        console(stderr=True).print(f"aipm: {note} and run again", markup=False)
    # One that nothing waits on: the counts said `FAILED 1`, and its finish line may be far above
    behind = {root for roots in never_runs(order) for root in roots}
    for task in order.tasks.values():
        if task.status in (Status.FAILED, Status.REJECTED, Status.INTERRUPTED) and task.id not in behind:
            why = f" ({task.reason})" if task.reason else ""
            what = ("check its work" if task.status == Status.INTERRUPTED else
                    f"`aipm logs {task.id}` shows why; fix it")
            console(stderr=True).print(f"aipm: {task.id} is {task.status}{why}: {what}, then `aipm retry {task.id}` "
                                       "and run again", markup=False)


def _running_unrecorded(launcher: Launcher, order: Order) -> None:
    """The running tasks the run left because their worker runs on without a record it can see (the project moved
    since the worker started, or a worker removed the state directory, its owner dead): the closing counts alone
    said IN_PROGRESS with no word of why the run ended."""
    from aipm import subreaper  # only for a run that ends unfinished

    recorded = {rec.task for rec in launcher.records() if rec.order == order.id}
    running = {(order.id, t.id) for t in order.tasks.values() if t.status in RUNNING and t.id not in recorded}
    for _, task_id in sorted(subreaper.tasks_running(launcher.project.root, running) if running else ()):
        console(stderr=True).print(f"aipm: {task_id}: its worker runs on without a record here (the project moved, "
                                   "or its state directory was removed, since it started); run again once it has "
                                   "ended", markup=False)


def _held_elsewhere(launcher: Launcher, view: OrderView) -> list[dict]:
    """The queued tasks this run left because files they need are held by another order's task whose worker is
    gone (until `aipm recover` of that order): the closing counts alone said nothing of them."""
    from aipm.board import survey  # only for a run that ends unfinished

    try:
        _, result, _, _, _ = survey(launcher, view.dir)
    except UserError:
        return []
    live = {rec.key for rec in launcher.records() if rec.alive()}
    out = []
    for blocked in result.blocked.values():
        holder = blocked.tasks[0] if blocked.tasks else ""
        if blocked.reason == FILE_BUSY and "/" in holder and holder not in live:
            # the plan's detail names the holder, and the `aipm recover` that frees it when its worker is gone
            out.append({"event": "blocked", "task": blocked.id, "detail": f"{blocked.id} waits: {blocked.detail}"})
    return out


def _pending_merges(root: Path, order: Order) -> None:
    """A task no one runs whose merge was cut short (cancelled after a crash mid-merge) leaves the tree
    half-merged until its worktree is removed: say so at the end of every run, and in its log."""
    from aipm.workspace import merge_dir, note_pending_merge  # the supervisor has loaded it already

    if not merge_dir(root, order.id, "-").parent.is_dir():
        return  # no merge of this order was ever planned here: one look, not one per task
    for task in order.tasks.values():
        note = None if task.status in RUNNING else note_pending_merge(root, order.id, task.id, "run")
        if note:
            console(stderr=True).print(f"aipm: {task.id}: {note}", markup=False)


@command("exec")
def exec_(
    task: str = Argument(..., help="Task id, ORDER/TASK, or path to the task file."),
    parallel: bool = Option(False, "--parallel", help="Also launch the order's other launchable tasks."),
    model: Optional[str] = ModelOpt,
    no_review: bool = NoReviewOpt,
    max_workers: Optional[int] = MaxWorkersOpt,
    max_cpu: Optional[float] = MaxCpuOpt,
    max_memory: Optional[float] = MaxMemoryOpt,
    no_monitoring: bool = NoMonitoringOpt,
    no_auto_scaling: bool = NoAutoScalingOpt,
    runner: Optional[str] = RunnerOpt,
    confine: bool = ConfineOpt,
    workspace: Optional[str] = WorkspaceOpt,
    json_out: bool = Option(False, "--json", help="Stream one JSON object per event, then a summary event."),
) -> None:
    """Run one task in the foreground (with its review and retries). Exit 0 when it ends DONE/COMPLETED.

    A task another aipm runs already (a detached launch, a run) is waited for, with a `watching` line; the exit
    code is what it comes to.

    Run by a worker's command, it takes that worker's slot when the command waits for it with nothing else
    running (a recursive make's job slot): one such exec at a time. Started in the background (`aipm exec X &`)
    it needs a free slot of its own; without one it says why and exits 1, as any exec does.
    """
    launcher = _launcher(max_workers, max_cpu, max_memory, no_monitoring, no_auto_scaling,
                         Options(no_review, model), runner, confine=confine, workspace=workspace)
    order_dir, task_id = find_task(launcher.project, task)
    view = OrderView(order_dir, launcher.project.root)
    warn_unbounded(view.order, [view.order.tasks[task_id]], launcher.settings)
    reach_cluster(launcher, view.order.tasks.values() if parallel else [view.order.tasks[task_id]])
    display = Display("json" if json_out else "plain", view)
    before = view.order.tasks[task_id]
    code = supervise(launcher, view, display, only=task_id, detach_others=parallel)
    try:
        _exec_end(launcher, view, display, order_dir, task_id, before, code, json_out)
    finally:
        said_last(launcher)


def _not_waited(records: list, reasons: list) -> str | None:
    """Why this exec did not wait for the start its reasons say the task waits for, where that is its caller's
    doing: the worker slot its calling worker holds, or the budget its calling attempt holds part of (waiting for
    that attempt, which waits for this exec, would be for ever)."""
    if any(r.reason == LIMIT for r in reasons):
        return refusal_note(records)
    if any(r.reason == BUDGET and r.detail.startswith(HELD) for r in reasons) and any(
            rec.encloses_us() for rec in records):
        return ("this exec runs inside an attempt, which does not wait for a budget that running attempts hold: "
                "the attempt it runs in may be one of them, and cannot end before it does; a run of the order starts "
                "the task once they have ended")
    return None


def _exec_end(launcher: Launcher, view: OrderView, display: Display, order_dir: Path, task_id: str, before: Task,
              code: int, json_out: bool) -> None:
    """exec's closing lines, and its exit code (Exit)."""
    final = view.refresh().tasks.get(task_id)
    # Its file was deleted while it waited, or while it ran (the view keeps that task's last valid version while
    # its outcome is held, said above): nothing to show but that.
    if final is None or not os.path.exists(final.path):
        if json_out:
            display({"event": "summary", "order": view.order.id, "task": task_id, "status": None, "exit_code": code})
        else:
            console(stderr=True).print(f"{task_id}: its task file {order_dir / (task_id + '.yaml')} is gone",
                                       markup=False)
        raise Exit(code)
    reasons = []
    ran = (final.attempts, final.started_at) != (before.attempts, before.started_at)
    if not ran and before.status not in RUNNING and code != 130:  # nothing ran (not even adopted): say why
        from aipm.cli.cmd_detect import reasons_for  # only here: `run` does without it

        looker = Launcher(launcher.project, launcher.settings, Options(dry_run=True))  # reads only, no lock
        _, _, launchable, found, _ = reasons_for(looker, order_dir, task_id)
        reasons = [] if launchable else found  # launchable: its launch failed, and the 'failed' line said why
    if json_out:  # stdout stays JSON lines: the closing line is an event too
        display({"event": "summary", "order": view.order.id, "task": task_id, "status": final.status.value,
                 "reason": final.reason, "exit_code": code, **({"reasons": [r.as_dict() for r in reasons]}
                                                               if reasons else {})})
        raise Exit(code)
    if reasons:
        from aipm.cli.cmd_detect import print_reasons, print_retry_hint

        print_reasons(task_id, False, reasons)
        note = _not_waited(looker.records(), reasons)
        if note:
            console().print(f"  ({note})", markup=False)
        print_retry_hint(task_id, final.status)
    why = f" ({final.reason})" if final.reason else ""
    console(stderr=code != 0).print(f"{task_id}: {final.status.value}{why}", markup=False)
    raise Exit(code)
