"""The only owner of aipm's runtime state: the launch lock, worker records and exit files in the project's
state directory outside the work tree (see statedir.py), and logs and review feedback in `<root>/.aipm/`.

What mutual exclusion and recovery rest on (locks, records, exit codes) lives where a worker that cleans the
tree (`git clean -fdx` removes the git-ignored `.aipm/`) cannot reach it; what a person reads (logs) lives in
the tree, and every write there re-creates its directory, so a deleted `.aipm/` costs log lines, never a crash.

Target-file locks are `flock` locks whose descriptors are handed to the worker process, so the kernel releases
them exactly when the last process that may edit those files exits: no lock outlives its worker, and none is
ever released by deleting a file. The short launch lock is a `flock` too, on a descriptor of its own per round.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from aipm import durable
from aipm.errors import StateWriteError, UserError
from aipm.liveness import read_small, remembered

from aipm.launchlock import exclusive, stopped_holder, wait_for
from aipm.attemptfiles import AttemptFiles, entries
from aipm.cancelmarks import CancelMarks
from aipm.statedir import make_state_dir, safe_name as _safe, state_dir
from aipm.record import Record
from aipm.inodes import fill
from aipm.spares import Pool, pool
from aipm.workerfiles import made_dir


class _Round(threading.local):
    """The worker records as read in this thread's current hold of the launch lock (None outside one): records
    change only under that lock, so the hold's own writes keep this copy current."""

    records: dict[Path, dict[Path, Record]] | None = None  # state directory → record path → record


_round = _Round()


def _write_file(path: str, data: bytes, spares: Pool, final: str) -> None:
    fd = spares.take(path, avoid=final)
    if fd is None:
        # Made new: what a worker left under the temp name (a link to ~/.bashrc, a hard link) is removed, never
        # truncated and written through; the usual case, no file there, costs nothing more.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o666)
        except FileExistsError:
            os.unlink(path)
            fd = os.open(path, flags, 0o666)
    try:
        fill(fd, data)
    finally:
        os.close(fd)


def _refuse_escape(root: Path, runtime: Path) -> None:
    """A `.aipm` symlink leading out of the project would make aipm create and delete files elsewhere."""
    if runtime.is_symlink():
        real, real_root = os.path.realpath(runtime), os.path.realpath(root)
        if not real.startswith(real_root.rstrip(os.sep) + os.sep):
            raise UserError(f"{runtime}: is a symlink to {real}, outside the project; remove the link "
                            "(aipm creates the directory again)")


class Runtime(CancelMarks, AttemptFiles):
    """Paths and primitives of one project's runtime state (`.aipm/` and the state directory)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.dir = self.root / ".aipm"
        _refuse_escape(self.root, self.dir)
        self.state = state_dir(self.root)
        self._made: set[str] = set()  # state directories known to exist: the hot path skips mkdir calls
        self._paths: dict[tuple[str, ...], Path] = {}  # (order, task[, kind]) -> its file's path
        self._dirs: dict[tuple[Path, str, str], Path] = {}  # (base, kind, order) -> the order's directory there
        self._ledger_files: dict[str, tuple[Path, Path]] = {}  # order -> its spending ledgers (state, tree)
        self._launch_lock = self.state / "launch.lock"
        self._logs_probe = self.dir / "logs" / "x"
        self._lock_depth = 0
        self._spares = pool(f"{self.state}/spare")  # removed records, reused by the next ones

    def _in(self, base: Path, kind: str, order: str) -> Path:
        """`base/kind/<order>`: an order's directory of one kind of file (remembered: asked on every start)."""
        found = self._dirs.get((base, kind, order))
        if found is None:
            found = self._dirs[(base, kind, order)] = base / kind / _safe(order)
        return found

    def ensure(self) -> None:
        with _named(self.state):
            _remake(self.state)
        self._dir(self._logs_probe)

    def _dir(self, path: Path) -> Path:
        """`path` under `.aipm/`, after making sure its directory (and `.aipm/.gitignore`) exist (made_dir)."""
        return made_dir(self.dir, path)

    def _state_file(self, path: Path) -> Path:
        """`path` in the state directory, after making sure its directory exists (cached: the hot path)."""
        parent = os.path.dirname(path)
        if parent not in self._made:
            self.ensure()
            os.makedirs(parent, exist_ok=True)
            self._made.add(parent)
        return path

    def _state_write(self, path: Path, text: str) -> None:
        """Atomic rename, no fsync: state files only matter while processes live."""
        parent, name = os.path.split(path)
        tmp = f"{parent}/.{name}.{os.getpid()}.tmp"
        try:
            for again in (False, True):
                try:
                    self._state_file(path)
                    _write_file(tmp, text.encode(), self._spares, str(path))
                    break
                except FileNotFoundError:
                    if again:
                        raise
                    self._made.clear()  # someone removed the state directory: make it again
            os.replace(tmp, path)
        except OSError as exc:
            with suppress(FileNotFoundError):
                os.unlink(tmp)  # a full disk must not leave a temp file behind
            raise StateWriteError(exc.errno, exc.strerror, str(path)) from None

    # -- the launch lock: serialises every status write and launch decision in the project ------------------

    @contextmanager
    def launch_lock(self) -> Iterator[None]:
        if self._lock_depth:  # already ours: nested rounds (finish, then launch) share one acquisition
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self.ensure()
        # Holders keep it for milliseconds (plan + a few writes), never across a worker's run.
        # The batch ends before the lock is released: the next holder finds this round's writes on disk, unless the
        # round left its fsync to this thread's next one (durable.carry_over): then only a start in their directory
        # may follow from them, and its own fsync comes first.
        with _named(self._launch_lock), exclusive(self._launch_lock), durable.batch():
            self._lock_depth = 1
            _round.records = {}
            try:
                with remembered():
                    yield
            finally:
                self._lock_depth = 0
                _round.records = None

    def launch_lock_holder(self) -> str | None:
        """A stopped process holding the launch lock, said as launchlock.stopped_holder says it; or None."""
        return stopped_holder(self._launch_lock)

    @contextmanager
    def between_rounds(self) -> Iterator[None]:
        """For a reader that must see task files and records of the same moment: holds launch rounds off (a
        shared flock on the launch lock) while it looks. Creates nothing: without the lock file no round has run."""
        try:
            fd = os.open(self._launch_lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            yield
            return
        try:
            wait_for(fd, self._launch_lock, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    # -- worker records ---------------------------------------------------------------------------------

    def record_path(self, order: str, task: str) -> Path:
        path = self._paths.get((order, task))
        if path is None:  # asked ~9 times per attempt: pathlib's joins are worth remembering
            path = self._paths[(order, task)] = self._in(self.state, "workers", order) / f"{_safe(task)}.json"
        return path

    def write_record(self, record: Record) -> None:
        # flat fields: no need for asdict's deep copy
        path = self.record_path(record.order, record.task)
        self._state_write(path, json.dumps(vars(record)))
        known = self._known()
        if known is not None:
            known[path] = Record(**vars(record))  # a copy: the caller's may change before its next write

    def read_record(self, order: str, task: str) -> Record | None:
        path = self.record_path(order, task)
        known = self._known()
        if known is not None:  # as this hold read it (records()), with its own writes since: a copy
            record = known.get(path)
            return None if record is None else Record(**vars(record))
        record = self._read(path)
        return record if record is None or (record.order, record.task) == (order, task) else None

    def remove_record(self, order: str, task: str) -> None:
        path = self.record_path(order, task)
        known = self._known()
        if known is not None:
            known.pop(path, None)
        # Kept as a spare for the next record rather than freed (see spares.py); records are never fsynced, so
        # it is ready at once.
        self._spares.ready(self._spares.keep(str(path)))

    def records(self) -> list[Record]:
        """Every worker record in the project, live or not (read once per launch-lock hold; copies)."""
        found = self._known()
        if found is None:
            found = self._scan()
            if self._lock_depth and _round.records is not None:
                _round.records[self.state] = found
        return [Record(**vars(rec)) for rec in found.values()]

    def _known(self) -> dict[Path, Record] | None:
        """This project's records as read in the current launch-lock hold (None: not read yet, or no hold)."""
        return _round.records.get(self.state) if self._lock_depth and _round.records is not None else None

    def _scan(self) -> dict[Path, Record]:
        out: dict[Path, Record] = {}
        for sub in entries(f"{self.state}/workers"):
            # (listed, then removed before it is read by a worker's `rm -rf`: an order without records)
            for entry in entries(sub.path) if sub.is_dir() else ():
                if entry.name.endswith(".json") and not entry.name.startswith("."):
                    record = self._read(entry.path)
                    if record is None:
                        continue
                    path = self.record_path(record.order, record.task)
                    if str(path) == entry.path:
                        out[path] = record  # (a record under another's name: a spare's old bytes after a crash)
        return out

    @staticmethod
    def _read(path: Path | str) -> Record | None:
        try:
            return Record.parse(json.loads(read_small(os.fspath(path))))
        except (OSError, ValueError, TypeError):
            return None

    def first_to_tell(self, order: str, end: str) -> bool:
        """Whether no one told `end`, the order's ending (notify.order_finished), yet; noted as told if so. Under the
        launch lock: a run watching the order and its detached owners can find the same ending at once."""
        path = self.state / "told" / _safe(order)
        with suppress(OSError):
            if read_small(str(path)) == end.encode(errors="surrogateescape"):
                return False
        self._state_write(path, end)
        return True

    def first_to_tell_of(self, order: str, said: str, running: list[str]) -> bool:
        """Whether no one told `said` (budgetstop.tell) while the order's `running` attempts ran; noted as told if
        so. Under the launch lock: every owner of the order's attempts finds a lowered budget at once. What was told
        while attempts ran none of which runs now is forgotten (a budget lowered again, another day, is told again)."""
        path = self.state / "told-budget" / _safe(order)
        try:
            told = json.loads(read_small(str(path)))
        except (OSError, ValueError):
            told = {}  # none yet, or cut short by a crash: told, perhaps twice
        told = {k: v for k, v in told.items() if isinstance(v, list) and set(running).intersection(map(str, v))} \
            if isinstance(told, dict) else {}
        if said in told:
            return False
        self._state_write(path, json.dumps({**told, said: running}))
        return True


TIMED_OUT = "timed-out"  # what a wrapper writes after the code when it kept the attempt's time limit itself (wrapper.c)


def read_exit_file(path: str) -> int | None:
    """The exit code a worker's wrapper recorded, or None when it never got that far."""
    return read_exit(path)[0]


def read_exit(path: str, deadline: float | None = None) -> tuple[int | None, bool]:
    """(read_exit_file's code, whether the attempt outran its time limit with no owner to stop it: the wrapper
    stopped it, or it ended, by the end stamp " @S.CC" on the boot clock that follows a wrapper's code when it keeps a
    limit, past `deadline`, within the margin the wrapper gives a live owner, runner.LATE)."""
    code, stopped, ended = _exit_said(path)
    return code, stopped or bool(deadline and ended and ended > deadline)


_STAMP_STEP = 0.01  # an end stamp is cut to hundredths: the end was within one such step after it


def ended_in_time(path: str, deadline: float) -> bool:
    """The wrapper's end stamp says the command ended by `deadline` (on the boot clock), unstopped: an owner that
    looks at it later (stopped by SIGSTOP, on a suspended machine) has no timeout to enforce."""
    code, stopped, ended = _exit_said(path)
    return code is not None and not stopped and ended is not None and ended + _STAMP_STEP <= deadline


def _exit_said(path: str) -> tuple[int | None, bool, float | None]:
    """(exit code, stopped at its limit by the wrapper, end on the boot clock) from the exit file.
    The compiled wrapper writes its code into `<path>.w` and then names it: one killed between the two left the code
    there, newline and all (an empty `.w` only says the wrapper started)."""
    try:
        text = read_small(path).decode("ascii", "replace")
    except FileNotFoundError:
        try:
            text = read_small(path + ".w").decode("ascii", "replace")
        except OSError:
            return None, False, None
        if not text.endswith("\n"):
            return None, False, None
    except OSError:
        return None, False, None
    code, *marks = text.split() or [""]
    if not code.lstrip("-").isdigit():
        return None, False, None
    ended = [float(m[1:]) for m in marks if m[:1] == "@" and m[1:].replace(".", "", 1).isdigit()]
    return int(code), TIMED_OUT in marks, ended[0] if ended else None


def exit_file_written(path: str) -> bool:
    """The worker's wrapper got as far as its exit file (the code in it may be lost, see unrecorded.exit_lost)."""
    return os.path.exists(path) or read_exit_file(path) is not None


@contextmanager
def _named(path: Path) -> Iterator[None]:
    """A state directory that cannot be made or locked in (/tmp full or read-only) is a StateWriteError that names
    it: the CLI says it in one line, where a bare OSError (some carry no file name) was a traceback."""
    try:
        yield
    except StateWriteError:
        raise
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise StateWriteError(exc.errno, exc.strerror, str(exc.filename or path)) from None


def _remake(state: Path) -> None:
    """The state directory made (again): no cache, a few syscalls, and a worker may have removed it. Removed
    again while it is made is left to what the caller does next (the launch lock tries again)."""
    with suppress(FileNotFoundError):
        make_state_dir(state)
