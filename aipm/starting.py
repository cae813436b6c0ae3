"""Starting one task, the launch transaction's step per task: its target locks, its worker's process (waiting for
a go), IN_PROGRESS; the worker recorded and let go once the round's statuses are durable (Starting.done); and,
when any step fails, the earlier ones undone so the task is QUEUED again. A mixin of Launcher (launcher.py),
which plans and calls start() under the launch lock.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

from aipm import (agents, commits, confine, inodes, landlock, locks, outcome, ownoutput, restore, runner, scope,
                  spending, workspace, writer)
from aipm.errors import UserError
from aipm.finish import pin, review_command
from aipm.liveness import process_ctime
from aipm.model import Order, Status, Task, definition, ran_by
from aipm.paths import as_path
from aipm.record import Record, live_pid
from aipm.runtime import StateWriteError
from aipm.view import OrderView
from aipm.workspace import carry
from aipm.worker import agent_for, program as worker_program, program_source
from aipm.workerfiles import NO_WAIT, append_log
from aipm.writer import StaleWrite, now, update_task


class Starter:
    """Launcher's start of one task (see the module's docstring)."""

    def start(self, order: Order, task: Task, owner: "Owner | None", view: OrderView | None = None,
              borrowed: str = "", cost_cap: float | None = None, cost_limit: float | None = None) -> Starting:
        """Start one task: its status written, its worker's process on its way. Caller holds the launch lock, and
        calls the result's done() once the status is durable (it records the worker and lets its command go). On
        failure, here or there, everything is undone and LaunchFailed raised. `borrowed`: the key of the worker
        whose slot it takes (slots.py); `cost_cap`: what its agent may spend (Record.cost_cap), given under the
        order budget's limit `cost_limit`."""
        if view is not None and view.invalid(task):
            # Kept out since an edit: started by its last valid version it ran what its file no longer says (an
            # edit that made a cycle or named an unknown dependency passes the status write's check of one file).
            raise LaunchFailed(view.why_invalid(task))
        rt = self.runtime
        running = rt.read_record(order.id, task.id)
        if running is not None and running.alive():  # one record per task: never overwrite a live one
            raise LaunchFailed(f"its worker pid {live_pid(running)} is still running")
        program = self._missing_program(task)
        if program:
            fix = program_source(task, self.settings)
            raise LaunchFailed(f"{runner.not_found(program)}; install it or fix {fix}")
        program = self._missing_reviewer(task)
        if program:  # found only once the work had run: each attempt paid for, then sent back as "review rejected"
            fix = f"`review` in {task.path}" if task.review is not None else "review.command in aipm.yaml"
            raise LaunchFailed(f"review: {runner.not_found(program)}; install it or fix {fix}")
        confined = confine.wanted(task, self.settings)
        # On a Ray node the command runs on another machine: a ruleset here would confine only the local driver.
        refusal = confined and ("not with --runner ray" if self.settings.runner == "ray"
                                else "not with workspace_setup (yet): the setup would run confined too"
                                if workspace.setup_of(task, self.settings) and
                                workspace.kind(task, self.settings) == workspace.WORKTREE else landlock.unavailable())
        if refusal:
            raise LaunchFailed(f"confine: {refusal}")
        try:
            fds = locks.take(rt.state, task.targets)
        except locks.LockBusy as exc:
            holder = next((f.holder for f in self.outside(self.records()) if exc.node in dict(f.nodes)), None)
            raise LaunchBusy(f"{exc.node or '.'} is held by {holder}" if holder else str(exc)) from None
        except OSError as exc:  # a full disk or a removed state directory while its lock file was made
            raise LaunchFailed(f"cannot lock its files: {exc.strerror or exc}") from None
        started_at = now()
        if owner is not None:  # its status write's fsync runs off this thread during the steps up to that write
            self.prepare_start(task, started_at)
        attempt = task.attempts + 1
        number = rt.next_number(order.id, task.id, attempt)
        worktree = workspace.kind(task, self.settings) == workspace.WORKTREE
        # A kept patch may be the only copy of an attempt's work (its logs cleared since): never write over it.
        while worktree and workspace.patch_path(self.project.root, order.id, task.id, number).exists():
            number = rt.next_number(order.id, task.id, number + 1)
        rec = Record(
            order=order.id, order_dir=order.path, task=task.id, task_file=task.path, attempt=attempt,
            targets=[str(t) for t in task.targets], log=str(rt.log_path(order.id, task.id, number)),
            exit_file=str(rt.exit_path(order.id, task.id, number)), started_at=started_at, number=number,
            counters=restore.counters(task), definition=definition(task), ran_by=ran_by(task), borrowed=borrowed,
            review=pin(review_command(task, self.settings, self.options.no_review)),  # (an adopter's judge too)
            cost_cap=cost_cap,
            cost_limit=cost_limit if cost_cap is not None else None, own_output=ownoutput.files(self.project.root),
            # Named now, not only once the worker starts: a detached owner's record is written under the launch
            # lock before it has a worker, and an uncapped agent's least share (budget.held) is read by its agent.
            # Left at "command", a planner that took the lock before the owner did (a second launch, a standby
            # owner) counted the running aider attempt as holding nothing, and started another under a budget that
            # paid for one.
            agent=agent_for(task, self.settings),
        )
        if task.resources is not None:
            rec.cpus, rec.memory_mb = task.resources.cpus or 0.0, task.resources.memory_mb or 0
        if agents.reports_cost(rec.agent):  # (a command's attempt spends nothing counted)
            spending.note_start(rt, rec)  # before it may spend: what its file holds of a redefined task's costs
        wrote_status = handed = False
        spawning: runner.Spawning | None = None
        try:
            # The kernel already holds a confined worker to exactly its targets: nothing to audit. A worktree task
            # writes its worktree (checked exactly at its end); the main tree is audited as the shared tree is, for
            # what it writes there by a path that leads out of its worktree (confined: the kernel refuses those).
            exact = confined and (worktree or confine.exact(task.target_files))
            if worktree:
                rec.workspace = workspace.prepare(self.project.root, rec, task, self.settings)
            if not (worktree and confined):
                rec.head = commits.at_start(self.project.root)  # before its command may begin (commits.py)
            if self.settings.scope_audit and not self.options.no_review and (task.targets or worktree) and not exact:
                self._scope_before(rec, ours=owner is not None)
            # The record is written once the worker exists and the round's statuses are durable; a crash before
            # that leaves IN_PROGRESS with no record, which recovery re-queues.
            inodes.remove(rec.exit_file)  # (next_number chose a number without one: a stray from a race)
            if owner is not None:
                spawning = owner.begin_worker(rec, task, fds)  # in the helper thread, while the status is written
            written = update_task(as_path(task.path), start_updates(task, rec.started_at), expect=Status.QUEUED,
                                  root=self.project.root)
            wrote_status = True
            if view is not None:
                view.note(written)
            if owner is None:
                self.spawn_detached(rec, fds)
                rt.write_record(rec)  # the detached owner reads it once we release the launch lock
                carry.log_note(rec.log)
                return Starting(rec)
            handed = True
            return Starting(rec, lambda: self._go(order, task, rec, view, spawning, fds),
                            lambda: self._abort(order, task, rec, view, spawning, fds))
        except (runner.SpawnError, StaleWrite, UserError, OSError) as exc:
            self._undo(order, task, rec, view, wrote_status)
            raise _failed(task, exc) from None
        finally:
            if not handed:
                if spawning is not None:
                    spawning.abandon()  # a wrapper whose launch failed must not wait for a go
                for fd in fds:
                    os.close(fd)
                writer.forget_prepared(task.path)

    def _go(self, order: Order, task: Task, rec: Record, view: OrderView | None, spawning: runner.Spawning,
            fds: list[int]) -> None:
        """The end of start(): the worker recorded before its command may begin (once the status is durable)."""
        try:
            spawning.finish()
            carry.log_note(rec.log)
        except (runner.SpawnError, StaleWrite, UserError, OSError) as exc:
            self._undo(order, task, rec, view, True)
            raise _failed(task, exc) from None
        finally:
            spawning.abandon()  # unless it went
            for fd in fds:
                os.close(fd)  # the worker has its own copies

    def _abort(self, order: Order, task: Task, rec: Record, view: OrderView | None, spawning: runner.Spawning,
               fds: list[int]) -> None:
        """A start given up half-way (an error elsewhere in its round): its wrapper runs nothing, its locks go,
        and it is undone as far as that can be done; the error being raised says why."""
        try:
            spawning.abandon()
        finally:
            for fd in fds:
                os.close(fd)
            with suppress(Exception):
                self._undo(order, task, rec, view, True)

    def _undo(self, order: Order, task: Task, rec: Record, view: OrderView | None, wrote_status: bool) -> None:
        """Put back what a start did: the task QUEUED again, no record, no snapshot or worktree."""
        carry.log_note(rec.log, keep=False)
        if wrote_status:
            restored = update_task(as_path(task.path), {"status": Status.QUEUED, "attempts": task.attempts,
                                                     "started_at": task.started_at},
                                   expect=Status.IN_PROGRESS, root=self.project.root)
            if view is not None:
                view.note(restored)
        self.runtime.remove_record(order.id, task.id)
        scope.end(self.project.root, rec.scope_file)
        if workspace.kind(task, self.settings) == workspace.WORKTREE:
            with suppress(UserError, OSError):  # what a failed prepare left; the launch error says why
                workspace.remove(self.project.root, order.id, task.id)

    def note_failure(self, task: Task, error: str, view: OrderView | None) -> None:
        """Keep why a task could not start in its `reason` (it stays QUEUED), so `status` and `why` say it after the
        launch's output is gone. Written only when it changed: `run` tries the launch again at every wake-up.
        Caller holds the launch lock."""
        if view is not None and view.invalid(task):
            return  # a person's file being fixed is not written (the write took their broken version in as ours)
        reason = outcome.launch_failed(error)
        try:
            written = update_task(as_path(task.path), lambda now: {"reason": reason} if now.reason != reason else {},
                                  expect=Status.QUEUED, root=self.project.root)
        except (StaleWrite, UserError, OSError):
            return  # launched by another process since, broken or unwritable: the error is printed all the same
        if view is not None:
            view.note(written)

    def prepare_start(self, task: Task, started_at: str | None = None) -> None:
        """Write the IN_PROGRESS version of a task that may start next ahead of time (see writer.prepare); with
        `started_at`, of the start under way."""
        stamp = started_at or now()
        writer.prepare(as_path(task.path), lambda current: start_updates(current, stamp), Status.QUEUED,
                       self.project.root, due=started_at is not None)

    def _scope_before(self, rec: Record, ours: bool) -> None:
        """Snapshot the git tree before the worker starts (or, for an attempt `ours` while this process watches
        the tree, open its window of events), and note whose files may change meanwhile."""
        def refuse() -> None:  # the snapshot could not be saved after all: its command must not begin
            append_log(rec.log, "scope audit: cannot save the snapshot this attempt starts from; stopped before "
                                "its command began")
            if rec.pid:
                runner.signal_group(rec.pgid, signal.SIGKILL)

        since = time.time_ns()
        if scope.save_before(self.project.root, as_path(rec.scope_file), refuse, ours):
            rec.scope_allowed = [t for other in self.runtime.records() for t in other.targets]
            rec.scope_since = since

    def _missing_program(self, task: Task) -> str | None:
        """Checked before any status changes, so a typo in a command is an error, not a stuck task."""
        argv = worker_program(task, self.settings)
        if not argv:
            return None  # a string command: the shell reports it in the log, as a failed attempt
        return runner.missing_program(argv, os.environ, str(self.project.root))

    def _missing_reviewer(self, task: Task) -> str | None:
        """The review's program, when it is a program named on PATH (or by its full path) that is not there. Not a
        shell line (the shell says it, as a rejection), nor a path in the tree (the task may be what makes it)."""
        command = review_command(task, self.settings, self.options.no_review)
        if not isinstance(command, tuple) or ("/" in command[0] and not os.path.isabs(command[0])):
            return None
        return runner.missing_program(command, os.environ, str(self.project.root))

    def spawn_detached(self, rec: Record, fds: list[int] = (), adopt: bool = False) -> None:
        """Start `python -m aipm.work` as the task's owner: it runs (or adopts) the worker, finishes the task
        and starts successors. It inherits the target locks and this invocation's effective settings."""
        # Opened here, not by the spawn: its error names the log (posix_spawn's names the program whatever failed).
        # Its directory is made again: a worker's `rm -rf .aipm` since the attempt started took it.
        log = os.open(self.runtime.log_again(rec.log), os.O_WRONLY | os.O_CREAT | os.O_APPEND | NO_WAIT | os.O_CLOEXEC,
                      0o644)
        try:
            self._spawn_owner(rec, log, fds, adopt)
        finally:
            os.close(log)

    def _spawn_owner(self, rec: Record, log: int, fds: list[int], adopt: bool) -> None:
        handover, given = runner.inherit(fds, above=max(log, 2))  # (none onto 0-2, nor onto the log)
        pid = self._spawn_work([rec.order_dir, rec.task, "--order-id", rec.order, "--lock-fds",
                                ",".join(map(str, given)), *["--adopt"] * adopt], log, handover)
        rec.owner_pid, rec.owner_ctime = pid, process_ctime(pid)

    def spawn_standby(self, order_dir: str, order_id: str) -> int:
        """Start `python -m aipm.work --standby` for the order (standby.py), logging to the order's standby.log;
        its pid."""
        log = os.open(self.runtime.log_again(str(self.runtime.log_dir(order_id) / "standby.log")),
                      os.O_WRONLY | os.O_CREAT | os.O_APPEND | NO_WAIT | os.O_CLOEXEC, 0o644)
        try:
            return self._spawn_work([order_dir, "--standby", "--order-id", order_id], log)
        finally:
            os.close(log)

    def work_flags(self) -> list[str]:
        """This invocation's effective settings as `python -m aipm.work` takes them (and as a standby's claim keeps
        them, standby.py)."""
        s = self.settings
        flags = ["--max-workers", str(s.max_workers), "--max-cpu", str(s.max_cpu_percent), "--max-memory",
                 str(s.max_memory_percent), "--workspace", s.workspace]
        flags += ["--no-review"] * self.options.no_review
        flags += ["--no-resource-monitoring"] * (not s.enable_monitoring)
        flags += ["--no-auto-scaling"] * (not s.enable_auto_scaling)
        flags += ["--runner", s.runner]
        flags += ["--confine"] * s.confine
        if self.options.model:
            flags += ["--model", self.options.model]
        return flags

    def _spawn_work(self, args: list[str], log: int, handover: list = ()) -> int:
        """`python -m aipm.work ROOT *args` detached, with this invocation's effective settings; its pid."""
        argv = [sys.executable, "-m", "aipm.work", str(self.project.root), *args, *self.work_flags()]
        pid = os.posix_spawn(sys.executable, argv, os.environ, setsid=True, file_actions=[
            (os.POSIX_SPAWN_DUP2, log, 1),  # before stdin's open, which would close it were it descriptor 0
            (os.POSIX_SPAWN_DUP2, 1, 2),
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            *handover,
        ])
        self.detached.add(pid)
        return pid


def _failed(task: Task, exc: Exception) -> LaunchFailed:
    if isinstance(exc, StateWriteError):
        return LaunchFailed(f"{exc.filename}: {exc.strerror}")
    return LaunchFailed(f"{task.path}: {exc}" if isinstance(exc, OSError) else str(exc))


def start_updates(task: Task, started_at: str) -> dict:
    """The status write that starts the task's next attempt."""
    return {"status": Status.IN_PROGRESS, "attempts": task.attempts + 1, "started_at": started_at,
            "finished_at": None, "exit_code": None, **cleared_reason(task)}


def cleared_reason(task: Task) -> dict:
    """The update that forgets the previous attempt's reason; none when there is none (no new `reason: null` line)."""
    return {"reason": None} if task.reason is not None else {}


class LaunchFailed(Exception):
    pass


@dataclass
class Starting:
    """A started task (Launcher.start) whose worker is yet to be recorded and let go: done() does that, once
    the status is durable, and returns the record (LaunchFailed, everything undone, if it cannot); abort() gives
    it up instead."""

    rec: Record
    finish: Callable[[], None] | None = None
    cancel: Callable[[], None] | None = None

    def done(self) -> Record:
        finish, self.finish = self.finish, None
        if finish is not None:
            finish()
        return self.rec

    def abort(self) -> None:
        if self.finish is not None and self.cancel is not None:
            self.finish = None
            self.cancel()


class LaunchBusy(LaunchFailed):
    """A target lock is held: the task waits, it did not fail."""


class Owner:
    """Interface of whatever owns running tasks (supervisor, foreground exec, detached worker)."""

    def spawn_worker(self, rec: Record, task: Task, fds: list[int]) -> None:
        raise NotImplementedError

    def begin_worker(self, rec: Record, task: Task, fds: list[int], background: bool = True) -> runner.Spawning:
        """Start the worker's process now (in the background: a helper thread), its command held back until the
        returned Spawning is finished (after the task's status is written and durable), so the process starts
        while the status is written."""
        raise NotImplementedError

    def adopt(self, rec: Record) -> None:
        raise NotImplementedError
