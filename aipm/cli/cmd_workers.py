"""Live workers and their upkeep: `ps`, `locks`, `cancel`, `retry`, `recover` (`logs`: cmd_watching)."""

from __future__ import annotations

import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Optional

import psutil
from aipm.cli import grid
from aipm.cli.decl import Argument, Exit, Option, command

from aipm import workspace
from aipm.cluster import is_attempt
from aipm.cli.common import JsonOpt, get_project, json_option, print_json
from aipm.errors import UserError
from aipm.fields import MAX_TIMEOUT
from aipm import adopted, logbook, recovery, standby, steering, workerstate
from aipm.launcher import Launcher, Options
from aipm.model import FINISHED_OK, Status
from aipm.locks import node_file
from aipm.paths import lock_node, normalize
from aipm.project import find_task
from aipm.runtime import Runtime
from aipm.settings import load_settings
from aipm.statedir import orphans
from aipm.store import load_order


def _worker_info(rec, root: Path) -> dict:
    state, pid, left = workerstate.state(rec, root)
    info = {"order": rec.order, "task": rec.task, "attempt": rec.serial, "pid": pid, "pgid": rec.pgid,
            "owner_pid": rec.owner_pid, "phase": rec.phase, "alive": rec.alive(), "log": rec.log,
            "command": rec.command, "targets": rec.targets,
            "runner": "ray" if rec.phase == "work" and is_attempt(rec.command) else "local", "state": state,
            "stopping": bool(rec.stopping)}
    if left:
        info["remnants"] = left
    try:
        if pid is None:  # (psutil.Process(None) is this process)
            raise ValueError
        proc = psutil.Process(pid)
        elapsed = time.time() - proc.create_time()
        procs = [proc, *proc.children(recursive=True)]
    except (psutil.Error, ValueError):
        info.update(elapsed=None, cpu_percent=None, memory_mb=None)
        return info
    # ps(1)'s %CPU: CPU time over elapsed time. (psutil's cpu_percent(interval=None) is 0.0 at a Process's first
    # call, and each `ps` makes new ones.) The times of children already reaped count: they were the worker's.
    cpu = rss = 0.0
    for one in procs:
        try:
            with one.oneshot():
                times = one.cpu_times()
                cpu += times.user + times.system + times.children_user + times.children_system
                rss += one.memory_info().rss
                if info["alive"] and one.status() == psutil.STATUS_STOPPED:  # /proc state T: kill -STOP, ^Z
                    info["state"] = "stopped"
        except psutil.Error:
            continue  # a child that ended since it was listed (a polling loop's `sleep`): it uses nothing now
    info.update(elapsed=round(elapsed, 1), cpu_percent=round(cpu / elapsed * 100, 1) if elapsed > 0 else 0.0,
                memory_mb=round(rss / 2**20, 1))
    if info["runner"] == "ray":  # what runs here is the Ray driver that waits for it: its figures are no measure
        info.update(cpu_percent=None, memory_mb=None)
    return info


@command()
def ps(json_out: bool = JsonOpt) -> None:
    """Live workers in the project: pid, task, elapsed time, CPU (since it started, as ps(1)) and memory (with
    their children). A Ray attempt's command runs on a node: its CPU and memory are not measured here (n/a)."""
    project = get_project()
    runtime = Runtime(project.root)
    infos = [_worker_info(r, project.root) for r in runtime.records()]
    waiting = standby.shown(runtime)
    if json_out:
        print_json({"workers": infos, "standby": waiting})
        return
    table = grid.Grid([grid.Column(c) for c in ("pid", "task", "phase", "elapsed", "cpu %", "mem MB", "state")])
    for i in infos:
        table.add_row(str(i["pid"] or "-"), f"{i['order']}/{i['task']}", i["phase"],
                      f"{i['elapsed']}s" if i["elapsed"] is not None else "-",
                      *(("n/a: Ray node", "n/a") if i["runner"] == "ray" and i["elapsed"] is not None else
                        (str(i[key] if i[key] is not None else "-") for key in ("cpu_percent", "memory_mb"))),
                      [workerstate.describe(i["state"], i["stopping"], i["phase"])])
    grid.print_lines(table.lines(grid.fitting(), grid.Styles.of()) if infos else ["no workers"])
    for one in waiting:  # an order's standby owner: no worker, no slot (standby.py)
        print(f"standby {one['order']} (pid {one['pid']}): waits for room to start {', '.join(one['tasks'])}")


@command()
def locks(json_out: bool = JsonOpt) -> None:
    """Target-file locks: every running task's paths (held now or not: by a lock, or by its review while it runs),
    and locks held by processes that are not aipm workers (a daemon a finished worker left behind): tasks on those
    paths wait until they are released.
    Reads /proc only: takes no lock and creates nothing."""
    project = get_project()
    launcher = Launcher(project, load_settings(project.root), Options(dry_run=True), monitor=None)
    held = launcher.holdings.held()
    # Held on a lock file a worker removed since (`rm -rf` of the state directory, of locks/): no file shows it.
    orphaned = {node for _, node, exclusive in orphans(launcher.runtime.state, make=False) if exclusive}
    records = launcher.records()
    pids = {rec.key: workerstate.holder(rec, project.root)[0] for rec in records}
    rows = []
    for rec in records:
        # A review under `run` holds no lock file: the worker that had the locks is gone and the reviewer is given
        # none. Its live record is what keeps its files from other tasks (every planner counts them busy), so they
        # are held all the same: by its review. ("held: no" read as free files while the review ran.)
        reviewing = rec.phase == "review" and rec.alive()
        for raw in rec.targets:
            target = normalize(raw)
            node = lock_node(target)
            name = node_file(node) if node else ""  # the node it holds exclusive
            locked = name in held or node in orphaned
            rows.append({"path": str(target), "order": rec.order, "task": rec.task, "pid": pids[rec.key],
                         "held": locked or reviewing, "held_by": "lock" if locked else "review" if reviewing else None})
    for lock in launcher.outside(records):
        for node, exclusive in lock.nodes:
            if exclusive:
                rows.append({"path": node or ".", "order": None, "task": None, "pid": lock.pids[0] if lock.pids else None,
                             "pids": list(lock.pids), "held": True, "held_by": "lock", "holder": lock.holder})
    if json_out:
        print_json({"locks": rows})
        return
    table = grid.Grid([grid.Column(c) for c in ("path", "task", "pid", "held")])
    for r in rows:
        task = f"{r['order']}/{r['task']}" if r["task"] else f"held by {r['holder']}"
        table.add_row(r["path"], task, str(r["pid"] or "-"),
                      "yes (its review runs)" if r["held_by"] == "review" else "yes" if r["held"] else "no")
    grid.print_lines(table.lines(grid.fitting(), grid.Styles.of()) if rows else ["no locks held"])


def _settings_project():
    project = get_project()
    return project, load_settings(project.root)


@command()
def cancel(
    task: str = Argument(..., help="Task id, ORDER/TASK, or path to the task file."),
    grace: float = Option(5.0, "--grace", help="Seconds between SIGTERM and SIGKILL."),
) -> None:
    """Cancel a task: stop its worker's whole process group (SIGTERM, then SIGKILL) and mark it CANCELLED."""
    if not 0 <= grace <= MAX_TIMEOUT:  # checked before the task is marked: NaN or a month cannot be waited for
        raise UserError(f"--grace: {grace} is not a number of seconds from 0 to {MAX_TIMEOUT} (a week)")
    project = get_project()
    try:
        order_dir, task_id = find_task(project, task)
    except UserError:
        rec = steering.cancel_fileless(project, task, grace)
        if rec is None:
            raise
        print(f"{rec.order}/{rec.task}: its worker (pid {rec.pid}) was stopped; its task file {rec.task_file} is "
              "gone, so no status was written (put the file back, then `aipm recover` writes CANCELLED; a recover "
              "without it frees the task's files and keeps the cancel for the file put back as it was)")
        return
    done = steering.cancel(project, order_dir, task_id, grace)
    print(f"{task_id}: CANCELLED")
    if done.ended:  # what `recover` would have recorded: said, not dropped without a word
        print(f"{task_id}: {done.ended}")
    if done.merge:
        print(f"{task_id}: {done.merge}")
    if done.kept_note():
        print(f"{task_id}: {done.kept_note()}")
    if done.held_by:
        print(f"aipm: {task_id}: {steering.held_note(done.held_by, done.unstarted)}", file=sys.stderr, flush=True)


@command()
def retry(
    task: str = Argument(..., help="Task id, ORDER/TASK, or path to the task file."),
    resume: bool = Option(False, "--resume", help="The next attempt continues the agent's own recorded "
                          "session (session_id), for agents that can (claude --resume, codex exec resume)."),
) -> None:
    """Put a finished, failed, rejected, interrupted or cancelled task back to QUEUED, as new (one whose worker was
    lost with its `run`, shown INTERRUPTED, is recovered first, as `aipm recover` would): its attempts, reworks,
    preemptions, times, exit code and reason are cleared and the old review feedback is dropped; its next attempt
    gets a new number and log. Its cost is kept (cost_usd counts against its budgets: raise max_cost_usd to go on)."""
    project, settings = _settings_project()
    order_dir, task_id = find_task(project, task)
    said: list[str] = []
    current = steering.retry(project, order_dir, task_id, settings if resume else None, said)
    print(f"{task_id}: QUEUED" + (f" (resuming session {current.session_id})" if resume else ""))
    for note in said:  # what its lost attempt had come to, which the retry replaces
        print(f"{task_id}: {note}")
    # Queued, and yet no run would start it (its budget, or its order's, is spent; a dependency waits for a person):
    # said now, not by the next run that starts nothing.
    with suppress(UserError):  # (a sibling file broken meanwhile: the retry is done, the next command says it)
        order = load_order(order_dir, project.root)
        why = logbook.wait_for_person(order, Runtime(project.root), settings.max_cost_usd).get(task_id)
        if why:
            print(f"aipm: {order.id}/{task_id} {why}", file=sys.stderr)


@command()
def recover(
    order: Optional[str] = Argument(None, help="Order id or directory (default: every order)."),
    json_out: bool = json_option("a line per task"),
) -> None:
    """Repair tasks whose worker is gone: adopt workers that still run or left an exit code; re-queue the rest.

    A held outcome (its task file was deleted mid-run) is recorded once the file is back as it was, discarded when
    another task was made under its name, dropped when the file is still gone; a task whose worker still runs
    though its record was removed is left running. Also removes the worktrees kept from failed attempts, and
    those of deleted tasks (and orders, without ORDER)."""
    project, settings = _settings_project()
    launcher = Launcher(project, settings, Options(), monitor=None)
    dirs = [project.order_dir(order)] if order is not None else project.order_dirs()
    for directory in dirs:  # bad input is refused before the lock makes .aipm/ (read again under it)
        try:
            load_order(directory, project.root)
        except UserError as exc:
            if order is not None:
                raise
            # Every order is read first (skipped, an order's held outcomes would be dropped as gone): one bad file
            # of another order refused the recovery that `status` sent the user to, with no word of a way on.
            raise UserError(f"{exc}; nothing recovered: fix it, or recover one order: aipm recover ORDER") from None
    if not dirs and not launcher.runtime.dir.exists() and not launcher.runtime.state.exists():
        # No order, and nothing ever ran here (no .aipm/, no state directory): the lock would only make .aipm/, in
        # a directory that may be no project at all. (An order's task left IN_PROGRESS is recovered without them.)
        print_json({"recovered": []}) if json_out else print("nothing to recover")
        return
    done, known, tasks, paths = [], [], set(), {}
    recovery.read_lost_usage_ahead(launcher.runtime)
    with launcher.runtime.launch_lock():
        # Records left by owners killed after their task's final write: `ps` calls them stale and sends the user
        # here, and `logs -f` waited on them. A run or launch drops them as it plans; so does a recovery.
        ids = {load_order(directory, project.root).id for directory in dirs}
        for rec in launcher.runtime.records():
            if (rec.order in ids or not order) and recovery.left_behind(rec, launcher.runtime):
                recovery.forget(launcher.runtime, rec)
                done.append({"order": rec.order, "id": rec.task,
                             "action": f"dropped the record of attempt {rec.serial}: its outcome is written"})
        for directory in dirs:
            loaded = load_order(directory, project.root)
            for item in recovery.recover_order(launcher, loaded):
                done.append({"order": loaded.id, **item})
                if "ended" in item:
                    paths[loaded.id, item["id"]] = Path(loaded.tasks[item["id"]].path)
            for task_id, action in workspace.sweep(project.root, loaded, everything=True):
                done.append({"order": loaded.id, "id": task_id, "action": action})
            known.append(loaded.id)
            tasks.update((loaded.id, task_id) for task_id in loaded.tasks)
        # Held outcomes of task files still gone (with their order directory too, without ORDER).
        done += recovery.drop_gone(launcher.runtime, [rec for rec in launcher.runtime.records() if (
            rec.order, rec.task) not in tasks and (rec.order in known or not order)])
        if not order:
            for order_name, task_id, action in workspace.sweep_orphans(project.root, known):
                done.append({"order": order_name, "id": task_id, "action": f"{action} (its order is gone)"})
        workspace.prune(project.root)
    for item in done:  # (the lock let go: the owners adopting ended attempts record them now)
        ended = item.pop("ended", None)
        found = ended and adopted.recorded(launcher.runtime, item["order"], item["id"],
                                           paths[item["order"], item["id"]], ended)
        if found:
            task, later = found
            item.update(action="recorded", status=task.status.value, exit_code=task.exit_code, reason=task.reason)
            if later is not None:  # re-queued and started again at once: the file tells that attempt, not this end
                item.update(exit_code=ended["exit_code"], reason=None, next_attempt=later)
            if later is not None or task.status not in (*FINISHED_OK, Status.IN_REVIEW):
                # It merged nothing: the patch that keeps a worktree attempt's work, as a re-queue's line names it
                item.update(recovery.kept(launcher.runtime, ended["record"]))
    if json_out:
        print_json({"recovered": done})
    else:
        for item in done:
            said = item.get("error") or (f"{item['action']}: {item['detail']}" if "detail" in item else item["action"])
            follow = (f"starts what that unblocks, as `aipm launch` does (follow it: `aipm logs {item['order']} -f`)")
            if said == "adopted":  # `recover` alone seemed to only repair, and then tasks it never named started
                said += f": a detached aipm records how its worker ends, then {follow}"
            elif said == "recorded" and "next_attempt" in item:
                code = "its exit code lost" if item["exit_code"] is None else f"exit {item['exit_code']}"
                said = (f"its worker had ended ({code}): recorded, and attempt {item['next_attempt']} has started; "
                        f"a detached aipm {follow}")
            elif said == "recorded":  # its worker had ended: what it came to, not "adopted" as if it still ran
                said = (f"its worker had ended: recorded {item['status']}" + f" ({item['reason']})" * bool(
                    item["reason"]) + _then(item["status"], follow, item["order"]))
            patch, rest = item.get("kept"), item.get("kept_rest")
            if patch or rest:  # the worktree goes at the next attempt's start, or by this recover's sweep
                said += f"; its changes are kept in {workspace.kept_words(patch, rest)}"
            print(f"{item['order']}/{item['id']}: {said}")
        if not done:
            print("nothing to recover")
    if any("error" in item for item in done):  # left for a later recovery
        raise Exit(1)


def _then(shown: str, follow: str, order: str) -> str:
    """What the detached aipm that recorded an ended attempt does next, as its outcome allows (work.py: it starts
    what the order allows once it is recorded). A FAILED, REJECTED, INTERRUPTED or CANCELLED task unblocks nothing
    and runs no more: nothing follows from it to be told."""
    status = Status(shown)
    if status == Status.IN_REVIEW:
        return f"; a detached aipm runs its review, then {follow}"
    if status in FINISHED_OK:
        return f"; a detached aipm {follow}"
    if status == Status.QUEUED:  # re-queued, not started at once: for want of room (a standby waits for it)
        return f"; its next attempt starts once the order has room for it (follow it: `aipm logs {order} -f`)"
    return ""
