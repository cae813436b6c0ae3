"""The dashboard's HTTP connections, bounded: uvicorn's h11 protocol with a wait for each request and a cap.

uvicorn times out a connection only after a response (timeout_keep_alive), and limit_concurrency answers 503 only
once a request arrives: a client that connects and sends nothing, or half a request, was kept for ever. About a
thousand such made the process run out of descriptors (`ulimit -n`): the dashboard stopped answering, and asyncio
logged a traceback every second for each accept it could not make.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import sys
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

REQUEST_WAIT = 10.0  # seconds a connection may take to send a whole request head, from its start or its last answer
MOST = 1000  # connections kept at once, at most; fewer when the descriptor limit is lower
# asyncio accepts up to `backlog` connections at a time, and a connection is seen here (and one over the cap closed)
# only some loop turns later: the cap leaves room for a few such batches, and for what requests open (task files,
# logs, /proc) and the server's own descriptors.
BACKLOG = 64
RESERVE = 4 * BACKLOG + 64


def most_connections() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return MOST
    return max(1, min(MOST, max(soft - RESERVE, soft // 2)))


class Told:
    """One line on stderr per episode of a shortage, not one per connection or per second."""

    def __init__(self) -> None:
        self.said: set[str] = set()

    def once(self, what: str, line: str) -> None:
        if what not in self.said:
            self.said.add(what)
            print(f"aipm ui: {line}", file=sys.stderr, flush=True)

    def over(self, what: str) -> None:
        self.said.discard(what)


TOLD = Told()


class Connection(H11Protocol):
    """A connection that must send each request head within REQUEST_WAIT; past the cap, the longest idle one of
    the others (or, when every one is busy, this one) is closed, so a person's page still gets in."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.wait_timer: asyncio.TimerHandle | None = None
        self._await_request()
        most = most_connections()
        if len(self.connections) > most:
            TOLD.once("connections", f"{len(self.connections)} connections open, the most it keeps (for `ulimit -n` "
                                     f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]}): closing the longest idle "
                                     "ones as others come")
            idle = [c for c in self.connections if c is not self and isinstance(c, Connection) and c.idle()]
            (min(idle, key=lambda c: c.since) if idle else self).transport.close()
        elif len(self.connections) < most // 2:  # well clear of the cap: a later shortage is news again
            TOLD.over("connections")
            TOLD.over("descriptors")

    def idle(self) -> bool:
        """No request under way: none came yet, or the last one was answered."""
        return self.cycle is None or self.cycle.response_complete

    def _await_request(self) -> None:
        if self.wait_timer is not None:
            self.wait_timer.cancel()
        self.since = time.monotonic()
        self.wait_timer = self.loop.call_later(REQUEST_WAIT, self._waited)

    def _waited(self) -> None:
        self.wait_timer = None
        if self.idle():  # (a request under way, an event stream say, has its head in: it stays)
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_request()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.wait_timer is not None:
            self.wait_timer.cancel()
        super().connection_lost(exc)


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """An accept that finds no descriptor left is one line until the connections are well below the cap; asyncio's
    own handler logged it with a traceback each time it tried again (every second)."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if context.get("message") == "socket.accept() out of system resource":
            TOLD.once("descriptors", f"no file descriptor left to accept a connection ({context.get('exception')}); "
                                     "new connections wait until some close")
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handle)


class OnceEach(logging.Filter):
    """uvicorn's warnings, each said once: a client's bad requests ("Invalid HTTP request received.") were a line
    each, and a port scanner or a stray client sending something else flooded stderr with them."""

    def __init__(self) -> None:
        super().__init__()
        self.said: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        text = record.getMessage()
        if text in self.said or len(self.said) >= 100:  # (bounded: of warnings that name what varies, the first 100)
            return False
        self.said.add(text)
        return True
