"""`run --preempt`: stop lower-priority work so that an urgent task starts now.

The decision is pure (`urgency.preemptions`); this module gathers its inputs from the run's view,
the worker records and what the supervisor owns, and has the supervisor stop the chosen workers. Only tasks
this run owns are stopped: another owner would count the kill as a failed attempt. The workers of an `aipm exec`
that a stopped command ran are stopped too, once the stop has ended that exec: they were part of the stopped work.
"""

from __future__ import annotations

from itertools import takewhile
from typing import TYPE_CHECKING

from aipm import budget, recovery, runner, subreaper
from aipm.errors import UserError
from aipm.model import Order, Status, Task
from aipm.paths import as_path, normalize
from aipm.record import Record
from aipm.spending import charged
from aipm.store import load_order
from aipm.stopping import KILL_GRACE

if TYPE_CHECKING:
    from aipm.supervisor import Supervisor
    from aipm.urgency import Holder, Preemption
    from aipm.view import OrderView


def stop_for_urgent(sup: "Supervisor", view: "OrderView") -> bool:
    """Stop whatever keeps a ready P0/P1 task from starting, when the planner allows it. True when any stopped."""
    from aipm.urgency import PREEMPT_LIMIT, URGENT_RANK, Holder  # only for `run --preempt`

    order = view.order
    # Launch order is priority first: the urgent ready tasks are a prefix of it.
    candidates = list(takewhile(lambda t: t.priority.rank <= URGENT_RANK,
                                (order.tasks[i] for i in view.ready_ordering())))
    # One that asks for more than this machine has is refused at its launch: work stopped for it was lost for
    # nothing, and the holder, ranked after it, never started again.
    never = sup.launcher.refused_here(candidates)
    candidates = [t for t in candidates if t.id not in never]
    if not candidates:
        return False  # the common case costs one look at the ready index
    records = sup.rt.records()
    spend = budget.of(charged(order, sup.rt), sup.settings.max_cost_usd, records)
    if spend is not None and spend.reached:
        return False  # no attempt starts now, the urgent one neither: a stop would only throw away running work
    holders, live = [], 0
    for rec in records:
        alive = rec.alive()
        live += alive
        task = order.tasks.get(rec.task) if rec.order == order.id else None
        owned = sup.owned.get(rec.key)
        stoppable = (alive and owned is not None and owned.phase == "work" and bool(owned.pid)
                     and task is not None and task.status == Status.IN_PROGRESS
                     and task.attempts == owned.attempt and task.preemptions < PREEMPT_LIMIT)
        # A task of another order is never ours to stop; its rank only matters for that.
        rank = task.priority.rank if task is not None else 0
        holders.append(Holder(rec.key, tuple(normalize(t) for t in rec.targets), rank, stoppable, alive))
    holders.sort(key=lambda h: h.key)
    decisions = _decide(sup, order, candidates, holders, records, max(0, sup.settings.max_workers - live))
    owners = {(rec.owner_pid, rec.owner_ctime) for rec in records if rec.order != order.id}
    nested = _nested(sup, [rec for rec in records if rec.order != order.id], {d.victim for d in decisions}) \
        if decisions else {}
    for decision in decisions:
        urgent = order.tasks[decision.urgent]
        sup.preempt(decision.victim, urgent.id, f"preempted by {urgent.priority} task {urgent.id}")
    if decisions:
        _stop_nested(sup, nested)
        _recover_lost_owners(sup, owners, order.id)
    return bool(decisions)


def _nested(sup: "Supervisor", records: list[Record], victims: set[str]) -> dict[str, tuple[Record, str]]:
    """Of `records`, those whose live owner is an `aipm exec` a victim's command started (it carries the victim's
    attempt marker), each with the victim's key."""
    marks = {key: subreaper.attempt_marker(sup.rt.root, sup.owned[key]) for key in victims}
    found = {}
    for rec in records:
        if rec.owner_alive():
            for key, mark in marks.items():
                if subreaper.marked(mark, [rec.owner_pid]):
                    found[rec.key] = (rec, key)
    return found


def _stop_nested(sup: "Supervisor", nested: dict[str, tuple[Record, str]]) -> None:
    """Stop the workers a stopped victim's `aipm exec` ran, as that exec meant to: the preemption's SIGTERM reached
    it with the victim's group, which was SIGKILLed as soon as the victim's wrapper went (its shell dies at once),
    often before the exec had signalled its own worker. That worker ran on, and its dead owner's recovery adopted
    it: the task stayed IN_PROGRESS. Noted in the record first (Record.stopping), so that it is re-queued, not
    failed with the code the SIGTERM gave it, whoever recovers it."""
    stopping = []
    with sup.rt.launch_lock():
        for rec in sup.rt.records():
            before, victim = nested.get(rec.key, (None, ""))
            # The same attempt, still of the exec we killed (the exec may have re-queued it before it died).
            if (before is None or (rec.owner_pid, rec.owner_ctime, rec.pid, rec.ctime)
                    != (before.owner_pid, before.owner_ctime, before.pid, before.ctime)
                    or rec.owner_alive() or not rec.pid or not rec.worker_alive()):
                continue
            rec.stopping = rec.stopping or f"the `aipm exec` that ran it was stopped with {victim}"
            try:
                sup.rt.write_record(rec)
            except OSError:
                continue  # unwritable: left to its recovery, which adopts it as before
            stopping.append(rec)
    for rec in stopping:
        runner.terminate_group(rec.pgid, rec.pid, KILL_GRACE)
        subreaper.reap_zombies([rec.pid])  # its wrapper came to us (a subreaper) when the exec died


def _decide(sup: "Supervisor", order: Order, candidates: list[Task], holders: list["Holder"],
            records: list[Record], free: int) -> list["Preemption"]:
    """urgency.preemptions, and only the stops that let their urgent task start: what else keeps it out is
    looked at once a stop is proposed (a dear read of /proc/locks, the machine's capacity), and each urgent task
    kept out anyway is left out of the decision made again without it. A stop for it was work thrown away, and
    again each time the victim started again, up to PREEMPT_LIMIT."""
    from aipm.urgency import Holder, preemptions

    decisions = preemptions(candidates, holders, free)
    if not decisions:
        return decisions
    # Files no record names: another order's task marked running with no worker, a lock held outside aipm.
    named = {h.key for h in holders}
    holders = holders + [Holder(key, b.targets, 0, False, not b.gone) for b in sup.launcher.holders(order, records)[0]
                         if (key := f"{b.order_id}/{b.task_id}") not in named]
    outside = sup.launcher.outside(records)
    candidates = [t for t in candidates if not any(lock.conflict(t.targets) for lock in outside)]
    decisions = preemptions(candidates, holders, free)
    while decisions and sup.settings.runner == "local":
        # CPUs and memory: those of the running tasks that are not stopped stay taken.
        urgent = [order.tasks[tid] for tid in dict.fromkeys(d.urgent for d in decisions)]
        stopped = {d.victim for d in decisions}
        waits = sup.launcher.fitting(urgent, [r for r in records if r.key not in stopped], order.id)[1] \
            if any(t.resources for t in urgent) else {}
        if not waits:
            break
        candidates = [t for t in candidates if t.id not in waits]
        decisions = preemptions(candidates, holders, free)
    return decisions


def _recover_lost_owners(sup: "Supervisor", owners: set[tuple[int, float]], order_id: str) -> None:
    """Recover the other orders' tasks whose owner (of `owners`, alive before the stops) the stops ended: an
    `aipm exec SUB` in a stopped command is SIGKILLed with its group once the wrapper goes, often half-way through
    stopping SUB, which stayed IN_PROGRESS until someone's `aipm recover`. This order's the run loop recovers."""
    recovery.read_lost_usage_ahead(sup.rt)
    with sup.rt.launch_lock():
        lost = {rec.order_dir for rec in sup.rt.records() if rec.order != order_id
                and (rec.owner_pid, rec.owner_ctime) in owners and not rec.owner_alive()}
        for directory in sorted(lost):
            try:
                other = load_order(as_path(directory), sup.rt.root)
            except (UserError, OSError):
                continue  # broken or gone: left to `aipm recover`, which says why
            for item in recovery.recover_order(sup.launcher, other):
                if item["action"] == "requeued":
                    sup.outbox.append({"event": "recovered", "task": item["id"], "order": other.id,
                                       **recovery.as_event(item)})
