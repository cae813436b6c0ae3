"""Owning running tasks: wait for workers, enforce timeouts, finish (review, status), and the `run` loop.

A Supervisor owns tasks it started or adopted. It keeps nothing that is not also on disk (the task files and
the worker records), so it may die at any instant: the workers keep running with their locks, and the next
owner adopts them and records their real outcome.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from aipm import agents, cluster, confine, notify, outcome, preemption, runner, scope, subreaper, unrecorded, workspace
from aipm.errors import UserError
from aipm.finish import after_review, after_work, attempt_reason, describe_exit, review_command
from aipm.launcher import Launcher, Owner, append_log
from aipm.model import FINISHED_OK, RUNNING, Order, Status, Task, status_summary
from aipm.restore import disowned, known_status, restore
from aipm.runtime import Record, process_ctime, read_exit_file
from aipm.store import load_task, now, update_task
from aipm.view import OrderView
from aipm.worker import environment, invocation, model_for

Emit = Callable[[dict], None]
KILL_GRACE = 5.0


class Supervisor(Owner):
    def __init__(self, launcher: Launcher, emit: Emit | None = None, view: OrderView | None = None):
        self.launcher = launcher
        self.view = view  # told about our own writes, so it need not re-read those files
        self.rt = launcher.runtime
        self.settings = launcher.settings
        self.watcher = runner.Watcher()
        self.owned: dict[str, Record] = {}
        self.exited: list[str] = []  # owned keys whose process ended before we could watch it
        self.timed_out: set[str] = set()
        self.kill_at: dict[str, float] = {}
        self.me = (os.getpid(), process_ctime(os.getpid()))
        self.emit = emit or (lambda event: None)
        # Events wait here while the launch lock is held: a stalled reader of our output must never stall the
        # whole project (every other aipm command needs that lock).
        self.outbox: list[dict] = []
        # Outcomes not yet written to their task file (key → record, exit code, timed out), retried each round.
        self.unrecorded: dict[str, tuple[Record, int | None, bool]] = {}
        self.writes = 0  # task-file writes of outcomes so far: tells a failure before any write from one after
        # Orphans of our workers come to us instead of init, so they can be ended with their attempt.
        subreaper.become_subreaper()
        self.adopted: set[str] = set()  # keys of workers that are not our children
        self.lock_fds: dict[str, list[int]] = {}  # target locks we hold ourselves (a detached owner's copies)

    # -- Owner interface (called under the launch lock) -----------------------------------------------

    def spawn_worker(self, rec: Record, task: Task, fds: list[int]) -> None:
        command, env, stdin = invocation(self.rt, self.settings, rec, task, self.launcher.options.model)
        command = workspace.with_setup(command, rec, task, self.settings)
        if self.settings.runner == "ray":
            command = cluster.wrap(command, address=self.settings.ray_address, resources=task.resources, stdin=stdin)
            stdin = None  # the prompt file is opened on the node
        rec.command = [command] if isinstance(command, str) else list(command)
        timeout = task.timeout or self.settings.timeout
        rec.owner_pid, rec.owner_ctime = self.me
        jail = confine.prefix(str(self.rt.root), rec.targets, rec.log) if confine.wanted(task, self.settings) else ()
        cwd = workspace.directory(self.rt.root, rec)
        pid = runner.spawn(command, exit_file=rec.exit_file, env=env, cwd=cwd, log=rec.log,
                           stdin=stdin, pass_fds=fds, started=lambda pid: self._record(rec, pid, timeout), prefix=jail)
        self._own(rec)
        self.outbox.append({"event": "started", "task": rec.task, "order": rec.order, "pid": pid,
                            "attempt": rec.serial})

    def _record(self, rec: Record, pid: int, timeout: int | None) -> None:
        """Write the worker's record; only then may its command begin."""
        rec.pid = rec.pgid = pid
        rec.ctime = process_ctime(pid)
        rec.deadline = time.time() + timeout if timeout else None
        self.rt.write_record(rec)

    def adopt(self, rec: Record) -> None:
        rec.owner_pid, rec.owner_ctime = self.me
        self.rt.write_record(rec)
        self.adopted.add(rec.key)
        self._own(rec)
        self.outbox.append({"event": "adopted", "task": rec.task, "order": rec.order, "pid": rec.pid})

    def _own(self, rec: Record) -> None:
        self.owned[rec.key] = rec
        if not (rec.pid and rec.worker_alive() and self.watcher.watch_pid(rec.pid, rec.key)):
            self.exited.append(rec.key)

    # -- waiting -------------------------------------------------------------------------------------

    def wait(self, timeout: float | None) -> list[str]:
        """Sleep until an owned process ends, a deadline passes or a watched descriptor is ready.

        Returns the keys that woke us: owned task keys (process ended) and any extra keys of watch_fd().
        """
        if self.exited:
            ready, self.exited = self.exited, []
            return ready
        now = time.time()
        wake = list(self.kill_at.values())
        wake += [r.deadline for k, r in self.owned.items() if r.deadline and k not in self.timed_out]
        if wake:
            until = max(0.0, min(wake) - now)
            timeout = until if timeout is None else min(timeout, until)
        keys = self.watcher.wait(timeout)
        self._enforce_deadlines()
        return keys

    def _enforce_deadlines(self) -> None:
        now = time.time()
        for key, rec in self.owned.items():
            if rec.deadline and now >= rec.deadline and key not in self.timed_out and rec.pid:
                self.timed_out.add(key)
                append_log(rec.log, f"timeout: sending SIGTERM to process group {rec.pgid}")
                runner.signal_group(rec.pgid, signal.SIGTERM)
                runner.signal_group(rec.pgid, signal.SIGCONT)
                self.kill_at[key] = now + KILL_GRACE
        for key, at in list(self.kill_at.items()):
            if now >= at:
                del self.kill_at[key]
                if key in self.owned:
                    runner.signal_group(self.owned[key].pgid, signal.SIGKILL)

    # -- finishing -----------------------------------------------------------------------------------

    def handle(self, key: str) -> dict | None:
        """An owned process ended: apply its outcome. Returns the event, or None if the key is not ours."""
        rec = self.owned.get(key)
        if rec is None:
            return None
        self.watcher.forget(key)
        self.kill_at.pop(key, None)
        code = runner.reap(rec.pid) if rec.pid else None
        if code is None:  # not our child (adopted): the wrapper's exit file holds the outcome
            code = read_exit_file(rec.exit_file)
        timed_out = key in self.timed_out
        self.timed_out.discard(key)
        if rec.pid:
            # The attempt is over: a straggler left in its group would hold the file locks and keep writing.
            runner.kill_group(rec.pgid)
            self.end_strays(rec)
        with self.rt.launch_lock():
            return self._record_outcome(rec, code, timed_out)

    def _record_outcome(self, rec: Record, code: int | None, timed_out: bool) -> dict | None:
        """Apply an outcome. One that cannot be written now is held and retried (retry_unrecorded), and reported
        once; one whose task file was deleted is kept in the log."""
        writes, before = self.writes, dataclasses.replace(rec)
        try:
            event = self._apply(rec, code, timed_out)
        except (UserError, OSError) as exc:
            if not os.path.exists(rec.task_file):
                return self._gone(rec, code)
            self.owned.pop(rec.key, None)
            first = rec.key not in self.unrecorded
            self.unrecorded[rec.key] = (before, code, timed_out)
            if self.writes != writes:  # half applied (say IN_REVIEW, no reviewer): not safe to apply twice
                self._hand_over(rec.key)
            if not first:
                return None
            text = unrecorded.message(rec, code, exc, unrecorded.keep_exit_code(rec, code))
            append_log(rec.log, text)
            return {"event": "error", "order": rec.order, "task": rec.task, "error": text}
        self.unrecorded.pop(rec.key, None)
        return event

    def retry_unrecorded(self) -> None:
        """Try the held outcomes again (the disk may have room, the file may be fixed). Caller holds the lock."""
        for key, (rec, code, timed_out) in list(self.unrecorded.items()):
            event = self._record_outcome(dataclasses.replace(rec), code, timed_out)
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

    def _gone(self, rec: Record, code: int | None) -> dict:
        """The task file was deleted while its worker ran: nothing to write to; the outcome stays in the log."""
        kept = unrecorded.keep_exit_code(rec, code)
        append_log(rec.log, f"attempt {rec.serial} ended with exit {code}, but its task file {rec.task_file} "
                            f"was deleted meanwhile: the outcome is recorded here" + (" and in its exit file" * kept))
        self._drop(rec)
        if self.view is not None and rec.order == self.view.order.id:
            self.view.reload(rec.task_file, gone=True)
        return {"event": "gone", "order": rec.order, "task": rec.task, "attempt": rec.serial, "exit_code": code,
                "file": rec.task_file}

    def _apply(self, rec: Record, code: int | None, timed_out: bool) -> dict:
        task = load_task(Path(rec.task_file), self.rt.root)
        event = {"event": "finished", "order": rec.order, "task": rec.task, "attempt": rec.serial,
                 "phase": rec.phase, "exit_code": code}
        if task.status == Status.CANCELLED:
            self._drop(rec)  # the user's word stands
            event.update(status=str(task.status), reason=task.reason)
            return event
        if disowned(task, rec):
            was = task.status
            task = self._restored(rec, task)
            self.outbox.append({"event": "restored", "order": rec.order, "task": rec.task, "was": str(was),
                                "status": str(task.status)})
        if code is None:
            if rec.phase == "review":
                self._start_review(rec, task)  # the reviewer vanished without a verdict: ask again
                return {"event": "review", "order": rec.order, "task": rec.task, "attempt": rec.serial}
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
            task = self._review_ended(rec, task, code)
        if task.status == Status.IN_REVIEW:
            return {"event": "review", "order": rec.order, "task": rec.task, "attempt": rec.serial}
        if rec.workspace and task.status in FINISHED_OK:
            append_log(rec.log, workspace.finished(self.rt.root, rec) or "merged; worktree removed")
        self._drop(rec)
        event.update(status=str(task.status), reason=task.reason)
        if task.status in (Status.FAILED, Status.REJECTED):
            notify.send(self.settings, self.rt, task.status.value.lower(), task.status.value,
                        f"{rec.order}/{rec.task} is {task.status} after attempt {rec.attempt}; log: {rec.log}",
                        AIPM_ORDER_ID=rec.order, AIPM_TASK_ID=rec.task, AIPM_ATTEMPT=str(rec.attempt),
                        AIPM_LOG=rec.log)
        return event

    def _restored(self, rec: Record, task: Task) -> Task:
        """The file was reset under a live worker (a `git checkout`): write back what we know, keep the rest."""
        append_log(rec.log, f"{task.path} said {task.status} (attempts {task.attempts}) while attempt "
                            f"{rec.serial} ran: restored {known_status(rec)} (attempts {rec.attempt})")
        task = restore(task, rec, self.rt.root)
        self._note(task)
        return task

    def restore_owned(self, tasks: dict[str, Task]) -> None:
        """Put back the status of owned tasks whose file (as the view last read it) was reset. Under the lock."""
        for rec in list(self.owned.values()):
            seen = tasks.get(rec.task)
            if seen is None or not disowned(seen, rec):
                continue
            try:
                task = load_task(Path(rec.task_file), self.rt.root)
                if disowned(task, rec):
                    self.outbox.append({"event": "restored", "order": rec.order, "task": rec.task,
                                        "was": str(task.status), "status": str(self._restored(rec, task).status)})
            except (UserError, OSError):
                pass  # broken or gone: the view reports it, and the finish deals with it

    def _outcome_lost(self, rec: Record, task: Task, event: dict) -> dict:
        """The worker ended but its exit code never reached the disk: its result is unknown. Leave it to a person
        (INTERRUPTED) rather than run it again blindly or call it failed."""
        append_log(rec.log, f"attempt {rec.serial} ended, but its exit code was lost ({rec.exit_file} is empty): "
                            "left INTERRUPTED; check its work, then `aipm retry` it")
        task = self._write(task, {"status": Status.INTERRUPTED, "finished_at": now(),
                                  "reason": outcome.interrupted("exit code lost")})
        self._drop(rec)
        event.update(status=str(task.status), reason=task.reason)
        event["detail"] = "exit code lost; check its work, then `aipm retry`"
        return event

    def _write(self, task: Task, updates: dict) -> Task:
        task = update_task(Path(task.path), updates, expect=task.status, root=self.rt.root)
        self.writes += 1
        self._note(task)
        return task

    def _work_ended(self, rec: Record, task: Task, code: int | None, timed_out: bool, event: dict) -> Task:
        """IN_PROGRESS → DONE, IN_REVIEW (review started), QUEUED or FAILED; REWORK when out of scope.

        `code` is None only for an adopted worker our timeout killed (its wrapper died before writing one).
        """
        timeout = task.timeout or self.settings.timeout
        append_log(rec.log, f"attempt {rec.serial} ended: {describe_exit(code, timed_out, timeout)}")
        spent = self._usage(rec, task, event)
        message = None
        try:
            outside = self._scope_findings(rec) if code == 0 else []
        except workspace.WorkspaceError as exc:
            outside, message = [], str(exc)
        if outside:
            # Writing outside target_files fails the review, whatever the reviewer would say.
            message = "scope audit: wrote outside target_files: " + ", ".join(outside)
            if rec.workspace:
                message += "; nothing of this attempt was merged"
            event["scope"] = outside
        reviewing = review_command(task, self.settings, self.launcher.options.no_review) is not None
        if code == 0 and not message and not reviewing:
            message = self._merge_back(rec, event)
        if message:
            append_log(rec.log, message.splitlines()[0])
            self.rt.feedback_path(rec.order, rec.task).write_text(message + "\n")
            task = self._write(task, {**after_work(task, 0, self.settings, True, outcome.exited(0)), **spent})
            why = outcome.scope(outside) if outside else outcome.one_line(message.splitlines()[0])
            for updates in after_review(task, 1, self.settings, why):
                task = self._write(task, updates)
            return task
        reason = attempt_reason(code, timed_out, timeout)
        task = self._write(task, {**after_work(task, code, self.settings, reviewing, reason), **spent})
        if task.status == Status.IN_REVIEW:
            self._start_review(rec, task)
        return task

    def _usage(self, rec: Record, task: Task, event: dict) -> dict:
        """The attempt's usage, read from its log by its agent preset, as updates of the task's totals."""
        if agents.can_resume(rec.agent):
            self.rt.resume_path(rec.order, rec.task).unlink(missing_ok=True)  # a resume is used once
        usage = agents.read_usage(rec.agent, Path(rec.log))
        if usage is None:
            return {}
        cost = "unknown" if usage.cost_usd is None else f"${usage.cost_usd:.4f}"
        tokens = ", ".join(f"{k} {n}" for k, n in usage.tokens.items()) or "unknown"
        append_log(rec.log, f"usage: cost {cost}; tokens {tokens}; session {usage.session_id or 'unknown'}")
        if usage.cost_usd is not None:
            event["cost_usd"] = usage.cost_usd
        return agents.task_updates(task.cost_usd, task.tokens, usage)

    def _review_ended(self, rec: Record, task: Task, code: int) -> Task:
        """IN_REVIEW → COMPLETED, or REWORK → QUEUED/REJECTED with the review's output kept as feedback."""
        feedback = self.rt.feedback_path(rec.order, rec.task)
        review_log = Path(rec.log).with_suffix(".review.log")
        verdict = "approved" if code == 0 else f"sent back (exit {code})"
        append_log(rec.log, f"review {verdict}; review output: {review_log}")
        conflict = self._merge_back(rec, {}) if code == 0 else None
        if conflict:
            append_log(rec.log, conflict.splitlines()[0])
            feedback.write_text(conflict + "\n")
            code, reason = 1, outcome.one_line(conflict.splitlines()[0])
        elif code == 0:
            feedback.unlink(missing_ok=True)
            reason = outcome.review_approved()
        else:
            output = review_log.read_bytes() if review_log.exists() else b""
            feedback.write_bytes(output)
            reason = outcome.review_rejected(output.decode(errors="replace"), code)
        for updates in after_review(task, code, self.settings, reason):
            task = self._write(task, updates)
        return task

    def _merge_back(self, rec: Record, event: dict) -> str | None:
        """An approved worktree task: apply its changes to the main tree. The conflict (its feedback) when they
        cannot be; then nothing was applied."""
        if not rec.workspace:
            return None
        try:
            for note in workspace.merge(self.rt.root, rec):
                append_log(rec.log, f"merge: {note}")
        except workspace.Conflict as exc:
            event["conflict"] = exc.paths
            return str(exc)
        except workspace.WorkspaceError as exc:
            return f"merge failed, nothing of this attempt was merged: {exc}"
        return None

    def _scope_findings(self, rec: Record) -> list[str]:
        """Paths the worker changed that neither it nor any task running alongside it may write (a worktree
        task: that it changed outside its own targets, exactly)."""
        if rec.workspace:
            return workspace.outside_targets(self.rt.root, rec)
        before = scope.load(Path(rec.scope_file))
        after = scope.snapshot(self.rt.root) if before is not None else None
        if after is None:
            return []
        others = self.rt.records()
        order_dirs = {os.path.relpath(r.order_dir, self.rt.root) + "/" for r in [rec, *others]}
        allowed = [*rec.targets, *rec.scope_allowed, *(t for r in others for t in r.targets), *order_dirs,
                   *scope.written_since(self.rt, before.taken_ns)]
        return scope.out_of_scope(scope.changed(before, after), allowed)

    def _start_review(self, rec: Record, task: Task) -> None:
        command = review_command(task, self.settings, self.launcher.options.no_review)
        if isinstance(command, tuple):
            command = list(command)
        env = environment(self.rt, rec, task, model_for(task, self.settings, self.launcher.options.model))
        rec.phase = "review"
        rec.exit_file = rec.exit_file.split(".review")[0] + ".review"
        review_log = str(Path(rec.log).with_suffix(".review.log"))
        try:
            os.unlink(rec.exit_file)
        except FileNotFoundError:
            pass
        rec.command = [command] if isinstance(command, str) else command
        try:
            runner.spawn(command, exit_file=rec.exit_file, env=env, cwd=workspace.directory(self.rt.root, rec),
                         log=review_log,
                         started=lambda pid: self._record(rec, pid, None))
        except runner.SpawnError as exc:
            # A reviewer that cannot start never approves (fail closed).
            append_log(review_log, f"review could not start: {exc}")
            rec.pid = 0
            with open(rec.exit_file, "w") as handle:
                handle.write("127\n")
            self.rt.write_record(rec)
        self._own(rec)

    def _note(self, task: Task) -> None:
        if self.view is not None:
            self.view.note(task)

    def _drop(self, rec: Record) -> None:
        Path(rec.scope_file).unlink(missing_ok=True)
        confine.tidy(rec.log)
        # Locks go before the record: a held lock without a record would look like a stranger's.
        for fd in self.lock_fds.pop(rec.key, ()):
            os.close(fd)
        scope.note_ended(self.rt, rec)
        self.rt.remove_record(rec.order, rec.task)
        self.owned.pop(rec.key, None)
        self.adopted.discard(rec.key)

    # -- strays: what an attempt left running outside its process group (see subreaper.py) -------------------

    def end_strays(self, rec: Record | None = None) -> None:
        """End the processes `rec`'s attempt left behind; with no `rec`, every stray below us."""
        ours = {r.pid for r in self.owned.values() if r.pid}
        adopted = rec is not None and rec.key in self.adopted
        if not adopted and all(pid in ours for pid in subreaper.children(os.getpid())):
            return  # the usual case: nothing left its worker
        known = ours | self.launcher.detached | {p for r in self.rt.records() for p in (r.pid, r.owner_pid) if p}
        alone = rec is None or all(key == rec.key for key in self.owned)
        doomed = subreaper.left_behind(self.rt, known, rec, alone, adopted)
        if doomed:
            ended = subreaper.end(doomed)
            if rec is not None:
                append_log(rec.log, f"ended {len(ended)} process(es) the attempt left running outside its "
                                    f"process group: pids {', '.join(map(str, ended))}")

    # -- stopping ------------------------------------------------------------------------------------

    def abort(self) -> list[str]:
        """Ctrl-C: stop every owned worker's group and put its task back to QUEUED, attempt not counted."""
        for rec in self.owned.values():
            if rec.pid:
                runner.signal_group(rec.pgid, signal.SIGTERM)
                runner.signal_group(rec.pgid, signal.SIGCONT)
        deadline = time.time() + KILL_GRACE
        for rec in self.owned.values():
            if rec.pid:
                runner.wait_gone(rec.pid, max(0.0, deadline - time.time()))
                runner.kill_group(rec.pgid)
                runner.reap(rec.pid)
        self.end_strays()
        stopped = []
        with self.rt.launch_lock():
            for rec in list(self.owned.values()):
                try:
                    task = load_task(Path(rec.task_file), self.rt.root)
                except (UserError, OSError):
                    task = None  # deleted or broken: without its record, recovery re-queues it once it is fixed
                if task is not None and task.status in RUNNING and task.attempts == rec.attempt:
                    self.launcher.interrupt(task, rec, "stopped by the user (Ctrl-C)")
                    stopped.append(rec.task)
                self._drop(rec)
        return stopped

    def preempt(self, key: str, urgent: str, why: str) -> None:
        """Stop an owned worker's whole group for a more urgent task: QUEUED again, the attempt not counted."""
        rec = self.owned[key]
        self.watcher.forget(key)
        self.kill_at.pop(key, None)
        self.timed_out.discard(key)
        runner.terminate_group(rec.pgid, rec.pid, KILL_GRACE)
        runner.reap(rec.pid)
        code = read_exit_file(rec.exit_file)
        with self.rt.launch_lock():
            if code is not None:  # it ended on its own before the signal: that outcome stands
                self.outbox.append(self._apply(rec, code, False))
                return
            task = load_task(Path(rec.task_file), self.rt.root)
            ours = task.status == Status.IN_PROGRESS and task.attempts == rec.attempt  # else moved on (cancel)
            if ours:
                self.launcher.interrupt(task, rec, why)
                self._write(load_task(Path(rec.task_file), self.rt.root), {"preemptions": task.preemptions + 1})
            self._drop(rec)
        if ours:
            self.outbox.append({"event": "preempted", "order": rec.order, "task": rec.task, "for": urgent,
                                "attempt": rec.serial})

    def close(self) -> None:
        self.watcher.close()


def all_done(order: Order) -> bool:
    return all(t.status in FINISHED_OK for t in order.tasks.values())


class Stop:
    """Turns SIGINT/SIGTERM into a readable descriptor, so the selector wakes and the loop stops cleanly."""

    def __init__(self, watcher: runner.Watcher):
        self.requested = False
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        os.set_blocking(self._r, False)
        self._old_fd = signal.set_wakeup_fd(self._w)
        self._old = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        watcher.watch_fd(self._r, "signal")

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def close(self) -> None:
        signal.set_wakeup_fd(self._old_fd)
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        os.close(self._r)
        os.close(self._w)


RESOURCE_RECHECK = 1.0  # seconds between load readings while launches are deferred


def _finish(sup: Supervisor, keys: list[str]) -> None:
    for key in keys:
        event = sup.handle(key)
        if event:
            sup.outbox.append(event)


@contextmanager
def _round(sup: Supervisor, ready: list[str]) -> Iterator[None]:
    """One wake-up under the launch lock, with one tree snapshot for every task that ends or starts in it
    (taken before queueing for the lock when a task that ended needs its audit)."""
    with scope.shared():
        ended = [sup.owned[k] for k in ready if k in sup.owned]
        if any(Path(rec.scope_file).exists() for rec in ended):
            for rec in ended:  # stragglers first (as `handle` does): their writes belong before the snapshot
                if rec.pid:
                    runner.kill_group(rec.pgid)
            scope.snapshot(sup.rt.root)
        with sup.rt.launch_lock():
            yield


FINISHING_RECHECK = 0.2  # seconds: another owner is recording a finished worker's outcome right now
HELD_RECHECK = 5.0  # seconds: a lock held outside aipm may be released without its holder exiting


def _watch_foreign(sup: Supervisor, records: list[Record], foreign: set[str],
                   order_id: str) -> tuple[bool, set[tuple[str, int]]]:
    """Watch other owners' live workers: their end may free files, a slot or a dependency.

    Watches workers, never their owners: another `run` lives until its order ends, and two runs watching each
    other would wait forever. Returns whether a worker has ended but its owner is still recording the outcome,
    and this order's records whose worker and owner are both gone (an owner killed before it started its
    worker, or while it recorded): (task key, owner pid) each, for the caller to recover.
    """
    present = {rec.key for rec in records}
    for key in foreign - present:
        sup.watcher.forget(key)
        foreign.discard(key)
    finishing = False
    dead: set[tuple[str, int]] = set()
    for rec in records:
        if rec.key in sup.owned or rec.key in foreign or (rec.owner_pid, rec.owner_ctime) == sup.me:
            continue  # ours (an outcome we hold, unrecorded): never wait on ourselves
        if rec.pid and rec.worker_alive() and sup.watcher.watch_pid(rec.pid, rec.key):
            foreign.add(rec.key)
        elif rec.owner_alive():
            finishing = True
        elif rec.order == order_id:
            dead.add((rec.key, rec.owner_pid))
    return finishing, dead


def supervise(launcher: Launcher, view: OrderView, emit: Emit, only: str | None = None,
              detach_others: bool = False) -> int:
    """The `run` loop (and, with `only`, `exec`): plan, launch, wait for the next event, finish, repeat.

    With `detach_others` (exec --parallel), the order's other launchable tasks start as detached workers
    once `only` has started.

    Returns the exit code: 0 when the order (or the `only` task) ended DONE/COMPLETED, 1 when not, 130 on Ctrl-C.
    """
    sup = Supervisor(launcher, emit, view)
    stop = Stop(sup.watcher)
    if view.fd is not None:
        sup.watcher.watch_fd(view.fd, "files")
    foreign: set[str] = set()
    recovered: set[tuple[str, int]] = set()  # dead owners whose tasks a recovery round has handled
    holders: set[int] = set()  # pids holding locks outside aipm that tasks wait for (watched: their exit wakes us)
    waiting_before: list[tuple[str, str]] = []
    deferred_before: list[str] = []
    recover = True  # at start, and whenever another owner's process ends (it may have died)
    ready: list[str] = []  # owned workers that ended, finished at the next lock round
    budget_told = False
    try:
        while not stop.requested:
            with _round(sup, ready):  # one lock round per wake-up: finish what ended, then launch
                _finish(sup, ready)
                if sup.unrecorded:
                    sup.retry_unrecorded()
                report = launcher.launch(view, owner=sup, only={only} if only else None, explain=False,
                                         recover=recover)
                sup.restore_owned(view.order.tasks)
            for event in sup.outbox:
                emit(event)
            sup.outbox.clear()
            recover = False
            order = report.order
            for problem in view.problems:
                emit({"event": "invalid_file", "error": problem})
            view.problems.clear()
            for item in report.failed:
                emit({"event": "launch_failed", "task": item["id"], "error": item["error"]})
            if detach_others:
                detach_others = False
                others = launcher.launch(view, owner=None, only=set(order.tasks) - {only})
                for item in others.launched:
                    emit({"event": "started", "task": item["id"], "pid": item["pid"], "attempt": item["attempt"],
                          "detached": True})
            if report.plan.budget_stop and not budget_told:
                budget_told = True  # once per run: the stop holds until someone raises the budget
                emit({"event": "budget", "order": order.id, "detail": report.plan.budget_stop})
                notify.send(launcher.settings, launcher.runtime, notify.BUDGET, "BUDGET_REACHED",
                            f"{order.id}: {report.plan.budget_stop}", AIPM_ORDER_ID=order.id)
            deferred = [d["id"] for d in report.deferred]
            if deferred != deferred_before and deferred:
                emit({"event": "deferred", "tasks": deferred, "detail": report.deferred[0]["detail"]})
            deferred_before = deferred
            waiting = report.plan.waiting
            if [(b.id, b.detail) for b in waiting] != waiting_before:
                for blocked in waiting:
                    emit({"event": "waiting", "task": blocked.id, "detail": blocked.detail, "pids": list(blocked.pids)})
            waiting_before = [(b.id, b.detail) for b in waiting]
            for pid in {p for b in waiting for p in b.pids} - holders:
                if sup.watcher.watch_pid(pid, ("holder", pid)):
                    holders.add(pid)
            finishing, dead = _watch_foreign(sup, report.records, foreign, order.id)
            orphaned = dead - recovered  # an owner died since the last recovery: never leave its task stuck
            recovered |= orphaned
            if only:
                if f"{order.id}/{only}" not in sup.owned:
                    break  # finished, failed for good, or never launchable
            elif not sup.owned and not foreign and not deferred and not finishing and not waiting and not orphaned:
                break  # nothing runs and nothing can start: finished, or stuck (exit code says which)
            ready = []
            if orphaned:
                recover = True
                continue
            if launcher.settings.preempt and not only and preemption.stop_for_urgent(sup, view):
                continue  # places were freed: plan again at once, and the urgent task (ranked first) starts
            timeout = (RESOURCE_RECHECK if deferred else FINISHING_RECHECK if finishing
                       else HELD_RECHECK if waiting else None)
            keys = sup.wait(timeout)
            while keys == ["files"]:
                view.refresh()
                if view.changed or view.problems:
                    break
                keys = sup.wait(timeout)  # only our own writes moved: no need for a planning round
            for key in keys:
                if key in foreign:
                    sup.watcher.forget(key)
                    foreign.discard(key)
                    recover = True
                elif isinstance(key, tuple):  # a lock holder outside aipm exited: plan again
                    sup.watcher.forget(key)
                    holders.discard(key[1])
                elif key not in ("signal", "files"):
                    ready.append(key)
        if ready:  # ended just as we were stopped: their real outcome still counts
            with launcher.runtime.launch_lock():
                _finish(sup, ready)
        if sup.unrecorded:
            sup.hand_over()
        if stop.requested:
            stopped = sup.abort()
            sup.outbox.append({"event": "interrupted", "requeued": stopped})
        for event in sup.outbox:
            emit(event)
        order = view.refresh()  # the caller's summary reads the view: bring it up to date on every path
        if stop.requested:
            return 130
        if only:
            return 0 if order.tasks[only].status in FINISHED_OK else 1
        done = all_done(order)
        notify.send(launcher.settings, launcher.runtime, notify.ORDER_FINISHED, "DONE" if done else "INCOMPLETE",
                    f"{order.id}: {status_summary(order)}", AIPM_ORDER_ID=order.id)
        return 0 if done else 1
    finally:
        sup.end_strays()  # nothing an attempt started outlives the run
        stop.close()
        sup.close()
