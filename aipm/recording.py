"""Recording what an attempt came to: the finishing half of an owner (supervisor.Supervisor).

When an owned worker ends, its owner re-reads the task under the launch lock and writes the outcome: DONE,
IN_REVIEW (the reviewer started), REWORK with feedback, FAILED, REJECTED; a worktree task's changes merged back
on approval; the scope audit's findings. An outcome that cannot be written (a full disk, a broken file) is held
and retried, and handed over to `aipm recover` (in its exit file) when the owner must exit. The decisions
themselves are pure (finish.py); this module applies them to files and records, the review half in reviewing.py.
"""

from __future__ import annotations

import os
import signal
from contextlib import nullcontext

from aipm import (agents, audit, cluster, commits, confine, interrupts, notify, outcome, recovery, scope, spending,
                  unrecorded, workspace, writer, writtenlog)
from aipm.budget import usd
from aipm.errors import UserError
from aipm.finish import after_cap, after_review, after_work, attempt_reason, describe_exit, review_command, time_limit
from aipm.launcher import Launcher
from aipm.model import FINISHED_OK, Status, Task, ran_by
from aipm.paths import as_path
from aipm.restore import disowned, known_status, restore
from aipm.reviewing import Reviewing, keep_ignored, left_out, log_whole
from aipm.record import Record
from aipm.runtime import Runtime
from aipm.settings import Settings
from aipm.store import load_task
from aipm.writer import now, update_task
from aipm.view import OrderView
from aipm.workerfiles import append_log, write_bytes
from aipm.workspace import carry


class Recording(Reviewing):
    """Outcome recording for an owner. The owner provides the state below (see Supervisor.__init__)."""

    launcher: Launcher
    view: OrderView | None
    rt: Runtime
    settings: Settings
    owned: dict[str, Record]
    adopted: set[str]
    lock_fds: dict[str, list[int]]
    outbox: list[dict]
    unrecorded: dict[str, tuple[Record, int | None, bool]]
    writes: int

    def _own(self, rec: Record) -> None:  # watch a process of ours (the reviewer)
        raise NotImplementedError

    def _record(self, rec: Record, pid: int, ctime: float, timeout: int | None) -> None:  # record a started process
        raise NotImplementedError

    def _requeue(self, rec: Record, why: str) -> bool:  # put a stopped attempt's task back to QUEUED
        raise NotImplementedError

    def _record_outcome(self, rec: Record, code: int | None, timed_out: bool) -> dict | None:
        """Apply an outcome. One that cannot be written now is held and retried (retry_unrecorded), and reported
        once; so is one whose task file went (deleted or renamed, alone or with its order directory: it may be put
        back), so its exit file outlives the run for `recover`."""
        writes, before = self.writes, Record(**vars(rec))
        try:
            with interrupts.step(f"the end of {rec.order}/{rec.task} (its worktree's capture and merge back)") \
                    if rec.workspace else nullcontext():
                event = self._apply(rec, code, timed_out)
        except (UserError, OSError) as exc:
            self.owned.pop(rec.key, None)
            first = rec.key not in self.unrecorded
            before.unwritten = unrecorded.cause(before, exc)  # kept in the record if it is handed over
            self.unrecorded[rec.key] = (before, code, timed_out)
            if self.writes != writes:  # half applied (say IN_REVIEW, no reviewer): not safe to apply twice
                self._hand_over(rec.key)
            if not first:
                return None
            # `before`: the code is its process's; rec may be its review's by now, whose exit file holds a verdict.
            text = unrecorded.message(before, code, exc, unrecorded.keep_exit_code(before, code),
                                      review_unstarted=rec.phase != before.phase)
            append_log(rec.log, text)
            return {"event": "error", "order": rec.order, "task": rec.task, "error": text}
        self.unrecorded.pop(rec.key, None)
        return event

    def retry_unrecorded(self) -> None:
        """Try the held outcomes again (the disk may have room, the file may be fixed). Caller holds the lock."""
        for key, (rec, code, timed_out) in list(self.unrecorded.items()):
            event = self._record_outcome(Record(**vars(rec)), code, timed_out)
            if event:
                self.outbox.append(event)

    def hand_over(self) -> None:
        """Before exiting: a last try, then leave each held outcome to `aipm recover` (in its exit file)."""
        with self.rt.launch_lock():
            self.retry_unrecorded()
            for key in list(self.unrecorded):
                self._hand_over(key)

    def _hand_over(self, key: str) -> None:
        rec, code, _ = self.unrecorded.pop(key)
        unrecorded.keep_exit_code(rec, code)
        rec.owner_pid, rec.owner_ctime = 0, 0.0
        try:
            self.rt.write_record(rec)
        except OSError:
            pass  # the record still names us; once we exit it is just as adoptable

    def _cancelled(self, rec: Record, task: Task, event: dict) -> dict:
        task = recovery.settle_cancelled(self.rt, rec, task, self._write)
        self._drop(rec)  # the user's word stands
        self.rt.unmark_cancelled(rec)
        event.update(status=str(task.status), reason=task.reason)
        return event

    def _discard(self, rec: Record, task: Task, code: int | None) -> dict:
        """The file holds another task now (made again under the name): the attempt's outcome is not its."""
        line = recovery.discard(self.rt, rec, code, recovery.another_task(task))
        self._drop(rec)
        return {"event": "discarded", "order": rec.order, "task": rec.task, "attempt": rec.serial,
                "exit_code": code, "detail": line}

    def _apply(self, rec: Record, code: int | None, timed_out: bool) -> dict:
        task = load_task(as_path(rec.task_file), self.rt.root)
        if not recovery.same_task(task, rec):
            return self._discard(rec, task, code)
        event = {"event": "finished", "order": rec.order, "task": rec.task, "attempt": rec.serial,
                 "phase": rec.phase, "exit_code": code}
        # (looked for only where a cancel may have been: a stopped command's exit is not 0; a read per task end
        # cost B1 2 % of its CPU)
        cancelled = (task.status == Status.CANCELLED or code != 0) and self.rt.cancelled(rec)
        if task.status == Status.CANCELLED and cancelled:
            return self._cancelled(rec, task, event)
        if disowned(task, rec, self.rt):
            was = task
            task = self._restored(rec, task)
            self.outbox.append(_restored_event(rec, was, task))
        if cancelled and task.status == known_status(rec):
            # `aipm cancel` stopped it while its file was away (moved or deleted, now back): the user's word, written now
            return self._cancelled(rec, self._write(task, {"status": Status.CANCELLED, "finished_at": now(),
                                                           "reason": outcome.cancelled()}), event)
        if code is None:
            # A review stopped by its owner, or vanished without a verdict, is asked again; one that timed out was not.
            if rec.phase == "review" and not timed_out:
                return self._review_again(rec, task, event)
            if unrecorded.exit_lost(rec.exit_file):
                return self._outcome_lost(rec, task, event)
            # We watched this worker (adopted, so not our child) die before its wrapper wrote an exit code: our
            # own timeout killed it, or someone else did. Either is a failed attempt like any other, or repeated
            # kills would retry forever.
            if not timed_out:
                append_log(rec.log, "worker ended without an exit code (killed from outside); counted as exit 137")
                code = 128 + signal.SIGKILL
        if rec.phase == "work":
            task = self._work_ended(rec, task, code, timed_out, event)
        else:
            task = self._review_ended(rec, task, code, timed_out, event)
        return self._ended(rec, task, event)

    def _ended(self, rec: Record, task: Task, event: dict) -> dict:
        """The event for what the attempt came to; an attempt that is over is merged (worktree) and dropped."""
        if task.status == Status.IN_REVIEW:
            return {"event": "review", "order": rec.order, "task": rec.task, "attempt": rec.serial}
        if task.status in FINISHED_OK:
            # An earlier send-back's feedback (a conflict's, a scope audit's, a review's) is for no attempt now: left,
            # a task put back to QUEUED by hand would read it as its last review's word.
            self.rt.drop_feedback(rec.order, rec.task)
            if rec.workspace:
                append_log(rec.log, workspace.finished(self.rt.root, rec) or "merged; worktree removed")
        elif rec.workspace:
            _name_kept_patch(self.rt, rec, task, event)
        self._drop(rec)
        event.update(status=str(task.status), reason=task.reason)
        if task.status in (Status.FAILED, Status.REJECTED):
            # For good: the log said only "sent back" or "exit 3", as of a task that goes on
            append_log(rec.log, f"{task.status}" + f" ({task.reason})" * bool(task.reason)
                       + f": no next attempt starts; `aipm retry {rec.task}` starts it anew")
            self._notify_end(rec, task)
        return event

    def _notify_end(self, rec: Record, task: Task, why: str = "") -> None:
        """Tell the `notify` command that the attempt left its task for a person (FAILED, REJECTED, INTERRUPTED)."""
        # AIPM_ATTEMPT is the worker's: the serial that names the log (`aipm logs T --attempt N`), not the
        # count since the last retry, which repeats after a `retry` and would point at an older attempt's log.
        notify.send(self.settings, self.rt, task.status.value.lower(), task.status.value,
                    f"{rec.order}/{rec.task} is {task.status} after attempt {rec.serial}{why}; log: {rec.log}",
                    AIPM_ORDER_ID=rec.order, AIPM_TASK_ID=rec.task, AIPM_ATTEMPT=str(rec.serial),
                    AIPM_LOG=rec.log)

    def _restored(self, rec: Record, task: Task) -> Task:
        """The file was reset under a live worker (a `git checkout`): write back what we know, keep the rest."""
        append_log(rec.log, f"{task.path} said {task.status} (attempts {task.attempts}) while attempt "
                            f"{rec.serial} ran: restored {known_status(rec)} (attempts {rec.attempt})"
                            + " (not an `aipm cancel`: its outcome counts)" * (task.status == Status.CANCELLED))
        task = restore(task, rec, self.rt.root)
        self._note(task)
        return task

    def restore_owned(self, tasks: dict[str, Task]) -> None:
        """Put back the status of owned tasks whose file (as the view last read it) was reset. Under the lock."""
        for rec in list(self.owned.values()):
            seen = tasks.get(rec.task)
            if seen is None or not self._reset(seen, rec):
                continue
            try:
                task = load_task(as_path(rec.task_file), self.rt.root)
                if self._reset(task, rec):
                    self.outbox.append(_restored_event(rec, task, self._restored(rec, task)))
            except (UserError, OSError):
                pass  # broken or gone: the view reports it, and the finish deals with it

    def _reset(self, task: Task, rec: Record) -> bool:
        """The attempt's own task, put back under it: not another task made under its name, whose file the
        attempt's end leaves alone (_discard)."""
        return disowned(task, rec, self.rt) and recovery.same_task(task, rec)

    def _outcome_lost(self, rec: Record, task: Task, event: dict) -> dict:
        """The worker ended but its exit code never reached the disk: its result is unknown. Leave it to a person
        (INTERRUPTED) rather than run it again blindly or call it failed."""
        append_log(rec.log, f"attempt {rec.serial} ended, but its exit code was lost ({rec.exit_file} is empty): "
                            "left INTERRUPTED; check its work, then `aipm retry` it")
        if rec.workspace and rec.phase == "work":  # the retry's start, or `aipm recover`, removes its worktree
            confine.tidy(rec.log, rec.confined)
            append_log(rec.log, workspace.keep(self.rt.root, rec))
        spent = spending.settle(self.rt, rec, task)[1]
        task = self._write(task, {"status": Status.INTERRUPTED, "finished_at": now(),
                                  "reason": outcome.interrupted("exit code lost"), **spent})
        self._drop(rec)
        event.update(status=str(task.status), reason=task.reason)
        event["detail"] = "exit code lost; check its work, then `aipm retry`"
        # Left for a person, as a failure is (no recovery re-queues it): they are told as of a failure.
        self._notify_end(rec, task, f" ({event['detail']})")
        return event

    def _write(self, task: Task, updates: dict) -> Task:
        task = update_task(as_path(task.path), updates, expect=task.status, root=self.rt.root)
        self.writes += 1
        self._note(task)
        return task

    def prepare_outcome(self, rec: Record) -> None:
        """Write ahead (writer.prepare) what a clean exit of this worker will write: the end whose hand-over is
        waited for (its dependants, or the next task on its files). Not for an agent's attempt: its usage, read
        from its log at the end, is part of that write."""
        if rec.phase != "work" or agents.is_preset(rec.agent):
            return
        no_review = self.launcher.options.no_review
        writer.prepare(as_path(rec.task_file), lambda task: after_work(
            task, 0, self.settings, review_command(task, self.settings, no_review, rec) is not None,
            attempt_reason(0, False, None)), Status.IN_PROGRESS, self.rt.root)

    def _work_ended(self, rec: Record, task: Task, code: int | None, timed_out: bool, event: dict) -> Task:
        """IN_PROGRESS → DONE, IN_REVIEW (review started), QUEUED or FAILED; REWORK when out of scope.

        `code` is None only for an adopted worker our timeout killed (its wrapper died before writing one). A timed-out
        attempt failed whatever its code: its wrapper waits for a command that handles the SIGTERM, which may exit 0.
        """
        timeout = time_limit(task, self.settings)
        # (a record of an older aipm, which pinned no review, digested the fields without it: no false "edited")
        edited = bool(rec.ran_by) and rec.ran_by != ran_by(task, rec.review is not None)
        append_log(rec.log, f"attempt {rec.serial} ended: {describe_exit(code, timed_out, timeout)}")
        if rec.workspace:
            # before the end capture: an empty file made for a rule is no change of its own
            confine.tidy(rec.log, rec.confined)
        commit = commits.committed_during(self.rt.root, rec)  # (a worktree task's: in the main tree, by a way out)
        if commit is not None:  # said, not judged: only the scope audit below may send the task back for it
            text, note = commits.notice(self.rt, rec, *commit, self.settings.orders_dir)
            append_log(rec.log, text)
            self.outbox.append(note)
        # (a Ray attempt lost on its node did not end by itself: it may have run there, unseen; one stopped before
        # its Ray task was submitted ran nothing, however it ended)
        exited = not timed_out and code is not None and code < 128 and not cluster.unseen(
            rec.exit_file, rec.command, code) or cluster.ran_nothing(rec.exit_file, rec.command)
        usage, spent = self._usage(rec, task, event, exited=exited)
        error = agents.failure(usage)  # its agent's own report of a failure: an exit 0 does not make it a success
        message = None
        ok = code == 0 and not timed_out and not error
        decided = ok and bool(rec.workspace) and workspace.decided(self.rt.root, rec)
        if decided:
            append_log(rec.log, "merge: finishing the merge its plan decided before its owner died (not reviewed "
                                "again)")
        if not ok and rec.workspace:
            append_log(rec.log, workspace.keep(self.rt.root, rec))
        # `git status` no longer shows what was committed: the commits' files count as the attempt's writes (None:
        # its start noted no HEAD, an attempt started by an older aipm).
        in_commits = commit[2] if commit else set() if rec.head else None
        outside: list[str] = []
        escaped: list[str] = []  # of those, written in the main tree by a worktree task
        try:
            if ok and not decided:
                outside, escaped = audit.findings(self.rt, self.settings, rec, in_commits)
        except workspace.NotCaptured as exc:  # no review can judge what is not captured: a failed try
            append_log(rec.log, str(exc))
            keep_ignored(self.rt.root, rec)
            return self._edited(rec, edited, event, self._write(task, {**after_work(
                task, code, self.settings, False, outcome.one_line(str(exc)), failed=True), **spent}))
        except workspace.WorkspaceError as exc:
            outside, message = [], str(exc)
            keep_ignored(self.rt.root, rec)
        if outside:
            # Writing outside target_files fails the review, whatever the reviewer would say.
            keep_ignored(self.rt.root, rec)  # (first: the line below names the rest that holds them)
            message = audit.feedback(self.rt.root, rec, outside, escaped)
            event["scope"] = outside
            hint = audit.hint(rec, escaped)
            if hint:
                event["hint"] = hint
        reviewing = not decided and review_command(task, self.settings, self.launcher.options.no_review,
                                                   rec) is not None
        lasting = False
        if ok and not message and not reviewing:
            message, lasting = self._merge_back(rec, task, event) or ("", False)
        if message:
            log_whole(rec.log, message)
            write_bytes(self.rt.feedback_path(rec.order, rec.task, writing=True),
                        f"{message}\n".encode(errors="surrogateescape"))
            if rec.workspace:  # (its next attempt starts from the main tree, as the message says)
                carry.unmark(self.rt, rec.order, rec.task)
            task = self._write(task, {**after_work(task, 0, self.settings, True, outcome.exited(0)), **spent})
            why = outcome.scope(outside) if outside else outcome.one_line(message.splitlines()[0])
            for updates in after_review(task, 1, self.settings, why, lasting):
                task = self._write(task, updates)
            return self._edited(rec, edited, event, task)
        # 126 of a confined attempt may be its ruleset refused in the worker, 75 of a Ray attempt its cluster not
        # reached: the reason names why, not "exit 126" or "exit 75"
        refused = (confine.failure(rec.exit_file, rec.confined) if code == 126 else None) or cluster.failure(
            rec.exit_file, rec.command, code)
        reason = outcome.one_line(refused) if refused else attempt_reason(code, timed_out, timeout)
        if not timed_out and agents.stopped_at_cap(usage, rec.cost_cap):
            return self._edited(rec, edited, event, self._write(
                task, {**after_cap(task, code, outcome.at_cap(reason, usd(rec.cost_cap))), **spent}))
        if error:
            # (a lost usage report is aipm's finding, not the agent's word)
            reason = outcome.one_line(f"{reason}; {error}") if error == agents.LOST else outcome.agent_error(
                reason, error)
        reason = left_out(reason, event)
        task = self._edited(rec, edited, event, self._write(task, {**after_work(
            task, code, self.settings, reviewing, reason, failed=timed_out or bool(error)), **spent}))
        if task.status == Status.IN_REVIEW:
            self._start_review(rec, task)
        return task

    @staticmethod
    def _edited(rec: Record, edited: bool, event: dict, task: Task) -> Task:
        """Say, with the outcome `task` came to, that the person edited what the attempt runs by (its command, its
        prompt...) while it ran: the outcome is the old version's. Re-queued, the run starts the edited one itself
        (a retry meanwhile is refused, or needless)."""
        if edited:
            then = ("its next attempt runs the edited one" if task.status == Status.QUEUED else
                    f"`aipm retry {rec.task}` runs the edited one" + (" once its review is over"
                                                                      if task.status == Status.IN_REVIEW else ""))
            said = (f"its command, prompt or another field it runs by was edited while attempt {rec.serial} ran: "
                    f"this outcome is that of the version the attempt started with; {then}")
            append_log(rec.log, said)
            event["hint"] = f"{event['hint']}; {said}" if event.get("hint") else said
        return task

    def _usage(self, rec: Record, task: Task, event: dict, exited: bool) -> tuple[agents.Usage | None, dict]:
        """The attempt's usage, read by its agent preset from what the agent printed (agents.read_usage), and as
        updates of the task's totals (`exited`: its process ended by itself, see agents.settle)."""
        if agents.can_resume(rec.agent):
            self.rt.resume_path(rec.order, rec.task).unlink(missing_ok=True)  # a resume is used once
        usage, updates = spending.settle(self.rt, rec, task, exited)
        if usage is not None and usage.cost_usd is not None:
            event["cost_usd"] = usage.cost_usd
        return usage, updates

    def read_usage_ahead(self, rec: Record) -> None:
        """Before taking the launch lock for an attempt that ended: read its usage (agents.read_ahead)."""
        if rec.phase == "work":
            agents.read_ahead(rec.agent, rec.log, rec.metered)

    def _note(self, task: Task) -> None:
        if self.view is not None:
            self.view.note(task)

    def _drop(self, rec: Record, noted: bool = False) -> None:
        """Forget an attempt that is over: its files, locks and record (`noted`: interrupt() noted its end)."""
        scope.end(self.rt.root, rec.scope_file)
        confine.tidy(rec.log, rec.confined)
        # Locks go before the record: a held lock without a record would look like a stranger's.
        for fd in self.lock_fds.pop(rec.key, ()):
            os.close(fd)
        if not noted:
            writtenlog.note_ended(self.rt, rec)
        self.rt.remove_record(rec.order, rec.task)
        agents.forget(rec.log)
        self.owned.pop(rec.key, None)
        self.adopted.discard(rec.key)


def _name_kept_patch(rt: Runtime, rec: Record, task: Task, event: dict) -> None:
    """A worktree attempt that merged nothing: its finish line names the patch that keeps its work, as a conflict's
    and `aipm cancel` do, since its worktree goes when the next attempt starts (the `aipm retry` the run's closing
    line advises); the log alone said where."""
    patch, rest = workspace.kept_patch(rt.root, rec), workspace.kept_rest(rt.root, rec)
    hint = event.get("hint") or ""
    named = [str(kept) for kept in (patch, rest) if kept]
    if all(kept in hint or kept in (task.reason or "") for kept in named):
        return  # nothing to keep, or said already
    said = f"its changes are kept in {workspace.kept_words(patch, rest)}"
    event["hint"] = f"{hint}; {said}" if hint else said


def _restored_event(rec: Record, was: Task, now: Task) -> dict:
    """The event of a file put back under its worker: what the file said that was not what aipm wrote (its status,
    else its attempts, else a counter: 'said IN_PROGRESS' of a file still IN_PROGRESS read as no change at all)."""
    said = (str(was.status) if was.status != now.status else f"attempts {was.attempts}" if was.attempts != now.attempts
            else "other counts (" + ", ".join(k for k, v in rec.counters.items() if getattr(was, k) != v) + ")")
    return {"event": "restored", "order": rec.order, "task": rec.task, "was": str(was.status),
            "status": str(now.status), "said": said}
