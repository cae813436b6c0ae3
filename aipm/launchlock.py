"""The launch lock's primitive: an exclusive flock on a file in the state directory, taken whatever a worker does
to that directory meanwhile (runtime.Runtime.launch_lock holds it around every round)."""

from __future__ import annotations

import fcntl
import itertools
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from aipm import durable
from aipm.liveness import LOOK_AFTER, how_to_go_on, read_small, stopped
from aipm.lockholders import lock_holders
from aipm.statedir import user_base

_REMAKES = 100  # a state directory removed again each time it is made: give up, it is not a single `rm -rf`


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (made if missing), waiting in the kernel: the holder's release wakes us at
    once, where polling would add its interval to every contended round. The descriptor is this round's own
    (never inherited by a worker), so closing it releases the lock, and another thread of this process that asks
    meanwhile waits like any other process. The state directory is made again when a worker's `rm -rf` took it
    away since it was made (a detached owner that raised here would die in its loop, its worker unlisted)."""
    for tries in itertools.count(1):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            if tries >= _REMAKES:
                raise
            if tries > 10:
                time.sleep(0.001)  # `rm -rf` of a big tree still at work: let it finish
            # The directory alone, at once: the lock file needs nothing more, and the whole remake (a scan of every
            # process for locks held in the removed one) takes long enough for a remover at work to take it again.
            # The rest is made by the next taker of a target lock (statedir.orphans) and the next round's ensure().
            with suppress(FileNotFoundError, FileExistsError):
                user_base(path.parent.parent)
                os.mkdir(path.parent)
            continue
        try:
            wait_for(fd, path, fcntl.LOCK_EX)
            held, now = os.fstat(fd), os.stat(path)
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                break
        except FileNotFoundError:
            pass  # deleted or replaced while we waited: a lock nobody else will see, take the new file's
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


def wait_for(fd: int, path: Path, operation: int) -> None:
    """flock(fd, operation), waiting in the kernel. Where the holder is a stopped process (an `aipm run` stopped by
    Ctrl-Z, or SIGSTOP, inside a round) the wait has no end: once a wait has been long, one line on stderr names
    it, and the wait goes on (the person stopped it, so only they may let it go on)."""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    # A wait with no bound: what this thread's last round left to the next one's fsync (durable.carry_over) is made
    # durable before it, not when the holder lets go.
    durable.settle_carried()
    taken = threading.Event()
    threading.Thread(target=_say_if_stopped, args=(path, taken), daemon=True).start()
    try:
        fcntl.flock(fd, operation)
    finally:
        taken.set()


def _say_if_stopped(path: Path, taken: threading.Event) -> None:
    while not taken.wait(LOOK_AFTER):
        holder = stopped_holder(path)
        if holder is not None:
            if not taken.is_set():
                print(f"aipm: waiting for the launch lock, held by {holder}", file=sys.stderr, flush=True)
            return


def stopped_holder(path: Path) -> str | None:
    """A stopped process that holds the lock on `path`, said as "pid N (COMMAND), which is stopped ..."; or None."""
    try:
        inode = os.stat(path).st_ino
    except OSError:
        return None
    for pid in sorted(lock_holders({inode}, str(path)).get(inode, ())):
        if not stopped(pid):
            continue
        try:
            argv = read_small(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile: the lock is free or about to be
        return f"pid {pid} ({' '.join(argv.split())[:100]}), {how_to_go_on(pid)}"
    return None
