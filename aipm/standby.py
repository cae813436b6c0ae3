"""An order's standby owner: a detached process that waits for room and then starts the order's next tasks.

Room is capacity (a worker slot, the machine's load, or a budget held by running attempts), or the files a live
worker of another order holds. A detached owner starts its order's tasks when its own task ends, and only then: a
task held for want of capacity (an `aipm launch` that started nothing, or another order's tasks holding the slots)
or by another order's files would wait for that end, or for ever, while what another order's task freed stays
unused. So one process stays, named by a file in the state directory (one per order; `aipm ps` lists it), waits
for workers and owners to end (pidfds; the load is read again each RESOURCE_RECHECK while it defers), starts what
there is room for, and goes away once nothing of the order waits so.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import suppress
from pathlib import Path

from aipm.liveness import process_alive, process_ctime, stopped
from aipm.foreign import FINISHING_RECHECK
from aipm.launcher import RAMP, RESOURCE_RECHECK, LaunchReport, Launcher
from aipm.plan import BUDGET, FILE_BUSY, LIMIT
from aipm.runner import Watcher
from aipm.runtime import Runtime
from aipm.statedir import safe_name
from aipm.view import OrderView
from aipm.workerfiles import read_bytes, write_bytes

LOAD = ("capacity", "resources", RAMP)  # deferral reasons of the machine: read again, not waited for
RECHECK = 5.0  # seconds: at most between looks (a record removed by an owner that lives on wakes nothing)


def held(report: LaunchReport) -> dict[str, str]:
    """Task id → why, of the tasks a launch left only for want of capacity, or for files a live worker of another
    order holds (whatever else it started: an owner starts only its own order's tasks, at its end, while a slot or
    the files another order's task frees are there now)."""
    if report.plan is None:
        return {}
    theirs = {rec.key for rec in report.records if report.order and rec.order != report.order.id and rec.alive()}
    out = {b.id: b.detail for b in report.plan.blocked.values()
           if b.reason == LIMIT or b.reason == FILE_BUSY and b.tasks and b.tasks[0] in theirs}
    out.update((d["id"], d["detail"]) for d in report.deferred if d["reason"] in (LIMIT, BUDGET, *LOAD))
    return out


def for_capacity(report: LaunchReport) -> bool:
    """Whether every task held() names waits for capacity (none for another order's files)."""
    if report.plan is None:
        return True
    waiting = held(report)
    return not any(b.reason == FILE_BUSY and b.id in waiting for b in report.plan.blocked.values())


def tell_failed(report: LaunchReport, said: dict[str, str]) -> None:
    """Say each start `report` could not make (a missing program, more CPUs than the machine has) in this owner's
    output (standby.log, or the log of the task it owned), once per error: no terminal sees a detached owner's
    launch, and the task stayed QUEUED with nothing said where `logs` looks."""
    for item in report.failed:
        if said.get(item["id"]) != item["error"]:
            said[item["id"]] = item["error"]
            print(f"aipm: failed {item['id']}: {item['error']}", file=sys.stderr, flush=True)


def _path(runtime: Runtime, order_id: str) -> Path:
    return runtime.state / "standby" / f"{safe_name(order_id)}.json"


def current(runtime: Runtime, order_id: str) -> dict | None:
    """The order's live standby owner: {order, pid, ctime, tasks, since}, or None."""
    return _live(_path(runtime, order_id))


def _live(path: Path) -> dict | None:
    with suppress(OSError, ValueError, KeyError, TypeError):
        found = json.loads(read_bytes(path, 1 << 16))
        if process_alive(found["pid"], found["ctime"]):
            return found
    return None


def every(runtime: Runtime) -> list[dict]:
    """The project's live standby owners."""
    with suppress(OSError):
        return [s for s in (_live(p) for p in sorted((runtime.state / "standby").glob("*.json"))) if s]
    return []


def shown(runtime: Runtime) -> list[dict]:
    """The project's live standby owners as `ps --json` and the dashboard give them: {order, pid, tasks}."""
    return [{key: s[key] for key in ("order", "pid", "tasks")} for s in every(runtime)]


def claim(runtime: Runtime, order_id: str, pid: int, tasks: list[str], settings: list[str]) -> None:
    """Name `pid` the order's standby owner (under the launch lock: one per order), which starts tasks with
    `settings` (Launcher.work_flags): a launch given others names a new one (cmd_launch), and this one leaves."""
    path = _path(runtime, order_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, json.dumps({"order": order_id, "pid": pid, "ctime": process_ctime(pid), "tasks": tasks,
                                  "since": time.time(), "settings": settings}).encode())


def stand_by(launcher: Launcher, view: OrderView, report: LaunchReport | None = None) -> None:
    """Stay as the order's standby owner while its tasks wait for room (held()), starting them as there is room
    (the launch lock and the records keep a task from starting twice). `report`: an owner's last launch, after which
    it stays when that left tasks so and the order has no standby owner yet; None: the standby owner a launch
    started and named (work.py --standby), which looks at once."""
    runtime, order_id, me = launcher.runtime, view.order.id, os.getpid()
    said: dict[str, str] = {}
    if report is not None:
        tell_failed(report, said)
        if not held(report):
            return  # (the usual end of an owner: one look at the report)
        with runtime.launch_lock():
            mine = current(runtime, order_id)
            if mine is not None and mine["pid"] != me:
                return  # another waits already
            claim(runtime, order_id, me, sorted(held(report)), launcher.work_flags())
    try:
        while True:
            if report is not None:
                _wait(launcher, report)
                _reap(launcher)
            # The look that finds nothing waiting and the claim's removal are one hold of the launch lock: a launch
            # (or an owner at its end) that found a task held between them, and this owner still named, left it to
            # this one, which went away without looking again, and the task waited with no owner to start it.
            with runtime.launch_lock():
                if (current(runtime, order_id) or {"pid": me})["pid"] != me:
                    return  # another was named meanwhile (the launch that started this one died before naming it)
                report = launcher.launch(view)
                tell_failed(report, said)
                if not held(report):
                    _unclaim(runtime, order_id, me)
                    return
                # (what `ps` says it waits to start)
                claim(runtime, order_id, me, sorted(held(report)), launcher.work_flags())
    except BaseException:
        with runtime.launch_lock(), suppress(OSError):
            _unclaim(runtime, order_id, me)
        raise


def _unclaim(runtime: Runtime, order_id: str, me: int) -> None:
    """Remove the order's standby claim if it names `me` (caller holds the launch lock)."""
    if (current(runtime, order_id) or {}).get("pid") == me:
        with suppress(FileNotFoundError):
            os.unlink(_path(runtime, order_id))


def _reap(launcher: Launcher) -> None:
    """Reap the owners this one started that have ended: else each stays a zombie for as long as this one waits
    (one per task it started; harmless to aipm, which reads a zombie as dead, but a process-table entry each)."""
    for pid in list(launcher.detached):
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                launcher.detached.discard(pid)
        except ChildProcessError:
            launcher.detached.discard(pid)


def _wait(launcher: Launcher, report: LaunchReport) -> None:
    """Until a worker or owner of any order ends (a slot, or the budget it held, may free), the load is worth
    reading again (it deferred a start), or RECHECK passes."""
    load = any(d["reason"] in LOAD for d in report.deferred)
    timeout = RESOURCE_RECHECK if load else RECHECK
    watcher = Watcher()
    try:
        for rec in launcher.runtime.records():
            if rec.owner_pid != os.getpid() and rec.owner_alive():
                watcher.watch_pid(rec.owner_pid, (rec.key, "owner"))
                # Its outcome is being recorded: looked at again soon. Not while it is stopped (Ctrl-Z): it records
                # nothing until it goes on, and 0.2 s rounds went on for as long; its end (pidfd) or RECHECK wakes us.
                if not rec.worker_alive() and not stopped(rec.owner_pid):
                    timeout = min(timeout, FINISHING_RECHECK)
            if rec.worker_alive():
                watcher.watch_pid(rec.pid, rec.key)
        watcher.wait(timeout)
    finally:
        watcher.close()
