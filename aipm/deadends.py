"""Dead ends: the tasks no run gets past until a person acts, and the tasks that wait on them.

A task that ended FAILED, REJECTED or CANCELLED (retry it), that is INTERRUPTED with its exit code lost (check its
work, retry it), or that is to start past its own max_cost_usd (raise it): whatever depends on it, through any
chain, never starts by itself. `status`, `why`, `detect`, `run`'s last words and the ends of `logs -f` say it from
here, each naming every dead end in a task's way: named one at a time, each fix took a round of its own.

Pure: an Order in, words out.
"""

from __future__ import annotations

from aipm.budget import Budget, spent_text, task_detail, task_reached, usd
from aipm.model import DEAD_END, FINISHED_OK, Order, Status, Task
from aipm.ranking import ranked

# Statuses of a task that is to start (again): QUEUED, or a rework on its way back to QUEUED.
TO_START = frozenset({Status.QUEUED, Status.REWORK})
# The dead ends named for one task, at most (one more is kept, to say there are more): 400 failed tasks ahead of a
# chain of 400 had every task of the chain carry all 400 (`status --json` grew from 285 KB to 6.5 MB).
NAMED = 10


def dead_end(task: Task) -> bool:
    """Whether no run gets past the task until a person acts (see the module's words)."""
    return task.status in DEAD_END or task.status == Status.INTERRUPTED or task.status in TO_START and task_reached(
        task)


def doomed(order: Order) -> dict[str, tuple[str, ...]]:
    """Task id → the dead ends in its way (through any chain of dependencies), in the order its dependencies come;
    a dead end behind another is named itself, not what stops it (it is the one to retry first)."""
    tasks = order.tasks
    if not any(map(dead_end, tasks.values())):
        return {}  # the common case, and the walk below is a third of planning a big order
    pending = {tid: sum(d in tasks for d in t.depends_on) for tid, t in tasks.items()}
    dependants: dict[str, list[str]] = {tid: [] for tid in tasks}
    for task in tasks.values():
        for dep in task.depends_on:
            if dep in tasks:
                dependants[dep].append(task.id)
    ready = [tid for tid, n in pending.items() if n == 0]
    cause: dict[str, tuple[str, ...]] = {}
    while ready:  # dependencies before dependants, so the causes found below are final
        tid = ready.pop()
        roots: dict[str, None] = {}
        for dep in tasks[tid].depends_on:
            if dep in tasks and dead_end(tasks[dep]):
                roots[dep] = None
            elif dep in cause and tasks[dep].status not in FINISHED_OK:
                roots.update(dict.fromkeys(cause[dep]))
        if roots:
            cause[tid] = tuple(roots)[:NAMED + 1]
        for nxt in dependants[tid]:
            pending[nxt] -= 1
            if pending[nxt] == 0:
                ready.append(nxt)
    return cause


def behind(order: Order, roots: tuple[str, ...], ids: str = "") -> str:
    """Why a task (`ids`: tasks, named) waiting on the dead ends `roots` never starts by itself."""
    dead = [order.tasks[r] for r in roots[:NAMED]]
    ended = [d for d in dead if d.status not in TO_START]
    said = [f"can never run: {', '.join(f'{d.id} is {d.status}' for d in ended)}"] if ended else []
    said += [f"will not start until {d.id} does: {task_detail(d)}" for d in dead if d.status in TO_START]
    return (f"{ids} " if ids else "") + "; ".join(said) + ("; and more" if len(roots) > NAMED else "")


def unblock(order: Order, roots: tuple[str, ...]) -> str:
    """What a person does for the dead ends `roots` to let their dependants go on, after behind()'s words: nothing
    more for one to start (task_detail said to raise it); retry one that ended, its budget raised first where its
    attempts spent it (`retry` alone left it QUEUED, never to start)."""
    return "".join(_unblock(order.tasks[r], len(roots) > 1) for r in roots[:NAMED])


def _unblock(dead: Task, named: bool) -> str:
    if dead.status in TO_START:
        return ""
    if dead.status == Status.INTERRUPTED:
        what = f"{dead.id + chr(39) + 's' if named else 'its'} worker ended and its exit code was lost: check its work"
    else:
        what = f"fix what stopped {dead.id if named else 'it'}"
    if task_reached(dead):
        what += (f" and raise its max_cost_usd (its attempts cost "
                 f"{spent_text(dead.cost_usd, dead.cost_unreported_usd or 0.0)} of {usd(dead.max_cost_usd or 0.0)})")
    return f"; {what}, then `aipm retry {dead.id}`"


def never_runs(order: Order) -> dict[tuple[str, ...], list[str]]:
    """The QUEUED tasks that can never run, by the dead ends in their way: no run starts them until those are
    retried or their budgets raised (`status`, and `run`'s last words)."""
    out: dict[tuple[str, ...], list[str]] = {}
    cause = doomed(order)
    for task in ranked(order) if cause else ():  # in launch order, as `detect` lists them
        if task.id in cause and task.status == Status.QUEUED:
            out.setdefault(cause[task.id], []).append(task.id)
    return out


def never_run_notes(order: Order) -> list[str]:
    """never_runs() in words, each with what would start them."""
    return [behind(order, roots, ", ".join(ids)) + unblock(order, roots) for roots, ids in never_runs(order).items()]


def will_not_start(order: Order, budget: Budget | None) -> dict[str, str]:
    """Id → why, of each task to start (TO_START) that starts only once a person acts (the end of `logs -f`): dead
    ends in its way, its own max_cost_usd reached, or the order's `budget`; and of each INTERRUPTED one (unless a
    record of its attempt is left, which a recovery re-queues: the caller's to tell). Never a budget that running
    attempts hold: that one waits for them to end."""
    cause = doomed(order)
    out: dict[str, str] = {}
    for task in order.tasks.values():
        if task.status == Status.INTERRUPTED:
            out[task.id] = f"will not start again by itself: it is {task.status}" + _unblock(task, False)
        elif task.status not in TO_START:
            continue
        elif task.id in cause:
            out[task.id] = behind(order, cause[task.id]) + unblock(order, cause[task.id])
        elif task_reached(task):
            out[task.id] = f"will not start: {task_detail(task)}"
        elif budget is not None and budget.reached:
            out[task.id] = f"will not start: {budget.detail}"
    return out
