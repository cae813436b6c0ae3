"""An owned worker's wrapper stopped by a signal, let go on.

The wrapper (runner.py, wrapper.c) only waits for its command and writes the exit code, so stopped (its command's
`kill -STOP $PPID`, or a person's `kill -STOP` of the pid `aipm ps` shows) it held the attempt's end: the task hung
until its timeout, or for ever without one. The command runs on either way. A group stopped whole (`kill -STOP
-PGID`, a person pausing the task) is left as it is.

The kernel tells a parent that its child stopped by SIGCHLD: its handler writes to a pipe the owner's selector
watches. Only in the main thread (where Python runs handlers), and only for wrappers that are our children (an
adopted one is not).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterable

from aipm.liveness import stopped
from aipm.record import Record
from aipm.runner import group_members
from aipm.workerfiles import append_log

KEY = "child-stopped"  # the wait key of the pipe


class ChildStops:
    def __init__(self, watcher) -> None:
        self.fd = -1
        self.told: set[tuple[str, int]] = set()  # attempts whose log says it already (a command may stop it often)
        if threading.current_thread() is not threading.main_thread():
            return
        self.fd, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old = signal.signal(signal.SIGCHLD, self._handler)
        watcher.watch_fd(self.fd, KEY)

    def _handler(self, signum, frame) -> None:
        try:
            os.write(self._w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: it is readable already

    def go_on(self, owned: Iterable[Record]) -> None:
        """Let each stopped wrapper of `owned` go on (after a SIGCHLD: one child or another stopped or ended)."""
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass
        # The kernel names the children that stopped: one call per SIGCHLD, not a /proc read per worker (a SIGCHLD
        # comes with every worker's end, so that cost was paid on each hand-over).
        halted = set()
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WSTOPPED | os.WNOHANG)
            except ChildProcessError:
                break
            if info is None:
                break
            halted.add(info.si_pid)
        if not halted:
            return
        for rec in owned:
            # A group stopped whole is a person's pause: `kill -CONT -PGID` lets it all go on, as they expect.
            if rec.pid in halted and not any(stopped(pid) for pid in group_members(rec.pgid) if pid != rec.pid):
                os.kill(rec.pid, signal.SIGCONT)  # (our child, not yet reaped: its pid is no other process's)
                if (rec.key, rec.serial) not in self.told:
                    self.told.add((rec.key, rec.serial))
                    append_log(rec.log, f"aipm: the wrapper of this attempt (pid {rec.pid}) was stopped (SIGSTOP): "
                               "let go on, as it only waits for the command to record its end; to pause a task, "
                               f"stop its whole group (kill -STOP -{rec.pgid})")

    def close(self) -> None:
        if self.fd >= 0:
            signal.signal(signal.SIGCHLD, self._old)
            os.close(self.fd)
            os.close(self._w)
            self.fd = -1
