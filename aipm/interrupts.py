"""Ctrl-C, SIGTERM and SIGHUP during `run` (and `exec`): turned into a descriptor the run loop's wait hears, so
that it stops cleanly between two steps rather than wherever the signal lands (runloop.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import stat

import aipm
from aipm import runner

# What this process is doing that a stop waits for (step()): said at the first Ctrl-C, not only at a second one.
_STEPS: list[str] = []


@contextlib.contextmanager
def step(what: str):
    """The block is a step a stop lets finish, and waits for: `what` names it ("the merge back of ORD/T")."""
    _STEPS.append(what)
    try:
        yield
    finally:
        _STEPS.pop()


class Stop:
    """Turns SIGINT/SIGTERM/SIGHUP into a readable descriptor, so the selector wakes and the loop stops cleanly.

    SIGHUP (the terminal closed) stops the run as SIGTERM does: its workers run in sessions of their own and would
    outlive it unsupervised, their successors never started. Under `nohup` (SIGHUP ignored) the run goes on."""

    def __init__(self, watcher: runner.Watcher):
        self.requested = False
        self._told = False  # a later Ctrl-C was answered
        self.why = ""  # what stopped us, for the stopped tasks' reason
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        os.set_blocking(self._r, False)
        self._old_fd = signal.set_wakeup_fd(self._w)
        stopping = [signal.SIGINT, signal.SIGTERM]
        if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
            stopping.append(signal.SIGHUP)
        # Outputs a hang-up takes away (the terminal, a pipe to a reader that goes with it): the stop's own lines
        # must not fail on them half-way.
        self._hung_up = [fd for fd in (1, 2) if not _regular_file(fd)]
        self._old = {sig: signal.signal(sig, self._handler) for sig in stopping}
        watcher.watch_fd(self._r, "signal")
        if aipm.EARLY:  # one came before us, and its KeyboardInterrupt was swallowed on the way
            self._handler(aipm.EARLY[-1], None)

    def _handler(self, signum, frame) -> None:
        if (self.requested and signum == signal.SIGINT or _STEPS) and not self._told:
            # A Ctrl-C while a step runs on (merging a worktree task's thousands of files back took half a minute):
            # without a word, it read as a hung aipm, one `kill -9` away from a half-written merge. Said at once
            # where the step is known, else at a second Ctrl-C.
            self._told = True
            what = f"{_STEPS[-1]} is done" if _STEPS else "the step under way is done (a merge back, an outcome " \
                                                          "being written)"
            with contextlib.suppress(OSError):
                os.write(2, f"aipm: stopping once {what}; it is not cut short\n".encode(errors="replace"))
        self.requested = True
        if signum == signal.SIGHUP:
            null = os.open(os.devnull, os.O_WRONLY)
            for fd in self._hung_up:
                os.dup2(null, fd)
            os.close(null)
        self.why = self.why or ("stopped by the user (Ctrl-C)" if signum == signal.SIGINT else
                                "stopped: its terminal closed (SIGHUP)" if signum == signal.SIGHUP else
                                f"stopped by {signal.Signals(signum).name}")

    def heard(self, keys: list) -> list:
        """`keys` without our descriptor's unless a stop was asked: the wakeup descriptor hears every signal that has
        a handler, childstops' SIGCHLD too. Emptied, so that it wakes nothing more (left, every wait ended at once)."""
        if "signal" not in keys:
            return keys
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass
        return keys if self.requested else [key for key in keys if key != "signal"]

    def close(self) -> None:
        signal.set_wakeup_fd(self._old_fd)
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        os.close(self._r)
        os.close(self._w)


def _regular_file(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False
