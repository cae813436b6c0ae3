"""How `run` and `exec` show progress: a Rich live view on a terminal, plain lines in logs, JSON lines."""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from typing import TYPE_CHECKING

from aipm.model import Order, format_counts, status_counts, status_summary

if TYPE_CHECKING:
    from rich.console import Console
    from rich.live import Live


# One line per event kind, for logs and CI output; fields missing from an event print as "?".
LINES = {
    "started": "start    {task} (attempt {attempt}, pid {pid}{detached}{by})",
    "finished": "finish   {task} → {status} ({reason}){by}{hint}",
    "review": "review   {task}{again}",
    "review_stopped": "stopped  review of {task}; it runs again on the next run (its work is kept)",
    "adopted": "adopt    {task} (pid {pid}): worker outlived its supervisor",
    "recovered": "recover  {task}: its worker was lost with its supervisor; re-queued, attempt not counted{kept}",
    "deferred": "defer    {tasks}: {detail}",
    "launch_failed": "failed   {task}: {error}",
    "error": "error    {error}",
    "invalid_file": "ignored  {error} ({keeping})",
    "interrupted": "stopped  {why}; {stopped}",
    "restored": "restore  {task} → {status}: its file said {said} while its worker ran{not_cancel}",
    "reopened": "reopen   {task}: its file went from {was} back to {status} during the run (`aipm retry`, or a "
                "checkout or stash of it); it runs again as its file says",
    "committed": "commit   {task}: {detail}",
    "discarded": "discard  {task}: {detail}{kept}",
    "summary": "{order}: {counts}",
    "budget": "budget   {where}: {detail}{kept}",
    "preempted": "preempt  {task} for {for} (re-queued, attempt not counted){kept}",
    "waiting": "wait     {task}: {detail}",
    "enclosing": "skip     {task}: this aipm runs inside its worker (pid {pid}), so it cannot wait for it",
    "watching": "watch    {tasks}: {detail}",
}


def plain_line(event: dict) -> str:
    template = LINES.get(event.get("event"))
    if template is None:
        return json.dumps(event)
    fields = {k: ", ".join(map(str, v)) or "none" if isinstance(v, list) else v for k, v in event.items()}
    fields["detached"] = ", detached" if event.get("detached") else ""
    fields["by"] = f"; run by {event['by']}" if event.get("by") else ""  # (an attempt another aipm runs)
    if event.get("by") and event.get("event") == "finished":  # (this run's start of the next may come first)
        fields["by"] = f"; attempt {event.get('attempt')}, run by {event['by']}"
    fields["where"] = f"{event.get('order')}/{event['task']}" if event.get("task") else event.get("order", "?")
    # Not the user's cancel (that is `aipm cancel`, which stops the worker): a worker wrote it; its outcome counts.
    fields["not_cancel"] = "; not an `aipm cancel`: its outcome counts" if event.get("was") == "CANCELLED" else ""
    fields.setdefault("said", event.get("was"))  # (an event of an older aipm, in a log)
    fields["again"] = f" again (its review was {event['again']})" if event.get("again") else ""
    fields["hint"] = f"; {event['hint']}" if event.get("hint") else ""
    fields["kept"] = kept_patches(event)
    fields["keeping"] = "a new file: nothing of it runs until it is fixed" if event.get("new") else \
        "keeping the last valid version"
    if event.get("event") == "finished" and not event.get("reason"):
        fields["reason"] = f"exit {event.get('exit_code')}"  # moved on by a writer that gave no reason
    if event.get("event") == "interrupted":
        fields["stopped"] = stopped_tasks(event)
        fields["why"] = event.get("why", "by signal")  # (a Ctrl-C or SIGTERM of this run says nothing more)
    if isinstance(event.get("counts"), dict):
        fields["counts"] = format_counts(event["counts"])
    return template.format_map(defaultdict(lambda: "?", fields))


def stopped_tasks(event: dict) -> str:
    """What a stop did: the tasks re-queued, and the reviews stopped whose tasks keep their work (run again later)."""
    said = [f"{what}: {', '.join(event[key])}" for key, what in (
        ("requeued", "re-queued"), ("reviews_stopped", "reviews stopped, their work kept")) if event.get(key)]
    return ("; ".join(said) or "re-queued: none") + kept_patches(event)


def kept_patches(event: dict) -> str:
    """Where the work of the worktree attempts an event stopped, re-queued or discarded is kept (its `kept`: task ->
    patch, `kept_rest`: task -> what no patch can hold): their worktrees go when their next attempts start, and
    their logs alone said where."""
    patches, rests = event.get("kept") or {}, event.get("kept_rest") or {}
    if not (patches or rests):
        return ""  # (every line of a run asks)
    from aipm.workspace.places import kept_words

    return "".join(f"; the changes of {task} are kept in {kept_words(patches.get(task), rests.get(task))}"
                   for task in {**patches, **rests})


def summary_event(order: Order, exit_code: int) -> dict:
    """The closing event of `run`: how many tasks ended in each status, and the exit code."""
    return {"event": "summary", "order": order.id, "counts": status_counts(order), "exit_code": exit_code}


class Display:
    """Receives events from the supervisor; renders them for the kind of output we have.

    Live mode prints like cargo or pip: every event becomes a line in the scrollback, above a small table of
    running tasks that Rich redraws (with its elapsed times) a few times a second and erases at the end.
    """

    def __init__(self, mode: str, view=None, out: Console | None = None):
        self.mode = mode  # "json", "plain" or "live"
        self.view = view
        self.out = out
        # Replaced, never mutated: Rich's refresh thread reads these while events arrive.
        self.running: dict[str, float] = {}
        self.headline = ""
        self.note = ""
        self.live: Live | None = None
        if mode == "live":  # rich only here: a run in a log or a pipe never imports it
            from rich.console import Console
            from rich.live import Live

            self.out = out or Console(highlight=False, soft_wrap=True)
            self._headline()
            self.live = Live(console=self.out, get_renderable=self._render, refresh_per_second=4, transient=True,
                             redirect_stdout=False, redirect_stderr=False)
            self.live.start()

    def __call__(self, event: dict) -> None:
        event.setdefault("time", round(time.time(), 6))
        order = self.view.order if self.view else None
        if order is not None:  # the run loop leaves it out where it is the run's own order
            event.setdefault("order", order.id)
        if event.get("event") == "error":  # errors reach a human whatever the output mode
            print(f"aipm: error: {event['error']}", file=sys.stderr, flush=True)
        if self.mode == "json":
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()
            return
        if self.mode == "plain":
            if event.get("event") != "error":  # on stderr already: print each error once
                sys.stdout.write(plain_line(event) + "\n")  # one write (print's line and newline were two)
                sys.stdout.flush()
            return
        kind, task = event.get("event"), event.get("task")
        if kind in ("started", "adopted") and not event.get("detached"):
            self.running = {**self.running, task: time.time()}
        elif kind == "finished":
            self.running = {k: v for k, v in self.running.items() if k != task}
        elif kind in ("deferred", "waiting"):
            self.note = plain_line(event)
        from rich.text import Text

        self._headline()
        self.live.refresh()  # the table under the new line shows the state after it, not a quarter second old
        if kind != "error":  # on stderr already: print each error once
            self.out.print(Text(plain_line(event)))

    def _headline(self) -> None:
        order: Order | None = self.view.order if self.view else None
        if order:
            self.headline = f"{order.id}: {status_summary(order)}"

    def _render(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(show_header=True, box=None)
        table.add_column("running")
        table.add_column("elapsed", justify="right")
        now = time.time()
        for task, since in sorted(self.running.items()):
            table.add_row(task, f"{now - since:.0f}s")
        parts = [Text(self.headline), table]
        if self.note:
            parts.append(Text(self.note, style="yellow"))
        return Group(*parts)

    def close(self) -> None:
        if self.live:
            self.live.stop()
            self.live = None


def mode_for(json_out: bool) -> str:
    if json_out:
        return "json"
    return "live" if sys.stdout.isatty() else "plain"
