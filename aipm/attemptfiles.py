"""An attempt's files: its log, exit file, review feedback and resume note, and an order's spending ledgers —
where each lies (`.aipm/`, which a person reads, or the state directory, which a `git clean` does not reach), how
an attempt's number is chosen, and the tidying of spent exit files. Mixed into Runtime (runtime.py), which keeps
the directories themselves, made again after a worker's `git clean` or `rm -rf` (`_dir`, `_state_file`, `_in`)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from aipm.spares import in_tree
from aipm.statedir import safe_name as _safe


def entries(directory: str | Path) -> list[os.DirEntry]:
    """A directory's entries; none when it does not exist (yet, or any more: a worker's `rm -rf`, `git clean`)."""
    try:
        return list(os.scandir(directory))
    except OSError:
        return []


class AttemptFiles:
    """Mixed into Runtime: its root, `.aipm/` (`dir`), state directory (`state`), directory helpers and records."""

    root: Path
    dir: Path
    state: Path

    def remove_spent_exit_files(self, order: str) -> None:
        """Remove an order's exit files that no worker record refers to. Each carried an outcome to whoever recorded
        it, and the record is dropped only once that outcome is in the task file: kept, they would pile up, one per
        attempt ever made (and every new attempt's number is found by looking past them). The cancel marks of tasks
        with no record go too (a mark names its attempt, so a stale one never counts: this only tidies). Under the
        launch lock."""
        records = self.records()
        wanted = {os.path.basename(rec.exit_file).removesuffix(".review") for rec in records}
        # (`.w`: the exit file the compiled wrapper makes at its start, named when its command ends; `.why`: the
        # reason aipm's own process in the attempt noted, workerfiles.note_reason)
        self._remove_unwanted(self._in(self.state, "exit", order), lambda name: name.removesuffix(".w").removesuffix(
            ".why").removesuffix(".review") in wanted)
        marked = {_safe(rec.task) for rec in records if rec.order == order}
        self._remove_unwanted(self.state / "cancel" / _safe(order), marked.__contains__)

    @staticmethod
    def _remove_unwanted(directory: Path, wanted: Callable[[str], bool]) -> None:
        """Opened as a directory of its own, never through a link: a worker's `exit/ORD -> ~` had every file there
        removed. What is no file of ours (a directory a worker made there) stays: its unlink failed the run."""
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return  # gone, or a link (ELOOP) or file where the directory goes
        try:
            for name in os.listdir(fd):
                if not wanted(name):
                    with suppress(FileNotFoundError, IsADirectoryError, PermissionError):
                        os.unlink(name, dir_fd=fd)
        finally:
            os.close(fd)

    # -- logs, exit files, review feedback --------------------------------------------------------------

    def log_path(self, order: str, task: str, attempt: int) -> Path:
        return self._dir(self.log_dir(order) / f"{_safe(task)}.{attempt}.log")

    def log_again(self, log: str) -> str:
        """The log a record names, its directory made again (and `.aipm/.gitignore`): a worker's `rm -rf .aipm` or
        `git clean -fdx` since its attempt started took it, and whatever opens it now for writing would fail."""
        return str(self._dir(Path(log)))

    def stock_logs(self, count: int) -> None:
        """Make `count` empty files for the next workers' logs while nothing waits (see place_log)."""
        spares = in_tree(self.root)
        if spares is not None:
            spares.stock(count)

    def place_log(self, log: str) -> None:
        """Give a new log its name on an empty file stock_logs() made, so that the worker's start, which opens
        it, creates no file (the dear step of a short task's start on ext4 without a journal)."""
        spares = in_tree(self.root)
        if spares is not None:
            spares.place(log)

    def log_dir(self, order: str) -> Path:
        return self._in(self.dir, "logs", order)

    def logs(self, order: str, task: str) -> dict[int, Path]:
        """Attempt number → log of each attempt of a task, oldest first (review logs are not listed)."""
        base = self.log_dir(order)
        name = re.compile(re.escape(_safe(task)) + r"\.(\d+)\.log")
        found = {}
        for entry in entries(base):
            match = name.fullmatch(entry.name)
            if match:
                found[int(match.group(1))] = Path(entry.path)
        return dict(sorted(found.items()))

    def next_number(self, order: str, task: str, start: int) -> int:
        """The first attempt number from `start` on whose log and exit file do not exist yet: every attempt of a
        task gets files of its own, across retries and interrupted attempts (whose counter is given back). A meter's
        copy left of a log a person removed takes its number too: the meter appends to it (a resumed codex puts
        its baseline there first), and the earlier attempt's usage was read as the new one's."""
        number = max(1, start)
        logs, exits = self.log_dir(order), self._in(self.state, "exit", order)
        while any(os.path.exists(path) for path in (f"{logs}/{_safe(task)}.{number}.log",
                                                    f"{logs}/{_safe(task)}.{number}.reported",
                                                    f"{exits}/{_safe(task)}.{number}")):
            number += 1
        return number

    def exit_path(self, order: str, task: str, attempt: int) -> Path:
        """In the state directory: the outcome of an adopted worker must survive a cleaned tree. Its directory is
        looked at every time: the wrapper writes the file, and nothing would make again a directory removed since
        it was remembered as made (the state directory's `rm -rf` between two starts)."""
        directory = self._in(self.state, "exit", order)
        if not os.path.isdir(directory):
            self._made.discard(str(directory))
        return self._state_file(directory / f"{_safe(task)}.{attempt}")

    def feedback_path(self, order: str, task: str, writing: bool = False) -> Path:
        """Where a review's feedback for the next attempt is kept (its directory made when `writing`)."""
        path = self._paths.get((order, task, "feedback"))
        if path is None:
            path = self._in(self.dir, "feedback", order) / f"{_safe(task)}.txt"
            self._paths[(order, task, "feedback")] = path
        return self._dir(path) if writing else path

    def carry_path(self, order: str, task: str, writing: bool = False) -> Path:
        """Beside the feedback: the number of the worktree attempt its review sent back, whose work the next
        attempt continues (workspace/carry.py)."""
        return self.feedback_path(order, task, writing).with_suffix(".carry")

    def drop_feedback(self, order: str, task: str) -> None:
        """Remove the task's feedback, and the work to carry that goes with it: no attempt is to read it (its task
        ended DONE or COMPLETED, or was retried as new). Looked for first, one stat (most tasks have none: no
        directory made for them), then removed by its path as `writing` makes it, never through a worker's link."""
        if os.path.lexists(self.feedback_path(order, task)):
            self.feedback_path(order, task, writing=True).unlink(missing_ok=True)
            with suppress(OSError):  # (a directory a worker made there: what it says is read as no mark)
                self.carry_path(order, task, writing=True).unlink(missing_ok=True)

    def resume_path(self, order: str, task: str) -> Path:
        """`aipm retry --resume` leaves the agent session to continue here, for the next attempt."""
        return self._dir(self.dir / "resume" / _safe(order) / f"{_safe(task)}.txt")

    def notify_log(self) -> Path:
        return self._dir(self.dir / "notify.log")

    def ledger_paths(self, order: str, writing: bool = False) -> list[Path]:
        """The order's spending ledgers (spending.py): in the state directory, which a `git clean` of the tree does
        not reach, and in `.aipm/spent/`, which a reboot that empties /tmp does not (their directories made when
        `writing`; one that cannot be made, a full disk or a worker's file in its place, leaves the other)."""
        state, tree = self._ledgers(order)
        if writing:
            for make, path in ((self._state_file, state), (self._dir, tree)):
                with suppress(OSError):
                    make(path)
        return [state, tree]

    def _ledgers(self, order: str) -> tuple[Path, Path]:
        """Remembered: asked for several times on each hand-over (the plan's costs, the outcome's charge)."""
        found = self._ledger_files.get(order)
        if found is None:
            name = f"{_safe(order)}.jsonl"
            found = self._ledger_files[order] = (self.state / "spent" / name, self.dir / "spent" / name)
        return found

