"""Every worker's lines of an order (or of the running workers), each tagged with its task: GNU parallel --tag.

A log file keeps no time per line, so what is already written prints attempt by attempt, in the order the
attempts ended (a running one last), as `parallel --group` prints jobs; lines that arrive while following
print as they come, so concurrent workers interleave as they ran.
"""

from __future__ import annotations

import re
import select
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from aipm.changes import ProjectWatch
from aipm.errors import UserError
from aipm.model import DEAD_END, FINISHED_OK, Order, Status
from aipm.plan import NEVER, plan
from aipm.project import Project
from aipm.runtime import Runtime, entries
from aipm.store import load_order
from aipm.workerfiles import read_bytes, reading

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


def parse(path: Path, order_id: str) -> AttemptLog | None:
    match = _NAME.match(path.name)
    return AttemptLog(order_id, match["task"], int(match["attempt"]), path, bool(match["review"])) if match else None


class Tail:
    """New complete lines of many files since the last read; a partial last line waits for its newline."""

    def __init__(self) -> None:
        self.offsets: dict[Path, int] = {}
        self.partial: dict[Path, bytes] = {}

    def start(self, path: Path, last: int | None = None) -> None:
        """Follow `path` from its beginning, or from its last `last` lines (the end when 0)."""
        if path in self.offsets:
            return
        offset = 0
        if last is not None:
            try:
                data = read_bytes(path)
            except OSError:
                data = b""
            keep = data.splitlines(keepends=True)[-last:] if last else []
            offset = len(data) - sum(map(len, keep))
        self.offsets[path] = offset

    def read(self, path: Path, final: bool = False) -> list[str]:
        """Lines added to `path`; with `final`, also an unterminated last line (the file is done)."""
        self.start(path)
        try:
            with reading(path) as handle:
                handle.seek(self.offsets[path])
                data = handle.read()
        except OSError:
            data = b""
        self.offsets[path] += len(data)
        data = self.partial.pop(path, b"") + data
        lines = data.split(b"\n")
        rest = lines.pop()
        if rest and not final:
            self.partial[path] = rest
        elif rest:
            lines.append(rest)
        return [line.decode(errors="replace").rstrip("\r") for line in lines]

    def forget(self, path: Path) -> None:
        self.offsets.pop(path, None)
        self.partial.pop(path, None)


def tagged(task: str, line: str) -> str:
    return f"{task}\t{line}"


def settled(order: Order, records: list) -> bool:
    """Nothing of the order runs and nothing can still run: a follower has nothing left to wait for."""
    if any(rec.order == order.id for rec in records):
        return False
    result = plan(order)
    for task in order.tasks.values():
        blocked = result.blocked.get(task.id)
        if task.status in FINISHED_OK or task.status in DEAD_END:
            continue
        if task.status == Status.QUEUED and blocked is not None and blocked.reason == NEVER:
            continue
        return False
    return True


def order_lines(project: Project, order_dir: Path, follow: bool = False) -> Iterator[str]:
    """Every worker's lines of the order, tagged; with `follow`, then new lines and new attempts as they come,
    until the order is settled (see `settled`)."""
    rt = Runtime(project.root)
    order = load_order(order_dir, project.root)
    tail = Tail()

    def new_lines(final: bool) -> Iterator[str]:
        for log in attempt_logs(rt, order.id):
            for line in tail.read(log.path, final):
                yield tagged(log.task, line)

    yield from new_lines(final=not follow)
    if not follow:
        return
    watch = ProjectWatch.open(project, [order_dir])
    try:
        changed = True
        while True:
            if changed:
                try:
                    order = load_order(order_dir, project.root)
                except UserError:
                    pass  # a task file mid-edit: judge by the last good version
                if settled(order, rt.records()):
                    break
            # Without inotify, look again every half second.
            select.select([watch.fd] if watch else [], [], [], None if watch else 0.5)
            changed = watch.changes()[0] if watch else True
            yield from new_lines(final=False)
    finally:
        if watch:
            watch.close()
    yield from new_lines(final=True)
