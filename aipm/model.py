"""Plain data for orders and tasks: no I/O here, so every other module can reason about it freely."""

from __future__ import annotations

import enum
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any

from aipm.digest import sha1
from aipm.paths import Target


class Status(str, enum.Enum):
    QUEUED = "QUEUED"
    IN_PROGRESS = "IN_PROGRESS"
    IN_REVIEW = "IN_REVIEW"
    DONE = "DONE"
    COMPLETED = "COMPLETED"
    REWORK = "REWORK"
    REJECTED = "REJECTED"
    FAILED = "FAILED"
    INTERRUPTED = "INTERRUPTED"
    CANCELLED = "CANCELLED"

    def __str__(self) -> str:
        return self.value


# Only these satisfy a dependency.
FINISHED_OK = frozenset({Status.DONE, Status.COMPLETED})
# A task in one of these can never reach DONE/COMPLETED without a user's retry.
DEAD_END = frozenset({Status.FAILED, Status.REJECTED, Status.CANCELLED})
# Tasks whose target files are busy.
RUNNING = frozenset({Status.IN_PROGRESS, Status.IN_REVIEW})

# Which status may follow which: the writer refuses anything else, so a racing
# process can never, say, turn a CANCELLED task back into DONE.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.QUEUED: frozenset({Status.IN_PROGRESS, Status.CANCELLED}),
    Status.IN_PROGRESS: frozenset(
        {Status.IN_REVIEW, Status.DONE, Status.QUEUED, Status.FAILED, Status.INTERRUPTED, Status.CANCELLED}
    ),
    # DONE: a stopped review not run again under `--no-review` (its work exited 0 and is kept, as without review).
    Status.IN_REVIEW: frozenset(
        {Status.COMPLETED, Status.DONE, Status.REWORK, Status.QUEUED, Status.REJECTED, Status.INTERRUPTED,
         Status.CANCELLED}
    ),
    Status.REWORK: frozenset({Status.QUEUED, Status.REJECTED, Status.CANCELLED}),
    Status.INTERRUPTED: frozenset({Status.QUEUED, Status.CANCELLED}),
    # The user's `retry` re-queues finished and dead-end tasks.
    Status.DONE: frozenset({Status.QUEUED}),
    Status.COMPLETED: frozenset({Status.QUEUED}),
    Status.FAILED: frozenset({Status.QUEUED}),
    Status.REJECTED: frozenset({Status.QUEUED}),
    Status.CANCELLED: frozenset({Status.QUEUED}),
}


class Priority(str, enum.Enum):
    P0 = "P0"
    P1 = "P1"
    P2 = "P2"
    P3 = "P3"

    def __str__(self) -> str:
        return self.value

    @property
    def rank(self) -> int:
        return int(self.value[1])


# Keys aipm writes back into task files; everything else belongs to the user.
MANAGED_FIELDS = ("status", "attempts", "started_at", "finished_at", "exit_code", "reworks", "reason", "cost_usd",
                  "cost_unreported_usd", "tokens", "session_id", "preemptions")


@dataclass(frozen=True)
class Resources:
    """What one attempt needs: a Ray resource request, and on this machine a share of its capacity."""

    cpus: float | None = None
    memory_mb: int | None = None
    gpus: float | None = None


@dataclass(frozen=True, slots=True)  # slots: no per-task __dict__ (100k tasks are loaded at once)
class Task:
    id: str
    path: str  # the task file, as given to the loader
    title: str = ""
    status: Status = Status.QUEUED
    priority: Priority = Priority.P1
    depends_on: tuple[str, ...] = ()
    target_files: tuple[str, ...] = ()
    targets: tuple[Target, ...] = ()  # target_files normalised against the project root
    command: str | tuple[str, ...] | None = None
    prompt: str | None = None
    model: str | None = None
    review: str | tuple[str, ...] | None = None
    timeout: int | None = None  # seconds; None: the timeout setting's; 0: none (fields.NO_LIMIT)
    max_attempts: int | None = None
    attempts: int = 0
    reworks: int = 0  # times sent back for another attempt (a review, scope audit, conflict): max_rework bounds it
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    resources: Resources | None = None
    max_rework: int | None = None
    reason: str | None = None  # why the latest attempt ended as it did (aipm.outcome words it)
    agent: str | None = None  # preset name; None: the worker.agent setting
    max_cost_usd: float | None = None  # the task's budget over its attempts (budget.task_left: each one's cap)
    cost_usd: float | None = None  # recorded: total over attempts; None = unknown (never 0 for unknown)
    # recorded: the caps of capped attempts that ended without reporting their cost (killed: timeout, cancel, a
    # lost worker): what they may have spent at most, beyond cost_usd. Counted against the budget, never in cost_usd.
    cost_unreported_usd: float | None = None
    tokens: dict[str, int] | None = None  # recorded: input/output/cache_read/cache_write totals that are known
    session_id: str | None = None  # recorded: the agent's own session of the latest attempt (retry --resume)
    preemptions: int = 0  # times a more urgent task stopped it (bounds preemption)
    workspace: str | None = None  # "shared" or "worktree"; None = the `workspace` setting
    workspace_setup: str | tuple[str, ...] | None = None  # None = the setting
    workspace_copy: tuple[str, ...] | None = None  # None = the setting

    @property
    def tries(self) -> int:
        """Attempts that count against max_attempts: every run except those a review sent back for another
        attempt (`reworks`). With `reworks`, it adds up to `attempts`, and neither passes its limit."""
        return max(0, self.attempts - self.reworks)
    confine: bool | None = None  # None: the `confine` setting decides


# What a task is apart from the file that holds it: every field but the managed ones, its path and its targets
# (target_files, normalised).
_NOT_DEFINITION = frozenset({*MANAGED_FIELDS, "path", "targets"})


_TASK_FIELDS = tuple(f.name for f in fields(Task))
_FIELD_NAMES = frozenset(_TASK_FIELDS)
_DEFINITION_FIELDS = tuple(name for name in _TASK_FIELDS if name not in _NOT_DEFINITION)

# Task's twin without `frozen`: the same slots in the same order, so an instance may become a Task (CPython allows
# __class__ assignment between classes of one layout). A frozen __init__ sets each of 30-odd fields through
# object.__setattr__; the twin's plain stores take a third of the time (it was a fifth of a cached 100k-task load).
_OpenTask = make_dataclass("_OpenTask", [(f.name, f.type, f.default) for f in fields(Task)], slots=True, eq=False,
                           repr=False, match_args=False)
_set = object.__setattr__


def new_task(*args: Any, **kwargs: Any) -> Task:
    """`Task(*args, **kwargs)`, made faster (see _OpenTask): the same object, frozen as any Task."""
    task = _OpenTask(*args, **kwargs)
    _set(task, "__class__", Task)
    return task


# What an attempt runs by: an edit of these while it runs leaves its outcome the old version's (Recording._work_ended
# says so; its review too: finish.review_command); not its priority, title, dependencies or limits, which an attempt
# under way does not run by.
_RAN_FIELDS = ("command", "prompt", "model", "agent", "target_files", "workspace", "workspace_setup", "workspace_copy",
               "confine", "review")  # (review last: ran_by)


def definition(task: Task) -> str:
    """A digest of what the user wrote for the task. A held outcome is the task's only while this is unchanged
    (recovery.same_task): a task made again under the same name with another command or prompt is another task."""
    return _digest(task, _DEFINITION_FIELDS)


def ran_by(task: Task, review: bool = True) -> str:
    """A digest of the fields an attempt of the task runs by (_RAN_FIELDS); without `review`, as an aipm that did
    not count it digested them (a record of its attempt has no pinned review: Record.review)."""
    return _digest(task, _RAN_FIELDS if review else _RAN_FIELDS[:-1])


def _digest(task: Task, names: tuple[str, ...]) -> str:
    mine = [(name, getattr(task, name)) for name in names]
    return sha1(repr(mine).encode()).hexdigest()[:16]


def evolve(task: Task, changes: Mapping[str, Any]) -> Task:
    """`task` with the fields in `changes` replaced: dataclasses.replace without its per-field checks, which cost
    more than the copy on every status write (Task has no init-only or non-init fields to check). A name that is
    no field raises, as there."""
    if not _FIELD_NAMES.issuperset(changes):
        raise TypeError(f"Task has no field {sorted(set(changes) - _FIELD_NAMES)[0]!r}")
    return new_task(*[changes[name] if name in changes else getattr(task, name) for name in _TASK_FIELDS])


# An order.yaml's `max_cost_usd: none`: no budget, where the max_cost_usd setting would give the order one.
NO_BUDGET = float("inf")


@dataclass
class Order:
    id: str
    path: str  # the order directory
    tasks: dict[str, Task] = field(default_factory=dict)
    title: str = ""
    max_cost_usd: float | None = None  # budget from order.yaml (NO_BUDGET: `none` there, the setting's not taken)
    # (cost_usd, cost_unreported_usd) that the spending ledger holds for tasks with no file now (spending.charged):
    # deleting a task file does not give back what its attempts spent
    gone_cost_usd: tuple[float, float] = (0.0, 0.0)


def status_counts(order: Order) -> dict[str, int]:
    """How many tasks are in each status, e.g. {"DONE": 9, "QUEUED": 1}."""
    return dict(Counter(t.status.value for t in order.tasks.values()))


def all_done(order: Order) -> bool:
    return all(t.status in FINISHED_OK for t in order.tasks.values())


def status_summary(order: Order) -> str:
    """"DONE 9, QUEUED 1": how many tasks are in each status, for one-line summaries."""
    return format_counts(status_counts(order))


def format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{status} {n}" for status, n in sorted(counts.items())) or "no tasks"  # not "ORD: "


def some(names: list[str]) -> str:
    """Names (paths, task ids) for a line: the first ten, and how many more."""
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple:
    """Sort key that puts TASK_9 before TASK_10."""
    parts = _DIGITS.split(text)  # the captured runs of digits are every second item, from the second on
    parts[1::2] = map(int, parts[1::2])
    return tuple(parts)


# Ids of tasks and orders: they become file names under .aipm/, log names and environment values, so two ids
# must never map to one name (`a b` and `a_b`) nor leave a directory (`.`, `..`, `a/b`). A file name holds 255
# bytes, and an id gets up to ~35 more in one (`.<id>.yaml.XXXXXXXX.tmp` while written, `<id>.<attempt>.reported`):
# a longer id made `add` and every command given it end in an OSError traceback (File name too long).
MAX_ID_LENGTH = 128
ID_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_ID_LENGTH - 1}}}")
ID_RULE = (f"ASCII letters (A-Z, a-z), digits, '_', '.' and '-', starting with a letter or digit, at most "
           f"{MAX_ID_LENGTH} characters")
