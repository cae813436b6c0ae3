"""`aipm logs`: a task's log (an attempt's, or the newest, followed as it grows and on to the next attempts), or
every worker's lines of an order."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

from aipm import logbook, recovery, workerstate
from aipm.cli.common import copy_out, get_project, print_json, print_json_text
from aipm.cli.decl import Argument, Option, command
from aipm.errors import UserError
from aipm.model import DEAD_END, FINISHED_OK, RUNNING
from aipm.project import AmbiguousOrder, TaskNotFound, find_task
from aipm.runtime import Runtime
from aipm.settings import load_settings
from aipm.store import load_order, load_task, own_task
from aipm.workerfiles import reading


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
                            "attempts, log, text} (and review_log, review_text: its review's output, when it has "
                            "one), an order's {order, lines: [{task, line}]}. Not with -f."),
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
    # Its own file and order.yaml only (as `cancel`): a sibling's file saved invalid mid-run hid this task's log.
    order_id, own = own_task(order_dir, task_id, project.root)
    rt = Runtime(project.root)
    found = rt.logs(order_id, task_id)
    if attempt is not None and attempt not in found:
        have = ", ".join(map(str, found)) or "none"
        raise UserError(f"no log of attempt {attempt} of {order_id}/{task_id} (attempts with a log: {have})")
    if not found and follow and attempt is None:
        found = _first_log(rt, order_dir, order_id, task_id)
    if not found:  # nothing to show (yet) is no usage error: said on stderr, exit 0, as `logs ORDER` says it
        print(f"aipm: {logbook.no_log(order_id, own)}", file=sys.stderr, flush=True)
        if json_out:
            print_json({"order": order_id, "task": task_id, "attempt": None, "attempts": [], "log": None, "text": ""})
        return
    number = attempt if attempt is not None else max(found)
    if json_out:
        _print_json(order_id, task_id, number, found)
        return
    while True:
        with _log(found[number]) as handle:
            _print_attempt(rt, order_id, task_id, handle, follow)
        if not follow or attempt is not None:
            return
        # Following the newest attempt goes on to the attempts that started meanwhile (a rework, another try), and
        # waits for the next one of a task put back to run again (`aipm retry`, a rework not started yet).
        found = _first_log(rt, order_dir, order_id, task_id, after=number)
        newer = [n for n in found if n > number]
        if not newer:
            return
        number = min(newer)
        print(f"==> {found[number].name} <==", flush=True)


def _first_log(rt: Runtime, order_dir: Path, order_id: str, task_id: str, after: int = 0) -> dict:
    """`logs -f` of a task that has not run yet (or, `after` its attempt of that number, was put back to run
    again): wait for its next log (`tail -F` style) while it may still start; {} once it no longer can (finished,
    failed, cancelled, interrupted, gone, its budget reached), or when it waits on a task that can never finish (it
    would wait for ever: said on stderr). A sibling's file that does not validate stops no wait (a run waits for
    its fix): what this task waits on is told once the order loads again."""
    said = False
    limit = load_settings(rt.root).max_cost_usd
    path = order_dir / f"{task_id}.yaml"
    while True:
        try:
            task = load_task(path, rt.root)
        except (UserError, OSError):
            return {}
        status = task.status
        found = rt.logs(order_id, task_id)
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
            found = rt.logs(order_id, task_id)
            return found if any(n > after for n in found) else {}
        never = None if status in RUNNING else _never(order_dir, rt, limit, task_id)
        if never:
            print(f"aipm: {order_id}/{task_id} {never}", file=sys.stderr, flush=True)
            return {}
        if not said and status not in RUNNING:
            print(f"waiting for {order_id}/{task_id} to start{' again' if after else ''} ({status.value}; Ctrl-C "
                  "stops)", file=sys.stderr, flush=True)
            said = True
        time.sleep(0.25)


def _never(order_dir: Path, rt: Runtime, limit: float | None, task_id: str) -> str | None:
    """Why the task can never start (logbook.wait_for_person, or its last launch failed: logbook.launch_failed), or
    None; None too while a file of its order does not validate."""
    try:
        order = load_order(order_dir, rt.root)
    except (UserError, OSError):
        return None
    return logbook.wait_for_person(order, rt, limit).get(task_id) or logbook.launch_failed(order, rt).get(task_id)


def _print_json(order_id: str, task_id: str, number: int, found: dict) -> None:
    """The attempt's log as JSON, with its review's output (review_log, review_text) when it has one, as the text
    output shows it after the work's lines."""
    data = {"order": order_id, "task": task_id, "attempt": number, "attempts": sorted(found), "log": str(found[number])}
    review = _review_path(found[number])
    with _log(found[number]) as handle:
        try:
            reviewed = reading(review)
        except OSError:  # no review, or a worker's FIFO in its place: as the text output, nothing of it shown
            print_json_text(data, "text", handle)
            return
        with reviewed:
            print_json_text({**data, "review_log": str(review)}, "text", handle, ("review_text", reviewed))


def _review_path(log) -> Path:
    """The review's output of the attempt whose log is `log`: `<TASK>.<n>.review.log`."""
    return Path(log).with_suffix(".review.log")


def _log(path):
    """The attempt's log to read; a worker may have put what is no file in its place (a FIFO's open would wait)."""
    try:
        return reading(path)
    except OSError as exc:
        raise UserError(f"cannot read the log {path}: {exc.strerror}") from None


def _print_attempt(rt: Runtime, order_id: str, task_id: str, handle, follow: bool) -> None:
    """Print the log open in `handle`; with `follow`, keep printing what is appended while its attempt runs.
    An owner stopped (Ctrl-Z) after its worker ended holds the attempt's end until it goes on: said once. Its
    review's output follows, once there is one."""
    review = _ReviewLog(handle.name)
    try:
        _follow_attempt(rt, order_id, task_id, handle, follow, review)
    finally:
        review.close()


def _follow_attempt(rt: Runtime, order_id: str, task_id: str, handle, follow: bool, review: _ReviewLog) -> None:
    told, lost, seen = False, False, b""
    while True:
        handle = _as_it_is_now(handle, seen)
        review.show_before(handle)
        if not follow:
            return
        seen = _last_read(handle)
        rec = rt.read_record(order_id, task_id)
        if rec is not None and _same(rec.log, handle.name) and recovery.followed(rec, rt):
            if not told and rec.held_by_stopped_owner():
                told = True
                now, then = ("is yet to start", "starts") if rec.starting() else ("has ended", "ends")
                print(f"aipm: {order_id}/{task_id}: its worker {now}, and its owner (pid {rec.owner_pid}) is "
                      f"stopped (Ctrl-Z or SIGSTOP): the attempt {then} once it goes on (`fg` in its terminal, or "
                      f"`kill -CONT {rec.owner_pid}`)", file=sys.stderr, flush=True)
            if not lost and workerstate.lost(rec, rt):  # said once, not waited on in silence
                lost = True
                print(f"aipm: {workerstate.unwatched_note(rec, rt.root)}", file=sys.stderr, flush=True)
            time.sleep(0.25)  # tail -f style: the reader is a human, a quarter second is plenty
            continue
        # The attempt ended. Its owner records the outcome and starts the next attempt in one step under the
        # launch lock: once we had it, the last lines are written and a next attempt's log exists.
        with rt.launch_lock():
            pass
        handle = _as_it_is_now(handle, seen)
        with handle:  # (one made again is ours to close; the caller's closes again, harmlessly)
            review.show_before(handle)
        return


class _ReviewLog:
    """The attempt's review output (`<TASK>.<n>.review.log`), printed after its work's lines under a header of its
    own: `aipm logs T` of a task its review sent back printed only where that output was, the why itself elsewhere."""

    def __init__(self, log: str):
        self.path = _review_path(log)
        self.handle = None

    def show_before(self, work) -> None:
        """What is new in the review's output, then in the work's log (`work`): once a review has begun, the work's
        log grows only by its verdict, which comes after the review's lines. Before, the work's lines come first."""
        if self.handle is None:
            copy_out(work)
            self._show()
        else:
            self._show()
            copy_out(work)

    def _show(self) -> None:
        if self.handle is None:
            try:
                self.handle = reading(self.path)
            except OSError:
                return  # no review (yet), or a worker's FIFO in its place
            sys.stdout.flush()
            print(f"==> {self.path.name} (its review) <==", flush=True)
        copy_out(self.handle)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


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
