"""Every worker's lines of an order (or of the running workers), each tagged with its task: GNU parallel --tag.

A log file keeps no time per line, so what is already written prints attempt by attempt, in the order the
attempts ended (a running one last), as `parallel --group` prints jobs; lines that arrive while following
print as they come, so concurrent workers interleave as they ran.
"""

from __future__ import annotations

import os
import re
import select
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from aipm import budget, parsecache, recovery, workerstate
from aipm.changes import ProjectWatch
from aipm.errors import UserError
from aipm.model import DEAD_END, FINISHED_OK, Order, Status, Task, natural_key, some
from aipm.deadends import will_not_start
from aipm.outcome import LAUNCH_FAILED
from aipm.project import Project
from aipm.recovery import followed
from aipm.runtime import Runtime, entries
from aipm.spending import charged
from aipm.statedir import safe_name
from aipm.store import load_order
from aipm.workerfiles import reading

_NAME = re.compile(r"^(?P<task>.+)\.(?P<attempt>\d+)(?P<review>\.review)?\.log$")


@dataclass(frozen=True)
class AttemptLog:
    order: str
    task: str
    attempt: int
    path: Path
    review: bool = False


def attempt_logs(rt: Runtime, order_id: str) -> list[AttemptLog]:
    """The order's log files (work and review), oldest last write first."""
    base = rt.log_dir(order_id)
    found = []
    for entry in entries(base):
        match = _NAME.match(entry.name)
        if match and entry.is_file():
            try:
                written = entry.stat().st_mtime_ns
            except OSError:  # removed since it was listed
                continue
            found.append((written, AttemptLog(
                order_id, match["task"], int(match["attempt"]), Path(entry.path), bool(match["review"]))))
    return [log for _, log in sorted(found, key=lambda pair: (pair[0], pair[1].path.name))]


def no_log(order_id: str, task: Task) -> str:
    """Why `aipm logs` has no log of a task to show: it has not run, or its logs were removed since it ran (a
    worker's `rm -rf .aipm` or `git clean -fdx`), and then what its file still says of its attempts."""
    if not task.attempts and task.started_at is None:
        return f"no log for {order_id}/{task.id} yet (it has not run)"
    started = f", the last started {task.started_at}" if task.started_at is not None else ""
    return (f"no log for {order_id}/{task.id}: removed since it ran (its file says {task.status.value}, "
            f"attempts {task.attempts}{started})")


def logs_gone(rt: Runtime, order: Order) -> list[str]:
    """no_log() of each task of the order that ran but has no log left: its lines are missing from the order's."""
    logged = {log.task for log in attempt_logs(rt, order.id) if not log.review}
    return [no_log(order.id, task) for task in order.tasks.values()
            if (task.attempts or task.started_at is not None) and safe_name(task.id) not in logged]


def parse(path: Path, order_id: str) -> AttemptLog | None:
    match = _NAME.match(path.name)
    return AttemptLog(order_id, match["task"], int(match["attempt"]), path, bool(match["review"])) if match else None


CHUNK = 1 << 20  # bytes read at a time: a log of gigabytes is never held whole
LONGEST = 1 << 16  # bytes of one line given at once: a longer one (one huge JSON event) comes in pieces
_BACK_BLOCK = 1 << 16


class Tail:
    """New complete lines of many files since the last read; a partial last line waits for its newline.

    Memory stays bounded whatever the files hold: they are read a chunk at a time, a line longer than LONGEST
    comes in pieces of that size, and `skip` (bytes) lets a reader that only shows the end of a burst start
    there. A file truncated or replaced since the last read (its worker's `truncate`, a new inode) is read again
    from its start."""

    def __init__(self, skip: int | None = None) -> None:
        self.skip = skip
        self.offsets: dict[Path, int] = {}
        self.partial: dict[Path, bytes] = {}
        self._ids: dict[Path, tuple[int, int]] = {}

    def start(self, path: Path, last: int | None = None) -> None:
        """Follow `path` from its beginning, or from its last `last` lines (the end when 0)."""
        if path in self.offsets:
            return
        offset = 0
        if last is not None:
            try:
                with reading(path) as handle:
                    st = os.fstat(handle.fileno())
                    self._ids[path] = (st.st_dev, st.st_ino)
                    offset = _lines_back(handle, st.st_size, last, self.skip)
            except OSError:
                pass
        self.offsets[path] = offset

    def read(self, path: Path, final: bool = False, skip: int | None = None) -> Iterator[str]:
        """Lines added to `path` up to its size now (a worker writing faster than we read is not followed for
        ever); with `final`, also an unterminated last line (the file is done). `skip`: this read's own."""
        skip = self.skip if skip is None else skip
        self.start(path)
        try:
            handle = reading(path)
        except OSError:
            return
        with handle:
            st = os.fstat(handle.fileno())
            if self._ids.setdefault(path, (st.st_dev, st.st_ino)) != (st.st_dev, st.st_ino) \
                    or st.st_size < self.offsets[path]:
                self._ids[path] = (st.st_dev, st.st_ino)
                self.offsets[path] = 0
                self.partial.pop(path, None)
            if skip is not None and st.st_size - self.offsets[path] > skip:
                self.offsets[path] = _line_start(handle, st.st_size - skip)
                self.partial.pop(path, None)
                yield "[aipm] … (the log's lines before these are not shown here: the task's log has them)"
            handle.seek(self.offsets[path])
            while self.offsets[path] < st.st_size:
                data = handle.read(min(CHUNK, st.st_size - self.offsets[path]))
                if not data:
                    break
                self.offsets[path] += len(data)
                lines = (self.partial.pop(path, b"") + data).split(b"\n")
                rest = lines.pop()
                while len(rest) > LONGEST:  # no newline in sight: its pieces go now
                    cut = _char_boundary(rest, LONGEST)
                    lines.append(rest[:cut])
                    rest = rest[cut:]
                if rest:
                    self.partial[path] = rest
                for line in lines:
                    while len(line) > LONGEST:
                        cut = _char_boundary(line, LONGEST)
                        yield line[:cut].decode(errors="replace")
                        line = line[cut:]
                    yield line.decode(errors="replace").rstrip("\r")
        rest = self.partial.pop(path, b"") if final else b""
        if rest:
            yield rest.decode(errors="replace").rstrip("\r")

    def forget(self, path: Path) -> None:
        self.offsets.pop(path, None)
        self.partial.pop(path, None)
        self._ids.pop(path, None)


def _lines_back(handle, size: int, count: int, limit: int | None) -> int:
    """The offset where the last `count` lines of the file begin (its end when 0), reading back from its end a
    block at a time, no further back than `limit` bytes (then at the first line that starts within them)."""
    if count == 0:
        return size
    pos, found = size, 0
    floor = 0 if limit is None else max(0, size - limit)
    while pos > floor:
        step = min(_BACK_BLOCK, pos - floor)
        pos -= step
        handle.seek(pos)
        block = handle.read(step)
        at = len(block)
        while True:
            at = block.rfind(b"\n", 0, at)
            if at < 0:
                break
            if pos + at + 1 < size:  # a newline that ends a line, not the file's last byte
                found += 1
                if found == count:
                    return pos + at + 1
    return 0 if floor == 0 else _line_start(handle, floor)


def _line_start(handle, offset: int) -> int:
    """The first line start at or after `offset`."""
    if offset == 0:
        return 0
    handle.seek(offset - 1)
    while True:
        block = handle.read(_BACK_BLOCK)
        if not block:
            return handle.tell()
        at = block.find(b"\n")
        if at >= 0:
            return handle.tell() - len(block) + at + 1


def _char_boundary(data: bytes, at: int) -> int:
    """`at`, moved back over UTF-8 continuation bytes so a character is not split (at most 3)."""
    for cut in range(at, max(at - 4, 0), -1):
        if data[cut] & 0xC0 != 0x80:
            return cut
    return at


def reviewed_in(tail: Tail, log: AttemptLog, reviews: dict[tuple[str, int], Path], final: bool) -> Iterator[str]:
    """The new lines of an attempt's log, its review's (`reviews`: (task, attempt) → review log) where they came:
    before the verdict line that names them, or after the attempt's lines while the review runs. Each file by its
    last write put a review's lines before the attempt's own, or after its verdict."""
    review = None if log.review else reviews.get((log.task, log.attempt))
    for line in tail.read(log.path, final):
        if review is not None and "; review output: " in line and line.endswith(review.name):
            yield from tail.read(review, final)
        yield line
    if review is not None:
        yield from tail.read(review, final)


def tagged(task: str, line: str) -> str:
    return f"{task}\t{line}"


def settled(order: Order, records: list, default_limit: float | None, rt: Runtime) -> dict[str, str] | None:
    """Nothing of the order runs and nothing can still run: a follower has nothing left to wait for. A task that
    starts only once a person acts (wait_for_person: a budget reached, a dead end on its way) is no more to wait
    for than a FAILED one: `logs -f` of an order its budget stopped followed it for ever. None while the order is
    not settled; once it is, id → why of each task left waiting for a person."""
    if any(rec.order == order.id for rec in records):
        return None
    stuck = {**launch_failed(order, rt, records), **wait_for_person(order, rt, default_limit)}
    done = all(task.status in FINISHED_OK or task.status in DEAD_END or task.id in stuck
               for task in order.tasks.values())
    return stuck if done else None


def stuck_notes(order_id: str, stuck: dict[str, str]) -> list[str]:
    """settled()'s tasks left waiting for a person, a line per reason (the tasks behind one dead end share it)."""
    by_why: dict[str, list[str]] = {}
    for task_id, why in stuck.items():
        by_why.setdefault(why, []).append(task_id)
    return [f"{order_id}: {some(sorted(ids, key=natural_key))} {why}" for why, ids in by_why.items()]


def wait_for_person(order: Order, rt: Runtime, default_limit: float | None) -> dict[str, str]:
    """deadends.will_not_start of `order` (`default_limit`: the max_cost_usd setting), its costs counted as the
    launcher counts them, from the spending ledger too (spending.charged: a task file that says less is not
    believed), and its interrupted attempts as a recovery will leave them (recovery.as_recovered)."""
    counted = charged(recovery.as_recovered(order, rt), rt)
    return will_not_start(counted, budget.of(counted, default_limit))


def launch_failed(order: Order, rt: Runtime, records: list | None = None) -> dict[str, str]:
    """Id → why, of each QUEUED task whose last launch failed (its reason says so: a missing program, more CPUs
    than the machine has) and of each task waiting on one, while the order has no standby owner and no attempt of it
    runs (`records`, read when not given): whoever met the failure went on without it, and no process of aipm tries
    it again; a launch or run a person starts does (after
    a fix, or to meet it again). `run` ends on such a failure too, and `logs -f` waited for ever."""
    failed = {t.id: t.reason[len(LAUNCH_FAILED):] for t in order.tasks.values()
              if t.status == Status.QUEUED and (t.reason or "").startswith(LAUNCH_FAILED)}
    if not failed:
        return {}
    from aipm import standby  # (only here: it imports the launcher)

    live = rt.records() if records is None else records  # (settled() has read them)
    if standby.current(rt, order.id) is not None or any(rec.order == order.id and rec.alive() for rec in live):
        # A standby owner launches the order again as room frees; a `run` of it (or a detached owner, at its end)
        # launches it again when one of its attempts ends: each meets (or not, the program installed since) the
        # failure again. `logs ORD/B -f` ended while a run that would start B waited only for a slot.
        return {}
    out = {tid: f"will not start by itself: its last launch failed: {why}; `aipm launch {order.id}` tries again"
           for tid, why in failed.items()}
    stuck = dict.fromkeys(failed)
    grew = True
    while grew:  # its dependants, through any chain: they wait on it
        grew = False
        for task in order.tasks.values():
            if task.id not in stuck and task.status not in FINISHED_OK and any(d in stuck for d in task.depends_on):
                roots = sorted({r for d in task.depends_on if d in stuck for r in (stuck[d] or (d,))})
                stuck[task.id] = tuple(roots)
                out[task.id] = f"will not start until {', '.join(roots)} does: its last launch failed"
                grew = True
    return out


def order_lines(project: Project, order_dir: Path, follow: bool = False, default_limit: float | None = None,
                told: Callable[[str], object] = lambda note: None) -> Iterator[str]:
    """Every worker's lines of the order, tagged; with `follow`, then new lines and new attempts as they come,
    until the order is settled (see `settled`; `default_limit`: the max_cost_usd setting). `told` is given first
    the no_log() of each task whose lines are missing (logs_gone)."""
    rt = Runtime(project.root)
    if follow:  # the order is read again at every change: only the files that changed are parsed
        parsecache.in_memory()
    order = load_order(order_dir, project.root)
    gone = logs_gone(rt, order)
    for note in gone:
        told(note)
    # Nothing to show yet is said, as `logs TASK` says it: a silent exit 0, or wait, read as aipm being broken.
    unseen = not gone and not attempt_logs(rt, order.id)
    nothing = f"no log for {order.id} yet (none of its tasks has run)"
    tail = Tail()
    lost: set[str] = set()  # the attempts said to be looked after by no aipm (workerstate.unwatched_note)

    def new_lines(final: bool) -> Iterator[str]:
        logs = attempt_logs(rt, order.id)
        reviews = {(log.task, log.attempt): log.path for log in logs if log.review}
        worked = {(log.task, log.attempt) for log in logs if not log.review}
        for log in logs:
            if log.review and (log.task, log.attempt) in worked:
                continue  # with its attempt's lines (reviewed_in)
            yield from (tagged(log.task, line) for line in reviewed_in(tail, log, reviews, final))

    if not follow:
        yield from new_lines(final=True)
        if unseen:
            told(nothing)
        for note in stuck_notes(order.id, launch_failed(order, rt)):  # met by a detached owner: said nowhere else
            told(note)
        return
    # Watched before the first read: a line written between that read and the watch was news to no event, and
    # waited for the next change (for ever, were there none) to be shown.
    watch = ProjectWatch.open(project, [order_dir])
    try:
        yield from new_lines(final=False)
        changed = True
        while True:
            if changed:
                try:
                    order = load_order(order_dir, project.root)
                except UserError:
                    if not order_dir.is_dir():  # removed: none of its tasks can start again, only its workers run on
                        order = replace(order, tasks={})
                    # else a task file mid-edit: judge by the last good version
                records = [rec for rec in rt.records() if followed(rec, rt)]
                stuck = settled(order, records, default_limit, rt)
                for rec in records:  # worker and owner gone: waited on in silence until a recover or a run
                    if rec.order == order.id and rec.key not in lost and workerstate.lost(rec, rt):
                        lost.add(rec.key)
                        told(workerstate.unwatched_note(rec, project.root))
                if stuck is not None:
                    if unseen and not attempt_logs(rt, order.id):
                        told(nothing)
                    break
            if unseen:
                told(f"waiting for a task of {order.id} to start (Ctrl-C stops)")
                unseen = False
            # Without inotify, look again every half second.
            select.select([watch.fd] if watch else [], [], [], None if watch else 0.5)
            changed = watch.changes()[0] if watch else True
            yield from new_lines(final=False)
    finally:
        if watch:
            watch.close()
    yield from new_lines(final=True)
    for note in stuck_notes(order.id, stuck):  # why it ended, after its last lines: not read as all done
        told(note)
