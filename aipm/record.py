"""A worker record: what aipm knows about one running task (who owns it, which process does the work), and
whether it is alive: a pid that exists *and* whose start time matches, so a reused pid is never taken for it.
Runtime (runtime.py) stores the records; this is the record itself, plain data and its liveness.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from aipm.liveness import ancestors, process_alive, same_start, stopped


@dataclass
class Record:
    """What aipm knows about one running task: who owns it and which process does the work."""

    order: str
    order_dir: str
    task: str
    task_file: str
    attempt: int
    targets: list[str]
    log: str
    exit_file: str
    started_at: str
    owner_pid: int = 0  # the supervisor or detached worker that will finish the task
    owner_ctime: float = 0.0
    pid: int = 0  # the worker process (session leader of its process group)
    ctime: float = 0.0
    pgid: int = 0
    command: list[str] = field(default_factory=list)
    phase: str = "work"  # "work" or "review"
    deadline: float | None = None  # when the worker's group is killed, on supervisor._CLOCK (not the wall clock)
    scope_allowed: list[str] = field(default_factory=list)  # targets of tasks running when it started
    # When its scope audit began (ns; 0: not audited): the audit's fallback when its saved start (beside its log,
    # in .aipm/) is gone, a worker's `git clean -fdx` that a skipped audit would have let write anywhere.
    scope_since: int = 0
    # [path, device, inode] of the files in the tree that the output of the aipm processes that started and owned
    # it goes to (ownoutput.files): an adopter's audit excuses them, though their writer, killed, holds them no more.
    own_output: list = field(default_factory=list)
    # Run under a Landlock ruleset (confine.prefix): only such an attempt's listing of what was made for its rules,
    # beside its log where it cannot write, is read back (confine.tidy).
    confined: bool = False
    head: list = field(default_factory=list)  # a shared-tree attempt: HEAD as it started (commits.at_start)
    cpus: float = 0.0  # the task's declared resources, counted against this machine's capacity
    memory_mb: int = 0
    # The attempt's number over the task's whole life (names its log and exit file); `attempt` is the task
    # file's `attempts:` counter, which `retry` resets, so it cannot name files.
    number: int = 0
    # Dollars its agent may spend (claude --max-budget-usd): the task's own cap, or its share of the order's budget,
    # which it holds until it ends (budget.held). None: uncapped.
    cost_cap: float | None = None
    # The order budget's limit when that cap was given (None: no order budget): a limit below it now was lowered
    # since, which the caps may not fit (budgetstop); a cap merely passed by the turn in flight is no lowering.
    cost_limit: float | None = None
    # How much of the review's log (`<TASK>.<n>.review.log`) was read for what its reviewers cost
    # (spending.settle_review): a review stopped, its cost counted, then run again appends to the same log.
    review_read: int = 0
    # Where in that log the output of the review running now begins: a review run again after a stop appends to it,
    # and the feedback and reason are its own output's, not the stopped run's (review_feedback).
    review_from: int = 0
    agent: str = "command"  # the preset that runs the work (aipm.agents), so its usage can be read at the end
    metered: bool = False  # its agent's output went through the meter (aipm.meter): usage is read from its copy only
    workspace: str = ""  # the task's git worktree ("" = it works in the shared project tree)
    # The task's counters when this attempt started (reworks, preemptions, cost_usd and tokens: what its limits and
    # the budget are decided on), written back with the status if a reset loses them.
    counters: dict = field(default_factory=dict)
    # Why its owner is stopping it (Ctrl-C, a preemption), set before the SIGTERM: its wrapper waits for the command
    # and writes its code, which is then no outcome of its own. An owner killed during the grace leaves the
    # re-queue to whoever finds the record (recovery.recover_order, Supervisor.handle), attempt not counted; a
    # stopped review is run again instead (its work is done), also after a Ctrl-C (Supervisor._leave_review).
    stopping: str = ""
    # The stop is a preemption: the re-queue that ends it counts it in the task's `preemptions` (recovery.interrupt).
    preempted: bool = False
    # Its owner's timeout fired (set before the SIGTERM): an adopter records the attempt as timed out, whatever
    # code the command the wrapper waited for exits with.
    timed_out: bool = False
    # model.definition of the task when this attempt started: what tells the task file put back under it (an
    # agent's `git checkout`) from another task made under its name. "" in records written before it: the same.
    definition: str = ""
    # model.ran_by of the task when this attempt started: an edit of its command or prompt while it ran is said with
    # its outcome. "" in records written before it: nothing said.
    ran_by: str = ""
    # The worker whose slot this attempt runs in (its key): the `exec` that owns it took that slot, its command
    # waiting for it (aipm/slots.py). Cleared when its owner is gone (recovery): that worker went on.
    borrowed: str = ""
    # The review that judges this attempt's work, as its task had it when the attempt started (finish.pin): a worker
    # that rewrote `review` in its own task file while it ran was approved by the review it chose. None in records
    # written before it: the task's review as it is then.
    review: list | None = None
    # Why its owner could not write its outcome into its task file and left it to `aipm recover` (its exit file
    # keeps the code: recording._hand_over). Unset, `status` and `ps` took that hand-over for an owner that died.
    unwritten: str = ""

    @classmethod
    def parse(cls, data: object) -> Record:
        """A record as stored. A field this version does not know (written by a newer aipm sharing the state
        directory) is left out: refusing the whole record left its live worker unadopted and its outcome lost.
        A missing field, or no JSON object, is still no record (TypeError)."""
        if not isinstance(data, dict):
            raise TypeError("a worker record is a JSON object")
        return cls(**{name: value for name, value in data.items() if name in _FIELDS})

    @property
    def serial(self) -> int:
        return self.number or self.attempt  # records written before `number` existed

    @property
    def scope_file(self) -> str:
        """Where the scope audit keeps the git snapshot taken before the worker started."""
        return self.log[: -len(".log")] + ".scope.json"

    @property
    def key(self) -> str:
        return f"{self.order}/{self.task}"

    def worker_alive(self) -> bool:
        return bool(self.pid) and process_alive(self.pid, self.ctime)

    def owner_alive(self) -> bool:
        return bool(self.owner_pid) and process_alive(self.owner_pid, self.owner_ctime)

    def alive(self) -> bool:
        return self.worker_alive() or self.owner_alive()

    def starting(self) -> bool:
        """A detached owner's record is written before its worker exists (no pid yet): that owner is to start it."""
        return not self.pid and self.owner_alive()

    def held_by_stopped_owner(self) -> bool:
        """No worker of it runs (it has ended, or is yet to start) and its owner is stopped (Ctrl-Z, SIGSTOP):
        nothing happens to it until that owner goes on."""
        return not self.worker_alive() and self.owner_alive() and stopped(self.owner_pid)

    def encloses_us(self) -> bool:
        """This process runs inside the worker: an `aipm run` its command started, in the worker's session or, if
        the command left the session (`setsid aipm run`), below the worker. Waiting for that worker, or adopting
        it, would be waiting for ourselves."""
        if not self.pid:
            return False
        session, above = _enclosing()
        return ((self.pgid == session or same_start(above.get(self.pid, -1.0), self.ctime))
                and self.worker_alive())


_FIELDS = frozenset(f.name for f in fields(Record))

_ENCLOSING: list[tuple[int, dict[int, float]]] = []  # this process's session and ancestors, read once


def _enclosing() -> tuple[int, dict[int, float]]:
    if not _ENCLOSING:
        _ENCLOSING.append((os.getsid(0), ancestors()))
    return _ENCLOSING[0]


def live_pid(rec: Record) -> int:
    """The pid to name for a live record: its worker's, or its owner's while no worker runs (review, finish)."""
    return rec.pid if rec.worker_alive() else rec.owner_pid


def same_attempt(task, rec: Record) -> bool:
    """The file (`task`, a model.Task) is the record's attempt's: an outcome written for it keeps its number and
    its start time."""
    return (task.attempts, task.started_at) == (rec.attempt, rec.started_at)
