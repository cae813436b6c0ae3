"""Owning running tasks: start or adopt workers, wait for them, enforce timeouts, stop them.

Recording what each attempt came to (review, status) is the other half of an owner: recording.py; stopping workers
before they end (Ctrl-C, preemption, a budget) is stopping.py. The `run` loop that drives a Supervisor round by
round is runloop.py.

A Supervisor owns tasks it started or adopted. It keeps nothing that is not also on disk (the task files and
the worker records), so it may die at any instant: the workers keep running with their locks, and the next
owner adopts them and records their real outcome.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from contextlib import suppress

from aipm import (agents, childstops, cluster, confine, meter, notify, ownoutput, runner, scope, statedir,
                  subreaper, workspace)
from aipm.childstops import ChildStops
from aipm.finish import time_limit
from aipm.inotify import IN_DELETE, IN_DELETE_SELF, DirWatch, close_at_exit
from aipm.intake import Intake
from aipm.launcher import Launcher
from aipm.paths import real_relative
from aipm.starting import Owner
from aipm.stopping import KILL_GRACE, Stopping
from aipm.recording import Recording
from aipm.model import Task
from aipm.liveness import led_by_another, process_ctime
from aipm.record import Record
from aipm.runtime import ended_in_time, read_exit, read_exit_file
from aipm.workerfiles import append_log, exit_code_in_log
from aipm.view import OrderView
from aipm.worker import invocation

Emit = Callable[[dict], None]
RECORDS = "records"  # the wait key of a deletion in our records' directory
RECORDS_RECHECK = 0.2  # seconds: a record of ours went unseen by the watch; written again by the next round
# Records are replaced and removed by rename (runtime.py), so a deletion there, or of the directory, is someone else's.
_RECORDS_GONE = IN_DELETE | IN_DELETE_SELF
# The clock of time limits, kept in records (another process may adopt them): one for the whole machine that a step
# of the wall clock leaves alone (an hour forward timed out every attempt at once), counting time asleep.
_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def _now() -> float:
    return time.clock_gettime(_CLOCK)


class Supervisor(Stopping, Recording, Owner):
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
        self.intake = Intake(self.rt.root)  # confined worktree attempts' objects, taken while they run
        self.records_watch: DirWatch | None = None  # wakes us when our records are deleted (see keep_records)
        # Ray attempts that ended lost with their cluster (key → why; None: lost to no more than that attempt), and
        # why that cluster is gone: the run stops rather than spend every task's attempts on it.
        self.lost_with_cluster: dict[str, str | None] = {}
        self.cluster_gone: str | None = None
        self.child_stops = ChildStops(self.watcher)  # a wrapper stopped (SIGSTOP) is let go on

    # -- Owner interface (called under the launch lock) -----------------------------------------------

    def spawn_worker(self, rec: Record, task: Task, fds: list[int]) -> None:
        self.begin_worker(rec, task, fds, background=False).finish()

    def begin_worker(self, rec: Record, task: Task, fds: list[int], background: bool = True) -> runner.Spawning:
        command, env, stdin = invocation(self.rt, self.settings, rec, task, self.launcher.options.model)
        command = workspace.with_setup(self.rt.root, command, rec, task, self.settings)
        if self.settings.runner == "ray":
            command = cluster.wrap(command, address=self.settings.ray_address, resources=task.resources, stdin=stdin,
                                   exit_file=rec.exit_file)
            stdin = None  # the prompt file is opened on the node
        rec.command = [command] if isinstance(command, str) else list(command)
        timeout = time_limit(task, self.settings)
        rec.owner_pid, rec.owner_ctime = self.me
        cwd = workspace.directory(self.rt.root, rec)
        jail = ()
        if confine.wanted(task, self.settings):
            # A worktree task's targets are its worktree's copies; the task files it may not touch are both the
            # main tree's and its worktree's copies of them, by their real place (a symlinked orders/ checked out
            # in the worktree may lead back to the main tree, leaving the worktree's copies open).
            # An order directory outside the project (`aipm run /elsewhere/ORD`, a linked orders/) is kept out
            # where it lies: the outside is open, and a task file written there runs as the worker wrote it.
            dirs = (os.path.dirname(rec.task_file), self.rt.root / self.settings.orders_dir)
            places = [real_relative(str(self.rt.root), os.path.relpath(d, self.rt.root)) for d in dirs]
            keep = [os.path.join(top, rel) for top in {str(self.rt.root), cwd} for rel in places if rel is not None]
            keep += [os.path.realpath(d) for d, rel in zip(dirs, places) if rel is None]
            jail = confine.prefix(cwd, rec.targets, rec.log, rec.exit_file, keep, project=str(self.rt.root),
                                  state=str(statedir.user_base()))
            rec.confined = True
        # The agent's report of its usage goes where the worker cannot rewrite it. Not on Ray: there the agent writes
        # the log itself, on its node (cluster.guard), and its usage is read from the log.
        if agents.is_preset(rec.agent) and self.settings.runner != "ray":
            jail = [*meter.prefix(rec.agent, rec.log), *jail]
            rec.metered = True
        def started(pid: int, ctime: float) -> None:
            """Recorded and watched before its command may begin: if either fails, the command never runs."""
            self._record(rec, pid, ctime, timeout)
            try:
                self._own(rec, started=True)
            except OSError:  # no descriptor left to watch it (EMFILE)
                self.owned.pop(rec.key, None)
                raise
            self.outbox.append({"event": "started", "task": rec.task, "order": rec.order, "pid": pid,
                                "attempt": rec.serial, "time": round(time.time(), 6)})  # its go, not its line

        return runner.begin(command, exit_file=rec.exit_file, env=env, cwd=cwd, log=rec.log, stdin=stdin,
                            pass_fds=fds, started=started, prefix=jail, background=background,
                            place_log=self.rt.place_log, limit=timeout)

    def _record(self, rec: Record, pid: int, ctime: float, timeout: int | None) -> None:
        """Write the worker's record; only then may its command begin."""
        rec.pid = rec.pgid = pid
        rec.ctime = ctime
        rec.deadline = _now() + timeout if timeout else None
        self.rt.write_record(rec)

    def adopt(self, rec: Record) -> None:
        if rec.deadline and rec.deadline > 1e9 > _now():  # a wall-clock time, written by an aipm before _CLOCK
            rec.deadline += _now() - time.time()
        rec.owner_pid, rec.owner_ctime = self.me
        rec.unwritten = ""  # ours to record now: should we die too, no hand-over left it
        rec.own_output = ownoutput.with_ours(rec.own_output, self.rt.root)  # should we die too (ownoutput.py)
        self.rt.write_record(rec)
        self.adopted.add(rec.key)
        self._own(rec)
        if rec.timed_out:
            self.timed_out.add(rec.key)
        # Its owner died stopping it: the stop goes on (not for one gone: its group's number may be reused).
        if (rec.stopping or rec.timed_out) and rec.pid and rec.key not in self.exited:
            self._stop(rec, _now())
        if not (rec.phase == "review" and rec.key in self.exited):  # a reviewer gone: handle() says what follows
            self.outbox.append({"event": "adopted", "task": rec.task, "order": rec.order, "pid": rec.pid})

    def _own(self, rec: Record, started: bool = False) -> None:
        """Watch an owned worker; one we `started` a moment ago waits for its go, so it is ours and alive."""
        self.owned[rec.key] = rec
        if not (rec.pid and (started or rec.worker_alive()) and self.watcher.watch_pid(rec.pid, rec.key)):
            self.exited.append(rec.key)

    # -- waiting -------------------------------------------------------------------------------------

    def pending(self) -> bool:
        """Whether wait() would return at once with something to handle (changes in the order's files aside)."""
        # (A SIGCHLD, heard by childstops and by run's Stop, is nothing to handle: a stop asked is seen by the loop.)
        return bool(self.exited) or self.watcher.pending("files", childstops.KEY, "signal")

    def wait(self, timeout: float | None, hush: Callable[[list], list] = lambda keys: keys) -> list[str]:
        """Sleep until an owned process ends, a deadline passes or a watched descriptor is ready.

        Returns the keys that woke us: owned task keys (process ended) and any extra keys of watch_fd() that
        `hush` keeps. A wake-up with nothing left to return (a child's SIGCHLD) sleeps on.
        """
        if self.exited:
            ready, self.exited = self.exited, []
            return ready
        now = _now()
        wake = list(self.kill_at.values())
        wake += [r.deadline for k, r in self.owned.items() if r.deadline and k not in self.timed_out]
        if wake:
            until = max(0.0, min(wake) - now)
            timeout = until if timeout is None else min(timeout, until)
        until = None if timeout is None else time.monotonic() + timeout
        while True:
            woke = self.watcher.wait(self.intake.cap(self.owned, timeout))
            if childstops.KEY in woke:  # a child of ours stopped or ended
                # Only our children: an adopted wrapper's pid, once reaped by its own parent, may be another's.
                self.child_stops.go_on(rec for key, rec in self.owned.items() if key not in self.adopted)
            keys = hush([key for key in woke if key != childstops.KEY])
            looked = self.intake.look(self.owned)  # (when due, woken for it or not: wake-ups may never stop)
            if keys or (not woke and not looked) or (until is not None and time.monotonic() >= until):
                break
            timeout = None if until is None else until - time.monotonic()
        self._enforce_deadlines()
        return keys

    def _enforce_deadlines(self) -> None:
        now = _now()
        for key, rec in self.owned.items():
            # An attempt that has ended, and by its wrapper's stamp within its limit, is handled next: no timeout (the
            # stamp of one still running is not read: it could be anything its worker wrote).
            if rec.deadline and now >= rec.deadline and key not in self.timed_out and rec.pid and not (
                    self.watcher.ended(key) and ended_in_time(rec.exit_file, rec.deadline)):
                self.timed_out.add(key)
                self._note_in_records([rec], timed_out=True)
                append_log(rec.log, f"timeout: sending SIGTERM to process group {rec.pgid}")
                self._stop(rec, now)
        for key, at in list(self.kill_at.items()):
            if now >= at:
                del self.kill_at[key]
                if key in self.owned:
                    runner.signal_group(self.owned[key].pgid, signal.SIGKILL)

    def _stop(self, rec: Record, now: float) -> None:
        """Ask the worker's group to stop (runner.ask_to_stop); SIGKILL after KILL_GRACE."""
        runner.ask_to_stop(rec.pgid)
        self.kill_at[rec.key] = now + KILL_GRACE

    # -- finishing -----------------------------------------------------------------------------------

    def handle(self, key: str) -> dict | None:
        """An owned process ended: apply its outcome. Returns the event, or None if the key is not ours."""
        rec = self.owned.get(key)
        if rec is None:
            return None
        self.watcher.forget(key)
        self.kill_at.pop(key, None)
        code = self.reaped.pop(key, None)
        if rec.pid:
            reaped = self.end_group(rec)  # (a straggler left in its group would hold the file locks and keep writing)
            code = reaped if code is None else code
        timed_out = key in self.timed_out
        self.timed_out.discard(key)
        if timed_out and rec.deadline and ended_in_time(rec.exit_file, rec.deadline):
            timed_out = False  # it had ended in time, and we saw it late (stopped meanwhile: SIGSTOP, a suspend)
        # Not our child (adopted): the wrapper's exit file holds the outcome, or else its log. Ours, killed by a
        # signal: its wrapper may have kept the time limit itself (no owner did), then killed its group, itself too.
        if code is None or not (timed_out or 0 <= code < 128):
            written, kept = read_exit(rec.exit_file, rec.deadline)
            code = written if kept or code is None else code
            code = exit_code_in_log(rec.log) if code is None else code
            timed_out = timed_out or kept
        if rec.pid:
            self.end_strays(rec)
        self.read_usage_ahead(rec)
        self.ask_cluster(rec, code)
        gone = self.lost_with_cluster.pop(key)
        with self.rt.launch_lock():
            if rec.stopping and rec.phase == "review":  # its code is no verdict: the review runs again
                code, timed_out = None, False
            elif rec.stopping:  # its dead owner was stopping it (Ctrl-C, a preemption): no outcome of its own
                return {"event": "interrupted", "requeued": [rec.task], "why": f"by its last owner ({rec.stopping})",
                        **self.kept([rec])} if self._requeue(rec, rec.stopping) else None
            elif gone:  # no failure of its task: QUEUED again, attempt not counted
                why = f"the Ray cluster was lost ({gone})"
                return {"event": "interrupted", "requeued": [rec.task], "why": why, **self.kept([rec])} \
                    if self._requeue(rec, why) else None
            return self._record_outcome(rec, code, timed_out)

    def ask_cluster(self, rec: Record, code: int | None) -> None:
        """Note whether `rec`'s attempt ended lost with its Ray cluster (cluster.gone), and so why the run's cluster is
        gone. Once per attempt: it takes a second or more, so the run loop asks before it takes the launch lock."""
        if rec.key not in self.lost_with_cluster:
            if code is None and cluster.is_attempt(rec.command):  # adopted: not reaped, its exit file says
                code = read_exit_file(rec.exit_file)
            why = cluster.gone(rec.exit_file, rec.command, code) if rec.phase == "work" else None
            self.lost_with_cluster[rec.key] = why
            self.cluster_gone = self.cluster_gone or why

    # -- strays: what an attempt left running outside its process group (see subreaper.py) -------------------

    def end_strays(self, rec: Record | None = None) -> None:
        """End the processes `rec`'s attempt left behind; with no `rec`, every stray below us."""
        notify.reap()  # an ended notify command is no stray, but a zombie of ours until collected
        ours = {r.pid for r in self.owned.values() if r.pid} | scope.running_pids()  # git of a prefetch
        adopted = rec is not None and rec.key in self.adopted
        if not adopted and all(pid in ours for pid in subreaper.adopted_below()):
            return  # the usual case: nothing left its worker
        known = ours | self.launcher.detached | {p for r in self.rt.records() for p in (r.pid, r.owner_pid) if p}
        alone = rec is None or all(key == rec.key for key in self.owned)
        doomed = subreaper.left_behind(self.rt, known, rec, alone, adopted)
        if doomed:
            ended = subreaper.end(doomed)
            if rec is not None and ended:
                append_log(rec.log, f"ended {len(ended)} process(es) the attempt left running outside its "
                                    f"process group: pids {', '.join(map(str, ended))}")

    # -- stopping ------------------------------------------------------------------------------------

    def end_ahead(self, rec: Record, strays: bool = False) -> None:
        """What handle() does of an ended attempt before it takes the launch lock, done before a round takes it
        (run's, a detached owner's last): its group ended, its exit code reaped and kept for handle(), with
        `strays` what it left running ended too, its usage read, its Ray cluster asked."""
        if rec.pid:
            # The leader reaped first: while it is an unreaped zombie the group counts as alive, and kill_group
            # would look for members through all of /proc.
            code = self.end_group(rec)
            if code is not None:
                self.reaped[rec.key] = code
            if strays:
                self.end_strays(rec)
        self.read_usage_ahead(rec)
        self.ask_cluster(rec, self.reaped.get(rec.key))

    def end_group(self, rec: Record) -> int | None:
        """The attempt is over: our worker's exit code, reaped (None for an adopted one: no child of ours, and its
        pid may be one of our children by now), and what is left of its group SIGKILLed."""
        code = None if rec.key in self.adopted else runner.reap(rec.pid)
        if not self._group_reused(rec):
            runner.kill_group(rec.pgid)
        return code

    def _group_reused(self, rec: Record) -> bool:
        """Its group's number leads another process now: an adopted worker that had ended, whose group emptied (a
        number in use as a group's is given to no new process). Not to be signalled."""
        return rec.key in self.adopted and led_by_another(rec.pgid, rec.ctime)

    # -- records a worker deleted -----------------------------------------------------------------------

    def keep_records(self) -> None:
        """Write again the records of owned workers that are gone from the state directory (a worker's command
        removed it: `rm -rf /tmp/aipm-*`, a test suite cleaning /tmp), and the directories their wrappers write
        their exit codes into: without them `ps` misses the workers, and our death would leave them to be re-queued
        instead of adopted. Under the lock, before the round's recovery (the hold's records are read once)."""
        if self.records_watch is not None:
            self.records_watch.events()  # cleared before we look: a deletion after this wakes the next round
        kept = {rec.key for rec in self.rt.records()}
        for rec in self.owned.values():
            if rec.key not in kept:
                with suppress(OSError):  # a full /tmp: tried again next round
                    os.makedirs(os.path.dirname(rec.exit_file), exist_ok=True)
                    self.rt.write_record(rec)

    def watch_records(self) -> bool:
        """Before we sleep: wake (RECORDS) when a record of ours, or its directory, is deleted, so that
        keep_records() follows at once rather than at our next event. False when one is missing already (deleted
        before its directory was watched: an `rm -rf` still at work when keep_records() made it again)."""
        if self.records_watch is None and self.owned:
            self.records_watch = DirWatch.open(None)
            if self.records_watch is not None:
                self.watcher.watch_fd(self.records_watch.fd, RECORDS)
        if self.records_watch is not None:
            for order in {rec.order for rec in self.owned.values()}:  # every time: a directory made again is new
                self.records_watch.add(os.path.dirname(self.rt.record_path(order, "-")), _RECORDS_GONE)
        return all(os.path.exists(self.rt.record_path(rec.order, rec.task)) for rec in self.owned.values())

    def close(self) -> None:
        if self.records_watch is not None:
            close_at_exit(self.records_watch.fd)
        self.watcher.close()
        self.child_stops.close()
