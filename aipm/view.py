"""A live view of one order directory that re-reads only the task files that changed.

The supervisor plans after every event; re-parsing every task file, or even walking every task, each time
would make a run quadratic in the order's size. The view keeps parsed tasks and reloads a file only when
inotify names it (or, without inotify, when its stamp changed: see _stat), and it keeps ninja-style indexes up to
date as tasks change: the running tasks, and the ready ones (QUEUED with every dependency finished).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable
from pathlib import Path

from aipm.inotify import IN_CREATE, IN_MOVED_TO, DirWatch, close_at_exit
from aipm.model import FINISHED_OK, MANAGED_FIELDS, RUNNING, Order, Status, Task, evolve
from aipm.ranking import ranked, remains
from aipm.inodes import Stamp, stamp
from aipm.errors import ValidationError
from aipm.store import ORDER_FILE, SETTINGS_FILE, check_links, load_order, load_task, task_files


class OrderView:
    def __init__(self, order_dir: Path, root: Path, watch: bool = True):
        self.dir = Path(order_dir)
        self.root = root
        self.watch = DirWatch.open(str(self.dir)) if watch else None
        self._above: dict[str, str] = {}  # directories above the order's (to the root) → the name below on the way
        if self.watch is not None:
            self._watch_path()
        # Watched before the read: a write that landed between the read and the watch (another run recording a
        # task as this one starts) was never seen, and the view stayed stale.
        try:
            self.order, self._stats = self._load_stamped()
        except BaseException:
            if self.watch is not None:
                os.close(self.watch.fd)
            raise
        self._ordering: list[str] | None = None
        self.problems: list[str] = []  # changed files that did not validate, for the caller to report
        # (task id, status, status now) of finished tasks whose file a change on disk put back (a `git checkout`
        # or `git stash` of the order): they run again; the caller says so
        self.reopened: list[tuple[str, Status, Status]] = []
        self._deleted: dict[str, Task] = {}  # finished tasks whose file went (a checkout deletes, then writes)
        self._read: dict[str, Task] = {}  # tasks this process wrote since, as their files were last read (as_read)
        # Files that did not load, and why: read again whenever another file changes.
        self._kept_out: dict[str, str] = {}
        self.changed = False
        self._index()

    @property
    def fd(self) -> int | None:
        return self.watch.fd if self.watch else None

    def close_watch(self) -> None:
        """Stop watching the directory, as a process that is about to exit (later refreshes compare stats)."""
        if self.watch is not None:
            close_at_exit(self.watch.fd)
            self.watch = None

    def _watch_path(self) -> None:
        """Watch the order's directory, and each directory above it up to the project root for the one below made
        again: `rm -rf` then `git checkout`, or `git stash -u` then `pop`, give them new inodes that the old watches
        do not see (a deleted directory's watch is gone). From the top down: a directory made before its parent's
        watch is found by the add below it, one made after is that watch's event."""
        path, below = [], self.dir
        for parent in self.dir.parents:
            path.append((str(parent), below.name))
            if parent == self.root or not parent.is_relative_to(self.root):
                break
            below = parent
        for parent, name in reversed(path):
            self._above[parent] = name
            self.watch.add(parent, IN_CREATE | IN_MOVED_TO)
        self.watch.add(str(self.dir))

    def refresh(self, rescan: bool = False) -> Order:
        """Bring the view up to date with the directory. `self.changed` says whether anything but our own
        writes moved (a bad file is kept out and reported in `problems`). `rescan`: list and stat the directory
        whatever the watch said, for a file that came without an event it watches (a hard link: IN_CREATE only)."""
        self.changed = False
        if self.watch is not None and not rescan:
            names, made_again = set(), False
            for directory, name in self.watch.events():
                if directory == str(self.dir):
                    if name.endswith(".yaml") and not name.startswith(".") and name != SETTINGS_FILE:
                        names.add(name)
                elif self._above.get(directory) == name:
                    made_again = True  # the order's directory, or one on the way to it, appeared
            if made_again or self.watch.lost:
                # Watch whatever stands at those paths now, then read it all again (every file is a new inode).
                self.watch.lost.clear()
                self._watch_path()
                if self.dir.is_dir() and self._reload_all(quiet=True):
                    return self.order
                paths = self._all_changed()
            elif ORDER_FILE in names and self._reload_all():  # rare: re-read everything, keeping the watch
                return self.order
            elif ORDER_FILE in names:  # (a task file that does not load keeps the whole from loading: file by file)
                paths = self._all_changed()
            else:
                paths = {f"{self.dir}/{n}" for n in names}  # (an event's name is one path component)
        else:
            paths = self._all_changed()
        todo = {}
        if paths:  # a file kept out for naming a task that was missing may load now that something changed
            paths = set(paths) | self._kept_out.keys()
        for path in sorted(paths):
            seen = _stat(path)  # before the read: a change that lands after it is seen at its own event
            if seen != self._stats.get(path) or path not in self._stats or path in self._kept_out:
                todo[path] = seen
        while todo:
            failed = {}
            for path, seen in todo.items():
                try:
                    self.reload(path, seen=seen)
                    self._kept_out.pop(path, None)
                    self.changed = True
                except ValidationError as exc:
                    failed[path] = (seen, exc)
            if len(failed) < len(todo):  # a file may name a dependency read after it: try those again
                todo = {path: seen for path, (seen, _) in failed.items()}
                continue
            for path, (seen, exc) in failed.items():
                # A file being edited mid-run: keep the last good version, say why (once per version of the
                # file), and retry on its next change or another file's.
                if path not in self._kept_out or seen != self._stats.get(path):
                    self.changed = True
                    self.problems.append(str(exc))
                self._stats[path] = seen
                self._kept_out[path] = str(exc)
            break
        return self.order

    def invalid(self, task: Task) -> bool:
        """Whether the task's file, there now, does not validate (the view holds its last valid version)."""
        return task.path in self._kept_out and os.path.exists(task.path)

    def unloaded(self) -> dict[str, str]:
        """Task files there now that never loaded in this view (added since, invalid from the start): path → why.
        Unlike an invalid() task's, no valid version of theirs is held, so nothing of theirs can run."""
        if not self._kept_out:
            return {}  # (asked every round: no set of the order's paths built, 22 µs of B1's 1000 tasks each)
        known = {task.path for task in self.order.tasks.values()}
        return {path: why for path, why in self._kept_out.items() if path not in known and os.path.exists(path)}

    def why_invalid(self, task: Task) -> str:
        """What keeps an invalid() task's file out (its field, or its place in the order: a cycle, an unknown
        dependency)."""
        return self._kept_out.get(task.path, f"{task.path}: does not load")

    def _all_changed(self) -> set[str]:
        """Task files whose stamp differs from what the view holds, new and deleted ones included."""
        try:
            current = {str(p) for p in task_files(self.dir)}
        except (FileNotFoundError, NotADirectoryError):
            current = set()  # the directory itself is gone (for now, or a file stands there): so is every file in it
        return {p for p in current | set(self._stats) if _stat(p) != self._stats.get(p) or p not in self._stats}

    def _load_stamped(self) -> tuple[Order, dict[str, Stamp | None]]:
        """The order read whole, and each task file's stamp taken before the reads (as in refresh()): a change
        that lands after them is seen at its own event."""
        try:
            stats = {str(p): _stat(str(p)) for p in task_files(self.dir)}
        except OSError:
            stats = {}  # no directory: load_order says so
        order = load_order(self.dir, self.root)
        return order, {t.path: stats.get(t.path) for t in order.tasks.values()}

    def _reload_all(self, quiet: bool = False) -> bool:
        """Read the whole order again; False (the view as it was, the error in `problems` unless `quiet`) when
        it does not load."""
        before = self.order.tasks
        try:
            self.order, stats = self._load_stamped()
        except (ValidationError, OSError) as exc:
            if not quiet:
                self.problems.append(str(exc))
            return False
        for task in self.order.tasks.values():
            self._note_reopened(before.get(task.id), task)
        self._stats = stats
        self._kept_out.clear()
        self._ordering = None
        self._index()
        self.changed = True
        return True

    def reload(self, path: str, seen: Stamp | None = None) -> None:
        """Re-read one task file (after our own write, or when it changed on disk). `seen`: the file's stat
        taken before this read."""
        tasks = self.order.tasks
        task_id = Path(path).name[: -len(".yaml")]
        old = tasks.get(task_id)
        if seen is None:
            seen = _stat(path)
        if seen is None:
            if old is not None and old.status in RUNNING:
                # Deleted under its worker: keep the last valid version (its files, its dependants): its outcome
                # is held until the file is back (Recording._record_outcome), so the order is not finished.
                self._stats[path] = None
                raise ValidationError(path, None, "deleted while its task runs")
            if old is not None and old.status in FINISHED_OK:
                self._deleted[task_id] = old
            tasks.pop(task_id, None)
            self._stats.pop(path, None)
            self._ordering = None
            self._index()
            return
        new = load_task(Path(path), self.root)
        self._stats[path] = seen
        self._read.pop(task_id, None)
        self._note_reopened(old or self._deleted.pop(task_id, None), new)
        if old is None or (old.depends_on, old.priority) != (new.depends_on, new.priority):
            candidate = dict(tasks, **{task_id: new})
            try:
                check_links(Order(self.order.id, self.order.path, candidate))
            except ValidationError as exc:
                if exc.file == path:
                    raise
                # A cycle is named from its first task's file, but it is this file's version that is kept out.
                raise ValidationError(path, exc.field, exc.message) from None
            tasks[task_id] = new
            self._ordering = None
            self._index()
        else:
            self._put(new)

    def _note_reopened(self, old: Task | None, new: Task) -> None:
        if old is not None and old.status in FINISHED_OK and new.status not in FINISHED_OK:
            self.reopened.append((new.id, old.status, new.status))

    def note(self, task: Task) -> None:
        """Take a task we just wrote ourselves, so the change event it causes need not re-read the file."""
        held = self.order.tasks.get(task.id)
        if held is not None:
            self._read.setdefault(task.id, held)
        if task.path in self._kept_out and held is not None and held.path == task.path:
            # Its file does not load as it is (an edit that made a cycle, say, while it ran): what we wrote is its
            # status and counters, taken onto the last valid version held; taken whole, the cycle was in the view,
            # and the task waited for itself instead of for the fix. The file stays kept out, read again later.
            self._put(evolve(held, {field: getattr(task, field) for field in MANAGED_FIELDS}))
            return
        self._put(task)
        self._stats[task.path] = _stat(task.path)

    def as_read(self, task_id: str) -> Task | None:
        """The task as its file said when last read, before this process's own writes since: what another owner
        wrote of its attempt's end, though this run started the next attempt at once (foreign.Said)."""
        return self._read.get(task_id) or self.order.tasks.get(task_id)

    def ordering(self) -> list[str]:
        if self._ordering is None:
            self._ordering = [t.id for t in ranked(self.order)]
            self._rank = {tid: i for i, tid in enumerate(self._ordering)}
            self._ready_ranked = None
        return self._ordering

    def rank(self, tid: str) -> int:
        """The task's place in launch order (0 first)."""
        self.ordering()
        return self._rank[tid]

    def first_rank(self, ids: Iterable[str]) -> int:
        """The best rank among `ids` (tasks of this order; others are ignored); past the last one when none."""
        self.ordering()
        return min((self._rank[t] for t in ids if t in self._rank), default=len(self._ordering))

    def ready_ordering(self, below: int | None = None) -> list[str]:
        """The ready tasks in launch order (only those ranked before `below`): all a quiet plan needs to look at.
        Kept sorted as tasks become ready or stop being so (a sort of every ready task per wake-up made a big
        order's run quadratic)."""
        self.ordering()
        if self._ready_ranked is None:
            self._ready_ranked = sorted(self.ready, key=self._rank.__getitem__)
        if below is None:
            return list(self._ready_ranked)
        return self._ready_ranked[:bisect.bisect_left(self._ready_ranked, below, key=self._rank.__getitem__)]

    # -- indexes ------------------------------------------------------------------------------------

    def _index(self) -> None:
        tasks = self.order.tasks
        self.dependants: dict[str, list[str]] = {tid: [] for tid in tasks}
        for task in tasks.values():
            for dep in task.depends_on:
                if dep in self.dependants:
                    self.dependants[dep].append(task.id)
        self.running = {tid for tid, t in tasks.items() if t.status in RUNNING}
        self.ready = {tid for tid in tasks if self._is_ready(tid)}
        self._ready_ranked: list[str] | None = None

    def _is_ready(self, tid: str) -> bool:
        tasks = self.order.tasks
        task = tasks[tid]
        return task.status == Status.QUEUED and all(
            d in tasks and tasks[d].status in FINISHED_OK for d in task.depends_on
        )

    def _put(self, task: Task) -> None:
        """Replace a task whose links did not change, updating the indexes for it and its dependants."""
        tasks = self.order.tasks
        old = tasks.get(task.id)
        tasks[task.id] = task
        if old is not None and remains(old) != remains(task) and (
                remains(task) or any(d in tasks and remains(tasks[d]) for d in task.depends_on)):
            # Its chain starts or ends (a retry, a dependency put back): its own rank, or a remaining dependency's,
            # moves. Not so when it finishes after its dependencies, as tasks do: the hot path keeps its ranks.
            self._ordering = None
            self._ready_ranked = None
        (self.running.add if task.status in RUNNING else self.running.discard)(task.id)
        for tid in (task.id, *self.dependants.get(task.id, ())):
            ready = self._is_ready(tid)
            if ready == (tid in self.ready):
                continue
            (self.ready.add if ready else self.ready.discard)(tid)
            ranked_ids = self._ready_ranked
            if ranked_ids is not None:
                at = bisect.bisect_left(ranked_ids, self._rank[tid], key=self._rank.__getitem__)
                if ready:
                    ranked_ids.insert(at, tid)
                else:
                    del ranked_ids[at]


def _stat(path: str) -> Stamp | None:
    """The file's version (inodes.stamp: its ctime too, as `cp -p` or `touch -d` put an edit's size and mtime back).
    Our own writes rename their inode into place, which moves its ctime: note() stamps the file after that."""
    try:
        return stamp(os.stat(path))
    except (FileNotFoundError, NotADirectoryError):  # (a file where its order directory was)
        return None
