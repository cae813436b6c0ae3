"""Work the run's thread hands off so that its waits overlap: helper threads (a worker's spawn, see
posix_spawn.py; a git status), and the fsync of a file written ahead (writer.prepare) in a thread of its own.

A Python helper thread takes the GIL to pick up its job, again when the job's system call returns, and again to
say it is done, each time while the run's thread is busy in Python: an fsync handed to one cost that thread about
as much as it saved where workers end faster than they are handed over (B1, benchmarks/ab.py: CPU 1.06x). A
native thread started on libc's fsync never runs Python, so it never wants the GIL; where one cannot be started
(no libc through ctypes, an ABI where fsync cannot serve as a thread's start routine), the helper thread does it.
"""

from __future__ import annotations

import ctypes
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any


class Pending:
    """A call running in the helper thread; result() waits for it and returns its value or raises its error."""

    def __init__(self, call: Callable[[], Any]):
        self._call = call
        # Held until the call is done: a bare lock, where an Event builds a Condition in Python on every spawn and
        # runs Python again to set and to wait.
        self._done = threading.Lock()
        self._done.acquire()
        self._value: Any = None
        self._error: BaseException | None = None

    def run(self) -> Pending:
        try:
            self._value = self._call()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            self._error = exc
        finally:
            self._done.release()
        return self

    def done(self) -> bool:
        """Whether the call has ended (its result() would not wait)."""
        return not self._done.locked()

    def result(self) -> Any:
        with self._done:  # waits for run(); released again, so a second result() does not wait
            pass
        if self._error is not None:
            raise self._error
        return self._value


# One helper thread per kind of work: a worker's spawn must not wait behind the disk.
_helpers: dict[str, tuple[threading.Thread, queue.SimpleQueue[Pending]]] = {}
# How long a thread that wants the GIL waits for one busy in Python before asking it to let go (CPython's default
# 5 ms). The helper takes the GIL three or four times per spawn, each time while the main thread writes the status:
# at the default a spawn took 1.1 ms (median of 500 in B2) instead of 0.15 ms alone, and 10 ms beside a thread that
# never blocks; at 0.1 ms, 0.36 ms beside that thread. Only matters while two threads want the GIL.
SWITCH_INTERVAL = 1e-4


def in_background(call: Callable[[], Any], helper: str = "spawn") -> Pending:
    """Run `call` in the helper thread of that name (started on first use: a daemon, idle between calls), after the
    calls given to it before."""
    found = _helpers.get(helper)
    if found is None or not found[0].is_alive():
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        jobs: queue.SimpleQueue[Pending] = queue.SimpleQueue()
        found = _helpers[helper] = (threading.Thread(target=_serve, args=(jobs,), name=f"aipm-{helper}",
                                                     daemon=True), jobs)
        found[0].start()
    job = Pending(call)
    found[1].put(job)
    return job


def _serve(jobs: queue.SimpleQueue[Pending]) -> None:
    while True:
        jobs.get().run()


class NativeFsync:
    """fsync(fd) running in a native thread; result() joins it, closes fd, and raises OSError if it failed (EIO
    is said: the thread's errno is its own, and a failed fsync is a failure whatever its cause)."""

    def __init__(self, fd: int, libc: ctypes.CDLL, start: int):
        self._fd, self._libc, self._failed = fd, libc, None
        self._joining = threading.Lock()  # a thread is joined once
        self._thread = ctypes.c_ulong()
        err = libc.pthread_create(ctypes.byref(self._thread), None, ctypes.c_void_p(start), ctypes.c_void_p(fd))
        if err:
            raise OSError(err, os.strerror(err))

    def result(self) -> None:
        with self._joining:
            if self._failed is None:
                code = ctypes.c_void_p()
                self._libc.pthread_join(self._thread, ctypes.byref(code))  # (ctypes lets go of the GIL meanwhile)
                self._failed = (code.value or 0) & 0xFFFFFFFF != 0  # fsync's int: 0, or -1
                os.close(self._fd)
        if self._failed:
            raise OSError(5, "fsync failed")


Synced = NativeFsync | Pending  # what fsync_later() gives: result() waits for the fsync
_native: list = []  # [libc, fsync's address], or [None, 0] where fsync cannot run as a thread's start routine


def _fsync_start() -> tuple[ctypes.CDLL | None, int]:
    if not _native:
        # fsync(int) as a start routine void *(*)(void *): its argument and result are in the registers a pointer's
        # would be only in the 64-bit Linux ABIs named here (an int result in the low half of the pointer's).
        libc = None
        if sys.platform == "linux" and sys.maxsize > 2**32 and os.uname().machine in ("x86_64", "aarch64"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.pthread_create.argtypes = [ctypes.POINTER(ctypes.c_ulong), ctypes.c_void_p, ctypes.c_void_p,
                                                ctypes.c_void_p]
                libc.pthread_join.argtypes = [ctypes.c_ulong, ctypes.POINTER(ctypes.c_void_p)]
                _native[:] = [libc, ctypes.cast(libc.fsync, ctypes.c_void_p).value]
            except (OSError, AttributeError):
                libc = None
        if libc is None:
            _native[:] = [None, 0]
    return _native[0], _native[1]


def fsync_later(fd: int) -> Synced:
    """fsync `fd` while the caller goes on, then close it: the result's result() waits for that and raises OSError
    if the fsync failed. `fd` is the callee's from now on."""
    libc, start = _fsync_start()
    if libc is not None:
        try:
            return NativeFsync(fd, libc, start)
        except OSError:  # no thread to be had (a limit): the helper thread does it
            pass
    return in_background(lambda: _sync_and_close(fd), "disk")


def _sync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
