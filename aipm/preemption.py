"""`run --preempt`: stop lower-priority work so that an urgent task starts now.

The decision is pure (`urgency.preemptions`); this module gathers its inputs from the run's view,
the worker records and what the supervisor owns, and has the supervisor stop the chosen workers. Only tasks
this run owns are stopped: another owner would count the kill as a failed attempt.
"""

from __future__ import annotations

from itertools import takewhile
from typing import TYPE_CHECKING

from aipm import budget
from aipm.model import Status
from aipm.paths import normalize

if TYPE_CHECKING:
    from aipm.supervisor import Supervisor
    from aipm.view import OrderView


def stop_for_urgent(sup: "Supervisor", view: "OrderView") -> bool:
    """Stop whatever keeps a ready P0/P1 task from starting, when the planner allows it. True when any stopped."""
    from aipm.urgency import PREEMPT_LIMIT, URGENT_RANK, Holder, preemptions  # only for `run --preempt`

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
    spend = budget.of(order, sup.settings.max_cost_usd, records)
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
    decisions = preemptions(candidates, holders, max(0, sup.settings.max_workers - live))
    for decision in decisions:
        urgent = order.tasks[decision.urgent]
        sup.preempt(decision.victim, urgent.id, f"preempted by {urgent.priority} task {urgent.id}")
    return bool(decisions)
