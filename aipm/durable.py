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

from aipm.offthread import Synced, fsync_later


class _Batch(threading.local):
    """This thread's open batch: directories with renames not yet fsynced (None: no batch), what waits for them."""

    dirs: list[str] | None = None
    after: list[Callable[[bool], None]]
    later: list[Callable[[bool], None]]  # what may wait for a later batch's fsync too (once_durable(urgent=False))
    carry = False  # this batch's end leaves its fsync to the next batch (carry_over)
    carried: tuple[list[str], list[Callable[[bool], None]]] | None = None  # what the last batch left
    syncing: list[Synced] | None = None  # the directory fsyncs sync_now() started
    failed: BaseException | None = None  # how one of those ended, when it failed: the batch's writes are not durable


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
    _open.syncing, _open.failed = [], None
    try:
        yield
    finally:
        dirs, after, later, carry = _open.dirs, _open.after, _open.later, _open.carry
        _open.dirs, _open.after, _open.later, _open.carry = None, [], [], False
        syncing, _open.syncing, failed, _open.failed = _open.syncing, [], _open.failed, None
        if carry and not after and dirs and not syncing and failed is None:
            _open.carried = (dirs, later)
        else:
            _settle(dirs, after + later, syncing, failed)


def flush() -> None:
    """Inside a batch: make its writes durable now and run what waits for them (the go of the workers started so
    far), keeping the batch open for what follows. Outside one there is nothing to wait for."""
    if _open.dirs is not None:
        dirs, after = _open.dirs, _open.after + _open.later
        _open.dirs, _open.after, _open.later = [], [], []
        syncing, _open.syncing, failed, _open.failed = _open.syncing, [], _open.failed, None
        _settle(dirs, after, syncing, failed)


def sync_now() -> None:
    """Inside a batch: start the fsync of its directories now, each in a native thread (offthread.fsync_later), so
    that its writes become durable while this thread goes on (its workers' processes start meanwhile), and leave
    what waits for them (once_durable) queued, in order, for the next flush() or the batch's end. A worker is
    recorded only once these are done (wait_synced); where one failed, what waits is told so (and the error
    raised) there."""
    dirs = _open.dirs
    if not dirs:
        return
    _open.dirs = []
    for directory in dirs:
        try:
            fd = os.open(directory, os.O_RDONLY)
        except FileNotFoundError:
            continue  # removed since its renames (see _fsync_all)
        except OSError:
            _open.dirs.append(directory)  # fsynced at the flush, which then says why it cannot be
            continue
        _open.syncing.append(fsync_later(fd))


def wait_synced() -> None:
    """Inside a batch: wait for the fsyncs sync_now() started, so that a worker's record, written next, follows its
    status's durability as it always has (a record is a worker that goes, or whose run died before its go). Raises
    the failure of one, here and at every later call and flush of the batch: none of its workers may go."""
    if _open.syncing:
        jobs, _open.syncing = _open.syncing, []
        try:
            _join(jobs)
        except BaseException as exc:  # noqa: BLE001 - kept for the batch, raised below
            _open.failed = exc
    if _open.failed is not None:
        raise _open.failed


def _settle(dirs: list[str], after: list[Callable[[bool], None]], syncing: list[Synced] = (),
            failed: BaseException | None = None) -> None:
    """fsync `dirs`, once the fsyncs sync_now() started (`syncing`) are done, then run `after`: each told whether
    all of it succeeded (`failed`: how an earlier join of those fsyncs ended). A failed fsync is a failure, never
    tried again: after an error the kernel may say a second fsync succeeded with the first one's writes lost (it
    reports an error once)."""
    ok = False
    try:
        _join(syncing)
        if failed is not None:
            raise failed
        _fsync_all(dirs)
        ok = True
    finally:
        for action in after:  # every one runs, so none leaks a descriptor, even when the fsync failed
            action(ok)


def _join(syncing: list[Synced]) -> None:
    """Wait for every fsync started early (each joined, so none leaves its thread or descriptor behind, whatever
    is raised meanwhile), then raise the first failure."""
    error: BaseException | None = None
    for job in syncing:
        try:
            job.result()
        except BaseException as exc:  # noqa: BLE001 - raised once all are joined
            error = error or exc
    if error is not None:
        raise error


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
