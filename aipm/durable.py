"""One directory fsync per wake-up: the durable end of the task-file writes made under one launch lock.

A task file is written as temp file, fsync, rename, directory fsync; the last step is what makes the rename
itself survive a power cut. Inside `batch()` (the launch lock opens one) that directory fsync is deferred to
the end of the batch and done once per directory, however many files were renamed there; whatever may only
happen once those writes are on disk (a worker's "go", see runner.spawn) waits for the same point: every
command of the batch starts only after its writes are durable. A run whose next wake-up follows at once leaves
its batch's fsync to that one (carry_over): one fsync of the order's directory per two wake-ups where workers end
faster than they are handed over; its writes are then seen before they are durable, and anything that may start
from them starts after them in their directory, so its fsync covers them first. A batch belongs to one thread
(the dashboard runs commands in a thread pool).
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
    later: list[Callable[[bool], None]]  # what may wait for a later batch's fsync too (once_durable(urgent=False))
    carry = False  # this batch's end leaves its fsync to the next batch (carry_over)
    carried: tuple[list[str], list[Callable[[bool], None]]] | None = None  # what the last batch left


_open = _Batch()


def sync_dir(directory: str) -> None:
    """fsync `directory` now, or at the end of the current batch."""
    if _open.dirs is None:
        fsync_dir(directory)
    elif directory not in _open.dirs:
        _open.dirs.append(directory)


def once_durable(action: Callable[[bool], None], urgent: bool = True) -> None:
    """Run `action(True)` once every write so far is durable (now, outside a batch); `action(False)` when the
    batch's fsync failed, so the action can be withheld. Not `urgent`: it may wait for a later batch's fsync
    (carry_over), where an urgent one (a worker's go) keeps its batch's fsync at the batch's end."""
    if _open.dirs is None:
        try:
            settle_carried()  # (none is left when it matters: every start is made in a batch)
        except BaseException:
            action(False)  # told, as at a batch's end: a go is closed, never left waiting
            raise
        action(True)
    elif urgent:
        _open.after.append(action)
    else:
        _open.later.append(action)


def carry_over() -> None:
    """Inside a batch: leave its directory fsyncs, at its end, to this thread's next batch, which follows at once (a
    run whose workers ended while it recorded others: B1's `true`s), unless an urgent action waits for them. That
    batch fsyncs before anything it starts may go, which makes both batches' renames durable with one fsync of
    their directory. Meanwhile the writes are visible and not yet durable, as a write is between its rename and
    its fsync: every start that may follow from them is one of their order, in their directory, so its own fsync
    covers them before its go. The thread fsyncs what is left before it waits (settle_carried)."""
    if _open.dirs is not None:
        _open.carry = True


def settle_carried() -> None:
    """fsync now what the thread's last batch left to the next (carry_over), and run what waits for it."""
    carried, _open.carried = _open.carried, None
    if carried is not None:
        _settle(*carried)


@contextmanager
def batch() -> Iterator[None]:
    """Defer directory fsyncs (and the actions waiting for them) to the end of this block. Nested: one batch."""
    if _open.dirs is not None:
        yield
        return
    carried, _open.carried = _open.carried, None
    _open.dirs, _open.after, _open.later, _open.carry = (carried[0], [], carried[1], False) if carried else \
        ([], [], [], False)
    try:
        yield
    finally:
        dirs, after, later, carry = _open.dirs, _open.after, _open.later, _open.carry
        _open.dirs, _open.after, _open.later, _open.carry = None, [], [], False
        if carry and not after and dirs:
            _open.carried = (dirs, later)
        else:
            _settle(dirs, after + later)


def flush() -> None:
    """Inside a batch: make its writes durable now and run what waits for them (the go of the workers started so
    far), keeping the batch open for what follows. Outside one there is nothing to wait for."""
    if _open.dirs is not None:
        dirs, after = _open.dirs, _open.after + _open.later
        _open.dirs, _open.after, _open.later = [], [], []
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
