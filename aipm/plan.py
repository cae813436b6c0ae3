"""The detector: which QUEUED tasks may start now, in which order, and why every other task may not.

Pure: an Order, the tasks holding files elsewhere, the live workers and a worker limit in; a Plan out.
No file system, clock or psutil, so every rule is testable with literals.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from aipm.budget import Budget, task_detail, task_left, task_reached
from aipm.deadends import NAMED, behind, doomed
from aipm.model import FINISHED_OK, RUNNING, Order, Priority, Status, Task
from aipm.overlap import LockIndex, conflict
from aipm.paths import Target, held_conflict, lock_prefix, nodes_related
from aipm.ranking import ranked

# Reason codes, stable for --json consumers.
NOT_QUEUED = "not_queued"
STALE = "stale"
WAITING = "waiting_on_dependencies"
NEVER = "dependency_cannot_finish"
FILE_BUSY = "file_busy"
FILE_CHOSEN = "file_conflict_in_round"
LIMIT = "worker_limit"
WORKER_RUNNING = "worker_running"  # the file says otherwise, but the task's worker lives (a reset file)
BUDGET = "budget"
FILE_HELD = "file_held_outside"  # a lock held by a process that is no aipm worker (e.g. a daemon a worker left)
REFUSED = "cannot_start_here"  # asks for more than the runner can ever give (a local task's `resources`)


@dataclass(frozen=True)
class Busy:
    """A task elsewhere in the project that holds target files (IN_PROGRESS or IN_REVIEW)."""

    order_id: str
    task_id: str
    targets: tuple[Target, ...]
    status: str = ""  # IN_PROGRESS or IN_REVIEW, named in the reason when known
    gone: bool = False  # its worker is gone (stale): the files stay busy until `aipm recover` of its order
    invalid: bool = False  # its file does not validate (holds._broken): held until it is fixed


@dataclass(frozen=True)
class ForeignLock:
    """Lock nodes (path, exclusive?) held by processes that no worker record accounts for."""

    pids: tuple[int, ...]
    nodes: tuple[tuple[str, bool], ...]

    def conflict(self, targets: tuple[Target, ...]) -> str | None:
        """The held path that keeps `targets` out (as the kernel would), or None."""
        for target in targets:
            for node, exclusive in self.nodes:
                if held_conflict(target, node, exclusive):
                    # a shared node (a directory above the holder's paths) is named by a path held below it; an
                    # exclusive one is itself the path: a glob meets only that one, not every path near it
                    return (node or ".") if exclusive else self.path_near(lock_prefix(target))
        return None

    def path_near(self, mine: str) -> str:
        """The holder's exclusive path closest to `mine`, as a person would name it."""
        held = [n for n, ex in self.nodes if ex] or [n for n, _ in self.nodes]
        near = [n for n in held if nodes_related(n, mine)]
        return (near or held)[0] or "."

    @property
    def holder(self) -> str:
        if not self.pids:
            return "another process (not an aipm worker)"
        return f"{'pid' if len(self.pids) == 1 else 'pids'} {', '.join(map(str, self.pids))}, not an aipm worker"


class Blocked(NamedTuple):  # (a tuple: a plan that explains makes one for nearly every task, 100k at a time)
    id: str
    reason: str
    detail: str
    tasks: tuple[str, ...] = ()  # the tasks it is waiting on or conflicts with
    path: str | None = None  # the conflicting path, for file reasons
    pids: tuple[int, ...] = ()  # processes holding it, when they are no aipm workers

    def as_dict(self) -> dict:
        out = {"id": self.id, "reason": self.reason, "detail": self.detail, "tasks": list(self.tasks)}
        if self.path is not None:
            out["path"] = self.path
        if self.pids:
            out["pids"] = list(self.pids)
        return out


@dataclass
class Plan:
    launchable: list[Task] = field(default_factory=list)
    blocked: dict[str, Blocked] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)
    budget_stop: str | None = None  # why QUEUED tasks that could otherwise start may not: the order's budget
    waiting: list[Blocked] = field(default_factory=list)  # held outside aipm: listed even when not explaining
    limited: Priority | None = None  # the best priority of a task that could start but for a free worker slot
    refused: list[Blocked] = field(default_factory=list)  # ready, but can never start here: listed even when not explaining
    # queued, their own max_cost_usd reached: listed even when not explaining
    spent: list[Blocked] = field(default_factory=list)
    # ready, held back while running attempts (and those chosen before it) may spend what is left of the budget
    held: list[Blocked] = field(default_factory=list)

    def summary(self, order: Order) -> dict[str, int]:
        reasons = [b.reason for b in self.blocked.values()]
        return {
            "total": len(order.tasks),
            "queued": sum(t.status == Status.QUEUED for t in order.tasks.values()),
            "launchable": len(self.launchable),
            "blocked_by_dependencies": reasons.count(WAITING) + reasons.count(NEVER),
            "blocked_by_files": reasons.count(FILE_BUSY) + reasons.count(FILE_CHOSEN) + reasons.count(FILE_HELD),
            "blocked_by_worker_limit": reasons.count(LIMIT),
            "stale": len(self.stale),
            "blocked_by_budget": reasons.count(BUDGET),
        }


def _never(order: Order, task_id: str, roots: tuple[str, ...]) -> Blocked:
    return Blocked(task_id, NEVER, behind(order, roots), roots[:NAMED])


def plan(
    order: Order,
    elsewhere: Iterable[Busy] = (),
    live: Collection[str] = (),
    slots: int = 5,
    ordering: list[str] | None = None,
    explain: bool = True,
    running: Collection[str] | None = None,
    budget: Budget | None = None,
    outside: Iterable[ForeignLock] = (),
    released: Collection[str] = (),
    refused: Mapping[str, str] | None = None,
) -> Plan:
    """Decide what may start now.

    order     -- the order, with current statuses
    elsewhere -- tasks of *other* orders that hold files
    live      -- ids of this order's tasks whose worker is alive (by its record; a mapping gives their pids);
                 a running task not in it is stale, and a task in it runs whatever its file says
    slots     -- how many workers may still start (max_workers minus live workers in the project)
    ordering  -- ids to consider, in rank order (default: every task, `ranked(order)`)
    explain   -- False stops at the first full round (the supervisor's hot path needs no reasons)
    running   -- ids of this order's IN_PROGRESS/IN_REVIEW tasks, when the caller indexes them
    budget    -- the order's budget; once reached no task starts (the ones running finish), nor, while its running
                 attempts hold all that is left, one that may spend against it
    outside   -- locks held by processes that are not aipm workers
    released  -- ids of running tasks whose worker ended and whose files are free before their outcome is written
    refused   -- id → why, of tasks that can never start here (they ask for more than the machine has)
    """
    result = Plan()
    busy, held_as = _holders(elsewhere, order.id)
    running_tasks = (order.tasks[i] for i in running) if running is not None else order.tasks.values()
    for task in running_tasks:
        if task.status in RUNNING and task.id not in released:
            busy.append((task.id, task.targets))
            held_as[task.id] = _holder(task.id, task.status, None if task.id in live else order.id)
            if task.id not in live:
                result.stale.append(task.id)
    # A worker's file reset under it (an agent's `git checkout`, `git stash`): still running, never launched again.
    held = {tid: live.get(tid) if isinstance(live, Mapping) else None
            for tid in live if tid in order.tasks and order.tasks[tid].status not in RUNNING}
    for tid in held:
        busy.append((tid, order.tasks[tid].targets))
    cause = doomed(order) if explain else {}
    near_busy = LockIndex(targets for _, targets in busy)
    near_chosen = LockIndex(())
    kept_out: set[tuple[Target, ...]] = set()  # without reasons: targets found kept out, so identical ones are too
    chosen: list[Task] = []
    claims: list[float | None] = []  # what the chosen tasks that take a share of `budget` ask of it (Budget.claim)
    claimers: list[str] = []  # (and which they are)
    closed = ""  # why the budget holds back every task that costs, once one is held
    # Lazily: the hot path stops at the first full round, and a big order's ready list is long.
    tasks = ranked(order) if ordering is None else (order.tasks[i] for i in ordering if i in order.tasks)
    for task in tasks:
        if task.id in held:
            if explain:
                pid = f" pid {held[task.id]}" if held[task.id] else ""
                result.blocked[task.id] = Blocked(
                    task.id, WORKER_RUNNING, f"its file says {task.status}, but its worker{pid} is still running")
            continue
        if task.status != Status.QUEUED:
            if explain:
                detail = f"status is {task.status.value}" + (f" ({task.reason})" if task.reason else "")
                if task.id in result.stale:
                    detail += "; its worker is gone (stale): run `aipm recover`"
                result.blocked[task.id] = Blocked(task.id, STALE if task.id in result.stale else NOT_QUEUED, detail)
            continue
        if budget is not None and budget.reached:
            result.budget_stop = budget.detail
            if not explain:
                break
            result.blocked[task.id] = Blocked(task.id, BUDGET, budget.detail)
            continue
        # Its own max_cost_usd spent: no share of the order's could fund it (said, not held back for ever).
        if task_reached(task):
            blocked = Blocked(task.id, BUDGET, task_detail(task))
            result.spent.append(blocked)
            if explain:
                result.blocked[task.id] = blocked
            continue
        # Not a stop: what the running ones leave is shared next, among the tasks chosen in the plan's order (as the
        # launcher gives their caps: `detect` said all of five could start where `launch` started two).
        deps = order.tasks
        waiting = [d for d in task.depends_on if d in deps and (deps[d].status not in FINISHED_OK or d in held)]
        # Once one is held, so is every one ranked after it that costs (a smaller own budget would fit, and yet it
        # waits its turn, as in the hot path); each ready one is listed, as run's `defer` line names them.
        if budget is not None and task.id not in budget.costless and (
                closed or budget.holds_back(task.id, task_left(task), claims)):
            blocked = Blocked(task.id, BUDGET, closed or budget.held_detail(claimers, claims))
            if not waiting:  # (ready but for the budget: what `launch` and `exec` say they wait for; and what
                # closes it to those after it: the hot path sees ready tasks alone)
                result.held.append(blocked)
                closed = blocked.detail
            if explain:
                result.blocked[task.id] = blocked
            continue
        if waiting:
            if not explain:
                continue
            if task.id in cause:
                result.blocked[task.id] = _never(order, task.id, cause[task.id])
            else:
                result.blocked[task.id] = Blocked(task.id, WAITING, _waiting_on(waiting, deps), tuple(waiting))
            continue
        if refused is not None and task.id in refused:
            # Chosen, it failed at its start and yet kept its files "first this round" from every task ranked
            # after it, round after round: a P3 sharing a file with an impossible P0 never ran.
            blocked = Blocked(task.id, REFUSED, refused[task.id])
            result.refused.append(blocked)
            if explain:
                result.blocked[task.id] = blocked
            continue
        # The lock-node indexes meet exactly where `conflict` finds a pair, so without reasons they decide alone:
        # a task kept out by a running or a chosen one costs a few set lookups per target, whatever the holders.
        hit = None
        if not explain and task.targets in kept_out:
            continue  # many tasks waiting for one file cost a set lookup each, not a walk of their locks
        if near_busy.near(task.targets):
            if not explain:
                kept_out.add(task.targets)
                continue
            hit = conflict(task, busy)
        reason, words = FILE_BUSY, "{path} is held by {other}"
        if not hit:
            hit = _held_outside(task, outside)
            reason, words = FILE_HELD, "{path} is held by {other}"
        if not hit and near_chosen.near(task.targets):
            if not explain:
                kept_out.add(task.targets)  # the chosen only grow: kept out for the rest of this plan
                continue
            hit = conflict(task, [(c.id, c.targets) for c in chosen])
            reason, words = FILE_CHOSEN, "{path} overlaps {other}, which starts first this round"
        if hit:
            other, path = hit
            if reason == FILE_HELD:
                blocked = Blocked(task.id, reason, words.format(path=path, other=other.holder), (), path, other.pids)
                result.waiting.append(blocked)
            else:
                # (one chosen this round is no running task yet)
                named = f"task {other}" if reason == FILE_CHOSEN else held_as.get(other) or _holder(other)
                blocked = Blocked(task.id, reason, words.format(path=path, other=named), (other,), path)
            if explain:
                result.blocked[task.id] = blocked
            continue
        if len(chosen) >= slots:
            if result.limited is None:
                result.limited = task.priority
            if not explain:
                break
            result.blocked[task.id] = Blocked(task.id, LIMIT, _limit_detail(slots))
            continue
        chosen.append(task)
        near_chosen.add(task.targets)
        if budget is not None and task.id not in budget.costless:
            claims.append(budget.claim(task.id, task_left(task)))
            claimers.append(task.id)
    result.launchable = chosen
    return result


def _limit_detail(slots: int) -> str:
    if slots == 0:
        return "worker limit reached: no free worker slot"
    return f"worker limit reached: the {slots} free slot(s) go to tasks ranked before it"


def _holders(elsewhere: Iterable[Busy], order_id: str,
             ) -> tuple[list[tuple[str, tuple[Target, ...]]], dict[str, str]]:
    """(holder, targets) of each holder, named "ORDER/TASK" when of another order than `order_id` (a worker
    record of this order names its task as the order's own running tasks are named), and how _holder names the
    holders whose status is known."""
    busy, held_as = [], {}
    for b in elsewhere:
        owner = b.task_id if b.order_id == order_id else f"{b.order_id}/{b.task_id}"
        busy.append((owner, b.targets))
        if b.status:
            held_as[owner] = _holder(owner, b.status, b.order_id if b.gone else None, b.invalid)
    return busy, held_as


def _holder(owner: str, status: str = "", gone_in: str | None = None, invalid: bool = False) -> str:
    """A task holding files, as said after "held by". One whose worker is gone (of order `gone_in`) is no running
    task, and waiting for it would be for ever: `aipm why` said 'held by running task X (IN_PROGRESS)' of a task a
    killed run left behind, then 'held by running task X ...; its worker is gone', which contradicts itself. One
    whose file does not validate cannot be recovered either: the fix is the file's."""
    if gone_in is not None and invalid:
        return (f"{owner}, {status} in a file that does not validate: fix it (`aipm validate {gone_in}` says what "
                "is wrong), or set its status, to free them")
    if gone_in is not None:
        return f"{owner}, {status} with its worker gone: `aipm recover {gone_in}` frees it"
    return f"running task {owner}" + (f" ({status})" if status else "")


def _held_outside(task: Task, outside: Iterable[ForeignLock]) -> tuple[str, str] | None:
    for lock in outside if task.targets else ():
        path = lock.conflict(task.targets)
        if path:
            return lock, path
    return None


def _waiting_on(waiting: Iterable[str], tasks: Mapping[str, Task], started: Collection[str] = ()) -> str:
    states = ", ".join(f"{d} ({Status.IN_PROGRESS.value if d in started else tasks[d].status.value})" for d in waiting)
    return f"waiting on {states}"


def after_starts(result: Plan, order: Order, started: Collection[str]) -> None:
    """The plan's WAITING details as they stand once `started` (ids) started: it was made before their starts, and
    `launch --json` said a dependency it had just started was QUEUED."""
    for tid, blocked in result.blocked.items():
        if blocked.reason == WAITING and any(d in started for d in blocked.tasks) \
                and all(d in order.tasks for d in blocked.tasks):
            result.blocked[tid] = blocked._replace(detail=_waiting_on(blocked.tasks, order.tasks, started))
