"""`run`: a budget lowered while attempts run applies to them too.

Each capped attempt (claude --max-budget-usd) was given a share of what the budget left when it started, so the
order's spent cost plus what its running attempts hold never passes the limit. A limit lowered since (order.yaml
edited mid-run) breaks that: the running attempts keep the caps of the old one and could together spend past the
new. The run says so once per limit, and once the new limit is reached (an attempt's cost recorded, or the limit
put at or below what is spent) it stops the order's capped attempts it owns, as a preemption does (QUEUED again,
attempt not counted): each counts what it reported, or its cap if it reported nothing (budget.py), and nothing
more is spent. Attempts another aipm owns are named, for `aipm cancel` (their owner stops them too, unless it is
stopped itself, or older). Each event is also told to the notify command (`tell`: BUDGET_LOWERED), once however
many owners find it. The `max_cost_usd` setting (the budget of orders whose order.yaml sets none) is read
again when the project's settings file changes (`follow_setting`), so lowering it there applies too.

A task's own `max_cost_usd` lowered while its attempt runs is the same (`past_task_limit`): the attempt's cap was
what the old limit left. It is said once per limit, and the attempt is stopped if the new limit is already reached
(nothing more may be spent); else it may spend less than its cap, and `aipm cancel` is the user's to choose.

The detached owner of a capped attempt (`aipm launch`: work.py) does all this for its own attempt (`Detached`),
saying it in the attempt's log.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from aipm import budget, notify
from aipm.errors import UserError
from aipm.inotify import DirWatch
from aipm.model import Order
from aipm.record import Record, same_attempt
from aipm.settings import load_settings
from aipm.spending import charged
from aipm.view import OrderView
from aipm.workerfiles import append_log

if TYPE_CHECKING:
    from aipm.supervisor import Supervisor

FILES, SETTINGS = "budget files", "budget settings"  # a detached owner's wait keys: the order's files, the settings'
_SETTINGS_FILES = ("aipm.yaml", "pyproject.toml")


def past_budget(sup: "Supervisor", order: Order, records: Iterable[Record], told: set[str]) -> list[dict]:
    """The events of a budget its running attempts (of the worker `records`) may pass (`budget` events, each said
    once: `told`), after stopping the attempts this run owns when it is reached."""
    records = _capped(order, records)
    if not records:
        return []  # the common case, read from the round's records alone: nothing capped runs
    events = [event for r in records for event in past_task_limit(sup, order, r, told)]
    spend = budget.of(charged(order, sup.rt), sup.settings.max_cost_usd, records)
    if spend is None or round(spend.limit - spend.spent - spend.unreported - spend.held, 6) >= 0:
        return events  # their caps fit in it: the budget holds them as it is
    given = [r.cost_limit for r in records]  # the limits their caps were given under (their records')
    if None not in given and spend.limit >= max(given):
        # Not lowered since the caps were given: an attempt spent past its own (Claude Code stops only after the turn
        # in flight). Stopping the others would throw their work away for that turn; no attempt starts once the
        # budget is reached, as ever. (Kept in the records, not the run's memory: a run killed and run again, which
        # adopts the attempts, knows it too.)
        return events
    stopped: list[Record] = []
    if not spend.reached:
        detail = (f"max_cost_usd {budget.usd(spend.limit)} ({spend.source}) is below the order's cost "
                  f"({spend.cost}) plus what its running attempts may still spend ({budget.usd(spend.held)}: their "
                  "caps, given under the budget they started with): no attempt starts, and the running ones are "
                  "stopped once it is reached")
    else:
        others = [r.task for r in records if r.key not in sup.owned]
        stopped = [r for r in records if r.key in sup.owned
                   and sup.stop_attempt(r.key, f"max_cost_usd {budget.usd(spend.limit)} reached")]
        detail = (f"{spend.detail}; its running attempts could spend past it (their caps were given under a higher "
                  "budget)" + (f": stopped {', '.join(r.task for r in stopped)}, each counting what it spent (its cap "
                               "if it did not say)" if stopped else "")
                  + (f"; {', '.join(others)} run under another aipm: `aipm cancel` them" if others else ""))
    # Said once per limit and state (and for each stop), not per wording: the cost and the caps in the detail change
    # as the running attempts end, and the same lowering was said again with each.
    key = f"{spend.limit} {'reached' if spend.reached else 'below'}"
    if key in told and not stopped:
        return events
    told.add(key)
    # As a Ctrl-C's line does: where the work of each stopped worktree attempt is kept (its worktree goes when its
    # next attempt starts)
    return [*events, {"event": "budget", "order": order.id, "detail": detail, "max_cost_usd": spend.limit,
                      "reached": spend.reached, **sup.kept(stopped)}]


def past_task_limit(sup: "Supervisor", order: Order, rec: Record, told: set[str]) -> list[dict]:
    """The event of a task whose own `max_cost_usd` its running capped attempt (`rec`) may pass (said once per
    limit: `told`), after stopping the attempt if this run owns it and the limit is reached.

    Measured against the task's cost when the attempt started (its record's counters), not its file's now: the cap
    was at most what the limit left then, so only a limit lowered since can fall short of it. What aipm writes to
    the file meanwhile (the attempt's own cost, once it ends, before its record goes; Claude Code passing its cap by
    the turn in flight) is no lowering."""
    task = order.tasks.get(rec.task)
    if task is None or task.max_cost_usd is None or not same_attempt(task, rec):
        return []  # (a file reset or made again under it is no edit of this attempt's limit)
    before = round((rec.counters.get("cost_usd") or 0.0) + (rec.counters.get("cost_unreported_usd") or 0.0), 6)
    if round(task.max_cost_usd - before - rec.cost_cap, 6) >= 0:
        return []  # its cap fits in the limit
    reached = round(task.max_cost_usd - before, 6) <= 0
    stopped: list[Record] = []
    if not reached:
        detail = (f"its max_cost_usd {budget.usd(task.max_cost_usd)} is below its cost ({budget.usd(before)}) plus "
                  f"what its running attempt may still spend ({budget.usd(rec.cost_cap)}: its cap, given under the "
                  f"limit it started with); `aipm cancel {task.id}` stops it, counting its cap")
    elif rec.key in sup.owned and sup.stop_attempt(rec.key, f"max_cost_usd {budget.usd(task.max_cost_usd)} reached"):
        detail = (f"{budget.task_detail(task)}; its running attempt could spend past it (its cap was given under a "
                  "higher limit): stopped it, counting what it spent (its cap if it did not say)")
        stopped = [rec]
    elif rec.key in sup.owned:
        return []  # it ended by itself first: its outcome stands, and the plan says the limit reached
    else:
        detail = (f"{budget.task_detail(task)}; its running attempt could spend past it (its cap was given under a "
                  f"higher limit), and runs under another aipm: `aipm cancel {task.id}` it")
    if f"{task.id}: {detail}" in told:
        return []
    told.add(f"{task.id}: {detail}")
    return [{"event": "budget", "order": order.id, "task": task.id, "detail": detail,
             "max_cost_usd": task.max_cost_usd, "reached": reached, **sup.kept(stopped)}]


def tell(sup: "Supervisor", order: Order, records: Iterable[Record], event: dict) -> None:
    """Send a `budget` event of past_budget's (or past_task_limit's) to the notify command (BUDGET_LOWERED), as
    every owner that follows the budget finds it (`run`, the detached owners of `aipm launch`): once per change of
    the limit (its value, whether it is reached, the attempts it concerns), by the first owner to find it."""
    if event["event"] != "budget" or sup.settings.notify is None:
        return
    task = event.get("task")
    running = [f"{r.task}.{r.serial}" for r in _capped(order, records) if task in (None, r.task)]
    said = f"{task or ''} {event['max_cost_usd']} {'reached' if event['reached'] else 'below'}"
    try:
        with sup.rt.launch_lock():
            first = sup.rt.first_to_tell_of(order.id, said, running)
    except OSError:
        first = True  # a full state directory: told, perhaps twice, rather than not at all
    if first:
        where = f"{order.id}/{task}" if task else order.id
        notify.send(sup.settings, sup.rt, notify.BUDGET, "BUDGET_LOWERED", f"{where}: {event['detail']}",
                    AIPM_ORDER_ID=order.id, **({"AIPM_TASK_ID": task} if task else {}))


def _capped(order: Order, records: Iterable[Record]) -> list[Record]:
    """The order's running capped attempts (their agents hold a share of the budget: Record.cost_cap)."""
    return [r for r in records if r.order == order.id and r.phase == "work" and r.cost_cap]


def follow_setting(sup: "Supervisor", seen: list) -> list[dict]:
    """Read the `max_cost_usd` setting again when the project's settings file (aipm.yaml, or pyproject.toml) changed
    since the last look (`seen`: its stamp; the first look only takes it). A file that no longer loads keeps the
    value the run has, said as an event."""
    stamp = []
    for name in _SETTINGS_FILES:
        try:
            info = os.stat(f"{sup.rt.root}/{name}")  # (a string: pathlib's join costs more than the stat, each round)
            stamp.append((info.st_ino, info.st_size, info.st_mtime_ns))
        except OSError:
            stamp.append(None)
    if not seen:
        seen.append(stamp)  # the file the run's settings were read from
        return []
    if seen[0] == stamp:
        return []
    seen[0] = stamp
    try:
        limit = load_settings(sup.rt.root).max_cost_usd
    except UserError as exc:
        return [{"event": "invalid_file", "error": f"{exc}; the run keeps max_cost_usd "
                 + (budget.usd(sup.settings.max_cost_usd) if sup.settings.max_cost_usd is not None else "none")}]
    if limit != sup.settings.max_cost_usd:
        sup.settings = sup.launcher.settings = replace(sup.settings, max_cost_usd=limit)
    return []


class Detached:
    """A detached owner's watch over the budgets of its capped attempt, as a `run` keeps over its own (past_budget,
    follow_setting): a change of the order's files (order.yaml, and the task files that hold the costs and each
    task's own limit) or of the project's settings file wakes it, and what a lowered limit comes to is said in the
    attempt's log and to the notify command (`budget`, BUDGET_LOWERED), once, the attempt stopped once it is
    reached. `seen`: the settings file's stamp when the owner read its settings (follow_setting)."""

    def __init__(self, sup: "Supervisor", view: OrderView, seen: list):
        self.sup, self.view, self.seen = sup, view, seen
        self.told: set[str] = set()
        self.settings_watch = DirWatch.open(str(sup.rt.root))
        for watch, key in ((view.watch, FILES), (self.settings_watch, SETTINGS)):
            if watch is not None:
                sup.watcher.watch_fd(watch.fd, key)

    @classmethod
    def follow(cls, sup: "Supervisor", order_dir: Path, seen: list) -> "Detached | None":
        """The watch, if the owner's attempt is capped (its agent spends against the budget: nothing to follow
        else), after a first look (an edit made since the attempt started); None without one."""
        if all(rec.cost_cap is None for rec in sup.owned.values()):
            return None
        try:
            view = OrderView(order_dir, sup.rt.root)  # (watched before it is read: no edit falls between)
        except (UserError, OSError):
            return None  # (an order.yaml saved invalid meanwhile: the attempt runs under its cap, as before)
        budgets = cls(sup, view, seen)
        budgets.look()
        return budgets

    def woke(self, keys: list) -> None:
        """After a wake-up: look again if the order's files changed, or the settings file (not any file the attempt
        writes in the project's root)."""
        settings = SETTINGS in keys and bool(self.settings_watch.changed().intersection(_SETTINGS_FILES))
        if FILES in keys or settings:
            self.look()

    def look(self) -> None:
        """Say what the files say now of a lowered limit, and stop the attempt if it is reached."""
        logs = [rec.log for rec in self.sup.owned.values()]  # (a stopped attempt's record goes; its log stays)
        try:
            order = self.view.refresh()  # (first: it drains the watch that woke us, whatever follows)
            # The records as they are once the task files just read were written: an owner writes its task's
            # outcome and drops its record under the lock, and a cap counted with the cost it became is too much.
            with self.sup.rt.launch_lock():
                records = self.sup.rt.records()
        except (UserError, OSError):
            return  # (the order directory gone, the state directory full: the next change looks again)
        self.view.problems.clear()  # (a file saved invalid is kept out: its last valid version counts)
        self.view.reopened.clear()
        from aipm.cli.display import plain_line  # (only here: every detached owner's start would pay for it)

        for event in [*follow_setting(self.sup, self.seen), *past_budget(self.sup, order, records, self.told)]:
            for log in logs:
                append_log(log, plain_line(event))
            tell(self.sup, order, records, event)
