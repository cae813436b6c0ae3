"""What each attempt spent, kept in the runtime apart from the task files: the order's spending ledger.

A task file's `cost_usd` is anyone's to change: a worker's `git checkout` or `git stash` of the order puts the
file back as it was before the cost was recorded, and deleting the file takes its cost away; either way the order's
budget had room again for attempts it had already paid for. So every ended attempt's cost (and, for one killed
before it reported, the cap it may have spent: `cost_unreported_usd`) is also appended to the order's ledger, one
JSON line per attempt, in both places runtime.ledger_paths names. The budget counts, for each task, the larger of
its file's figures and the ledger's, and the ledger's alone for a task whose file is gone (`charged`). An entry
names the definition of the task its attempt ran (model.definition): a task made again under the same name with
another command or prompt is another task (recovery.same_task), and what the old one spent counts against the
order's budget, not against the new one's own. A file edited in place (a prompt, a priority: another definition
too) keeps the old one's cost in its `cost_usd`, a file made again does not; so each entry says what the file had
counted when its attempt started (`base_*`), and the first attempt of a task whose ledger holds another definition
writes a `start` entry that says it before anything is spent: the old costs its file does not hold are the order's.

An attempt's entry is keyed by its number and its worker process (and its review's apart: a reviewer that runs an
agent reports its own cost, settle_review): an end settled twice (a recovery after its owner died between the
ledger and the task file) is counted once, and an attempt numbered again (its logs, which number attempts, removed
with the runtime directory by a worker's `git clean -fdx`) is another.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import NamedTuple

from aipm import agents
from aipm.model import Order, Task, definition, evolve
from aipm.paths import as_path
from aipm.record import Record
from aipm.runtime import Runtime
from aipm.workerfiles import append_log, open_regular

Pair = tuple[float, float]  # (cost_usd, cost_unreported_usd)


class Spent(NamedTuple):
    """What one definition of a task spent, and what its file had counted when the first of its attempts the
    ledger knows started (None: no entry says)."""

    cost: float
    unreported: float
    base: Pair | None = None


# (task, attempt, phase, worker) → (definition, cost, unreported, base)
Entries = dict[tuple[str, int, str, str], tuple[str, float, float, Pair | None]]
_read: dict[str, "_Seen"] = {}  # path → the ledger as last read


def settle(rt: Runtime, rec: Record, task: Task | None, exited: bool = False) -> tuple[agents.Usage | None, dict]:
    """agents.settle for the attempt of `rec` (its task `task` as its file says now; None: its outcome goes to no
    task, recovery.discard), and its cost noted in the ledger. Every end of an attempt goes through here, however
    it ended: an attempt whose outcome is discarded still spent what it spent. So does every end of its review
    (settle_review: no usage, the updates)."""
    if rec.phase == "review":
        return None, settle_review(rt, rec, task)
    before = task.cost_unreported_usd if task is not None else None
    usage, updates = agents.settle(rec.agent, as_path(rec.log), task and task.cost_usd, task and task.tokens,
                                   rec.cost_cap, before, exited, rec.metered)
    cost = usage.cost_usd if usage is not None and usage.cost_usd is not None else 0.0
    unreported = (round(updates["cost_unreported_usd"] - (before or 0.0), 6)
                  if "cost_unreported_usd" in updates else 0.0)
    if cost or unreported:
        note(rt, rec, cost, unreported)
    return usage, updates


def settle_review(rt: Runtime, rec: Record, task: Task | None) -> dict:
    """The cost a review reported (a reviewer that runs an agent: agents.review_usage), noted in the ledger and said
    in the attempt's log; the update of the task's `cost_usd` that adds it ({} when it said none, or for no task:
    recovery.discard). However the review ended: a verdict, a timeout, or stopped or killed without one (then run
    again: what its reviewer printed is counted once, `rec.review_read`, which the caller keeps in the record). A
    reviewer's agent killed before it said its cost spent what aipm cannot see (a review has no cap): said so."""
    usage, rec.review_read = agents.review_usage(as_path(rec.log).with_suffix(".review.log"), rec.review_read)
    cost = usage and usage.cost_usd
    if usage is not None and cost is None:
        append_log(rec.log, f"review usage: cost unknown (its agent's session {usage.session_id} reported none: "
                            "killed before its result?); not counted in the task's cost_usd or the order's budget")
    if not cost:
        return {}
    note(rt, rec, cost, 0.0, phase="review")
    if task is None:
        append_log(rec.log, f"review usage: cost ${cost:.4f} (added to no task; to the order's budget)")
        return {}
    append_log(rec.log, f"review usage: cost ${cost:.4f} (added to the task's cost_usd and the order's budget)")
    total = round((task.cost_usd or 0.0) + cost, 6)
    return {"cost_usd": total} if total < agents.MAX_DOLLARS else {}


def note_start(rt: Runtime, rec: Record) -> None:
    """The `start` entry of an attempt whose task the ledger knows under another definition only (made again, or
    edited), before it spends: what its file counted then tells whether that file holds the old costs (charged).
    Nothing in the common case: a task the ledger does not name, or names as it is."""
    spent = ledger(rt, rec.order).get(rec.task)
    if spent and rec.definition not in spent and any(made != "" for made in spent):
        note(rt, rec, 0.0, 0.0, phase="start")


def note(rt: Runtime, rec: Record, cost: float, unreported: float, phase: str = "work") -> None:
    """Append the attempt's entry (its work's or its review's: `phase`) to both ledgers, durably (a budget must not
    forget what was paid). A ledger that cannot be written (a full disk, a worker's link in its place) leaves the
    task file's figure to count."""
    # `worker`: its process (pid and start time) tells an attempt from another given its number again
    line = json.dumps({"task": rec.task, "attempt": rec.serial, "phase": phase, "worker": f"{rec.pid}@{rec.ctime}",
                       "definition": rec.definition,
                       "cost_usd": cost, "cost_unreported_usd": unreported,
                       "base_cost_usd": rec.counters.get("cost_usd") or 0.0,
                       "base_unreported_usd": rec.counters.get("cost_unreported_usd") or 0.0}) + "\n"
    for path in rt.ledger_paths(rec.order, writing=True):
        try:
            fd = open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError:
            continue
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def ledger(rt: Runtime, order_id: str) -> dict[str, dict[str, Spent]]:
    """Task id → definition → what the ledgers say its attempts spent: each attempt's largest entry in either
    ledger (a worker may have removed one of them), summed."""
    attempts: Entries = {}
    for path in rt.ledger_paths(order_id):
        for key, entry in _entries(str(path)).items():
            attempts[key] = _larger(attempts.get(key), entry)
    tasks: dict[str, dict[str, Spent]] = {}
    for (task, *_), (made, cost, unreported, base) in attempts.items():
        was = tasks.setdefault(task, {}).get(made, Spent(0.0, 0.0))
        # the least said: the first attempt's, what the file counted before this definition spent
        base = min(was.base, base) if was.base is not None and base is not None else was.base or base
        tasks[task][made] = Spent(round(was.cost + cost, 6), round(was.unreported + unreported, 6), base)
    return tasks


def _larger(was: tuple | None, entry: tuple) -> tuple:
    """An attempt's entry read twice (both ledgers, or written again): its largest figures."""
    if was is None:
        return entry
    return (entry[0], max(was[1], entry[1]), max(was[2], entry[2]), was[3] or entry[3])


class _Seen(NamedTuple):
    """A ledger as last read: its file (inode), how far it was read (to the end of its last whole line), and what
    it held up to there."""

    ino: int
    end: int
    entries: Entries


def _entries(path: str) -> Entries:
    """A ledger's entries. Read on every plan of a run: only what was appended since the last read is parsed (a
    file cut or replaced is read whole; what was read before stays, since an attempt's entry only grows)."""
    try:
        fd = open_regular(path)
    except OSError:
        return {}
    try:
        info = os.fstat(fd)
        seen = _read.get(path)
        if seen is not None and seen.ino == info.st_ino and seen.end == info.st_size:
            return seen.entries
        start = seen.end if seen is not None and seen.ino == info.st_ino and seen.end < info.st_size else 0
        data = os.pread(fd, info.st_size - start, start)
    except OSError:
        return {}
    finally:
        os.close(fd)
    whole = data[:data.rfind(b"\n") + 1]  # a line being appended is read once it is whole
    found = dict(seen.entries) if seen is not None else {}
    for line in whole.decode(errors="replace").splitlines():
        try:
            entry = json.loads(line)
            key = (entry["task"], entry["attempt"], entry.get("phase", "work"), entry.get("worker", ""))
            made = entry["definition"]
            cost, unreported = agents.dollars(entry["cost_usd"]), agents.dollars(entry["cost_unreported_usd"])
            base = (agents.dollars(entry.get("base_cost_usd")), agents.dollars(entry.get("base_unreported_usd")))
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            continue  # a line cut short by a crash, or a worker's: what the task files say still counts
        if (isinstance(key[0], str) and isinstance(key[1], int) and isinstance(key[2], str) and isinstance(key[3], str)
                and isinstance(made, str) and cost is not None and unreported is not None):
            found[key] = _larger(found.get(key), (made, cost, unreported, None if None in base else base))
    _read[path] = _Seen(info.st_ino, start + len(whole), found)
    return found


def charged(order: Order, rt: Runtime) -> Order:
    """The order with each task's cost as the budget counts it: no less than its ledger says (a file put back or
    made again under the same name still owes what its attempts spent), and in `gone_cost_usd` the ledger's costs
    of tasks whose file is gone, and those of a task's other definitions that its file does not hold (`_held`). The
    same order when the files say no less (the common case: nothing is copied)."""
    raised: dict[str, Task] = {}
    gone = [0.0, 0.0]
    for tid, spent in ledger(rt, order.id).items():
        task = order.tasks.get(tid)
        if task is not None and len(spent) == 1 and _holds(task, next(iter(spent.values()))):
            # The common case, without the digest of its definition (a plan's every task's): the file says no less
            # than the one definition the ledger knows, and whether that is the file's or an older one (`_held`
            # holds all of it) nothing is raised and nothing is gone.
            continue
        made = definition(task) if task is not None else None
        mine = [s for d, s in spent.items() if d in (made, "")] if task is not None else []
        other = [s for d, s in spent.items() if d not in (made, "")] if task is not None else list(spent.values())
        (cost, unreported), old = _total(mine), _total(other)
        held = _held(task, mine, old, (cost, unreported)) if task is not None and other else (0.0, 0.0)
        gone = [gone[0] + old[0] - held[0], gone[1] + old[1] - held[1]]
        cost, unreported = round(cost + held[0], 6), round(unreported + held[1], 6)
        if task is not None and (cost > (task.cost_usd or 0.0) or unreported > (task.cost_unreported_usd or 0.0)):
            raised[tid] = evolve(task, {
                "cost_usd": cost if cost > (task.cost_usd or 0.0) else task.cost_usd,
                "cost_unreported_usd": max(unreported, task.cost_unreported_usd or 0.0) or task.cost_unreported_usd})
    gone = [round(g, 6) for g in gone]
    if not raised and gone == [0.0, 0.0]:
        return order
    return replace(order, tasks={**order.tasks, **raised}, gone_cost_usd=(gone[0], gone[1]))


def _total(spent: list[Spent]) -> Pair:
    return round(sum(s.cost for s in spent), 6), round(sum(s.unreported for s in spent), 6)


def _held(task: Task, mine: list[Spent], other: Pair, own: Pair) -> Pair:
    """Of what a task's other definitions spent (`other`), what its file's figures hold: up to what they said when
    this definition's first attempt started (a file made again: nothing; edited in place: all); unknown (no attempt
    of it started yet), what its figures say beyond this definition's part (`own`), up to `other`: a file edited in
    place holds the old costs it says, all of them or (put back by a `git checkout` first) a part, which counted
    again in the ledger's was the old cost twice; a file made again says none of them."""
    bases = [s.base for s in mine if s.base is not None]
    if bases:
        base = min(bases)
        return min(other[0], base[0]), min(other[1], base[1])
    file = (task.cost_usd or 0.0, task.cost_unreported_usd or 0.0)
    return (max(0.0, min(other[0], round(file[0] - own[0], 6))),
            max(0.0, min(other[1], round(file[1] - own[1], 6))))


def _holds(task: Task, spent: Pair | Spent) -> bool:
    """Whether the task file's figures say no less than `spent` (cost, unreported)."""
    return (task.cost_usd or 0.0) >= spent[0] and (task.cost_unreported_usd or 0.0) >= spent[1]
