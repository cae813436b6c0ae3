"""One descriptor that becomes readable when anything a reader shows changes: task files, worker records, logs.

`aipm logs ORDER -f` and the web dashboard sleep on it (select, or the event loop's reader) instead of polling.
Directories come and go (`.aipm/` is created on the first launch, a worker may `git clean` it away, a new order
appears): after each batch of events the watch re-adds whatever now exists, so nothing is missed for long.
"""

from __future__ import annotations

import os
from pathlib import Path

from aipm.inotify import IN_CLOSE_WRITE, IN_CREATE, IN_DELETE, IN_MODIFY, IN_MOVED_FROM, IN_MOVED_TO, DirWatch
from aipm.statedir import state_dir
from aipm.project import Project

_FILES = IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE | IN_CREATE
_LOGS = _FILES | IN_MODIFY  # a log grows by appends: every write is news


class ProjectWatch:
    """inotify over the project root, its order directories, `.aipm/` (logs) and the worker records."""

    def __init__(self, project: Project, watch: DirWatch, orders: list[Path] | None = None):
        self.project = project
        self.watch = watch
        self.extra = orders  # None: every order under orders_dir
        self.runtime = project.runtime
        self.rescan()

    @classmethod
    def open(cls, project: Project, orders: list[Path] | None = None) -> "ProjectWatch | None":
        """None where inotify is missing."""
        watch = DirWatch.open(None)
        return cls(project, watch, orders) if watch is not None else None

    @property
    def fd(self) -> int:
        return self.watch.fd

    def order_dirs(self) -> list[Path]:
        return list(self.extra) if self.extra is not None else self.project.order_dirs()

    def rescan(self) -> None:
        """Watch every directory that exists now (adding a watch twice is a no-op)."""
        root, rt, state = self.project.root, self.runtime, state_dir(self.project.root)
        # Worker records live in the state directory outside the tree (aipm.statedir), logs under .aipm/.
        bases = ((state / "workers", _FILES), (rt / "logs", _LOGS))
        # The state directory only for the directories made in it: its files (locks, spares) are no news. Its
        # standby owners' claims are (standby.py).
        dirs = [(root, _FILES), (root / self.project.orders_dir, _FILES), (rt, _FILES), (state, IN_CREATE),
                (state / "standby", _FILES)]
        self.parents = {str(d) for d, _ in dirs} | {str(base) for base, _ in bases}  # where the others appear
        dirs += [(d, _FILES) for d in self.order_dirs()]
        for base, mask in bases:
            dirs.append((base, _FILES))
            if base.is_dir():
                dirs += [(Path(e.path), mask) for e in os.scandir(base) if e.is_dir()]
        self.incomplete = False  # a directory missing now may appear where no watch sees it (an order given by path)
        for directory, mask in dirs:
            if directory.is_dir():
                self.watch.add(str(directory), mask)
            else:
                self.incomplete = True

    def changes(self) -> tuple[bool, set[Path]]:
        """Drain pending events: (did task files or worker records change, the log files that grew)."""
        board = rescan = False
        logs: set[Path] = set()
        log_dir = str(self.runtime / "logs")
        for directory, name in self.watch.events():
            if directory.startswith(log_dir + os.sep) and name.endswith(".log"):
                logs.add(Path(directory) / name)
            elif not directory.startswith(log_dir + os.sep):
                board = True
                # Only where directories come and go: a rescan per task file written was most of the dashboard's
                # own CPU while a run of quick tasks went on.
                rescan = rescan or directory in self.parents or not directory
        if rescan or self.watch.lost or (board and self.incomplete):
            self.watch.lost.clear()
            self.rescan()
        return board, logs

    def close(self) -> None:
        self.watch.close()
