"""The contract's launch order: priority (P0 first), then the longest remaining chain of dependants, then the id.

Pure, like the planner that takes tasks in this order (plan.py) and the order view that keeps it (view.py).
"""

from __future__ import annotations

from collections.abc import Mapping

from aipm.model import DEAD_END, FINISHED_OK, Order, Priority, Task, natural_key

_OVER = FINISHED_OK | DEAD_END


def remains(task: Task) -> bool:
    """Whether the task is still to run: neither finished nor at a dead end. Only such tasks make a chain."""
    return task.status not in _OVER


def chain_lengths(tasks: Mapping[str, Task]) -> dict[str, int]:
    """Length of the longest chain of remaining tasks from each task down its dependants (1 for a task no
    remaining task waits on; 0 for a task that is over, which ends every chain through it: a retried task whose
    dependants are done already unblocks nothing more by finishing).

    Starting the task with the longest chain first keeps the critical path moving. Linear in tasks + edges.
    """
    pending = dict.fromkeys(tasks, 0)  # dependants whose length is not known yet
    for task in tasks.values():
        for dep in task.depends_on:
            if dep in pending:
                pending[dep] += 1
    # Peel leaves (tasks nothing depends on) first: Kahn's algorithm on the reversed graph. Each task measured
    # passes its length on to its dependencies, so no list of dependants is built.
    below = dict.fromkeys(tasks, 0)  # the longest chain among a task's dependants measured so far
    ready = [tid for tid, n in pending.items() if n == 0]
    length: dict[str, int] = {}
    while ready:
        tid = ready.pop()
        n = length[tid] = below[tid] + 1 if tasks[tid].status not in _OVER else 0
        for dep in tasks[tid].depends_on:
            left = pending.get(dep)
            if left is not None:
                if below[dep] < n:
                    below[dep] = n
                pending[dep] = left - 1
                if left == 1:
                    ready.append(dep)
    # Tasks on a cycle (only possible in unvalidated input) get no chain bonus.
    return length if len(length) == len(tasks) else {tid: length.get(tid, 1) for tid in tasks}


_RANKS = {p: p.rank for p in Priority}


def rank_key(task: Task, chains: Mapping[str, int]) -> tuple:
    """P0 first, then the longest remaining chain, then the id in natural order (TASK_9 before TASK_10)."""
    return (_RANKS[task.priority], -chains.get(task.id, 1), natural_key(task.id))


def ranked(order: Order) -> list[Task]:
    chains = chain_lengths(order.tasks)
    return sorted(order.tasks.values(), key=lambda t: rank_key(t, chains))
