"""The meter: what an agent reports of its usage, kept where its worker cannot rewrite it.

Usage was read from the attempt's log, and the worker writes its log: the log is its standard output, and
confinement leaves it writable (confine.rules). An agent, or any command it ran, that truncated or rewrote the
log after the agent's final report (`: > "$AIPM_LOG"`) hid what the attempt cost from the order's budget.

So an agent preset's command runs behind the meter: `python ... SPEC -- [confine prefix] AGENT ARGV...`. The agent's
standard output and error are a pipe the meter reads; the meter appends everything to the log as before, and each
line that changes what its preset has read (agents.Reading, one line at a time) to its own copy beside the log
(`<TASK>.<n>.reported`, agents.reported), first, so a line seen in the log is in the copy. The agent holds no descriptor of either file,
and, confined, may not open the copy (only the log has a rule). aipm reads usage from the copy (agents.read_usage).

Local workers only: on Ray the agent writes the log itself on its node (cluster.guard opens it there), so nothing
of its output passes through the local worker, and its usage is read from the log.

The meter is in the worker's process group, outside its confinement (it comes before confine's prefix). A stop
signal to the group waits for the agent, which gets it with its default action, so the meter reads all the agent
printed; its exit code is the agent's (128+N for a signal N, as the wrappers give it). The agent's parent is not
the meter but a fork of it that only waits for the agent (_parent): an agent's `kill -STOP $PPID` cannot stop
the reading of its output. Once the agent has exited,
the meter reads what is left in the pipe and ends: a process the agent left behind with the pipe open does not
hold the attempt.
"""

from __future__ import annotations

import errno
import io
import json
import os
import select
import signal
import sys
from typing import NoReturn

from aipm import agents
from aipm.confine import boot_argv

_STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_CHUNK = 1 << 16
_LEFT = 1 << 26  # bytes: a pipe holds far less; the rest is a writer the agent left behind, which never stops


def prefix(agent: str, log: str) -> list[str]:
    """The argv to put in front of an agent preset's command (before confine's prefix, if any)."""
    return boot_argv("aipm.meter", {"agent": agent, "log": log})


class Copy:
    """The lines of the agent's output that change what its preset reads of them, appended to the copy."""

    def __init__(self, agent: str, fd: int) -> None:
        self.fd, self.reading = fd, agents.preset(agent).Reading()
        self.length = os.fstat(fd).st_size  # the copy's, as the meter left it (codex's argv may have begun it)
        self.pieces: list[bytes] = []  # the line being read, as its chunks came (joined once it ends)
        self.size = 0
        self.endless = False  # the line being read is LONGEST or more: passed over, as read_usage passes it

    def feed(self, data: bytes) -> None:
        *lines, rest = data.split(b"\n")
        for line in lines:
            self._add(line)
            self._line_ends(b"\n")
        self._add(rest)

    def end(self) -> None:
        if self.size:
            self._line_ends(b"")

    def _add(self, piece: bytes) -> None:
        if not self.endless and piece:
            self.pieces.append(piece)
            self.size += len(piece)
            if self.size >= agents.LONGEST:
                self.pieces, self.size, self.endless = [], 0, True

    def _line_ends(self, newline: bytes) -> None:
        if not self.endless:
            self._weigh(b"".join(self.pieces) + newline)
        self.pieces, self.size, self.endless = [], 0, False

    def _weigh(self, raw: bytes) -> None:
        before = self.reading.state()
        # As read_usage will read the copy: a lone \r ends a line too (universal newlines), so `progress\rlitellm.
        # RateLimitError: ...` is two lines there, the second aider's error.
        for line in io.StringIO(raw.decode("utf-8", "replace"), newline=None):
            self.reading.read(line)
        if self.reading.state() != before:  # (a line that changes nothing is read the same way in the copy)
            self.length += _write_all(self.fd, raw)

    def kept(self, path: str) -> bool:
        """Whether `path` is still the copy, as the meter wrote it: not removed, replaced, cut or added to."""
        try:
            mine, there = os.fstat(self.fd), os.stat(path, follow_symlinks=False)
        except OSError:
            return False
        return mine.st_nlink > 0 and (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino) and (
            mine.st_size == self.length)


def _write_all(fd: int, data: bytes) -> int:
    """Write what the disk takes of `data`; how much that was."""
    done = 0
    try:
        while done < len(data):
            done += os.write(fd, data[done:])
    except OSError:
        pass  # a full disk: the log says what it can; the copy, what it could hold
    return done


def main(argv: list[str]) -> int:
    """`SPEC -- ARGV...`: run ARGV with its output through the meter; exit with its exit code."""
    spec, command = json.loads(argv[0]), argv[2:]
    for stop in _STOPS:
        signal.signal(stop, signal.SIG_IGN)  # the agent's to act on: the meter reads until it has ended
    path = agents.reported(spec["log"])
    try:
        copy = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
    except OSError:  # (its directory removed meanwhile): no copy, so the usage is unknown (agents.LOST)
        copy, path = os.open(os.devnull, os.O_WRONLY), None
    out, into = os.pipe()
    stops = _Stops()
    parent = os.fork()  # the agent's parent: see _parent
    if parent == 0:
        os.close(out)
        _parent(command, into)
    os.close(into)
    _relay(out, pidfd := os.pidfd_open(parent), copier := Copy(spec["agent"], copy), stops, parent)
    os.close(pidfd)
    code = os.waitstatus_to_exitcode(os.waitpid(parent, 0)[1])
    if path and not copier.kept(path):
        _lost(path)
    return 128 - code if code < 0 else code


def _lost(path: str) -> None:
    """The copy was removed, replaced or changed while the agent ran (an unconfined agent, or a command it ran, can):
    what is there now is no account of the attempt's usage, and neither is the log, so it goes, and the attempt's
    usage is read as unknown (agents.LOST), its cost never the $0 a rewritten log may say."""
    try:
        os.unlink(path)
    except OSError:
        pass  # (gone already, or a directory: read as no copy either way)
    _write_all(1, f"\naipm: the meter's copy of the agent's usage report ({path}) was removed or changed while the "
                  "attempt ran: what it cost is unknown, and the attempt fails\n".encode())


def _parent(command: list[str], into: int) -> NoReturn:
    """The agent's parent, a process of its own that only waits for it and exits as it did (128+N for a signal N).

    An agent's `kill -STOP $PPID`, were the meter its parent, stopped the meter: the pipe filled, the agent blocked
    writing to it, and the attempt hung until its timeout. Stopped, this process holds nothing but the agent's exit
    code, and the meter, its parent, is told (SIGCHLD) and lets it go on (_Stops)."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        pid = os.posix_spawnp(command[0], command, os.environ, setsigdef=_STOPS,
                              file_actions=[(os.POSIX_SPAWN_DUP2, into, 1), (os.POSIX_SPAWN_DUP2, into, 2)])
    except OSError as exc:  # as a shell says it: one line, 127 for a program not found, 126 for one not runnable
        os.write(2, f"aipm: cannot run {command[0]}: {exc.strerror}\n".encode())
        os._exit(127 if isinstance(exc, FileNotFoundError) else 126)
    os.close(into)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    os._exit(128 - code if code < 0 else code)


class _Stops:
    """The meter's SIGCHLD, as a descriptor its loop selects on: the agent's parent stopped (or ended)."""

    def __init__(self) -> None:
        self.fd, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # (the wakeup descriptor is written to)
        self.told = False

    def go_on(self, parent: int) -> bytes:
        """Let the agent's parent go on if it is stopped; what the log says of it the first time."""
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass
        try:
            if os.waitid(os.P_PID, parent, os.WSTOPPED | os.WNOHANG) is None:  # (an exit is left for waitpid)
                return b""
        except ChildProcessError:  # it has ended (Linux finds no child to wait for stops of among the ended)
            return b""
        # Not a person's pause of the task either: stopping its whole group stops the meter too. Let go, the parent
        # only waits, and the agent stays as it is.
        os.kill(parent, signal.SIGCONT)
        if self.told:
            return b""
        self.told = True
        return (f"aipm: the agent stopped its parent (pid {parent}, kill -STOP $PPID): let go on, as it only waits "
                "for the agent to record its end\n").encode()


def _relay(out: int, pidfd: int, copy: Copy, stops: _Stops, parent: int) -> None:
    """Copy the pipe to the log (standard output) and the copy until it closes, or the agent's parent has exited
    and what the agent left in the pipe is read."""
    left = None  # how much more is read once the agent has exited: what a process it left behind writes is not
    line_open = False  # the log's last line is not ended: a note of ours starts a line of its own
    while left is None or left > 0:
        if left is None:
            ready = select.select([out, pidfd, stops.fd], [], [])[0]
            if stops.fd in ready and (note := stops.go_on(parent)):
                _write_all(1, b"\n" + note if line_open else note)
                line_open = False
            if pidfd in ready:
                left = _LEFT
                os.set_blocking(out, False)
            elif out not in ready:
                continue
        try:
            data = os.read(out, _CHUNK)
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                raise
            data = b""
        if not data:
            break
        if left is not None:
            left -= len(data)
        copy.feed(data)
        _write_all(1, data)
        line_open = not data.endswith(b"\n")
    copy.end()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
