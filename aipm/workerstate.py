"""How a recorded attempt stands, in one word: `aipm ps` and the web dashboard both say it from here, so the
dashboard cannot tell a worker whose owning aipm died from one that is looked after (it had no such state)."""

from __future__ import annotations

from pathlib import Path

from aipm import lostreviews, subreaper
from aipm.errors import UserError
from aipm.liveness import stopped
from aipm.record import Record
from aipm.runtime import exit_file_written
from aipm.store import load_task

# What each state means to a person, and the colour `ps` gives it ("stopped" is only `ps`'s: it reads /proc states).
STATE_TEXT = {"alive": ("alive", ""), "unowned": ("alive, its owner gone (aipm recover adopts it)", "yellow"),
              "stopped": ("stopped", "yellow"), "gone": ("gone (stale: aipm recover)", "red"),
              "orphaned": ("orphaned: runs on (aipm recover ends it)", "red"),
              "review_pending": ("review pending: it runs again on the next run", "yellow"),
              "ended": ("ended: its owner records that end", ""),
              "held": ("ended: its owner is stopped and records that end once it goes on", "yellow"),
              "unrecorded": ("ended: its owner could not record its outcome (aipm recover records it)", "yellow"),
              "starting": ("starting: its owner is about to start its worker", ""),
              "starting_held": ("starting: its owner is stopped and starts its worker once it goes on", "yellow")}

# The states that a task's status and reasons do not tell (`why` says them): processes that run, or an outcome that
# waits, with no live aipm to record them, or held by a stopped one. (A stale or lost attempt is said as `status`
# says it, a review pending included.)
UNWATCHED = {"unowned", "orphaned", "held", "starting_held", "unrecorded"}


def describe(state: str, stopping: bool, phase: str) -> tuple[str, str]:
    """STATE_TEXT's words and colour for a state; an attempt whose owner died stopping it (Ctrl-C's grace, a
    preemption) is not adopted: a recover ends the stop, re-queueing its task, or, a review, running it again."""
    if state == "unowned" and stopping:
        then = "runs its review again" if phase == "review" else "re-queues its task"
        return f"alive, its owner gone while stopping it (aipm recover ends it and {then})", "yellow"
    return STATE_TEXT[state]


def lost(rec: Record, rt) -> bool:
    """Whether the attempt's worker and owner are gone with its record still there (`rt`: the Runtime it was read
    from). Read again once both are seen gone: an owner drops the record of an attempt whose outcome it wrote before
    it exits, so a record read just before that drop, its processes seen gone just after, is no lost attempt."""
    if rec.alive():
        return False
    again = rt.read_record(rec.order, rec.task)
    return again is not None and again.serial == rec.serial and not again.alive()


def unwatched_note(rec: Record, root: Path) -> str:
    """What `logs -f` says once of an attempt whose worker and owner are gone (`status`: INTERRUPTED): nothing writes
    to its log until a recover (or a run) takes it up, and -f waited on it in silence, for ever to the user's eye."""
    now = state(rec, root)[0]
    return (f"{rec.order}/{rec.task}: no aipm looks after this attempt (`aipm ps`: "
            f"{describe(now, bool(rec.stopping), rec.phase)[0]}); this waits for `aipm recover {rec.order}` (or a "
            "run of it), following on from there (Ctrl-C stops)")


def holder(rec: Record, root: Path) -> tuple[int | None, list[int]]:
    """The process that holds the attempt's locks, and what its command left running: its wrapper while it lives;
    with its owner and wrapper dead, the least pid its command left running (as `ps` says: orphaned); else its
    owner's pid while it records the end (the wrapper's, dead, named nothing); None when all of them are gone (a
    dead owner's pid named another process once reused, one a person might kill)."""
    if rec.worker_alive():
        return rec.pid, []
    left = [] if rec.alive() else sorted(subreaper.marked(subreaper.attempt_marker(root, rec)))
    return (left[0] if left else rec.owner_pid if rec.owner_alive() else None), left


def state(rec: Record, root: Path) -> tuple[str, int | None, list[int]]:
    """The attempt's state (a key of STATE_TEXT but "stopped"), its worker's pid (or the least one its command left
    running; None once all are gone) and what its command left running."""
    pid, left = holder(rec, root)
    if rec.worker_alive():
        # Its owner was killed: the worker runs on (its wrapper keeps its time limit) with nobody to record its end
        # or start what follows, until a recover or run adopts it. "alive" alone told nothing was amiss.
        return ("alive" if rec.owner_alive() else "unowned"), pid, left
    if rec.starting():  # its record written before its worker exists: "ended" said of a worker yet to run
        return ("starting_held" if stopped(rec.owner_pid) else "starting"), None, left
    if rec.owner_alive():
        # Not the owner's pid (holder's, for `locks`): `ps` showed that aipm's CPU and memory, its other workers' in
        # them, as the ended worker's, and a stopped owner as a stopped worker.
        return ("held" if stopped(rec.owner_pid) else "ended"), None, left
    if _review_pending(rec, root):
        return "review_pending", pid, left
    if rec.unwritten and not left and exit_file_written(rec.exit_file):  # handed over: no owner died
        return "unrecorded", pid, left
    # Its owner and wrapper died; with its command running on (holding its files) it is orphaned, else stale.
    return ("orphaned" if left else "gone"), pid, left


def _review_pending(rec: Record, root: Path) -> bool:
    """A review stopped (Ctrl-C) or lost without a verdict: no process, but nothing stale either (the task stays
    IN_REVIEW and the next run runs the review again), as `status` says (lostreviews.review_pending)."""
    try:
        return bool(lostreviews.review_pending(load_task(rec.task_file, root), rec))
    except (UserError, OSError):
        return False
