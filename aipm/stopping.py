"""Stopping an owner's workers before they end by themselves: all of them (Ctrl-C, SIGTERM: abort) or one (for a
more urgent task, a budget: stop_attempt). A stopped attempt is not counted: its task goes back to QUEUED, or a
stopped review stays IN_REVIEW for the next run. A mixin of Supervisor (supervisor.py), as Recording is.
"""

from __future__ import annotations

import os
import time
from contextlib import suppress

from aipm import lostreviews, recovery, runner, spending
from aipm.errors import UserError
from aipm.model import RUNNING, Status
from aipm.paths import as_path
from aipm.record import Record
from aipm.restore import counters
from aipm.runtime import read_exit
from aipm.store import load_task
from aipm.workerfiles import append_log
from aipm.writer import StaleWrite

KILL_GRACE = 5.0  # seconds from a stop's SIGTERM to its SIGKILL


class Stopping:
    """Supervisor's stops (see the module's docstring)."""

    def abort(self, why: str) -> dict:
        """Ctrl-C or SIGTERM (`why` says which): stop every owned worker's group and put its task back to QUEUED,
        attempt not counted; a review's task keeps its work (_leave_review). The `interrupted` event: which."""
        self._note_in_records([rec for rec in self.owned.values() if rec.pid], stopping=why)
        for rec in self.owned.values():
            if rec.pid and not self._group_reused(rec):
                runner.ask_to_stop(rec.pgid)
        deadline = time.monotonic() + KILL_GRACE
        for rec in self.owned.values():
            if rec.pid and not self._group_reused(rec):
                runner.wait_gone(rec.pid, max(0.0, deadline - time.monotonic()))
                # The grace is over: what ignored the SIGTERM (the wrapper waits for its command) is killed
                # before the reap, which would otherwise wait for the command to end by itself.
                runner.kill_group(rec.pgid)
            if rec.pid:
                self.end_group(rec)
        self.end_strays()
        for rec in self.owned.values():
            if rec.pid:
                self.read_usage_ahead(rec)
        stopped, reviews = [], []
        with self.rt.launch_lock():
            for rec in list(self.owned.values()):
                if rec.phase == "review" and self._leave_review(rec, why):
                    reviews.append(rec.task)
                elif self._requeue(rec, why):
                    stopped.append(rec)
        return {"event": "interrupted", "requeued": [rec.task for rec in stopped], "reviews_stopped": reviews,
                **self.kept(stopped)}

    def kept(self, recs: list[Record]) -> dict:
        """For an event of stopped worktree attempts: where their work is kept, task -> path: `kept` the patches,
        `kept_rest` what no patch can hold (their worktrees go when their next attempts start; the log alone said
        where)."""
        found: dict[str, dict[str, str]] = {}
        for rec in recs:
            for key, kept in recovery.kept(self.rt, rec).items():
                found.setdefault(key, {})[rec.task] = kept
        return found

    def _leave_review(self, rec: Record, why: str) -> bool:
        """A stopped review: its attempt's work is done and paid for, so the task stays IN_REVIEW and its record
        (Record.stopping set, no owner) goes to the next `run`/`exec`/`recover`, which runs the review again. False
        when it cannot be (lostreviews.cannot_review): then it is re-queued. Caller holds the launch lock."""
        try:
            task = load_task(as_path(rec.task_file), self.rt.root)
        except (UserError, OSError):
            return False
        if not lostreviews.in_review(task, rec):
            return False
        if lostreviews.cannot_review(rec, stopped=why):
            return False
        spent = spending.settle_review(self.rt, rec, task)  # what the stopped reviewer reported (rec.review_read)
        if spent:
            with suppress(StaleWrite, UserError, OSError):  # (unwritten, the ledger's entry counts it)
                rec.counters = counters(self._write(task, spent))  # the file's, or the next owner would put it back
        rec.owner_pid, rec.owner_ctime = 0, 0.0
        try:
            self.rt.write_record(rec)
        except OSError:
            return False
        append_log(rec.log, f"review of {rec.task} stopped ({why}); it runs again on the next run")
        for fd in self.lock_fds.pop(rec.key, ()):
            os.close(fd)  # IN_REVIEW keeps its files busy for every planner meanwhile
        self.owned.pop(rec.key, None)
        self.adopted.discard(rec.key)
        self.outbox.append({"event": "review_stopped", "order": rec.order, "task": rec.task, "attempt": rec.serial})
        return True

    def _note_in_records(self, recs: list[Record], **marks) -> None:
        """Note in these workers' records, before the signal, that we stop them (Record.stopping, Record.timed_out):
        an adopter after our death carries on with what we meant, not with the code the command exits with."""
        if not recs:
            return
        with self.rt.launch_lock():
            for rec in recs:
                vars(rec).update(marks)
                try:
                    self.rt.write_record(rec)
                except OSError:
                    pass  # unwritable: as before, an adopter takes the command's code as it is

    def _requeue(self, rec: Record, why: str) -> bool:
        """Put a stopped worker's task back to QUEUED (through INTERRUPTED), attempt not counted, if the task is still
        that attempt's; drop the record either way. Caller holds the launch lock."""
        try:
            task = load_task(as_path(rec.task_file), self.rt.root)
        except (UserError, OSError):
            task = None  # deleted or broken: without its record, recovery re-queues it once it is fixed
        if task is not None and self._reset(task, rec):
            try:
                task = self._restored(rec, task)  # put back under it (a `git checkout`): the attempt is still ours
            except (StaleWrite, UserError, OSError):
                pass  # changed again, or unwritable: left as it is, like any task that is not this attempt's
        ours = task is not None and task.status in RUNNING and task.attempts == rec.attempt
        if ours:
            recovery.interrupt(self.rt, task, rec, why)
        self._drop(rec, noted=ours)
        return ours

    def preempt(self, key: str, urgent: str, why: str) -> None:
        """Stop an owned worker's whole group for a more urgent task: QUEUED again, the attempt not counted."""
        rec = self.owned[key]
        if self.stop_attempt(key, why, preempted=True):
            self.outbox.append({"event": "preempted", "order": rec.order, "task": rec.task, "for": urgent,
                                "attempt": rec.serial, **self.kept([rec])})

    def stop_attempt(self, key: str, why: str, preempted: bool = False) -> bool:
        """Stop an owned worker's whole group (for a more urgent task, `preempted`, or a budget): QUEUED again, the
        attempt not counted, what it spent counted. False when it ended by itself first (that outcome stands) or
        its task moved on (a cancel)."""
        rec = self.owned[key]
        self.watcher.forget(key)
        self.kill_at.pop(key, None)
        self.timed_out.discard(key)
        # Read before the signal: the wrapper writes the exit file of a command our SIGTERM ended too.
        code, timed_out = read_exit(rec.exit_file, rec.deadline)
        if code is None:
            self._note_in_records([rec], stopping=why, preempted=preempted)
        runner.terminate_group(rec.pgid, rec.pid, KILL_GRACE)
        runner.reap(rec.pid)
        # As at any end of an attempt: what it left running outside its group (`setsid cmd &`) holds its locks,
        # and the urgent task waited for it for as long as it ran.
        self.end_strays(rec)
        self.read_usage_ahead(rec)
        with self.rt.launch_lock():
            if code is not None:  # it ended on its own before the signal: that outcome stands
                self.outbox.append(self._apply(rec, code, timed_out))
                return False
            task = load_task(as_path(rec.task_file), self.rt.root)
            ours = task.status == Status.IN_PROGRESS and task.attempts == rec.attempt  # else moved on (cancel)
            if ours:
                self._note(recovery.interrupt(self.rt, task, rec, why))
            self._drop(rec, noted=ours)
        return ours
