"""Worker slots an `exec` or a nested `run` borrows: a task run by `aipm exec` that a worker's command waits for
takes that worker's slot, as a recursive make's job takes its parent's token, and so do the starts of an `aipm run`
of another order that the command waits for (`command: aipm run SUB`), one after another in that slot (with others
beside it where free slots allow). The slot is lent once, to one borrower at a time.

The lender must be blocked on the exec: every process of its command on the way down to the exec sleeps in
wait() with that one child, and no other process of the command runs, so it can do nothing until the exec ends
(seen when the exec plans its start, under the launch lock). An exec started in the background while the command
goes on (`aipm exec X & make`), or beside another one (`aipm exec A & aipm exec B & wait`), borrows nothing:
counted besides its caller, it needs a free slot of its own, like any exec. Only the borrower leaves its lender
uncounted; every other launch counts both (a slot too many, on the safe side, while the borrow lasts).
"""

from __future__ import annotations

import os

from aipm.liveness import asleep_in_wait, read_small
from aipm.record import Record
from aipm.shellwrap import WATCHDOG
from aipm.subreaper import children


def borrowed(records: list[Record]) -> list[str]:
    """Keys of the workers whose slot a task this process starts takes, lender first: the worker whose command
    runs this exec and waits for it alone, then, if that worker runs in a slot it borrowed itself (a nested exec),
    its lender, and so on. [] when this process runs in no worker, or the worker does not wait for it alone, or
    its slot is lent already."""
    key = _caller()
    if key is None:
        return []
    by_key = {rec.key: rec for rec in records}
    rec = by_key.get(key)
    if rec is None or not rec.encloses_us() or not _waits_for_us_alone(rec.pid):
        return []
    me = os.getpid()
    if any(other.borrowed == key and other.owner_alive() and other.owner_pid != me for other in records):
        return []  # lent once: another exec of this worker runs in its slot
    chain = [key]
    # A borrower's exec (its owner) still alive keeps its own lender waiting: that slot is ours too.
    while rec.borrowed and rec.owner_alive() and rec.borrowed in by_key and rec.borrowed not in chain:
        chain.append(rec.borrowed)
        rec = by_key[rec.borrowed]
    return chain


def _waits_for_us_alone(worker: int) -> bool:
    """Every process from the worker down to this one sleeps in wait() with no other child (a zombie is one: it
    is about to wake its parent), and slept on while we looked: the command runs nothing but us, and cannot go on
    before we end. Seen under the launch lock, before our start."""
    me = os.getpid()
    pid = worker
    while pid != me:
        asleep = asleep_in_wait(pid)
        # (The shell wrapper's watchdog, which keeps the time limit where no owner is left, runs nothing of the
        # command's: shellwrap.WATCHDOG.)
        kids = [kid for kid in children(pid) if pid != worker or not _watchdog(kid)]
        if asleep is None or len(kids) != 1 or asleep_in_wait(pid) != asleep:
            return False
        pid = kids[0]
    return True


def _watchdog(pid: int) -> bool:
    try:
        return f"\0{WATCHDOG}\0".encode() in read_small(f"/proc/{pid}/cmdline")
    except OSError:
        return False


def refusal_note(records: list[Record]) -> str | None:
    """Why an exec or run inside a worker found no slot although its caller holds one; None outside a worker of
    this project (a worker of another project holds no slot here)."""
    key = _caller()
    if key is None or not any(rec.key == key and rec.encloses_us() for rec in records):
        return None
    return (f"this aipm runs inside the worker {key}, which lends its slot only to one exec or run at a time that "
            "its command waits for with nothing else running (not `aipm exec X &` or `aipm run SUB &`)")


def _caller() -> str | None:
    """The key of the worker whose command runs this process, as its environment names it (the worker's record
    proves it: Record.encloses_us)."""
    task = os.environ.get("AIPM_TASK_ID")
    return None if task is None else f"{os.environ.get('AIPM_ORDER_ID', '')}/{task}"
