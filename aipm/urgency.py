"""Which running tasks give way to an urgent one (`run --preempt`): a pure choice, like the plan it follows.

Ready tasks, the tasks holding files and the free worker slots in; the running tasks to stop out. The run loop
(aipm/preemption.py) gathers the inputs and stops what is chosen.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from aipm.model import Task
from aipm.paths import Target, first_overlap, lock_overlap

URGENT_RANK = 1  # P0 and P1 tasks may stop lower-priority work
PREEMPT_LIMIT = 2  # a task is stopped at most this often (its `preemptions` field); then it runs to its end


@dataclass(frozen=True)
class Holder:
    """A task that holds target files and (while alive) a worker slot, as preemption sees it."""

    key: str  # ORDER/TASK
    targets: tuple[Target, ...]
    rank: int  # its priority rank (0 = P0)
    stoppable: bool  # ours to stop: owned by this run, working (never reviewing), preempted < PREEMPT_LIMIT times
    alive: bool = True  # a dead (stale) holder keeps its files but takes no slot


@dataclass(frozen=True)
class Preemption:
    victim: str  # ORDER/TASK of the running task to stop
    urgent: str  # id of the task that takes its place


def preemptions(candidates: Iterable[Task], holders: Iterable[Holder], slots: int) -> list[Preemption]:
    """Which running tasks to stop so that urgent tasks can start now.

    candidates -- ready tasks (QUEUED, dependencies finished) that did not start this round, in rank order
    holders    -- every task holding files in the project
    slots      -- worker slots free now

    An urgent (P0/P1) candidate takes the place of running tasks of a strictly lower priority when they are all
    that keeps it from starting: every holder of a file it needs may be stopped, or, when no file is in its way,
    the worker limit is (then the least urgent stoppable task goes). Anything else in its way — a task of equal
    or higher priority, a review, a task of another owner, a task stopped PREEMPT_LIMIT times — and it waits.
    """
    holders = list(holders)
    stopped: set[str] = set()
    placed: list[tuple[Target, ...]] = []  # urgent tasks given a place this round hold their files from now on
    out: list[Preemption] = []
    for task in candidates:
        if task.priority.rank > URGENT_RANK:
            break  # rank order: no urgent task follows
        # By the kernel locks' test, as the planner blocks (a glob locks its whole fixed directory): a holder that
        # only the finer test would pass over still keeps the task from starting.
        if any(first_overlap(task.targets, targets, lock_overlap) for targets in placed):
            continue
        live = [h for h in holders if h.key not in stopped]
        conflicts = [h for h in live if first_overlap(task.targets, h.targets, lock_overlap)]

        def may_stop(holder: Holder) -> bool:
            return holder.stoppable and holder.alive and holder.rank > task.priority.rank

        if not all(may_stop(h) for h in conflicts):
            continue
        victims = conflicts
        if not victims:
            if slots > 0:
                continue  # nothing in its way but the machine's load: stopping work would not help
            spare = [h for h in live if may_stop(h)]
            if not spare:
                continue
            victims = [max(spare, key=lambda h: h.rank)]
        slots += len(victims) - 1
        stopped.update(v.key for v in victims)
        placed.append(task.targets)
        out.extend(Preemption(v.key, task.id) for v in victims)
    return out
