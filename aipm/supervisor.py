"""Owning running tasks: start or adopt workers, wait for them, enforce timeouts, and the `run` loop.

Recording what each attempt came to (review, status) is the other half of an owner: recording.py.

A Supervisor owns tasks it started or adopted. It keeps nothing that is not also on disk (the task files and
the worker records), so it may die at any instant: the workers keep running with their locks, and the next
owner adopts them and records their real outcome.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from aipm import cluster, confine, durable, notify, preemption, runner, scope, subreaper, workspace
from aipm.errors import UserError
from aipm.launcher import Launcher, LaunchReport, Owner, append_log
from aipm.recording import Recording
from aipm.model import FINISHED_OK, RUNNING, Order, Status, Task, status_summary
from aipm.runtime import Record, process_ctime, read_exit_file
from aipm.store import load_task
from aipm.view import OrderView
from aipm.worker import invocation

Emit = Callable[[dict], None]
KILL_GRACE = 5.0


class Supervisor(Recording, Owner):
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
        self.reaped: dict[str, int] = {}  # exit codes of ended workers reaped before handle() (see _round)
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
        self._own(rec, started=True)
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

    def _own(self, rec: Record, started: bool = False) -> None:
        """Watch an owned worker; one we `started` a moment ago waits for its go, so it is ours and alive."""
        self.owned[rec.key] = rec
        if not (rec.pid and (started or rec.worker_alive()) and self.watcher.watch_pid(rec.pid, rec.key)):
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
        code = self.reaped.pop(key, None)
        if code is None and rec.pid:
            code = runner.reap(rec.pid)
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

    # -- strays: what an attempt left running outside its process group (see subreaper.py) -------------------

    def end_strays(self, rec: Record | None = None) -> None:
        """End the processes `rec`'s attempt left behind; with no `rec`, every stray below us."""
        ours = {r.pid for r in self.owned.values() if r.pid} | scope.running_pids()  # git of a prefetch
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
                interrupted = task is not None and task.status in RUNNING and task.attempts == rec.attempt
                if interrupted:
                    self.launcher.interrupt(task, rec, "stopped by the user (Ctrl-C)")
                    stopped.append(rec.task)
                self._drop(rec, noted=interrupted)
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
            self._drop(rec, noted=ours)
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
def _round(sup: Supervisor, ready: list[str], first: bool = False) -> Iterator[list[str]]:
    """One wake-up under the launch lock, with one tree snapshot for every task that ends or starts in it
    (started before queueing for the lock when a task that ended needs its audit, or for the first starts of
    the run). Yields the keys of those tasks: their audit, and so their outcome, waits for that snapshot."""
    with scope.shared():
        ended = [sup.owned[k] for k in ready if k in sup.owned]
        audited = [rec.key for rec in ended if Path(rec.scope_file).exists()]
        if audited:
            for rec in ended:  # stragglers first (as `handle` does): their writes belong before the snapshot
                if rec.pid:
                    # The leader first (its status kept for handle()): while it is an unreaped zombie the group
                    # counts as alive, and kill_group would look for members through all of /proc.
                    code = runner.reap(rec.pid)
                    if code is not None:
                        sup.reaped[rec.key] = code
                    runner.kill_group(rec.pgid)
        may_audit = sup.settings.scope_audit and not (sup.settings.confine or sup.launcher.options.no_review)
        if audited or (first and may_audit):
            scope.prefetch(sup.rt.root)  # git runs while we take the lock and start what need not wait
        with sup.rt.launch_lock():
            yield audited


def _start_early(sup: Supervisor, launcher: Launcher, view: OrderView, only: str | None, recover: bool,
                 audited: list[str]) -> LaunchReport | None:
    """While the tasks that just ended wait for their audit's snapshot, start what does not depend on them in the
    places they left, and let it go as soon as that snapshot (its "before" too) is read and its status durable:
    neither waits for the audits and outcomes of the others. Their successors start after, in the same round.

    Only tasks ranked before all that those outcomes may make launchable start early (the queued dependants of
    the ended tasks, and an ended task that failed, which may be retried), so places go in the plan's order as if
    the outcomes were known; only a task its audit sends back to rework loses its turn to them."""
    if not audited:
        return None
    for key in audited:  # what they left running is ended first, while they are still all we may own
        sup.end_strays(sup.owned[key])
    order = view.order
    waiting = [d for key in audited if sup.owned[key].order == order.id
               for d in view.dependants.get(sup.owned[key].task, ()) if order.tasks[d].status == Status.QUEUED]
    waiting += [sup.owned[key].task for key in audited if sup.owned[key].order == order.id
                and sup.owned[key].task in order.tasks and read_exit_file(sup.owned[key].exit_file) != 0]
    limit = min((view.rank(t) for t in waiting), default=len(order.tasks))
    early = [t for t in view.ready_ordering() if view.rank(t) < limit and (only is None or t == only)]
    if not early:
        return None
    report = launcher.launch(view, owner=sup, only=set(early), explain=False, recover=recover, ending=audited)
    durable.flush()
    return report


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
    first = True
    ready: list[str] = []  # owned workers that ended, finished at the next lock round
    budget_told = False
    try:
        while not stop.requested:
            with _round(sup, ready, first=first) as audited:  # one lock round per wake-up: finish, launch
                early = _start_early(sup, launcher, view, only, recover, audited)
                _finish(sup, ready)
                if sup.unrecorded:
                    sup.retry_unrecorded()
                report = launcher.launch(view, owner=sup, only={only} if only else None, explain=False,
                                         recover=recover and early is None)
                if early is not None:
                    report.failed[:0] = early.failed
                    report.recovered[:0] = early.recovered
                sup.restore_owned(view.order.tasks)
            first = False
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
