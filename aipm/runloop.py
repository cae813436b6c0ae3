"""The `run` loop (and `exec`'s): plan, launch, wait for the next event, finish what ended, repeat.

One Supervisor (supervisor.py) owns the workers; this module drives it: one launch-lock round per wake-up, the
audit's snapshot shared by the tasks that end and start in it, independent tasks started before the audits of
the ones that ended, other owners' workers watched, Ctrl-C turned into a clean stop (interrupts.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from aipm import budget, budgetstop, durable, handover, notify, preemption, recovery, scope, writer, writtenlog
from aipm import foreign as foreign_attempts
from aipm.foreign import (FINISHING_RECHECK, HELD_RECHECK, STOPPED_RECHECK, others_matter, say_slot_held,
                          watch_foreign)
from aipm.interrupts import Stop
from aipm.launcher import RAMP, RESOURCE_RECHECK, Launcher
from aipm.liveness import stopped
from aipm.model import FINISHED_OK, Status, all_done, status_summary
from aipm.spending import charged
from aipm.supervisor import RECORDS, RECORDS_RECHECK, Emit, Supervisor
from aipm.view import OrderView


def _finish(sup: Supervisor, keys: list[str]) -> None:
    for key in keys:
        event = sup.handle(key)
        if event:
            sup.outbox.append({**event, "time": round(time.time(), 6)})  # when it was recorded (see supervise)


@contextmanager
def _round(sup: Supervisor, ready: list[str], first: bool = False) -> Iterator[list[str]]:
    """One wake-up under the launch lock, with one tree snapshot for every task that ends or starts in it
    (started before queueing for the lock when a task that ended needs its audit, or for the first starts of
    the run). Yields the keys of the owned tasks that ended, reaped: their outcomes are recorded in it."""
    with scope.shared():
        ended = [sup.owned[k] for k in ready if k in sup.owned]
        for rec in ended:  # stragglers first (as `handle` does): their writes belong before the snapshot
            sup.end_ahead(rec)
            scope.ended(sup.rt.root, rec.scope_file)  # what starts early is not in its audit
            if sup.reaped.get(rec.key) == 0 and rec.key not in sup.timed_out and (len(ended) > 1 or sup.view.ready):
                # Its outcome's write is fsynced off this thread while this round starts others or records
                # the other ends: where workers end faster than they are handed over (1000 `true`s on 2 workers),
                # the run's thread waited for each of those fsyncs. (In a chain, with nothing else to do, the
                # thread hand-off only cost: B2 CPU 1.06-1.09x in ab.py.)
                sup.prepare_outcome(rec)
        audited = any(os.path.exists(rec.scope_file) for rec in ended)
        may_audit = sup.settings.scope_audit and not (sup.settings.confine or sup.launcher.options.no_review)
        if audited or (first and may_audit):
            scope.prefetch(sup.rt.root)  # git runs while we take the lock and start what need not wait
        with sup.rt.launch_lock():
            sup.keep_records()  # before this round's recovery looks for them
            yield [rec.key for rec in ended]


def supervise(launcher: Launcher, view: OrderView, emit: Emit, only: str | None = None,
              detach_others: bool = False) -> int:
    """The `run` loop (and, with `only`, `exec`): plan, launch, wait for the next event, finish, repeat.

    With `detach_others` (exec --parallel), the order's other launchable tasks start as detached workers
    once `only` has started.

    Returns the exit code: 0 when the order (or the `only` task) ended DONE/COMPLETED, 1 when not (also when the Ray
    cluster was lost: Supervisor.cluster_gone), 130 on Ctrl-C.
    """
    settings = launcher.settings
    audits = settings.scope_audit and settings.scope_watch and not launcher.options.no_review
    # The caller exits soon after: the watches are handed to a child to close (inotify.close_at_exit).
    with scope.watching(launcher.project.root, at_exit=True) if audits else nullcontext():
        try:
            return _supervise(launcher, view, emit, only, detach_others)
        finally:
            view.close_watch()


def _supervise(launcher: Launcher, view: OrderView, emit: Emit, only: str | None, detach_others: bool) -> int:
    sup = Supervisor(launcher, emit, view)
    stop = Stop(sup.watcher)
    if view.fd is not None:
        sup.watcher.watch_fd(view.fd, "files")
    foreign: set[str] = set()
    inside: set[str] = set()  # workers this run runs inside (a worker's command started it)
    recovered: set[tuple[str, int]] = set()  # dead owners whose tasks a recovery round has handled
    holders: set[int] = set()  # pids holding locks outside aipm that tasks wait for (watched: their exit wakes us)
    waiting_before: list[tuple[str, str]] = []
    outside_told: set[tuple[str, str | None]] = set()  # (task, path) of the waits for locks held outside aipm, notified
    watched: set[str] = set()  # this order's tasks run by another owner, already said
    others_said = foreign_attempts.Said()  # their attempts' starts and ends, said as this run's own are
    noted_for: set[tuple[str, int]] = set()  # other owners' attempts (any order's) in flight at the last note
    held: set[str] = set()  # this order's outcomes that a stopped owner holds, already said
    deferred_before: list[tuple[str, str]] = []  # (task, reason) of the last deferral said
    unloaded_told: dict[str, str] = {}  # new task files that never loaded → why, said as what the run waits for
    failed_told: dict[str, tuple] = {}  # task → the launch error last emitted for it, and the launch it followed
    recover = True  # at start, and whenever another owner's process ends (it may have died)
    lost = True  # at start, and when an owner died: its agents' transcripts are read before the lock (recovery)
    first = True
    first_detach = True  # (exec --parallel: the first launch of the others recovers, as any launch does)
    ready: list[str] = []  # owned workers that ended, finished at the next lock round
    budget_told = False
    spent_told: set[str] = set()  # tasks whose own budget stop was said
    past_told: set[str] = set()  # what budgetstop said of a budget lowered below what running attempts hold
    settings_seen: list = []  # the settings file's stamp, for budgetstop.follow_setting
    lock_files: set[str] = set()  # lock nodes whose files exist (see handover.prepare_next)
    prepared: set[tuple[str, tuple]] = set()
    unwritten_told: set[str] = set()  # tasks whose outcome, held for their broken file, the run said it waits to write
    try:
        while not stop.requested:
            if lost:
                lost = False
                recovery.read_lost_usage_ahead(sup.rt)
            with _round(sup, ready, first=first) as ended:  # one lock round per wake-up: finish, launch
                said = len(sup.outbox)
                # Nothing starts on a Ray cluster found gone (ask_cluster, before this round): the run stops below.
                halted = sup.cluster_gone is not None or stop.requested
                early = None if halted else handover.start_early(sup, launcher, view, only, recover, ended)
                early_said = len(sup.outbox)
                _finish(sup, ready)
                if sup.unrecorded:
                    sup.retry_unrecorded()
                # An early start takes the place of a worker whose outcome is recorded after it: said after that
                # outcome, so the lines never show more workers at once than --max-workers.
                sup.outbox[said:] = sup.outbox[early_said:] + sup.outbox[said:early_said]
                # Nor once a stop was asked, even while this round finished a worker (a merge back takes seconds):
                # a successor it unblocked started, wrote its files, and was stopped at once.
                report = launcher.launch(view, owner=sup, only=set() if halted or stop.requested else
                                         {only} if only else None,
                                         explain=False, recover=recover and early is None)
                if early is not None:
                    report.failed[:0] = early.failed
                    report.recovered[:0] = early.recovered
                sup.restore_owned(view.order.tasks)
                if sup.pending():
                    durable.carry_over()  # the next round follows at once: its fsync is this one's too
            first = False
            for item in report.recovered:  # before the round's starts; adopted ones the supervisor says itself
                if item["action"] == "requeued":
                    emit({"event": "recovered", "task": item["id"], "order": report.order.id,
                          **recovery.as_event(item)})
                elif item["action"] == "discarded":
                    emit({"event": "discarded", "task": item["id"], "order": report.order.id, "detail": item["detail"],
                          **recovery.as_event(item)})
            # Another owner's attempts that ended are said before this round's own lines: their outcome (D1 DONE)
            # may be what let this round start a task (D2), said after it otherwise.
            theirs_live = {rec.task for rec in report.records if rec.order == report.order.id
                           and (rec.owner_pid, rec.owner_ctime) != sup.me}
            for event in [*others_said.ended(view.as_read, theirs_live), *sup.outbox]:
                emit(event)
            sup.outbox.clear()
            if sup.cluster_gone:
                break  # every other attempt would be lost to it too
            recover = False
            order = report.order
            # New files that never loaded (no last valid version to keep): the run waits for their fix, as for a task
            # whose file was saved invalid (not exec: its one task is not among them).
            unloaded = view.unloaded()
            for problem in view.problems:
                emit({"event": "invalid_file", "error": problem, **({"new": True} if problem in unloaded.values()
                                                                    else {})})
            view.problems.clear()
            for task, was, status in view.reopened:
                emit({"event": "reopened", "order": order.id, "task": task, "was": str(was), "status": str(status)})
            view.reopened.clear()
            # A task whose file was saved invalid mid-run cannot start from it: the run waits for the fix (its
            # file's next change wakes it) rather than ending with the task never run.
            fixing = {item["id"] for item in report.failed if view.invalid(order.tasks[item["id"]])} | (
                set() if only else unloaded.keys())
            # So does an outcome held for a file saved invalid while its attempt ran (the run ended, exit 1, its
            # outcome left to `aipm recover`, where a broken QUEUED file is waited for): written once it is fixed. Not
            # for what is no file any more (deleted, a FIFO a worker left): `aipm recover` once it is back.
            unwritten = {key.partition("/")[2] for key in sup.unrecorded if key.partition("/")[0] == order.id} - {only}
            for tid in sorted(tid for tid in unwritten if tid in order.tasks and view.invalid(order.tasks[tid])
                              and os.path.isfile(order.tasks[tid].path)):
                fixing.add(tid)
                if tid not in unwritten_told:
                    unwritten_told.add(tid)
                    detail = "its outcome waits for its file to be fixed; fix the file and the run records it and " \
                             "goes on (Ctrl-C stops it)"
                    emit({"event": "waiting", "task": tid, "pids": [], "detail": detail})
                    notify.needs_person(launcher.settings, launcher.runtime, order.id, tid, detail)
            unwritten_told &= unwritten
            for item in report.failed:  # a failed launch is tried again every round: said once, until it changes
                # or the task was launched in between, by this run or by any other process (its file's attempts
                # and started_at tell; a launch that fails writes neither).
                task = order.tasks[item["id"]]
                told = (item["error"], task.attempts, task.started_at)
                if failed_told.get(item["id"]) != told:
                    failed_told[item["id"]] = told
                    if item["id"] in fixing:
                        detail = f"{item['error']}; fix the file and the run goes on (Ctrl-C stops it)"
                        emit({"event": "waiting", "task": item["id"], "pids": [], "detail": detail})
                        notify.needs_person(launcher.settings, launcher.runtime, order.id, item["id"], detail)
                    else:
                        emit({"event": "launch_failed", "task": item["id"], "error": item["error"]})
            if detach_others and not stop.requested:
                others = launcher.launch(view, owner=None, only=set(order.tasks) - {only}, recover=first_detach)
                first_detach = False
                for item in others.launched:
                    emit({"event": "started", "task": item["id"], "pid": item["pid"], "attempt": item["attempt"],
                          "detached": True})
                # On a half-busy machine the ramp-up lets one start per fresh load reading: the others follow at
                # the next readings, as `aipm launch` starts them (once, they were never started, and said nothing).
                detach_others = any(d["reason"] == RAMP for d in others.deferred)
            if report.plan.budget_stop and not budget_told:
                budget_told = True  # once per run: the stop holds until someone raises the budget
                emit({"event": "budget", "order": order.id, "detail": report.plan.budget_stop})
                notify.send(launcher.settings, launcher.runtime, notify.BUDGET, "BUDGET_REACHED",
                            f"{order.id}: {report.plan.budget_stop}", AIPM_ORDER_ID=order.id)
            for event in [*budgetstop.follow_setting(sup, settings_seen),
                          *budgetstop.past_budget(sup, order, report.records, past_told)]:
                emit(event)
                budgetstop.tell(sup, order, report.records, event)
            for blocked in report.plan.spent:
                if blocked.id not in spent_told:  # once per task and run, as the order's budget
                    spent_told.add(blocked.id)
                    emit({"event": "budget", "order": order.id, "task": blocked.id, "detail": blocked.detail})
                    notify.send(launcher.settings, launcher.runtime, notify.BUDGET, "BUDGET_REACHED",
                                f"{order.id}/{blocked.id}: {blocked.detail}", AIPM_ORDER_ID=order.id,
                                AIPM_TASK_ID=blocked.id)
            deferred = [d["id"] for d in report.deferred]
            # Said again when a task is deferred anew or for another reason (not at each new load reading), a
            # line per detail: the tasks the load holds back are not said to wait for CPUs they never asked for.
            reasons = [(d["id"], d["reason"]) for d in report.deferred]
            if reasons != deferred_before:
                details: dict[str, list[str]] = {}
                for item in report.deferred:
                    details.setdefault(item["detail"], []).append(item["id"])
                for detail, tasks in details.items():
                    emit({"event": "deferred", "tasks": tasks, "detail": detail})
            deferred_before = reasons
            waiting = report.plan.waiting
            # Keyed by the path, not the holder's pids: a daemon that starts a `sleep` every second hands the lock on
            # to each (an inherited descriptor), and the line (and its notify) came again at every one.
            if [(b.id, b.path) for b in waiting] != waiting_before:
                for blocked in waiting:
                    emit({"event": "waiting", "task": blocked.id, "detail": blocked.detail, "pids": list(blocked.pids)})
                    if (blocked.id, blocked.path) not in outside_told:  # told once, however often it is said
                        outside_told.add((blocked.id, blocked.path))
                        notify.needs_person(launcher.settings, launcher.runtime, order.id, blocked.id, blocked.detail)
            waiting_before = [(b.id, b.path) for b in waiting]
            for pid in {p for b in waiting for p in b.pids} - holders:
                if sup.watcher.watch_pid(pid, ("holder", pid)):
                    holders.add(pid)
            finishing, dead = watch_foreign(sup, report.records, foreign, inside, held, order.id, only)
            # This order's tasks a live other owner runs (not a worker we could not adopt), said once each, or a run
            # that only waits for them prints nothing until the end; exec says only its own task.
            theirs = {rec.task for rec in report.records if rec.key in foreign and rec.order == order.id
                      and (rec.task in watched or rec.owner_alive()) and only in (None, rec.task)}
            if theirs - watched:  # (only the new ones: a second launch's task was said with the first's again)
                emit({"event": "watching", "tasks": sorted(theirs - watched), "detail":
                      "run by another aipm (a detached `aipm launch` or another `aipm run`); this run waits for them "
                      "and goes on from there" if not only else
                      "run by another aipm; this exec waits for it and ends as it ends"})
            for event in others_said.started([rec for rec in report.records if rec.task in theirs
                                              and rec.key in foreign and rec.order == order.id], watched):
                emit(event)
            watched |= theirs
            # Other owners' attempts in flight, each by its number: a task's next attempt is a new audit window.
            flight = {(rec.key, rec.serial) for rec in report.records
                      if rec.key in foreign or rec.key in finishing} if foreign or finishing else set()
            if flight - noted_for and writtenlog.has_output(launcher.runtime):
                # Their owners' audits look for the output of aipm processes that own attempts; this one may own
                # none while they run (it watches them, or waits for their files), and its `> run2.log` sent them
                # back (REJECTED): noted in their window.
                with launcher.runtime.launch_lock():
                    writtenlog.note_output(launcher.runtime)
            noted_for = flight
            orphaned = dead - recovered  # an owner died since the last recovery: never leave its task stuck
            recovered |= orphaned
            if only:
                key = f"{order.id}/{only}"
                # Run by another owner (its worker alive, or its owner recording the outcome, or dead and to be
                # recovered): exec waits for its end, as run does, and exits by the status it comes to.
                elsewhere = any(rec.key == key and (rec.owner_pid, rec.owner_ctime) != sup.me
                                and (rec.key in foreign or rec.owner_alive()) for rec in report.records)
                if key not in sup.owned and only not in deferred and not elsewhere and key not in dict(orphaned):
                    break  # finished, failed for good, or never launchable (a busy machine is waited for, as by run)
            # (the costs as the budget counts them: a task past its own budget waits on no other work)
            elif not sup.owned and not others_matter(charged(order, launcher.runtime), foreign | finishing) \
                    and not deferred and not waiting and not orphaned:
                if not fixing:
                    # Nothing runs and nothing can start, as far as the watch told: the directory read once more, so
                    # that a task that came without an event it watches (linked in) runs rather than ends the run.
                    view.refresh(rescan=True)
                    if not view.changed:
                        say_slot_held(launcher.settings.max_workers, view, report.records, inside, emit)
                        break  # finished, or stuck (exit code says which)
                    ready = []
                    continue
                for path, why in unloaded.items():  # all that is left: said once each, when it is all that is left
                    if unloaded_told.get(path) != why:
                        unloaded_told[path] = why
                        detail = f"{why}; fix the file (or remove it) and the run goes on (Ctrl-C stops it)"
                        emit({"event": "waiting", "task": os.path.basename(path), "pids": [], "detail": detail})
                        notify.needs_person(launcher.settings, launcher.runtime, order.id, os.path.basename(path),
                                            detail)
            ready = []
            if orphaned:
                recover = lost = True
                continue
            if launcher.settings.preempt and not only and preemption.stop_for_urgent(sup, view):
                continue  # places were freed: plan again at once, and the urgent task (ranked first) starts
            # An owner recording an outcome takes milliseconds: looked at again soon. One stopped (Ctrl-Z) records
            # nothing until it goes on, and 0.2 s rounds went on for as long: its owner's files wake this run only
            # where they are this order's, so it is looked at every STOPPED_RECHECK.
            recording = finishing and any(not stopped(rec.owner_pid) for rec in report.records if rec.key in finishing)
            timeout = (RESOURCE_RECHECK if deferred or detach_others else FINISHING_RECHECK if recording
                       else STOPPED_RECHECK if finishing else HELD_RECHECK if waiting or fixing else None)
            handover.prepare_next(sup, launcher, view, lock_files, prepared)
            if not sup.watch_records():
                timeout = min(timeout or RECORDS_RECHECK, RECORDS_RECHECK)
            if not sup.pending():
                durable.settle_carried()  # (left by a round that another was to follow at once)
            keys = sup.wait(timeout, hush=stop.heard)
            while keys == ["files"]:
                view.refresh()
                if view.changed or view.problems:
                    break
                durable.settle_carried()
                keys = sup.wait(timeout, hush=stop.heard)  # only our own writes moved: no need for a planning round
            if fixing and not keys:
                view.refresh(rescan=True)  # a fix that came without an event the watch takes (a hard link)
            for key in keys:
                if key in foreign:
                    sup.watcher.forget(key)
                    foreign.discard(key)
                    recover = True
                elif isinstance(key, tuple):  # a lock holder outside aipm exited: plan again
                    sup.watcher.forget(key)
                    holders.discard(key[1])
                elif key not in ("signal", "files", RECORDS):  # RECORDS: the round below writes them again
                    ready.append(key)
        # The exit files of the outcomes written are spent: removed now, once, not one by one while tasks end (a
        # removal per task cost B1 ~80 µs of system time each) and not left for the next recovery (a run of N
        # tasks left N files in the state directory, and a project run once, a test's, kept them forever).
        for key in ready:
            if key in sup.owned:
                sup.read_usage_ahead(sup.owned[key])
        with launcher.runtime.launch_lock():
            if ready:  # ended just as we were stopped: their real outcome still counts
                _finish(sup, ready)
            launcher.runtime.remove_spent_exit_files(view.order.id)
            # Its lines so far (its closing ones are noted again once printed: cmd_launch.said_last, whose wait for
            # this lock an audit's round may fill)
            writtenlog.note_output(launcher.runtime)
        if sup.unrecorded:
            sup.hand_over()
        gone = sup.cluster_gone and f"the Ray cluster was lost ({sup.cluster_gone})"
        if stop.requested or gone and sup.owned:  # (lost with it, an attempt was re-queued as it ended)
            sup.outbox.append({**sup.abort(stop.why or gone), **({} if stop.requested else {"why": gone})})
        for event in sup.outbox:
            emit(event)
        order = view.refresh()  # the caller's summary reads the view: bring it up to date on every path
        if stop.requested:
            # The caps of the claude attempts it stopped count as spent: they may fill the budget, and the next run
            # would start nothing. Said now, while the person who pressed Ctrl-C is looking.
            counted = charged(order, launcher.runtime)
            spend = budget.of(counted, launcher.settings.max_cost_usd)
            if spend is not None and spend.reached and not budget_told and any(
                    t.status == Status.QUEUED for t in order.tasks.values()):
                emit({"event": "budget", "order": order.id, "detail": spend.detail})
            for task in counted.tasks.values():  # the same of a task's own budget
                if task.status == Status.QUEUED and task.id not in spent_told and budget.task_reached(task):
                    emit({"event": "budget", "order": order.id, "task": task.id, "detail": budget.task_detail(task)})
            return 130
        # Exit 1, as a budget's stop: its tasks stay QUEUED. Not 2, as at a start where it cannot be reached
        # (cluster.check): that says nothing changed, and what finished meanwhile is kept.
        if gone:
            said = (f"runner ray: {gone}: the run stopped; its tasks are QUEUED again, attempts not counted; run it "
                    "again once the cluster is back")
            emit({"event": "error", "error": said})
            if not only:  # the order ends unfinished, and no one may be watching: as any end of `run` but Ctrl-C
                notify.send(launcher.settings, launcher.runtime, notify.ORDER_FINISHED, "INCOMPLETE",
                            f"{order.id}: {said}", AIPM_ORDER_ID=order.id)
            return 1
        lost = not os.path.isdir(view.dir)  # an order emptied by deleting or renaming its directory is not done
        if lost:
            emit({"event": "error", "error": f"{view.dir}: the order directory was deleted or renamed during the "
                  "run, so it ends unfinished; put the directory back and run it again (the outcomes it could not "
                  "write are said above)"})
        if only:  # (its file may be gone: deleted while it ran)
            return 0 if not lost and only in order.tasks and order.tasks[only].status in FINISHED_OK else 1
        done = not lost and all_done(order)
        spend = budget.of(charged(order, launcher.runtime), launcher.settings.max_cost_usd)
        over = spend is not None and spend.over
        if over and not budget_told:  # every task may be DONE, and yet the order cost more than it may
            emit({"event": "budget", "order": order.id, "detail": spend.over_detail})
        notify.order_finished(launcher.settings, launcher.runtime, order, done, f"{order.id}: {status_summary(order)}")
        # Every task DONE or COMPLETED is success whatever it cost (the contract's exit 0): the line above says
        # the order went over, and the budget's stop (tasks left QUEUED) is exit 1 as any unfinished order.
        return 0 if done else 1
    finally:
        try:
            durable.settle_carried()  # (an fsync that fails here leaves the rest to be done all the same)
        finally:
            writer.drop_prepared()
            launcher.demands.withdraw()  # its tasks wait for no slot now
            sup.end_strays()  # nothing an attempt started outlives the run
            stop.close()
            sup.close()
