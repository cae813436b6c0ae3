"""Every reason a task cannot start, for `aipm why` and `aipm detect`: the plan records only the first it meets
(the budget before dependencies, dependencies before files), and a user who fixed that one found the task still
held by the next."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from aipm.model import FINISHED_OK, RUNNING, Order, Status
from aipm.overlap import LockIndex, conflict
from aipm.plan import (BUDGET, FILE_BUSY, FILE_CHOSEN, FILE_HELD, LIMIT, REFUSED, WAITING, WORKER_RUNNING, Blocked,
                       Busy, ForeignLock, Plan, _holder, _holders, _never)
from aipm.deadends import dead_end, doomed


class Reasons:
    """What the reasons of an order's blocked tasks are read from, gathered once: `detect` asks for every task."""

    def __init__(self, order: Order, result: Plan, elsewhere: Iterable[Busy] = (),
                 outside: Iterable[ForeignLock] = (), invalid: Mapping[str, str] = {}):
        self.order, self.result, self.outside, self.invalid = order, result, list(outside), invalid
        self.doomed = doomed(order)
        self.holders, self.held_as = _holders(elsewhere, order.id)
        for t in order.tasks.values():
            if t.status in RUNNING:
                self.holders.append((t.id, t.targets))
                self.held_as[t.id] = _holder(t.id, t.status, order.id if t.id in result.stale else None)
        # Most tasks meet no holder: a few set lookups tell, before a comparison with each (detect of 100k tasks).
        self.near = LockIndex(targets for _, targets in self.holders)

    def of(self, task_id: str) -> list[Blocked]:
        """Every reason `task_id` cannot start, the plan's own among them; [] when it may."""
        task = self.order.tasks[task_id]
        first = self.result.blocked.get(task_id)
        if first is None:
            return []
        if task.status != Status.QUEUED or first.reason == WORKER_RUNNING:
            return [first]
        reasons = []
        deps = self.order.tasks
        for dep in task.depends_on:
            if dep in self.invalid:  # (board.excused: what its file says cannot be read until it is fixed)
                reasons.append(Blocked(task_id, WAITING, f"waiting on {dep}: its file does not validate "
                                       f"({self.invalid[dep]}); fix it", (dep,)))
            elif dep in deps and deps[dep].status not in FINISHED_OK:
                if dep in self.doomed or dead_end(deps[dep]):
                    roots = (dep,) if dead_end(deps[dep]) else self.doomed[dep]
                    reasons.append(_never(self.order, task_id, roots))
                else:
                    reasons.append(Blocked(task_id, WAITING, f"waiting on {dep} ({deps[dep].status})", (dep,)))
        for owner, targets in self.holders if self.near.near(task.targets) else ():
            hit = conflict(task, [(owner, targets)]) if owner != task_id else None
            if hit:
                detail = f"{hit[1]} is held by {self.held_as.get(owner) or _holder(owner)}"
                reasons.append(Blocked(task_id, FILE_BUSY, detail, (owner,), hit[1]))
        for lock in self.outside if task.targets else ():
            path = lock.conflict(task.targets)
            if path:
                reasons.append(Blocked(task_id, FILE_HELD, f"{path} is held by {lock.holder}", (), path, lock.pids))
        if first.reason in (BUDGET, REFUSED):
            reasons.insert(0, first)
        if first.reason in (FILE_CHOSEN, LIMIT):
            reasons.append(first)
        return reasons or [first]

    def others(self, task_id: str) -> list[Blocked]:
        """The reasons `task_id` cannot start besides the plan's (its `blocked` entry): what `detect` adds, for a
        task the plan stopped looking at before its dependencies and files (the budget) or its files (refused here).
        A task waiting on a dependency may also overlap a running task, but that dependency ends first (`why` says
        both), and looking costs a lock-index walk for each of them: a third more for `detect` of a big order."""
        first = self.result.blocked[task_id]
        if first.reason not in (BUDGET, REFUSED):
            return []
        return [r for r in self.of(task_id)
                if not (r.reason == first.reason and set(r.tasks) <= set(first.tasks) and r.path == first.path)]


def all_reasons(order: Order, result: Plan, task_id: str, elsewhere: Iterable[Busy] = (),
                outside: Iterable[ForeignLock] = (), invalid: Mapping[str, str] = {}) -> list[Blocked]:
    """Every reason `task_id` cannot start (the plan records only the first), for `aipm why`; `invalid`: the
    order's tasks whose file does not validate (board.excused), id → its error."""
    return Reasons(order, result, elsewhere, outside, invalid).of(task_id)
