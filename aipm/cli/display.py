"""How `run` and `exec` show progress: a Rich live view on a terminal, plain lines in logs, JSON lines."""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict, deque

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from aipm.model import Order, status_summary


# One line per event kind, for logs and CI output; fields missing from an event print as "?".
LINES = {
    "started": "start    {task} (attempt {attempt}, pid {pid})",
    "finished": "finish   {task} → {status} (exit {exit_code})",
    "review": "review   {task}",
    "adopted": "adopt    {task} (pid {pid}): worker outlived its supervisor",
    "deferred": "defer    {tasks}: {detail}",
    "launch_failed": "failed   {task}: {error}",
    "error": "error    {error}",
    "invalid_file": "ignored  {error} (keeping the last valid version)",
    "interrupted": "stopped  by signal; re-queued: {requeued}",
    "restored": "restore  {task} → {status}: its file said {was} while its worker ran",
    "gone":     "gone     {task}: its file was deleted while it ran; exit {exit_code} kept in its log",
    "waiting": "wait     {task}: {detail}",
}


def plain_line(event: dict) -> str:
    template = LINES.get(event.get("event"))
    if template is None:
        return json.dumps(event)
    fields = {k: ", ".join(map(str, v)) or "none" if isinstance(v, list) else v for k, v in event.items()}
    return template.format_map(defaultdict(lambda: "?", fields))


class Display:
    """Receives events from the supervisor; renders them for the kind of output we have."""

    def __init__(self, mode: str, view=None):
        self.mode = mode  # "json", "plain" or "live"
        self.view = view
        self.running: dict[str, float] = {}
        self.recent: deque[str] = deque(maxlen=6)
        self.note = ""
        self.live: Live | None = None
        if mode == "live":
            self.live = Live(self._render(), refresh_per_second=4, transient=False)
            self.live.start()

    def __call__(self, event: dict) -> None:
        event.setdefault("time", round(time.time(), 3))
        if event.get("event") == "error":  # errors reach a human whatever the output mode
            print(f"aipm: error: {event['error']}", file=sys.stderr, flush=True)
        if self.mode == "json":
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()
            return
        if self.mode == "plain":
            if event.get("event") != "error":  # on stderr already: print each error once
                print(plain_line(event), flush=True)
            return
        kind, task = event.get("event"), event.get("task")
        if kind in ("started", "adopted"):
            self.running[task] = time.time()
        elif kind == "finished":
            self.running.pop(task, None)
            self.recent.appendleft(plain_line(event))
        elif kind in ("deferred", "waiting"):
            self.note = plain_line(event)
        elif kind in ("launch_failed", "interrupted", "invalid_file", "restored", "gone"):  # errors: on stderr
            self.recent.appendleft(plain_line(event))
        self.live.update(self._render())

    def _render(self):
        parts = []
        order: Order | None = self.view.order if self.view else None
        if order:
            parts.append(Text(f"{order.id}: {status_summary(order)}"))
        table = Table(show_header=True, box=None)
        table.add_column("running")
        table.add_column("elapsed", justify="right")
        for task, since in sorted(self.running.items()):
            table.add_row(task, f"{time.time() - since:.0f}s")
        parts.append(table)
        if self.note:
            parts.append(Text(self.note, style="yellow"))
        parts.extend(Text(line, style="dim") for line in self.recent)
        return Group(*parts)

    def close(self) -> None:
        if self.live:
            self.live.update(self._render())
            self.live.stop()


def mode_for(json_out: bool) -> str:
    if json_out:
        return "json"
    return "live" if sys.stdout.isatty() else "plain"
