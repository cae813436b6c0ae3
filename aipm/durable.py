"""One directory fsync per wake-up: the durable end of the task-file writes made under one launch lock.

A task file is written as temp file, fsync, rename, directory fsync; the last step is what makes the rename
itself survive a power cut. Inside `batch()` (the launch lock opens one) that directory fsync is deferred to
the end of the batch and done once per directory, however many files were renamed there; whatever may only
happen once those writes are on disk (a worker's "go", see runner.spawn) waits for the same point. Nothing
outside the batch can see the difference: the lock is released, and every command of the batch starts, only
after its writes are durable. A batch belongs to one thread (the dashboard runs commands in a thread pool).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class _Batch(threading.local):
    """This thread's open batch: directories with renames not yet fsynced (None: no batch), what waits for them."""

    dirs: list[str] | None = None
    after: list[Callable[[bool], None]]


_open = _Batch()


def sync_dir(directory: str) -> None:
    """fsync `directory` now, or at the end of the current batch."""
    if _open.dirs is None:
        fsync_dir(directory)
    elif directory not in _open.dirs:
        _open.dirs.append(directory)


def once_durable(action: Callable[[bool], None]) -> None:
    """Run `action(True)` once every write so far is durable (now, outside a batch); `action(False)` when the
    batch's fsync failed, so the action can be withheld."""
    if _open.dirs is None:
        action(True)
    else:
        _open.after.append(action)


@contextmanager
def batch() -> Iterator[None]:
    """Defer directory fsyncs (and the actions waiting for them) to the end of this block. Nested: one batch."""
    if _open.dirs is not None:
        yield
        return
    _open.dirs, _open.after = [], []
    try:
        yield
    finally:
        dirs, after = _open.dirs, _open.after
        _open.dirs, _open.after = None, []
        _settle(dirs, after)


def flush() -> None:
    """Inside a batch: make its writes durable now and run what waits for them (the go of the workers started so
    far), keeping the batch open for what follows. Outside one there is nothing to wait for."""
    if _open.dirs is not None:
        dirs, after = _open.dirs, _open.after
        _open.dirs, _open.after = [], []
        _settle(dirs, after)


def sync_now() -> None:
    """Inside a batch: fsync its directories now, so its writes so far are durable, and leave what waits for them
    (once_durable) queued, in order, for the next flush() or the batch's end. Where the fsync fails the
    directories stay pending (and the error is raised)."""
    dirs = _open.dirs
    if not dirs:
        return
    _open.dirs = []
    try:
        _fsync_all(dirs)
    except BaseException:
        _open.dirs = dirs + _open.dirs
        raise


def _settle(dirs: list[str], after: list[Callable[[bool], None]]) -> None:
    ok = False
    try:
        _fsync_all(dirs)
        ok = True
    finally:
        for action in after:  # every one runs, so none leaks a descriptor, even when the fsync failed
            action(ok)


def _fsync_all(dirs: list[str]) -> None:
    for directory in dirs:
        try:
            fsync_dir(directory)
        except FileNotFoundError:
            pass  # removed since its renames (a worker checked out a branch without it): nothing there to keep


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory now (its renames reach the disk), batch or not."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
