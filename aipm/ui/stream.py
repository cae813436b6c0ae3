"""Server-sent events for the dashboard, woken by one inotify watch over the project (no polling loop).

Each open page has a Stream: the hub marks what changed (task files and records → a new board; log files →
new lines) and wakes it; the stream then sends only what differs from what that page already has. A worker
lost with its supervisor changes no file, yet the board then shows its task INTERRUPTED (board.as_seen): the
hub also holds a pidfd of every recorded worker and owner (and standby owner), readable when that process ends.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from aipm import standby
from aipm.changes import ProjectWatch
from aipm.errors import UserError
from aipm.liveness import process_alive
from aipm.logbook import Tail, parse
from aipm.record import Record
from aipm.runtime import Runtime
from aipm.settingvalues import number

BACKLOG = 200  # lines of each running worker's log a page gets when it connects
LIVE_BYTES = 1 << 18  # of a log that grew by more at once (or a backlog's lines), only its end is read and sent
# Seconds between comment lines that keep an idle stream open through proxies (AIPM_UI_KEEPALIVE overrides).
KEEPALIVE = 15.0
NO_INOTIFY_RECHECK = 2.0  # seconds: only where inotify is missing does a stream look again on its own
# A board read is followed by a pause of PACE times its length before the next one (so reads take at most a tenth
# of the time), never longer than MAX_PAUSE: a run of quick tasks changes the board many times a second, and one
# read of a 3,000-task order takes 0.2-0.3 s, so an open page kept a core busy beside the workers. A small order's
# read (milliseconds) is paced below the linger after each wake-up, and so is not held back; a 1,000-task order's
# board follows its run about twice a second.
PACE = 9.0
MAX_PAUSE = 5.0


def keepalive() -> float:
    """AIPM_UI_KEEPALIVE, checked like every setting: a bad value is one line and exit 2, before the URL."""
    text = os.environ.get("AIPM_UI_KEEPALIVE") or ""
    if not text:
        return KEEPALIVE
    seconds = number(text, float)
    if seconds is None or not 0 < seconds < float("inf"):
        raise UserError(f"AIPM_UI_KEEPALIVE: {text!r} is not a positive number of seconds")
    return seconds


class Stream:
    def __init__(self) -> None:
        self.wake = asyncio.Event()
        self.board = True  # the page needs the board first
        self.logs: set[Path] = set()


class Hub:
    """Owns the project watch and the recorded processes' pidfds; wakes every open stream when something changed."""

    def __init__(self, watch: ProjectWatch | None, runtime: Runtime):
        self.watch = watch
        self.runtime = runtime
        self.streams: set[Stream] = set()
        self.keepalive = keepalive()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pidfds: dict[tuple[int, float], int] = {}  # (pid, start time) of a worker or owner -> its pidfd
        self.stopping = False  # the server is shutting down: every stream ends
        self.changes = 0  # of the board, counted: a read begun after the latest serves every stream it woke
        # (changes the read covers, the read): infinite while it waits for its pace, so that a stream woken then
        # joins it instead of starting another
        self._read: tuple[float, asyncio.Future] | None = None
        self._next_read = 0.0  # loop time before which no board read starts (see PACE)
        self._stopped: asyncio.Event | None = None

    def stop(self) -> None:
        """From the server's signal handler (Ctrl-C): end the open streams now, so the shutdown need not cancel
        them (with a traceback each) once its grace has passed."""
        self.stopping = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake, False, set())
            self._loop.call_soon_threadsafe(self._stopped.set)  # a read waiting for its pace goes now

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        if self.watch is not None:
            self._loop.add_reader(self.watch.fd, self._ready)
            self._track()

    def _ready(self) -> None:
        board, logs = self.watch.changes()
        if board:  # records may have come or gone
            self._track()
        self._wake(board, logs)

    def _wake(self, board: bool, logs: set[Path]) -> None:
        self.changes += board
        for stream in self.streams:
            stream.board |= board
            stream.logs |= logs
            stream.wake.set()

    def _track(self) -> None:
        """Hold a pidfd of each live process the records name, and of each standby owner, and only of those. One
        that has ended already is seen by the board the streams read after this."""
        wanted = {(pid, ctime) for rec in self.runtime.records()
                  for pid, ctime in ((rec.pid, rec.ctime), (rec.owner_pid, rec.owner_ctime)) if pid}
        wanted |= {(s["pid"], s["ctime"]) for s in standby.every(self.runtime)}
        for key in self._pidfds.keys() - wanted:
            self._forget(key)
        for pid, ctime in wanted - self._pidfds.keys():
            try:
                fd = os.pidfd_open(pid)
            except OSError:  # gone (ESRCH), or no descriptor left (EMFILE): its files' changes still wake the streams
                continue
            if not process_alive(pid, ctime):  # ended, and its pid taken by another process since
                os.close(fd)
                continue
            self._pidfds[(pid, ctime)] = fd
            self._loop.add_reader(fd, self._ended, (pid, ctime))

    def _ended(self, key: tuple[int, float]) -> None:
        self._forget(key)
        self._wake(True, set())

    def _forget(self, key: tuple[int, float]) -> None:
        fd = self._pidfds.pop(key)
        self._loop.remove_reader(fd)
        os.close(fd)

    async def wait(self, stream: Stream) -> bool:
        """Sleep until the project changes; False when the keep-alive interval passed first."""
        timeout = self.keepalive if self.watch is not None else NO_INOTIFY_RECHECK
        try:
            await asyncio.wait_for(stream.wake.wait(), timeout)
        except asyncio.TimeoutError:
            if self.watch is None:
                stream.board = True
                self.changes += 1  # nothing says what changed: read again
                return True
            return False
        stream.wake.clear()
        return True

    async def board(self, read: Callable[[], Awaitable[dict]]) -> dict:
        """The board as of the latest change: one read(), however many streams that change woke (each stream
        read its own, so 30 open pages made each change 30 reads of every task file)."""
        if self._read is None or self._read[0] < self.changes:
            before = self._read[1] if self._read is not None else None
            self._read = (float("inf"), asyncio.ensure_future(self._paced(read, before)))
        return await asyncio.shield(self._read[1])  # a page that leaves does not cancel the others' read

    async def _paced(self, read: Callable[[], Awaitable[dict]], before: asyncio.Future | None) -> dict:
        """read(), once the read `before` it has ended and the pause after it has passed (see PACE); it covers the
        changes counted when it starts, and the time it takes sets the next pause. (A change during a read began
        the next one at once, beside it, whatever the pause.)"""
        if before is not None and not before.done():
            await asyncio.wait({before})
        pause = min(self._next_read - self._loop.time(), MAX_PAUSE)
        if pause > 0 and not self.stopping:
            try:
                await asyncio.wait_for(self._stopped.wait(), pause)
            except asyncio.TimeoutError:
                pass
        me = asyncio.current_task()
        if self._read is not None and self._read[1] is me:
            self._read = (self.changes, me)
        began = self._loop.time()
        try:
            return await read()
        finally:
            ended = self._loop.time()
            self._next_read = ended + PACE * (ended - began)

    def close(self) -> None:
        if self.watch is not None:
            if self._loop is not None:
                self._loop.remove_reader(self.watch.fd)
                for key in list(self._pidfds):
                    self._forget(key)
            self.watch.close()


class LiveLog:
    """The merged log of the running workers: each new line with its order and task."""

    def __init__(self) -> None:
        self.tail = Tail(skip=LIVE_BYTES)

    def backlog(self, records: list[Record]) -> list[dict]:
        """The last lines of every live worker's log, for a page that just connected."""
        out = []
        for rec in records:
            if rec.alive():
                path = Path(rec.log if rec.phase == "work" else rec.log[: -len(".log")] + ".review.log")
                self.tail.start(path, last=BACKLOG)
                out += self.read(path)
        return out

    def read(self, path: Path, skip: int | None = None) -> list[dict]:
        """New lines of a log that grew (a log first seen now is read from its start: a new attempt); of more
        than `skip` bytes (LIVE_BYTES by default), only the end."""
        log = parse(path, path.parent.name)
        if log is None:
            return []
        return [{"order": log.order, "task": log.task, "line": line} for line in self.tail.read(path, skip=skip)]


def board_patch(sent: dict, current: dict) -> dict:
    """`current` as a change to `sent`, the board the page has: a task unchanged in an order it has is only its id
    (one task's change in an order of 3,000 sent the page 1 MB); an order new to it comes whole."""
    had = {order["path"]: {task["id"]: task for task in order["tasks"]} for order in sent["orders"]}
    orders = [order if order["path"] not in had else
              {**order, "tasks": [t["id"] if had[order["path"]].get(t["id"]) == t else t for t in order["tasks"]]}
              for order in current["orders"]]
    return {**current, "orders": orders}


def as_json(data) -> str:
    """ASCII JSON, for the stream and the API alike: a name that is not UTF-8 (an order directory's, read as
    surrogates) comes out escaped, where encoding it to UTF-8 failed."""
    return json.dumps(data, separators=(",", ":"), default=str)


def sse(event: str, data) -> str:
    return f"event: {event}\ndata: {as_json(data)}\n\n"
