"""Live workers and their upkeep: `ps`, `locks`, `logs`, `cancel`, `retry`, `recover`."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import psutil
from aipm.cli import grid
from aipm.cli.decl import Argument, Exit, Option, command

from aipm import workspace
from aipm.cluster import is_attempt
from aipm.cli.common import JsonOpt, copy_out, get_project, json_option, print_json, print_json_text
from aipm.errors import UserError
from aipm.fields import MAX_TIMEOUT
from aipm import logbook, lostreviews, recovery, steering, subreaper
from aipm.launcher import Launcher, Options
from aipm.locks import node_file
from aipm.paths import lock_node, normalize
from aipm.project import AmbiguousOrder, TaskNotFound, find_task
from aipm.runtime import Runtime
from aipm.settings import load_settings
from aipm.statedir import orphans
from aipm.budget import of as budget_of, task_detail, task_reached
from aipm.model import DEAD_END, FINISHED_OK, RUNNING, Status
from aipm.spending import charged
from aipm.plan import never_runs
from aipm.store import load_order, load_task
from aipm.workerfiles import reading


def _holder(rec, root: Path) -> tuple[int | None, list[int]]:
    """The process that holds the attempt's locks, and what its command left running: its wrapper while it lives;
    with its owner and wrapper dead, the least pid its command left running (as `ps` says: orphaned); else its
    owner's pid (the wrapper's, dead, named nothing)."""
    if rec.worker_alive():
        return rec.pid, []
    left = [] if rec.alive() else sorted(subreaper.marked(subreaper.attempt_marker(root, rec)))
    return (left[0] if left else rec.owner_pid or rec.pid), left


def _worker_info(rec, root: Path) -> dict:
    pid, left = _holder(rec, root)
    info = {"order": rec.order, "task": rec.task, "attempt": rec.serial, "pid": pid, "pgid": rec.pgid,
            "owner_pid": rec.owner_pid, "phase": rec.phase, "alive": rec.alive(), "log": rec.log,
            "command": rec.command, "targets": rec.targets,
            "runner": "ray" if rec.phase == "work" and is_attempt(rec.command) else "local"}
    info["state"] = "alive" if info["alive"] else "review_pending" if _review_pending(rec, root) else "gone"
    if info["alive"] and not rec.owner_alive():
        # Its owner was killed: the worker runs on (its wrapper keeps its time limit) with nobody to record its end
        # or start what follows, until a recover or run adopts it. "alive" alone told nothing was amiss.
        info["state"] = "unowned"
    if left:  # its owner and wrapper died, its command runs on (holding its files)
        info["remnants"] = left
        if info["state"] == "gone":
            info["state"] = "orphaned"
    try:
        proc = psutil.Process(info["pid"])
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


def _review_pending(rec, root: Path) -> bool:
    """A review stopped (Ctrl-C) or lost without a verdict: no process, but nothing stale either (the task stays
    IN_REVIEW and the next run runs the review again), as `status` says (lostreviews.review_pending)."""
    try:
        return bool(lostreviews.review_pending(load_task(rec.task_file, root), rec))
    except (UserError, OSError):
        return False


STATE_TEXT = {"alive": ("alive", ""), "unowned": ("alive, its owner gone (aipm recover adopts it)", "yellow"),
              "stopped": ("stopped", "yellow"), "gone": ("gone (stale: aipm recover)", "red"),
              "orphaned": ("orphaned: runs on (aipm recover ends it)", "red"),
              "review_pending": ("review pending: it runs again on the next run", "yellow")}


@command()
def ps(json_out: bool = JsonOpt) -> None:
    """Live workers in the project: pid, task, elapsed time, CPU (since it started, as ps(1)) and memory (with
    their children). A Ray attempt's command runs on a node: its CPU and memory are not measured here (n/a)."""
    project = get_project()
    infos = [_worker_info(r, project.root) for r in Runtime(project.root).records()]
    if json_out:
        print_json({"workers": infos})
        return
    table = grid.Grid([grid.Column(c) for c in ("pid", "task", "phase", "elapsed", "cpu %", "mem MB", "state")])
    for i in infos:
        table.add_row(str(i["pid"] or "-"), f"{i['order']}/{i['task']}", i["phase"],
                      f"{i['elapsed']}s" if i["elapsed"] is not None else "-",
                      *(("n/a: Ray node", "n/a") if i["runner"] == "ray" and i["elapsed"] is not None else
                        (str(i[key] if i[key] is not None else "-") for key in ("cpu_percent", "memory_mb"))),
                      [STATE_TEXT[i["state"]]])
    grid.print_lines(table.lines(grid.fitting(), grid.Styles.of()) if infos else ["no workers"])


@command()
def locks(json_out: bool = JsonOpt) -> None:
    """Target-file locks: every running task's paths (held now or not), and locks held by processes that are not
    aipm workers (a daemon a finished worker left behind): tasks on those paths wait until they are released.
    Reads /proc only: takes no lock and creates nothing."""
    project = get_project()
    launcher = Launcher(project, load_settings(project.root), Options(dry_run=True), monitor=None)
    held = launcher.holdings.held()
    # Held on a lock file a worker removed since (`rm -rf` of the state directory, of locks/): no file shows it.
    orphaned = {node for _, node, exclusive in orphans(launcher.runtime.state, make=False) if exclusive}
    records = launcher.records()
    pids = {rec.key: _holder(rec, project.root)[0] for rec in records}
    rows = []
    for rec in records:
        for raw in rec.targets:
            target = normalize(raw)
            node = lock_node(target)
            name = node_file(node) if node else ""  # the node it holds exclusive
            rows.append({"path": str(target), "order": rec.order, "task": rec.task,
                         "pid": pids[rec.key], "held": name in held or node in orphaned})
    for lock in launcher.outside(records):
        for node, exclusive in lock.nodes:
            if exclusive:
                rows.append({"path": node or ".", "order": None, "task": None, "pid": lock.pids[0] if lock.pids else None,
                             "pids": list(lock.pids), "held": True, "holder": lock.holder})
    if json_out:
        print_json({"locks": rows})
        return
    table = grid.Grid([grid.Column(c) for c in ("path", "task", "pid", "held")])
    for r in rows:
        task = f"{r['order']}/{r['task']}" if r["task"] else f"held by {r['holder']}"
        table.add_row(r["path"], task, str(r["pid"] or "-"), "yes" if r["held"] else "no")
    grid.print_lines(table.lines(grid.fitting(), grid.Styles.of()) if rows else ["no locks held"])


def _order_named(project, arg: str):
    try:
        return project.order_dir(arg)
    except AmbiguousOrder:
        raise  # not "no such task": the name is two orders'
    except UserError:
        return None


@command()
def logs(
    task: str = Argument(..., help="An order (id or directory), or a task: id, ORDER/TASK or task file."),
    follow: bool = Option(False, "-f", "--follow", help="Keep printing as logs grow, until the task ends "
                          "(for an order: new attempts too, until no task can still run)."),
    attempt: Optional[int] = Option(None, "--attempt", help="Which attempt of a task (default: the newest)."),
    json_out: bool = Option(False, "--json", help="Print the log as JSON: a task's {order, task, attempt, "
                            "attempts, log, text}, an order's {order, lines: [{task, line}]}. Not with -f."),
) -> None:
    """Print a task's log: the newest attempt by default (`--attempt N` for another); with -f, keep following
    the newest attempt until the task stops running (a task that has not run yet, or was put back to run again
    by `aipm retry`: wait for its next attempt to start). Or, for an order, every worker's lines, each prefixed with
    its task id and a tab (GNU parallel --tag style).

    An order's lines already written print attempt by attempt, in the order the attempts ended; with -f, new
    lines print as they arrive. An argument that names both an order and a task means the order.
    """
    if json_out and follow:
        raise UserError("--json: not with -f (following prints the log as it grows); drop one of them")
    project = get_project()
    order_dir = _order_named(project, task) if attempt is None else None
    if order_dir is not None:
        def told(note: str) -> None:  # a task whose lines are not among the order's
            print(f"aipm: {note}", file=sys.stderr, flush=True)

        if json_out:
            lines = [line.split("\t", 1) for line in logbook.order_lines(project, order_dir, told=told)]
            print_json({"order": load_order(order_dir, project.root).id,
                        "lines": [{"task": tid, "line": text} for tid, text in lines]})
            return
        limit = load_settings(project.root).max_cost_usd if follow else None  # (a budget can settle the order)
        for line in logbook.order_lines(project, order_dir, follow, limit, told):
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        return
    try:
        order_dir, task_id = find_task(project, task)
    except UserError as exc:
        if isinstance(exc, TaskNotFound) and attempt is None:  # the name may be an order's as well as a task's
            raise UserError(f"{task!r}: no order and no task of that name under {project.root / project.orders_dir}"
                            f" ({project.orders_here()}); give ORDER, ORDER/TASK or a path to a task file") from None
        # `logs ORDER --attempt N`: the order's name was looked up as a task's, and "task 'ORDER': not found in
        # any order" sent the user looking for a typo. Attempts are numbered per task: say so.
        if attempt is not None and _order_named(project, task) is not None:
            raise UserError(f"--attempt: {task!r} is an order, and attempts are a task's; give ORDER/TASK, or "
                            "drop --attempt for every task's lines") from None
        raise
    order = load_order(order_dir, project.root)
    rt = Runtime(project.root)
    found = rt.logs(order.id, task_id)
    if attempt is not None and attempt not in found:
        have = ", ".join(map(str, found)) or "none"
        raise UserError(f"no log of attempt {attempt} of {order.id}/{task_id} (attempts with a log: {have})")
    if not found and follow and attempt is None:
        found = _first_log(rt, order, task_id)
    if not found:  # nothing to show (yet) is no usage error: said on stderr, exit 0, as `logs ORDER` says it
        print(f"aipm: {logbook.no_log(order.id, order.tasks[task_id])}", file=sys.stderr, flush=True)
        if json_out:
            print_json({"order": order.id, "task": task_id, "attempt": None, "attempts": [], "log": None, "text": ""})
        return
    number = attempt if attempt is not None else max(found)
    if json_out:
        with _log(found[number]) as handle:
            print_json_text({"order": order.id, "task": task_id, "attempt": number, "attempts": sorted(found),
                             "log": str(found[number])}, "text", handle)
        return
    while True:
        with _log(found[number]) as handle:
            _print_attempt(rt, order.id, task_id, handle, follow)
        if not follow or attempt is not None:
            return
        # Following the newest attempt goes on to the attempts that started meanwhile (a rework, another try), and
        # waits for the next one of a task put back to run again (`aipm retry`, a rework not started yet).
        found = _first_log(rt, order, task_id, after=number)
        newer = [n for n in found if n > number]
        if not newer:
            return
        number = min(newer)
        print(f"==> {found[number].name} <==", flush=True)


def _first_log(rt: Runtime, order, task_id: str, after: int = 0) -> dict:
    """`logs -f` of a task that has not run yet (or, `after` its attempt of that number, was put back to run
    again): wait for its next log (`tail -F` style) while it may still start; {} once it no longer can (finished,
    failed, cancelled, interrupted, gone, its budget reached), or when it waits on a task that can never finish (it
    would wait for ever: said on stderr)."""
    said = False
    limit = load_settings(rt.root).max_cost_usd
    while True:
        try:
            now = load_order(Path(order.path), rt.root)
            task = now.tasks[task_id]
        except (UserError, OSError, KeyError):
            return {}
        status = task.status
        found = rt.logs(order.id, task_id)
        if any(n > after for n in found):
            return found
        if status in FINISHED_OK | DEAD_END:
            return {}
        if after and status in RUNNING:
            # Its next attempt starting: every start is made under the launch lock, its log placed by the lock's
            # release (a detached one's after its status is written). Else the attempt followed ended and no owner
            # lives to record it (`aipm recover` does).
            with rt.launch_lock():
                pass
            found = rt.logs(order.id, task_id)
            return found if any(n > after for n in found) else {}
        if after and status not in (Status.QUEUED, Status.REWORK):
            return {}  # interrupted: the next run starts it again, if any does
        never = None if status in RUNNING else _never_starts(rt, now, task, limit)
        if never:
            print(f"aipm: {order.id}/{task_id} {never}", file=sys.stderr, flush=True)
            return {}
        if not said and status not in RUNNING:
            print(f"waiting for {order.id}/{task_id} to start{' again' if after else ''} ({status.value}; Ctrl-C "
                  "stops)", file=sys.stderr, flush=True)
            said = True
        time.sleep(0.25)


def _never_starts(rt: Runtime, order, task, limit: float | None) -> str | None:
    """Why a queued task can start no more until a person acts (a failed dependency, a budget reached: its own, a
    dependency's on the way to it, or its order's), or None."""
    dead = next((d for d, ids in never_runs(order).items() if task.id in ids), None)
    if dead is not None:
        return (f"can never run: {dead} is {order.tasks[dead].status}; fix what stopped it, then "
                f"`aipm retry {dead}`")
    if task_reached(task):
        return f"will not start: {task_detail(task)}"
    seen, todo = set(), list(task.depends_on)
    while todo:  # (never_runs counts the dead statuses only)
        dep = order.tasks.get(todo.pop())
        if dep is None or dep.id in seen or dep.status in FINISHED_OK:
            continue
        seen.add(dep.id)
        if dep.status in (Status.QUEUED, Status.REWORK) and task_reached(dep):
            return f"will not start: it waits on {dep.id}, which will not start: {task_detail(dep)}"
        todo.extend(dep.depends_on)
    spend = budget_of(charged(order, rt), limit)
    return f"will not start: {spend.detail}" if spend is not None and spend.reached else None


def _log(path):
    """The attempt's log to read; a worker may have put what is no file in its place (a FIFO's open would wait)."""
    try:
        return reading(path)
    except OSError as exc:
        raise UserError(f"cannot read the log {path}: {exc.strerror}") from None


def _print_attempt(rt: Runtime, order_id: str, task_id: str, handle, follow: bool) -> None:
    """Print the log open in `handle`; with `follow`, keep printing what is appended while its attempt runs.
    An owner stopped (Ctrl-Z) after its worker ended holds the attempt's end until it goes on: said once."""
    told, seen = False, b""
    while True:
        handle = _as_it_is_now(handle, seen)
        copy_out(handle)
        if not follow:
            return
        seen = _last_read(handle)
        rec = rt.read_record(order_id, task_id)
        if rec is not None and _same(rec.log, handle.name) and recovery.followed(rec, rt):
            if not told and rec.held_by_stopped_owner():
                told = True
                print(f"aipm: {order_id}/{task_id}: its worker has ended, and its owner (pid {rec.owner_pid}) is "
                      "stopped (Ctrl-Z or SIGSTOP): the attempt ends once it goes on (`fg` in its terminal, or "
                      f"`kill -CONT {rec.owner_pid}`)", file=sys.stderr, flush=True)
            time.sleep(0.25)  # tail -f style: the reader is a human, a quarter second is plenty
            continue
        # The attempt ended. Its owner records the outcome and starts the next attempt in one step under the
        # launch lock: once we had it, the last lines are written and a next attempt's log exists.
        with rt.launch_lock():
            pass
        handle = _as_it_is_now(handle, seen)
        with handle:  # (one made again is ours to close; the caller's closes again, harmlessly)
            copy_out(handle)
        return


def _last_read(handle) -> bytes:
    """The last bytes read from `handle` (up to 64): what must still be there for the next read to go on from it."""
    at = handle.tell()
    return os.pread(handle.fileno(), min(at, 64), at - min(at, 64))


def _as_it_is_now(handle, seen: bytes):
    """The log followed, as it is at its name now (as `tail -F`): truncated by its worker (`: > log`: shorter than
    what was read, or no longer holding the bytes last read where they were, once it has grown past them again),
    read again from its start; removed and made again (aipm's closing lines), or replaced, the new file from its
    start. The lines after such a change were lost, and the first read after a truncation began mid-line."""
    try:
        now = os.stat(handle.name)
    except OSError:
        return handle  # removed, nothing there yet: what is open is all there is
    mine = os.fstat(handle.fileno())
    if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
        try:
            fresh = reading(handle.name)
        except OSError:
            return handle
        handle.close()
        return fresh
    at = handle.tell()
    if now.st_size < at or os.pread(handle.fileno(), len(seen), at - len(seen)) != seen:
        handle.seek(0)
    return handle


def _same(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


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
    if done.merge:
        print(f"{task_id}: {done.merge}")
    if done.kept_note():
        print(f"{task_id}: {done.kept_note()}")
    if done.held_by:
        print(f"aipm: {task_id}: {steering.held_note(done.held_by)}", file=sys.stderr, flush=True)


@command()
def retry(
    task: str = Argument(..., help="Task id, ORDER/TASK, or path to the task file."),
    resume: bool = Option(False, "--resume", help="The next attempt continues the agent's own recorded "
                          "session (session_id), for agents that can (claude --resume, codex exec resume)."),
) -> None:
    """Put a finished, failed, rejected, interrupted or cancelled task back to QUEUED, as new: its attempts, reworks,
    preemptions, times, exit code and reason are cleared and the old review feedback is dropped; its next attempt
    gets a new number and log. Its cost is kept (cost_usd counts against its budgets: raise max_cost_usd to go on)."""
    project, settings = _settings_project()
    order_dir, task_id = find_task(project, task)
    current = steering.retry(project, order_dir, task_id, settings if resume else None)
    print(f"{task_id}: QUEUED" + (f" (resuming session {current.session_id})" if resume else ""))


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
        load_order(directory, project.root)
    done, known, tasks = [], [], set()
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
    if json_out:
        print_json({"recovered": done})
    else:
        for item in done:
            said = item.get("error") or (f"{item['action']}: {item['detail']}" if "detail" in item else item["action"])
            if said == "adopted":  # `recover` alone seemed to only repair, and then tasks it never named started
                said += (": a detached aipm records how its worker ends, then starts what that unblocks, as `aipm "
                         f"launch` does (follow it: `aipm logs {item['order']} -f`)")
            patch, rest = item.get("kept"), item.get("kept_rest")
            if patch or rest:  # the worktree goes at the next attempt's start, or by this recover's sweep
                said += f"; its changes are kept in {workspace.kept_words(patch, rest)}"
            print(f"{item['order']}/{item['id']}: {said}")
        if not done:
            print("nothing to recover")
    if any("error" in item for item in done):  # left for a later recovery
        raise Exit(1)
