"""Bind the socket, print the URL with a fresh token, and serve the dashboard with uvicorn until Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import socket
from collections.abc import Callable
from pathlib import Path

from aipm.project import Project
from aipm.settings import Settings

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Seconds a request may still take once Ctrl-C is pressed: a cancel waits for its worker's group (SIGKILL 5 s after
# the SIGTERM) and then for the owner to record the end (5 s more). Cut short, it was a traceback and a 500 for the
# page, though the cancel went on to its end.
LONGEST_REQUEST = 20


def allowed_hosts(host: str, port: int) -> tuple[set[str], bool]:
    """Host header values this server answers to, and whether any IP address will do (a wildcard bind)."""
    hosts = {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
    hosts.add(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return hosts, host in ("0.0.0.0", "::")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    name = "127.0.0.1" if host == "localhost" else host
    return socket.create_server((name, port), family=family)


def serve(project: Project, settings: Settings, orders: list[Path] | None, host: str, port: int,
          announce: Callable[[str], None]) -> None:
    import uvicorn

    from aipm.ui.app import create_app
    from aipm.ui.connections import BACKLOG, Connection, OnceEach, quiet_accept_errors

    sock = bind(host, port)
    port = sock.getsockname()[1]
    token = secrets.token_urlsafe(32)
    hosts, any_ip = allowed_hosts(host, port)
    app = create_app(project, settings, orders, token, hosts, any_ip)
    shown = "127.0.0.1" if host in ("0.0.0.0", "localhost") else "[::1]" if host == "::" else (
        f"[{host}]" if ":" in host else host)
    announce(f"http://{shown}:{port}/?token={token}")
    # The open event streams end as the shutdown begins (handle_exit); a request under way is let finish.
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=LONGEST_REQUEST, lifespan="on",
                            http=Connection, backlog=BACKLOG)
    server = uvicorn.Server(config)
    logging.getLogger("uvicorn.error").addFilter(OnceEach())
    start_server = server.startup

    async def startup(sockets=None) -> None:
        quiet_accept_errors(asyncio.get_running_loop())
        await start_server(sockets)

    server.startup = startup
    exit_server = server.handle_exit

    def handle_exit(sig, frame) -> None:  # the open event streams end as the shutdown begins
        app.stop()
        exit_server(sig, frame)

    server.handle_exit = handle_exit
    # The server takes SIGINT and SIGTERM, not SIGHUP: a hang-up ends the dashboard at once, as it always did (left
    # to aipm.main's interrupt, it broke into the server's loop, which logged the break with its traceback).
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    server.run(sockets=[sock])
