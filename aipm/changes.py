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
        root, rt = self.project.root, self.runtime
        # The state directory only for the directories made in it: its files (locks, spares) are no news.
        dirs = [(root, _FILES), (root / self.project.orders_dir, _FILES), (rt, _FILES), (state_dir(root), IN_CREATE)]
        dirs += [(d, _FILES) for d in self.order_dirs()]
        # Worker records live in the state directory outside the tree (aipm.statedir), logs under .aipm/.
        for base, mask in ((state_dir(root) / "workers", _FILES), (rt / "logs", _LOGS)):
            dirs.append((base, _FILES))
            if base.is_dir():
                dirs += [(Path(e.path), mask) for e in os.scandir(base) if e.is_dir()]
        for directory, mask in dirs:
            if directory.is_dir():
                self.watch.add(str(directory), mask)

    def changes(self) -> tuple[bool, set[Path]]:
        """Drain pending events: (did task files or worker records change, the log files that grew)."""
        board = False
        logs: set[Path] = set()
        log_dir = str(self.runtime / "logs")
        for directory, name in self.watch.events():
            if directory.startswith(log_dir + os.sep) and name.endswith(".log"):
                logs.add(Path(directory) / name)
            elif not directory.startswith(log_dir + os.sep):
                board = True
        if board:
            self.rescan()
        return board, logs

    def close(self) -> None:
        self.watch.close()
