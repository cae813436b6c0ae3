"""The hand-over between a worker that ends and the next: what starts in its place before its outcome is written
(start_early), and what is made ready while workers run so that the next start only renames files that exist
(prepare_next). Driven by the run loop (runloop.py), one launch-lock round per wake-up.
"""

from __future__ import annotations

import os

from aipm import budget, confine, durable, locks, offthread, writer
from aipm.finish import review_command
from aipm.launcher import Launcher, LaunchReport
from aipm.model import Order, Status
from aipm.paths import normalize
from aipm.overlap import any_clear
from aipm.record import Record
from aipm.runtime import read_exit_file
from aipm.supervisor import Supervisor
from aipm.view import OrderView


def start_early(sup: Supervisor, launcher: Launcher, view: OrderView, only: str | None, recover: bool,
                 ended: list[str]) -> LaunchReport | None:
    """Before the outcomes of the tasks that just ended are recorded (their audits wait for a snapshot, their
    status writes for the disk), start what does not depend on them in the places they left — and in their files,
    when no reviewer follows — and let it go as soon as its status is durable (and the snapshot, its "before"
    too, read): it waits for none of the audits and outcomes of the others. Their successors start after, in the
    same round.

    Only tasks ranked before all that those outcomes may make launchable start early (the queued dependants of
    the ended tasks, and an ended task that failed, which may be retried), so places go in the plan's order as if
    the outcomes were known; only a task its audit sends back to rework loses its turn to them."""
    if not ended or budget.of(view.order, launcher.settings.max_cost_usd) is not None:
        return None  # under a budget the ended attempts' costs count first: they are known once recorded
    order = view.refresh()  # the ended tasks' files as they are now: a `review:` saved meanwhile counts
    ready = view.ready_ordering() if only is None else [only] if only in view.ready else []
    if not ready:
        return None  # a chain: what comes next waits for an outcome
    # A timed-out attempt failed whatever its code (Recording._work_ended): it is not reviewed next, it may be retried.
    codes = {key: 1 if key in sup.timed_out else _exit_code(sup, sup.owned[key]) for key in ended}
    freed = [key for key in ended if not _reviewed_next(sup.owned[key], codes[key], order, launcher)]
    # An attempt that no reviewer follows is over with its files once its group has ended (and its strays, below):
    # recording its outcome changes none of them — unless it worked in a worktree (it merges back into them) or
    # was confined (what confinement created for it and it left untouched is removed then).
    released = [key for key in freed
                if not sup.owned[key].workspace and not os.path.exists(confine.made_file(sup.owned[key].log))]
    held = [tuple(normalize(t) for t in sup.owned[key].targets) for key in ended if key not in released]
    if not any_clear((order.tasks[t] for t in ready), held):
        return None  # every ready task waits for the files of ended tasks that are reviewed next
    waiting = [d for key in ended if sup.owned[key].order == order.id
               for d in view.dependants.get(sup.owned[key].task, ()) if order.tasks[d].status == Status.QUEUED]
    waiting += [sup.owned[key].task for key in ended if sup.owned[key].order == order.id
                and sup.owned[key].task in order.tasks and codes[key] != 0]
    if view.rank(ready[0]) >= view.first_rank(waiting):
        return None  # ready is in rank order: none is ranked before what the outcomes may make launchable
    for key in ended:  # what they left running is ended first, while they are still all we may own
        sup.end_strays(sup.owned[key])
    report = launcher.launch(view, owner=sup, only={only} if only else None, explain=False, recover=recover,
                             ending=freed, released=released, ranked_before=waiting)
    durable.flush()
    return report


def prepare_next(sup: Supervisor, launcher: Launcher, view: OrderView, made: set[str],
                  prepared: set[tuple[str, tuple]]) -> None:
    """While the workers run, do what the next hand-overs would otherwise do while something waits for them:
    - write ahead the status a clean exit gives each running task, and the IN_PROGRESS of the tasks that may
      start next (its queued dependants, and as many ready tasks as run now: each end frees a place), so that
      those writes only rename a file that is on disk already (writer.prepare);
    - make the lock files of those dependants, and empty files for the next workers' logs: in a chain of short
      tasks a new file is the dearest step of a start (on ext4 without a journal each create scans the inodes
      freed in the last minute), made in a helper thread (_make_files). `prepared`: (task, targets) whose lock
      files were made, so a wide fan-out costs its lookups once, not on every wake-up.
    Only while nothing waits to be handled (checked first, and before each write ahead): where workers end faster
    than the supervisor hands over (1000 `true`s on 2 workers), the work would only be done sooner and delay every
    hand-over. All but the IN_PROGRESS of the first ready tasks, as many as run now: the next round starts them
    whether or not it waits, and writes that version itself if it is not ready, then waits for its fsync (B1:
    0.5 ms of each start's 2.3, `true`s ending while the version was still being written). Made a round earlier, its
    fsync is done when the start comes (B1 wall 2.29-2.43 s -> 1.91-1.96 s, three runs each)."""
    order = view.order
    if sup.pending():
        for tid in view.ready_ordering()[:len(sup.owned)]:
            launcher.prepare_start(order.tasks[tid])
        return
    starting: list[str] = []
    lock: list[tuple] = []
    for rec in sup.owned.values():
        if rec.order == order.id:
            for dependant in view.dependants.get(rec.task, ()):
                task = order.tasks.get(dependant)
                if task is not None and task.status == Status.QUEUED:
                    starting.append(dependant)
                    if (task.id, task.targets) not in prepared:
                        lock.append((task.id, task.targets))
    if sup.owned:
        starting += view.ready_ordering()[:len(sup.owned)]
    _make_files(sup, lock, len(sup.owned), made, prepared)
    wanted = {rec.task_file for rec in sup.owned.values() if rec.order == order.id}
    wanted.update(order.tasks[tid].path for tid in starting)
    writer.keep_prepared(wanted)
    for rec in list(sup.owned.values()):
        if rec.order == order.id and not sup.pending():
            sup.prepare_outcome(rec)
    for tid in starting:
        if sup.pending():
            return
        launcher.prepare_start(order.tasks[tid])


_making: list[offthread.Pending] = []  # the files being made for the next starts (at most one job at a time)


def _make_files(sup: Supervisor, lock: list[tuple], logs: int, made: set[str], prepared: set[tuple]) -> None:
    """Make the lock files of `lock` ((task, targets)) and `logs` empty log files in a helper thread: each create
    is the kernel's time (0.12 ms of B2's run thread per file, cProfile), with the GIL let go of meanwhile, so the
    run's thread goes on with the next versions' writes; a start that comes first makes what it needs itself
    (locks.take, Runtime.place_log). One job at a time: a wake-up while one is under way adds none."""
    if not (lock or logs) or (_making and not _making[0].done()):
        return

    def make() -> None:
        for tid, targets in lock:
            locks.prepare(sup.rt.state, targets, made)
            prepared.add((tid, targets))
        if logs:
            sup.rt.stock_logs(logs)
    _making[:] = [offthread.in_background(make, "files")]


def _exit_code(sup: Supervisor, rec: Record) -> int | None:
    """The ended attempt's exit code as its outcome will be recorded (Supervisor.handle): our child's wait
    status, else the exit file its wrapper wrote."""
    code = sup.reaped.get(rec.key)
    return code if code is not None else read_exit_file(rec.exit_file)


def _reviewed_next(rec: Record, code: int | None, order: Order, launcher: Launcher) -> bool:
    """Whether the outcome of this ended attempt may start its reviewer, which takes the place again (so the
    place is not free for an early start): a work phase that exited 0 with a review to run, or one we cannot tell
    (no exit code: a reviewer that vanished is asked again)."""
    task = order.tasks.get(rec.task) if rec.order == order.id else None
    if task is None or code is None:
        return True
    return (rec.phase == "work" and code == 0
            and review_command(task, launcher.settings, launcher.options.no_review, rec) is not None)
