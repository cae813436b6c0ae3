"""Other owners' workers, as a run watches them: their end may free files, a slot or a dependency, and an owner
that died leaves outcomes for this run's recovery. Driven by the run loop (runloop.py).
"""

from __future__ import annotations

from collections.abc import Callable

from aipm import notify
from aipm.liveness import stopped
from aipm.model import RUNNING, Order, Status, Task
from aipm.deadends import dead_end, never_runs
from aipm.overlap import conflict
from aipm.paths import normalize
from aipm.record import Record
from aipm.slots import borrowed, refusal_note
from aipm.supervisor import Emit, Supervisor
from aipm.view import OrderView


FINISHING_RECHECK = 0.2  # seconds: another owner is recording a finished worker's outcome right now
STOPPED_RECHECK = 2.0  # seconds: that owner is stopped (Ctrl-Z): it records nothing before someone lets it go on
HELD_RECHECK = 5.0  # seconds: a lock held outside aipm may be released without its holder exiting


def watch_foreign(sup: Supervisor, records: list[Record], foreign: set[str], inside: set[str], held: set[str],
                  order_id: str, only: str | None) -> tuple[set[str], set[tuple[str, int]]]:
    """Watch other owners' live workers: their end may free files, a slot or a dependency.

    Watches workers, never their owners: another `run` lives until its order ends, and two runs watching each
    other would wait forever. Returns the keys of workers that have ended while their owner still records the
    outcome, and this order's records whose worker and owner are both gone (an owner killed before it started its
    worker, or while it recorded): (task key, owner pid) each, for the caller to recover. A worker that runs us
    (`inside`: told once) is not waited for: this run ends with what it can do, and the order stays unfinished.
    `exec` (`only`: its task) waits for no other worker, so it has nothing to tell. This order's outcomes whose
    owner is stopped (`held`: told once each; for exec, its task's) are said: the wait for them lasts until that
    owner is let go on.
    """
    present = {rec.key for rec in records}
    for key in foreign - present:
        sup.watcher.forget(key)
        foreign.discard(key)
    finishing: set[str] = set()
    dead: set[tuple[str, int]] = set()
    for rec in records:
        if rec.key in sup.owned or rec.key in foreign or (rec.owner_pid, rec.owner_ctime) == sup.me:
            continue  # ours (an outcome we hold, unrecorded): never wait on ourselves
        if rec.encloses_us():  # a worker ran this `aipm run`: it cannot end before we do
            if rec.key not in inside:
                inside.add(rec.key)
                # Said of a task of this order, which the run ends without: another order's is no part of it (a
                # task's `aipm run SUB`: 'skip ORD/L' at the top of L's log read as L skipped), and what it keeps
                # from starting is said at the run's end (say_slot_held).
                if not only and rec.order == order_id:
                    sup.outbox.append({"event": "enclosing", "task": rec.key, "pid": rec.pid})
            continue
        if rec.pid and rec.worker_alive() and sup.watcher.watch_pid(rec.pid, rec.key):
            foreign.add(rec.key)
        elif rec.owner_alive():
            finishing.add(rec.key)
            if rec.order == order_id and only in (None, rec.task) and rec.key not in held and stopped(rec.owner_pid):
                held.add(rec.key)
                now, then = ("is yet to start", "starts it") if not rec.pid else ("has ended", "records the outcome")
                detail = (f"its worker {now}, and its owner (another aipm, pid {rec.owner_pid}) is stopped "
                          f"(Ctrl-Z or SIGSTOP): it {then} once it goes on (`fg` in its terminal, or "
                          f"`kill -CONT {rec.owner_pid}`); this run waits for that")
                sup.outbox.append({"event": "waiting", "task": rec.task, "pids": [rec.owner_pid], "detail": detail})
                notify.needs_person(sup.settings, sup.rt, rec.order, rec.task, detail)
        elif rec.order == order_id:
            dead.add((rec.key, rec.owner_pid))
    return finishing, dead


def others_matter(order: Order, others: set[str]) -> bool:
    """Whether another owner's work (`others`: the keys of its workers that run, or have ended with their outcome
    still being recorded) is worth waiting for: a task of this order is among it, or a queued task of this order
    may start once it ends (it may free files, a slot or a dependency). A run of an order that is done waited for
    every other order's workers to end, and for every other order's outcome being recorded: for ever, where that
    owner was stopped (Ctrl-Z) with its worker ended."""
    if any(key.startswith(f"{order.id}/") for key in others):
        return True
    # A task past its own budget, or behind a dead end (deadends.dead_end: FAILED, REJECTED, CANCELLED, or past its
    # own budget), starts after no other work: waited for, it kept the run for as long as another order's worker ran,
    # and for ever where that owner was stopped with its outcome.
    queued = {t.id for t in order.tasks.values() if t.status == Status.QUEUED and not dead_end(t)} if others else set()
    return bool(queued) and bool(queued - {tid for ids in never_runs(order).values() for tid in ids})


class Said:
    """The attempts of this order's tasks that other owners run, said as a run says its own: a start (but the first
    of each task, which the `watch` line names) and its end, with the status it came to. A run that waited on a
    detached task said nothing between `watch A` and its own last line, which named A's end (`B can never run: A
    is FAILED`) as news."""

    def __init__(self) -> None:
        self.running: dict[str, int] = {}  # task → the attempt said to run

    def ended(self, read: Callable[[str], Task | None], live: set[str]) -> list[dict]:
        """The ends of the attempts said to run whose task has no record of another owner now (`live`: the tasks
        that have one), with the status each came to (`read`: OrderView.as_read, the file as last read, before this
        run's own writes: the end of another's attempt, though this run started the next at once). Said before the
        round's starts, which that end may have allowed."""
        events = []
        for task_id, serial in list(self.running.items()):
            task = read(task_id)
            if task_id in live or task is None or task.status in RUNNING:
                continue  # (its outcome not written yet, or its file gone: nothing to say of it)
            del self.running[task_id]
            events.append({"event": "finished", "task": task_id, "attempt": serial, "status": task.status.value,
                           "reason": task.reason, "exit_code": task.exit_code, "by": "another aipm"})
        return events

    def started(self, records: list, watched: set[str]) -> list[dict]:
        """The starts of `records` (the live attempts of other owners, of this order's tasks), given the tasks
        `watched` (named by a watch line) before them. An attempt whose end was not seen before its owner's next one
        started is said by that start alone: what its own end came to, its file no longer says."""
        events = []
        for rec in records:
            if self.running.get(rec.task) != rec.serial:
                if rec.task in watched:
                    events.append({"event": "started", "task": rec.task, "pid": rec.pid, "attempt": rec.serial,
                                   "by": "another aipm"})
                self.running[rec.task] = rec.serial
        return events


def say_slot_held(max_workers: int, view: OrderView, records: list[Record], inside: set[str], emit: Emit) -> None:
    """A run inside a worker that ends with tasks ready while every worker slot is taken, its worker's among them,
    or while that worker holds their files: why they did not start. It said only the order's counts, QUEUED tasks
    and exit 1 with no reason given."""
    ready = view.ready_ordering() if inside else []
    # Not counting the worker whose slot we borrow: a foreground run that had it, its task kept out by a file its
    # caller holds, was told that every slot was taken and not to run it with `&`.
    lent = borrowed(records) if ready else []
    if ready and sum(rec.key not in lent and rec.alive() for rec in records) >= max_workers:
        note = refusal_note(records)
        if note:
            emit({"event": "deferred", "tasks": ready, "detail": f"every worker slot is taken; {note}"})
            return
    # Or kept out by a file of the worker we run in, which cannot end before we do: said, not only QUEUED and exit 1.
    callers = [(rec.key, tuple(normalize(t) for t in rec.targets)) for rec in records if rec.key in inside]
    for tid in ready:
        held = conflict(view.order.tasks[tid], callers)
        if held:
            emit({"event": "deferred", "tasks": [tid], "detail": f"{held[1]} is held by the worker {held[0]}, which "
                  "this aipm runs inside: it cannot start before that worker ends"})
