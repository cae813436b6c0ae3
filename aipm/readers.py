"""Reader processes: the task files of a big order parsed on every core, as if one after another.

Parsing and validating a task file costs ~60 µs, nearly all of it Python holding the GIL, so a cold load of 100k
files keeps one core busy for seconds while the others idle. Above PARALLEL_FROM files to parse, the list is cut
into one contiguous share per core; this process parses the first share itself while forked readers parse the
others and send back each Task as plain tuples (parsecache's rows, marshal) over a pipe. Readers write nothing to
disk and change nothing: a read-only command stays read-only.

What comes back is what parsing the files in order returns: the same Tasks in the same order, and for bad input
the same error, for the first bad file in name order (each reader stops at its first; shares are looked at in
order, so an earlier share's error wins). A reader that fails any other way (killed, out of memory, a crash)
costs only time: its share is parsed again here, which then fails, or not, exactly as a sequential load would.

Only processes that ask for it fork (`allow`: the short-lived read commands and `validate`), and only while
single-threaded: `run` keeps signal handlers and a wake-up descriptor that a forked child must not inherit.
"""

from __future__ import annotations

import marshal
import os
import signal
import threading
from collections.abc import Callable

from aipm import parsecache
from aipm.errors import ValidationError
from aipm.model import Task
from aipm.paths import Target

# This process's share against a reader's: with equal shares of 50k files, the reader ended 0.4 s after this process
# (detect_scale's 100k order, 2 cores); at 1.3 the wait for it is the hand-over alone (0.06 s).
OWN_WEIGHT = 1.3
PARALLEL_FROM = 2000  # files to parse before a second process pays for its fork and the hand-over (a few ms)

_allowed = False


def allow(on: bool = True) -> None:
    """Let this process parse big orders in forked readers (for single-threaded commands that read and exit)."""
    global _allowed
    _allowed = on


def load_all(paths: list[str], load: Callable[[str], Task]) -> list[Task]:
    """`[load(path) for path in paths]`, in several processes when there are many paths."""
    readers = _readers(len(paths))
    if readers < 2:
        return [load(path) for path in paths]
    # (a reader's file costs more: copy-on-write faults after the fork, its rows marshalled back)
    own = round(len(paths) * OWN_WEIGHT / (OWN_WEIGHT + readers - 1))
    size = -(-(len(paths) - own) // (readers - 1))
    shares = [paths[:own]] + [paths[i:i + size] for i in range(own, len(paths), size)]
    started: list[tuple[int, int]] = []
    try:
        for share in shares[1:]:
            try:
                started.append(_start(share, load))
            except OSError:  # no process or pipe to be had now (EAGAIN, ENOMEM, EMFILE): the rest is parsed here
                break
        tasks = [load(path) for path in shares[0]]
        for i, share in enumerate(shares[1:]):
            tasks.extend(_collect(share, _drain(started[i][1]), load) if i < len(started) else map(load, share))
        return tasks
    finally:
        for pid, fd in started:  # done (or no longer wanted after an error): stop and reap every reader
            os.close(fd)
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def _readers(files: int) -> int:
    if not _allowed or files < PARALLEL_FROM or threading.active_count() > 1:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, files * 2 // PARALLEL_FROM))


def _start(share: list[str], load: Callable[[str], Task]) -> tuple[int, int]:
    """Fork a reader for `share`: (its pid, the pipe its answer comes on)."""
    r, w = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        raise
    if pid == 0:  # the reader: answer, then leave without running the parent's exit handlers or flushing its buffers
        code = 1
        try:
            os.close(r)
            _answer(share, load, w)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _answer(share: list[str], load: Callable[[str], Task], fd: int) -> None:
    """Parse `share` in order and write ("ok", rows) or ("error", file, field, message) for its first bad file."""
    rows = []
    answer: tuple = ("ok", rows)
    for path in share:
        try:
            task = load(path)
        except ValidationError as exc:
            answer = ("error", exc.file, exc.field, exc.message)
            break
        # A row of None (a value marshal cannot carry) makes the parent parse that file itself.
        rows.append((parsecache.as_row(task), tuple((t.path, t.is_dir, t.is_glob) for t in task.targets)))
    data = memoryview(marshal.dumps(answer))
    while data:
        data = data[os.write(fd, data):]


def _drain(fd: int) -> bytes:
    parts = []
    while part := os.read(fd, 1 << 20):
        parts.append(part)
    return b"".join(parts)


class _Targets(dict):
    """Target objects by their fields, one object for each distinct target."""

    def __missing__(self, fields: tuple) -> Target:
        target = self[fields] = Target(*fields)
        return target


def _collect(share: list[str], data: bytes, load: Callable[[str], Task]) -> list[Task]:
    """The Tasks of `share` from a reader's answer; the error it found; or, if it gave no whole answer, the share
    parsed here."""
    try:
        answer = marshal.loads(data)
    except (EOFError, ValueError, TypeError):
        answer = None
    if type(answer) is tuple and answer[0] == "error" and len(answer) == 4:
        raise ValidationError(*answer[1:])
    if type(answer) is not tuple or answer[0] != "ok" or len(answer[1]) != len(share):
        return [load(path) for path in share]
    targets = _Targets()
    return [load(path) if values is None else parsecache.task_of(values, path, tuple(map(targets.__getitem__, fields)))
            for path, (values, fields) in zip(share, answer[1])]
