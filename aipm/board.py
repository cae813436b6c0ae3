"""What a reader sees of a project: each task as a row, what it waits on, and the live workers.

`status`, `detect`, `why` and the web dashboard read the project through here, so they never disagree.
Read-only: a dry-run launcher takes no lock and writes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from aipm import agents, budget, lostreviews, outcome, recovery, subreaper, unrecorded, workerstate
from aipm.errors import UserError, ValidationError
from aipm.finish import attempt_limit, rework_limit
from aipm.launcher import Launcher
from aipm.model import RUNNING, Order, Status, Task, status_summary
from aipm.plan import NOT_QUEUED, Plan, plan
from aipm.record import Record
from aipm.runtime import Runtime
from aipm.settings import Settings
from aipm.spending import charged
from aipm.store import check_links, load_order, load_task, order_meta, task_names

# Why a task whose worker was lost reads as INTERRUPTED: what its file still says and what to do.
LOST = "worker lost with its supervisor; `aipm recover` re-queues it"
# The same for one whose worker ended, its exit code left for the supervisor that died (recovery records it).
ENDED = "its supervisor died before recording how its worker ended; `aipm recover` records it"
# The same for one cancelled while its file was gone, the file put back after a recovery dropped its record.
CANCEL_KEPT = "cancelled by the user while its task file was gone; `aipm recover` writes CANCELLED"


def task_row(task: Task, settings: Settings) -> dict:
    return {
        "id": task.id, "title": task.title, "status": task.status.value, "priority": task.priority.value,
        "depends_on": list(task.depends_on), "target_files": list(task.target_files), "attempts": task.attempts,
        "exit_code": task.exit_code, "started_at": task.started_at, "finished_at": task.finished_at,
        "file": task.path, "reason": task.reason, "tries": task.tries,
        "max_attempts": attempt_limit(task, settings), "reworks": task.reworks,
        "max_rework": rework_limit(task, settings), "preemptions": task.preemptions,
        # Unknown usage is left out, never shown as 0.
        **({"cost_usd": task.cost_usd} if task.cost_usd is not None else {}),
        # The caps of its attempts that did not report their cost: up to this much more may have been spent.
        **({"cost_unreported_usd": task.cost_unreported_usd} if task.cost_unreported_usd else {}),
        # Its own budget over its attempts; once reached no attempt of it starts (the plan's reason `budget`).
        **({"max_cost_usd": task.max_cost_usd, "budget_reached": budget.task_reached(task)}
           if task.max_cost_usd is not None else {}),
        **({"tokens": dict(task.tokens)} if task.tokens else {}),
        # The agent's session of the latest attempt, which `retry --resume` continues; left out when none is known.
        **({"session_id": task.session_id} if task.session_id else {}),
    }


def as_seen(order: Order, root: Path) -> Order:
    """The order as it stands: a running task whose worker is gone (its supervisor and wrapper died) is INTERRUPTED,
    as the contract has it, though its file says IN_PROGRESS or IN_REVIEW until a recovery writes it. A reader
    writes nothing: it shows the task so, with the reason and what to do (LOST, ENDED), and the file stays as it
    is. A review stopped or lost without a verdict is no lost worker: the task stays IN_REVIEW, its work kept,
    and the reason says that its review runs again (lostreviews.review_pending), as `run` said when it stopped it.
    And a live worker outranks its file: a task whose file says otherwise (a worker wrote DONE into it, a `git
    checkout` put it back to QUEUED) is shown IN_PROGRESS (IN_REVIEW: its reviewer) while its worker runs, as its
    owner records it when it ends (`detect` and `why` say the same: plan.WORKER_RUNNING)."""
    rt = Runtime(root)
    running = [t for t in order.tasks.values() if t.status in RUNNING]
    records = _records(rt, order.id)
    if not (running and _gone(rt, order.id, running, records) or _outran(order.tasks.values(), records)):
        return order
    # Confirmed between launch rounds: a round writes a start's status before its record, and an outcome before
    # removing the record, so a look inside one could take a task starting or ending for a lost one.
    with rt.between_rounds():
        records = _records(rt, order.id)
        now = [t for t in (_reload(t, root) for t in running) if t is not None and t.status in RUNNING]
        seen = {}
        for task, rec in _outran([t for t in (_reload(t, root) for t in order.tasks.values() if t.id in records)
                                  if t is not None], records):
            status = Status.IN_REVIEW if rec.phase == "review" else Status.IN_PROGRESS
            seen[task.id] = replace(task, status=status, reason=outcome.one_line(
                f"its file says {task.status.value}, but its {'reviewer' if rec.phase == 'review' else 'worker'} "
                f"(pid {rec.pid}) is still running; its owner records how it ends"))
        for task, rec in _gone(rt, order.id, now, records):
            again = lostreviews.review_pending(task, rec) if rec is not None else ""
            if again:
                seen[task.id] = replace(task, reason=again)
            else:
                if rec is not None and recovery.outcome_left(task, rec, rt):
                    why = unrecorded.waiting(rec) or ENDED  # handed over by its owner, or its owner died
                else:
                    why = CANCEL_KEPT if rec is None and recovery.cancelled_while_gone(rt, order.id, task) else LOST
                seen[task.id] = replace(task, status=Status.INTERRUPTED, reason=outcome.interrupted(why))
    if not seen:
        return order
    return replace(order, tasks={**order.tasks, **seen})


def _records(rt: Runtime, order_id: str) -> dict[str, Record]:
    return {rec.task: rec for rec in rt.records() if rec.order == order_id}


def _outran(tasks, records: dict[str, Record]) -> list[tuple[Task, Record]]:
    """The tasks whose file says they are not running while a worker (or reviewer) of theirs runs."""
    return [(t, records[t.id]) for t in tasks
            if t.status not in RUNNING and t.id in records and records[t.id].worker_alive()]


def _gone(rt: Runtime, order_id: str, running: list[Task], records: dict[str, Record]
          ) -> list[tuple[Task, Record | None]]:
    """The running tasks with no live worker or owner, each with its record (None: none left, and no process of
    the task runs: a worker may outlive its deleted record)."""
    return [(t, records.get(t.id)) for t in running
            if (not records[t.id].alive() if t.id in records else not subreaper.task_runs(rt.root, order_id, t.id))]


def _reload(task: Task, root: Path) -> Task | None:
    try:
        return load_task(task.path, root)
    except (UserError, OSError):
        return None  # gone or mid-edit: not shown as lost on a guess


def order_totals(order: Order, settings: Settings) -> dict:
    """The order's recorded cost, tokens (the sums of its tasks') and budget, each when known (`status --json`, the
    dashboard), and whether the budget is reached: the planner's own verdict, so no reader works it out again and disagrees. The caps of
    attempts that did not report their cost (`cost_unreported_usd`: up to this much more may have been spent)
    count against the budget, apart from the cost."""
    cost = budget.recorded(order)
    unreported = budget.unreported(order)
    limit = budget.of(order, settings.max_cost_usd)
    tokens: dict[str, int] = {}
    for task in order.tasks.values():
        for kind, count in (task.tokens or {}).items():
            tokens[kind] = tokens.get(kind, 0) + count
    return {**({"cost_usd": cost} if cost is not None else {}),
            **({"cost_unreported_usd": unreported} if unreported else {}),
            **({"tokens": {k: tokens[k] for k in agents.TOKEN_KINDS if k in tokens}} if tokens else {}),
            **({"max_cost_usd": limit.limit, "budget_reached": limit.reached} if limit is not None else {})}


def survey(launcher: Launcher, order_dir: Path, order: Order | None = None, invalid: Mapping[str, str] = {},
           ) -> tuple[Order, Plan, int, list, list]:
    """The same planning inputs `launch` uses (the order, live worker records, free slots) and the plan.
    `order`: the order as read already; `invalid`: its tasks that stand in for files that do not validate
    (excused), id → the error, which never start.

    Returns (order, plan, free slots, busy files of every running task in the project, locks held outside aipm).
    """
    order = charged(load_order(order_dir, launcher.project.root) if order is None else order, launcher.runtime)
    records = launcher.records()
    busy, live, count = launcher.holders(order, records)
    free = max(0, launcher.settings.max_workers - count)
    spend = launcher.budget(order, records)
    outside = launcher.outside(records)
    refused = launcher.refused_here(order.tasks.values())
    if invalid:
        refused = {**refused, **{tid: f"its file does not validate: {why}" for tid, why in invalid.items()}}
    # (planned as a launch's recovery leaves it: an interrupted re-queue is finished first)
    planned = plan(recovery.as_recovered(order, launcher.runtime), busy, live, free, budget=spend, outside=outside,
                   refused=refused)
    return order, planned, free, busy, outside


def survey_about(launcher: Launcher, order_dir: Path, task_id: str
                 ) -> tuple[Order, Plan, int, list, list, dict[str, str]]:
    """survey() for a reader asking about one task (`why`), and id → error of each sibling task file that does not
    validate: a file being edited beside a running order (the run keeps it out and waits for its fix) made `why` of
    every task of the order an error naming that file. Such a task is planned as one that cannot start (excused)."""
    try:
        return (*survey(launcher, order_dir), {})
    except ValidationError:
        order, invalid = excused(order_dir, launcher.project.root, task_id)
        return (*survey(launcher, order_dir, order, invalid), invalid)


def excused(order_dir: Path, root: Path, task_id: str) -> tuple[Order, dict[str, str]]:
    """The order with each task file that does not validate (its fields, a dependency that is no task of the order,
    its place in a dependency cycle) standing in as a QUEUED task of no files and no dependencies, and id → its
    error. `task_id`'s own file is not excused, nor order.yaml: their error is raised, as every command says it."""
    order_id, title, _, limit = order_meta(order_dir)
    order, invalid = Order(order_id, str(order_dir), {}, title, limit), {}
    for name in task_names(order_dir):
        path = order_dir / name
        try:
            task = load_task(path, root)
        except ValidationError as exc:
            if name == f"{task_id}.yaml":
                raise
            if not os.path.lexists(path):
                continue  # removed since it was listed
            task = Task(path.stem, str(path))
            invalid[task.id] = str(exc)
        order.tasks[task.id] = task
    while True:
        try:
            check_links(order)
            return order, invalid
        except ValidationError as exc:  # a task file naming what is no task, or closing a cycle: that file's error
            wrong = Path(exc.file).stem
            if wrong == task_id or wrong not in order.tasks or wrong in invalid:
                raise
            order.tasks[wrong] = Task(wrong, exc.file)
            invalid[wrong] = str(exc)


def order_board(launcher: Launcher, order_dir: Path) -> dict:
    """One order for the dashboard: its tasks (rows plus what each waits on) and a one-line summary."""
    try:
        order, result, free, *_ = survey(launcher, order_dir)
    except UserError as exc:  # a file being edited: show the problem, keep the rest of the board
        return broken_board(launcher, order_dir, exc)
    order = as_seen(order, launcher.project.root)  # after the plan: a lost task's files stay busy until recovered
    rows = []
    for task in sorted(order.tasks.values(), key=lambda t: t.id):
        row = task_row(task, launcher.settings)
        blocked = result.blocked.get(task.id)
        row["waits_on"] = blocked.detail if blocked is not None and blocked.reason != NOT_QUEUED else None
        rows.append(row)
    return {"id": order.id, "title": order.title, "path": str(order_dir), "summary": status_summary(order),
            "free_slots": free, "tasks": rows, **order_totals(order, launcher.settings)}


def broken_board(launcher: Launcher, order_dir: Path, exc: UserError) -> dict:
    """An order one of whose files does not validate: the problem, and each task whose own file loads, as it
    stands (no plan: what it waits on cannot be told). A task file being edited hid the whole order, the cancel of
    the task running beside it included. Its order.yaml broken: no id to reach its tasks by, so none are shown."""
    shown = {"id": order_dir.name, "path": str(order_dir), "error": str(exc), "tasks": []}
    try:
        order_id, title, _, limit = order_meta(order_dir)
        names = task_names(order_dir)
    except (UserError, OSError):
        return shown
    root = launcher.project.root
    tasks = {}
    for name in names:
        try:
            task = load_task(order_dir / name, root)
        except (UserError, OSError):
            continue  # the file that is wrong (said above), or one removed since it was listed
        tasks[task.id] = task
    order = as_seen(Order(order_id, str(order_dir), tasks, title, limit), root)
    rows = [{**task_row(task, launcher.settings), "waits_on": None} for _, task in sorted(order.tasks.items())]
    return {**shown, "id": order_id, "title": title, "summary": status_summary(order), "tasks": rows}


def workers(launcher: Launcher) -> list[dict]:
    """The worker records of the project, as `ps` lists them (without the psutil readings): its state and pid by
    `ps`'s own rule (workerstate), and the state in `ps`'s words."""
    out = []
    for r in launcher.records():
        state, pid, _ = workerstate.state(r, launcher.project.root)
        out.append({"order": r.order, "task": r.task, "attempt": r.serial, "phase": r.phase, "pid": pid,
                    "pgid": r.pgid, "alive": r.alive(), "state": state,
                    "state_text": workerstate.describe(state, bool(r.stopping), r.phase)[0], "log": r.log,
                    "started_at": r.started_at})
    return out


def project_board(launcher: Launcher, order_dirs: list[Path]) -> dict:
    """Every order, every worker record and the orders' standby owners (as `ps` lists them): what the dashboard
    draws."""
    from aipm import standby  # it brings the runner: `detect` and `status`, which read boards too, start without it

    return {"root": str(launcher.project.root), "orders": [order_board(launcher, d) for d in order_dirs],
            "workers": workers(launcher), "standby": standby.shown(launcher.runtime)}
