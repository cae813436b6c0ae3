"""`aipm ui`: the live web dashboard."""

from __future__ import annotations

import importlib.util
from typing import Optional

from aipm.cli.decl import Argument, Option, command

from aipm.cli.common import console, get_project
from aipm.errors import UserError
from aipm.settings import load_settings


@command()
def ui(
    orders: Optional[list[str]] = Argument(None, help="Orders to show (default: every order, new ones too)."),
    port: int = Option(0, "--port", min=0, max=65535, help="Port to listen on; 0 = any free port."),
    host: str = Option("127.0.0.1", "--host", help="Address to listen on. Anything but loopback exposes "
                       "the dashboard (and its cancel button) to the network, unencrypted: a warning says so."),
) -> None:
    """Serve a live dashboard of the project: tasks, graph, merged worker log, cancel and retry.

    Prints the URL to open; it carries a random token, and every request without it is refused (403). The page
    updates itself as task files, workers and logs change. Works with or without `aipm run` going. Ctrl-C stops.
    Needs the `ui` extra: pip install 'aipm\\[ui]'.
    """
    if not all(importlib.util.find_spec(name) for name in ("starlette", "uvicorn")):
        raise UserError("aipm ui needs the web extra: pip install 'aipm[ui]' (Starlette and uvicorn)")
    from aipm.ui.serve import LOOPBACK, serve

    if not host.strip():
        raise UserError("--host: empty; name the address to listen on (127.0.0.1, the default, keeps the dashboard "
                        "on this machine; 0.0.0.0 is every interface)")
    project = get_project()
    settings = load_settings(project.root)
    dirs = [project.order_dir(o) for o in orders] if orders else None

    def announce(url: str) -> None:  # once listening: an address that cannot be had gets its error alone
        if host not in LOOPBACK:
            console(stderr=True).print(
                f"aipm: warning: listening on {host}: anyone who can reach it and learns the URL (token included) "
                "can read every log and cancel tasks; traffic is not encrypted", markup=False)
        print(url, flush=True)

    try:
        serve(project, settings, dirs, host, port, announce)
    except OSError as exc:
        raise UserError(f"--host {host} --port {port}: cannot listen: {exc.strerror or exc}") from None
