"""OpenAI Codex CLI: `codex exec --json --sandbox workspace-write ... -` with the prompt on standard input.

`--json` prints one event per line on stdout (progress goes to stderr; both land in the log):
`thread.started` names the session (`thread_id`), each `turn.completed` carries `usage` with `input_tokens`
(cached ones included), `cached_input_tokens` and `output_tokens`; `turn.failed` ends a turn that failed, its
`error.message` saying why (the attempt's error: codex exec exited 0 after it before openai/codex#4309); an
`error` event is one codex retries past (`Reconnecting... 1/5`) or one a failed turn follows: only one that no turn's
end follows is the attempt's. Before 0.44 `--json` printed codex's protocol events, `{"id", "msg": {"type": ...}}`:
`session_configured` (`session_id`), `token_count` (each response's usage; from 0.3x the session's total, in
`info.total_token_usage`), `error`, `stream_error` (retried), `task_complete`; and 0.44 itself began with
`session.created`.
That usage is the thread's total so far, not the turn's: codex reports its running total, and `exec resume`
restores the total the thread had (from its rollout). A resumed attempt's own tokens are its last total less the
one its thread reported in the attempt it resumes, which argv notes at the head of the log (BASELINE).
Codex reports no cost, so `cost_usd` stays unknown. The workspace-write sandbox lets it write inside the project
only (and no network); it cannot narrow writes to the task's targets (`confine: true` does, for every tool).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from aipm import agents
from aipm.agents import Attempt, Usage, _bounded_lines, _source, _text, count, json_lines, reported, session
from aipm.workerfiles import append_log, reading

PROGRAM = "codex"
RESUMES = True
REPORTS_COST = False  # tokens only
CAPS_COST = False


def argv(attempt: Attempt) -> list[str]:
    args = [PROGRAM, "exec", "--json", "--sandbox", "workspace-write", "--skip-git-repo-check"]
    if attempt.model_chosen:  # aipm's default model (`sonnet`) means nothing to codex
        args += ["--model", attempt.model]
    if attempt.resume:
        args += ["resume", attempt.resume]
        base = _resumed_total(attempt.log, attempt.resume)
        if base:  # in the log for people, in the meter's copy for the usage read from it
            for where in (str(attempt.log), reported(attempt.log)):
                append_log(where, f"{BASELINE} {json.dumps(base)}")
    return args + ["-"]  # read the prompt from standard input


# aipm's note of the total a resumed thread had reported: what the attempt's own totals are counted from.
BASELINE = "codex resume: the thread's usage so far"
_BASELINE = re.compile(re.escape(BASELINE) + r" (\{.*\})$")
_KEYS = ("input_tokens", "cached_input_tokens", "output_tokens")


def _resumed_total(log: Path, thread: str) -> dict[str, int]:
    """The usage total `thread` last reported, from the newest earlier attempt of this task that ran it (the
    meter's copy beside `<TASK>.<n>.log`, or that log where it ran without a meter); {} when none did."""
    task, _, serial = log.name.removesuffix(".log").rpartition(".")
    if not serial.isdigit():
        return {}
    for n in range(int(serial) - 1, 0, -1):
        try:
            # The meter's copy, as that attempt's usage: its worker may have written anything into its log.
            with reading(_source(log.with_name(f"{task}.{n}.log"))) as raw:
                found, total = _thread_total(_bounded_lines(_text(raw)))
        except OSError:
            continue
        if found == thread and total:
            return total
    return {}


def _thread_total(lines: Iterable[str]) -> tuple[str | None, dict[str, int]]:
    """The thread a log ran and the last usage total it reported (as codex reports it)."""
    thread, total = None, {}
    for event in json_lines(lines):
        if event.get("type") == "thread.started" and session(event.get("thread_id")) is not None:
            thread = event["thread_id"]
        elif event.get("type") == "turn.completed" and isinstance(event.get("usage"), dict):
            total = {k: n for k in _KEYS if (n := count(event["usage"].get(k))) is not None}
    return thread, total


class Reading(agents.Reading):
    def __init__(self) -> None:
        super().__init__()
        self.base: dict[str, int] = {}  # the thread's total when resumed (BASELINE)
        self.total: dict[str, int | None] = {}  # the thread's total so far, as codex last reported it
        self.alarm: str | None = None  # an error since the last turn ended, none codex said it retries past

    def state(self) -> tuple:
        return super().state(), tuple(self.base.items()), tuple(self.total.items()), self.alarm

    def read(self, line: str) -> None:
        usage = self.found
        if (noted := _BASELINE.search(line.rstrip("\n"))) and not line.startswith("{"):
            try:
                self.base = {k: n for k, n in json.loads(noted.group(1)).items()
                             if k in _KEYS and count(n) is not None}
            except (ValueError, RecursionError):
                pass
            return
        for event in json_lines([line]):
            if isinstance(event.get("msg"), dict):
                self._protocol_event(event["msg"])
                continue
            kind = event.get("type")
            if kind in ("thread.started", "session.created"):  # (session.created: codex 0.44's first --json)
                found = session(event.get("thread_id" if kind == "thread.started" else "session_id"))
                usage.session_id = found or usage.session_id
            elif kind in ("turn.completed", "turn.failed"):
                self._turn_ended(_turn_error(event) if kind == "turn.failed" else None)
                if isinstance(event.get("usage"), dict):  # the thread's total so far: the last one counts
                    self.total = {k: count(event["usage"].get(k)) for k in _KEYS}
            elif kind == "error":
                self._error(event.get("message"))

    def _protocol_event(self, msg: dict) -> None:
        """An event of codex's own protocol, `{"id", "msg": {...}}`: what `exec --json` printed before 0.44."""
        kind = msg.get("type")
        if kind == "session_configured":
            self.found.session_id = session(msg.get("session_id")) or self.found.session_id
        elif kind == "token_count":
            info = msg.get("info")
            if isinstance(info, dict) and isinstance(info.get("total_token_usage"), dict):  # the session's total
                self.total = {k: count(info["total_token_usage"].get(k)) for k in _KEYS}
            elif "input_tokens" in msg:  # before 0.3x's TokenUsageInfo: one model response's own usage, summed
                self.total = {k: _plus(self.total.get(k, 0), count(msg.get(k))) for k in _KEYS}
        elif kind == "task_complete":
            self._turn_ended(None)
        elif kind == "error":  # (a stream_error is one codex retries)
            self._error(msg.get("message"))

    def _turn_ended(self, error: str | None) -> None:
        """A turn's end decides: an error before it that codex retried past is no failure of the attempt."""
        self.found.turns = (self.found.turns or 0) + 1
        self.found.error, self.alarm = error, None

    def _error(self, message: object) -> None:
        text = message.strip().splitlines()[0] if isinstance(message, str) and message.strip() else "error"
        if not _RETRIED.search(text):
            self.alarm = text

    def usage(self) -> Usage:
        usage, base = super().usage(), self.base
        # An error no turn's end followed: codex stopped at it (before openai/codex#4309 exiting 0 all the same).
        usage.error = usage.error or self.alarm
        usage.is_error = usage.error is not None if usage.turns or usage.error else None
        # This attempt's own: the total less what the thread had when resumed (a figure below its base is unknown).
        own = {k: (n - base.get(k, 0) if n >= base.get(k, 0) else None) if n is not None else None
               for k, n in self.total.items()}
        given, cached, out = (own.get(k) for k in _KEYS)
        # Ours count cache reads apart from fresh input, as Claude's do.
        # (a cached count above the input's, which no real turn has, makes the input count unknown, not < 0)
        fresh = given if given is None or cached is None else given - cached if given >= cached else None
        usage.tokens = {ours: n for ours, n in (("input", fresh), ("cache_read", cached), ("output", out))
                        if n is not None}
        return usage


# What codex says of an error it retries: `Reconnecting... 1/5` (its StreamError), and before that
# `stream error: ...; retrying 1/5 in 200ms...`.
_RETRIED = re.compile(r"^Reconnecting\.\.\. \d+/\d+|retrying \d+/\d+", re.IGNORECASE)


def _plus(known: int | None, more: int | None) -> int | None:
    """A sum of counts, unknown once one of them is."""
    return None if known is None or more is None else count(known + more)


parse = Reading.parse


def _turn_error(event: dict) -> str:
    """A failed turn's error in codex's words (its `error.message`), or what it is when codex gives none."""
    error = event.get("error")
    message = error.get("message") if isinstance(error, dict) else None
    return message.strip().splitlines()[0] if isinstance(message, str) and message.strip() else "turn.failed"
