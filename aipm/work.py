"""A detached worker: `python -m aipm.work ROOT ORDER_DIR TASK`, started by `aipm launch`.

It owns one task: starts (or adopts) the worker process, waits for it, finishes the task (review, status),
then starts the successors that became launchable, each as a new detached worker. It inherits the task's
target-file locks from the launcher and holds them until the task is finished. As a child subreaper it also
ends whatever the worker left running outside its process group (see subreaper.py).

`python -m aipm.work ROOT ORDER_DIR --standby` owns no task: it is the order's standby owner (standby.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack, nullcontext
from pathlib import Path

from aipm import budgetstop, notify, recovery, standby
from aipm.errors import UserError, said
from aipm.launcher import Launcher, Options
from aipm.model import all_done, status_summary
from aipm.project import Project
from aipm.settings import settings_from_flags
from aipm.store import load_task
from aipm.supervisor import RECORDS, RECORDS_RECHECK, Supervisor
from aipm.view import OrderView
from aipm.workerfiles import append_log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aipm.work")
    parser.add_argument("root")
    parser.add_argument("order_dir")
    parser.add_argument("task", nargs="?")
    parser.add_argument("--standby", action="store_true")
    parser.add_argument("--lock-fds", default="")
    parser.add_argument("--order-id", required=True)
    parser.add_argument("--adopt", action="store_true")
    parser.add_argument("--no-review", action="store_true")
    parser.add_argument("--model")
    parser.add_argument("--max-workers", type=int)
    parser.add_argument("--max-cpu", type=float)
    parser.add_argument("--max-memory", type=float)
    parser.add_argument("--no-resource-monitoring", action="store_true")
    parser.add_argument("--no-auto-scaling", action="store_true")
    parser.add_argument("--runner")
    parser.add_argument("--confine", action="store_true")
    parser.add_argument("--workspace")
    args = parser.parse_args(argv)
    fds = [int(fd) for fd in args.lock_fds.split(",") if fd]
    root = Path(args.root)
    try:
        settings = settings_from_flags(root, args.max_workers, args.max_cpu, args.max_memory,
                                       args.no_resource_monitoring, args.no_auto_scaling, args.runner,
                                       confine=args.confine, workspace=args.workspace)
    except UserError as exc:
        print(f"aipm: error: {exc}", file=sys.stderr)
        return 2
    launcher = Launcher(Project(root, settings.orders_dir), settings, Options(args.no_review, args.model))
    if args.standby:
        return _start_next(launcher, Path(args.order_dir), "its order", standing_by=True)
    sup = Supervisor(launcher)
    settings_seen: list = []
    budgetstop.follow_setting(sup, settings_seen)  # the stamp of the settings file just read (two stats)
    me = (os.getpid(), sup.me[1])
    with launcher.runtime.launch_lock():
        # The launcher holds this lock until our record names us, so we read a finished record here.
        rec = launcher.runtime.read_record(args.order_id, args.task)
        if rec is None or (rec.owner_pid, rec.owner_ctime) != me and rec.owner_alive():
            return 0  # finished, or owned by someone else meanwhile
        if args.adopt:
            try:
                sup.adopt(rec)
            except OSError as exc:  # a full state directory: the record names the dead owner; recovered later
                print(f"aipm: cannot adopt the worker of {args.task}: {said(exc)}", file=sys.stderr)
                return 1
        else:
            try:
                task = load_task(Path(rec.task_file), root)
            except UserError as exc:  # broken or deleted since the launch: nothing to run
                print(f"aipm: cannot start worker: {exc}", file=sys.stderr)
                launcher.runtime.remove_record(rec.order, rec.task)
                return 1
            if launcher.runtime.cancelled(rec):  # `aipm cancel` came between the launch and us: nothing runs
                append_log(rec.log, f"cancelled by the user before its worker started (attempt {rec.serial})")
                launcher.runtime.remove_record(rec.order, rec.task)
                return 0
            sup.lock_fds[rec.key] = fds
            try:
                sup.spawn_worker(rec, task, fds)
            except Exception as exc:  # noqa: BLE001 - any failure must put the task back, not strand it
                print(f"aipm: cannot start worker: {exc}", file=sys.stderr)
                recovery.interrupt(launcher.runtime, task, rec, f"worker could not start: {exc}")
                return 1
    # A capped attempt (its agent takes a share of the budget) follows a limit lowered while it runs, as in `run`.
    budgets = budgetstop.Detached.follow(sup, Path(args.order_dir), settings_seen)
    # The launch lock from the round that records the last outcome to the first launch after it, as `run` holds it
    # over its finishes and starts: let go in between, another order's `run` took the files the task had freed, and
    # its next attempt (QUEUED again) or its successors waited for them with no owner left to start them.
    last_round = ExitStack()
    with last_round:
        while sup.owned:
            whole = sup.watch_records()
            keys = sup.wait(None if whole else RECORDS_RECHECK)
            if RECORDS in keys or not whole:  # a worker removed the state directory: our record goes back
                with launcher.runtime.launch_lock():
                    sup.keep_records()
            if budgets is not None:
                budgets.woke(keys)
            ended = [key for key in keys if key in sup.owned]
            for key in ended:
                sup.end_ahead(sup.owned[key], strays=True)  # (ending its strays under the lock held it up to 5 s)
            if ended:
                last_round.enter_context(launcher.runtime.launch_lock())
            for key in keys:
                sup.handle(key)  # an outcome it cannot record is held (and logged), never a crash
            if sup.owned:
                last_round.close()  # (a review started: its end is the last)
        sup.end_strays()  # the attempt's left-overs die before successors start
        if sup.unrecorded:
            sup.hand_over()
        for held in sup.lock_fds.values():  # a handed-over outcome keeps its record; the locks go now
            for fd in held:
                os.close(fd)
        if sup.cluster_gone:  # its successors would be lost to it too; a new run starts them once it is back
            print(f"aipm: runner ray: the Ray cluster was lost ({sup.cluster_gone}); {args.task} is QUEUED again",
                  file=sys.stderr)
            return 1  # as `run` then: its task is left QUEUED, and 2 would say nothing changed
        return _start_next(launcher, Path(args.order_dir), f"the successors of {args.task}", last_round)


def _start_next(launcher: Launcher, order_dir: Path, what: str, held: ExitStack | None = None,
                standing_by: bool = False) -> int:
    """Start what the order allows now, and stay as its standby owner while its next tasks wait for capacity alone
    with no other owner left to start them (standby.py): else they were stranded (`launch P` given a higher
    --max-workers held the slots, and O/B stayed QUEUED for good, nothing said). `held`: the launch lock of the
    round that recorded the last outcome, let go once the first launch is made. `standing_by`: this is the standby
    owner a launch started (--standby), which makes its first launch itself."""
    try:
        if standing_by:
            view = OrderView(order_dir, launcher.project.root, watch=False)
            standby.stand_by(launcher, view)
        else:
            with held or nullcontext():
                view = OrderView(order_dir, launcher.project.root, watch=False)
                report = launcher.launch(view)
            standby.stand_by(launcher, view, launcher.ramp_on(view, report))
        _tell_if_finished(launcher, view)
    except (UserError, OSError) as exc:  # a task file broken or a disk full: `aipm launch` says the same
        print(f"aipm: cannot start {what}: {exc}", file=sys.stderr)
        return 1
    return 0


def _tell_if_finished(launcher: Launcher, view: OrderView) -> None:
    """An order run by `aipm launch` alone has no `run` to tell its end: the owner that leaves it settled (no
    record of it left, nothing that can still start) tells it, once (notify.order_finished)."""
    if launcher.settings.notify is None:
        return
    from aipm.logbook import settled  # (only here: ~5 ms more of every detached worker's start otherwise)

    with launcher.runtime.launch_lock():
        order = view.refresh()
        if settled(order, launcher.runtime.records(), launcher.settings.max_cost_usd, launcher.runtime) is not None:
            notify.order_finished(launcher.settings, launcher.runtime, order, all_done(order),
                                  f"{order.id}: {status_summary(order)}")


if __name__ == "__main__":
    sys.exit(main())
