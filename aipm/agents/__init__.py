"""Agent presets: how each agent CLI is started, which permission files it gets, and how its usage is read.

One small module per preset (`claude`, `codex`, `aider`); `command` is the project's own worker template.
The worker module picks one by name; nothing outside this package knows what a preset does.

Usage is read after an attempt from what the agent printed: a preset parses the structured lines it knows and
ignores everything else; its owner reads it before taking the launch lock (see read_ahead). The lines that carry
usage are read from the meter's copy (aipm.meter), which the worker cannot rewrite as it can its log; from the log
only for an attempt that ran without one. What the agent did not report stays unknown (None, or a missing token
kind), never 0.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from importlib import import_module
from pathlib import Path
from typing import Any, NamedTuple

from aipm.paths import Target
from aipm.workerfiles import append_log, read_end, read_since, reading, write_bytes

COMMAND = "command"  # not a preset: the worker.command template (or the task's own command)
NAMES = (COMMAND, "claude", "codex", "aider")
TOKEN_KINDS = ("input", "output", "cache_read", "cache_write")


@dataclass(frozen=True)
class Attempt:
    """What a preset needs to build one attempt's command line."""

    root: Path  # where the agent works: the project root, or its copy in the task's worktree
    prompt_file: Path
    log: Path  # the attempt's log; per-attempt files go beside it: log.with_suffix(".<what>")
    model: str
    model_chosen: bool  # False when `model` is only aipm's default (`sonnet`, a Claude alias)
    targets: tuple[Target, ...]
    protected: tuple[Path, ...]  # directories no agent may edit: the runtime directory, the order directory
    max_cost_usd: float | None = None  # the attempt's cap: the task's own, or its share of the order's budget
    resume: str | None = None  # the agent's session to continue (retry --resume)
    workspace: Path | None = None  # the task's git worktree: inside the runtime directory, yet the agent's to edit


@dataclass
class Usage:
    """What one attempt cost, as the agent reported it."""

    cost_usd: float | None = None
    tokens: dict[str, int] = field(default_factory=dict)  # only the kinds the agent reported
    session_id: str | None = None
    turns: int | None = None
    is_error: bool | None = None
    # The error the agent's final report names (claude: its result's subtype, or the result's text when that
    # subtype says success), when that report is an error: the attempt failed, whatever the exit code.
    error: str | None = None
    # The agent stopped because it spent the cap aipm gave it (claude: error_max_budget_usd): the budget's doing.
    at_cap: bool = False
    # An event of the agent's was read (claude prints its first before it asks the model anything): a capped attempt
    # that exited with none spent nothing. Not its session id: one that cannot be recorded still began a session.
    began: bool = False


class Reading:
    """A preset's reading of an agent's output, one line at a time: its parse() is read() over every line. The meter
    (aipm.meter) weighs each line as it comes in the time that line takes to read; re-parsing all it had kept for
    every new line was quadratic (a codex run of 10,200 lines: 4.9 s of CPU)."""

    def __init__(self) -> None:
        self.found = Usage()

    def read(self, line: str) -> None:
        raise NotImplementedError

    def state(self) -> tuple:
        """All that read() keeps (a preset keeping more adds it): a line after which it is the same changes nothing
        that any later line is read as, so the meter's copy may leave it out."""
        u = self.found
        return u.cost_usd, tuple(u.tokens.items()), u.session_id, u.turns, u.is_error, u.error, u.at_cap, u.began

    def usage(self) -> Usage:
        return replace(self.found, tokens=dict(self.found.tokens))

    @classmethod
    def parse(cls, lines: Any) -> Usage:
        reading = cls()
        for line in lines:
            reading.read(line)
        return reading.usage()


def preset(name: str) -> Any:
    return import_module(f"aipm.agents.{name}")


def is_preset(name: str) -> bool:
    return name != COMMAND


def program(name: str) -> str:
    return preset(name).PROGRAM


def can_resume(name: str) -> bool:
    return is_preset(name) and preset(name).RESUMES


def reports_cost(name: str) -> bool:
    """Whether the agent's output says what an attempt cost (what an order's budget counts)."""
    return is_preset(name) and preset(name).REPORTS_COST


def caps_cost(name: str) -> bool:
    """Whether the agent's CLI takes a spending cap per attempt (Attempt.max_cost_usd)."""
    return is_preset(name) and preset(name).CAPS_COST


def command_line(name: str, attempt: Attempt) -> list[str]:
    """The preset's argv for this attempt; writes the permission files it refers to."""
    return preset(name).argv(attempt)


class _Read(NamedTuple):
    """A log as its read-ahead found it: the file (device, inode), how far it was read, and its usage."""

    dev: int
    ino: int
    end: int
    usage: Usage


# The logs of ended attempts read ahead by their owner (read_ahead), by path, until their record is removed.
_ahead: dict[str, _Read] = {}


def read_ahead(name: str, log: str | Path, metered: bool = False) -> None:
    """Parse an ended attempt's log before its owner takes the launch lock for the outcome: a transcript of a
    gigabyte takes seconds to read, and every other aipm command of the project would wait for them. read_usage,
    under the lock, then reads only what was added since (as a rule aipm's own lines)."""
    if is_preset(name) and _key(log) not in _ahead and (read := _read(name, Path(log), metered)) is not None:
        _ahead[_key(log)] = read


def forget(log: str | Path) -> None:
    """The attempt is over (its record removed): its read-ahead goes."""
    _ahead.pop(_key(log), None)


def _key(log: str | Path) -> str:
    """One key for a log however its path is spelt (a record's text, or a Path made of it)."""
    return os.path.normpath(log)


def reported(log: str | Path) -> str:
    """The meter's copy of the lines of the attempt's output that carry its usage (`<TASK>.<attempt>.reported`)."""
    return str(Path(log).with_suffix(".reported"))


def _source(log: Path, metered: bool = False) -> Path:
    """Where the attempt's usage is read: the meter's copy, or the log of an attempt that ran without a meter (one
    that did, `metered`, never the log: whoever removed the copy may have rewritten the log too)."""
    copy = Path(reported(log))
    return copy if metered or copy.exists() else log


# The usage of a metered attempt whose copy is gone or was changed under the meter (which then removes it): an agent
# or a command of its deleted or rewrote it, and the log, the worker's to write, is no account of what it cost.
LOST = ("its usage report is lost: the meter's copy of it was removed or changed while the attempt ran (see its log), "
        "so what the attempt cost is unknown")


def read_usage(name: str, log: Path, metered: bool = False) -> Usage | None:
    """The attempt's usage from the meter's copy, else its log: its read-ahead's, unless usage was added since;
    None for `command`; a LOST error for a `metered` attempt whose copy cannot be read. Kept beside the log too
    (`<TASK>.<attempt>.usage.json`)."""
    if not is_preset(name):
        return None
    ahead = _ahead.get(_key(log))
    if ahead is not None and _nothing_added(name, log, ahead, metered):
        return ahead.usage
    read = _read(name, log, metered)
    if read is not None and ahead is not None:
        _ahead[_key(log)] = read  # an outcome held and retried reads only what follows
    return read.usage if read is not None else None


def _read(name: str, log: Path, metered: bool) -> _Read | None:
    try:
        with reading(_source(log, metered)) as raw:
            found, text = os.fstat(raw.fileno()), _text(raw)
            usage = preset(name).parse(_bounded_lines(text))
            read = _Read(found.st_dev, found.st_ino, text.buffer.tell(), usage)  # the end it read to
    except OSError:
        if not metered:
            return None
        usage = Usage(is_error=True, error=LOST)
        read = _Read(0, 0, -1, usage)  # (no file to be the one read ahead: read again)
    try:
        write_bytes(log.with_suffix(".usage.json"), (json.dumps({"agent": name, **asdict(usage)}) + "\n").encode())
    except OSError:
        pass  # the task file gets the figures anyway; this copy is for people reading .aipm/
    return read


def _nothing_added(name: str, log: Path, ahead: _Read, metered: bool) -> bool:
    """Whether the log is the one read ahead and what was written to it since holds no usage of the agent's."""
    try:
        with reading(_source(log, metered)) as raw:
            found = os.fstat(raw.fileno())
            if (found.st_dev, found.st_ino) != (ahead.dev, ahead.ino) or found.st_size < ahead.end:
                return False  # replaced or cut: read whole
            raw.seek(ahead.end)
            return preset(name).parse(_bounded_lines(_text(raw))) == Usage()
    except OSError:
        return False


def _text(raw: Any) -> io.TextIOWrapper:
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")


LONGEST = 16 << 20  # characters: an agent's event is far shorter; a worker's stray output may be one endless line


def _bounded_lines(handle: Any) -> Iterator[str]:
    """The log's lines; one longer than LONGEST is passed over, never held whole (a line of gigabytes, held and
    decoded, took twice its size of the owner's memory)."""
    while line := handle.readline(LONGEST):
        if len(line) == LONGEST and not line.endswith("\n"):
            while (rest := handle.readline(LONGEST)) and not rest.endswith("\n"):
                pass
            continue
        yield line


def settle(name: str, log: Path, cost_usd: float | None, tokens: dict[str, int] | None,
           cap: float | None = None, unreported: float | None = None, exited: bool = False, metered: bool = False
           ) -> tuple[Usage | None, dict]:
    """An ended attempt's usage, however it ended: read as read_usage reads it, summed up in its log in a `usage:` line,
    and as updates of the task's totals (`cost_usd`, `tokens`, `unreported`: the task's before the attempt). An attempt
    that ran with a cap (`cap`, its record's cost_cap) and reported no cost (killed before its final report, or a
    report without it) may have spent up to it: the cap is added to the task's `cost_unreported_usd`, never to its
    cost. Not so for one that exited
    by itself (`exited`: no timeout, no signal) with no event of its agent in its log: it never began a session (it
    refused its command line), and claude prints its first event, which names the session, before it asks the model
    anything. One killed counts its cap even so: what it did before it was stopped is unseen. `metered`: its output
    went through the meter (Record.metered), so its usage is read from the meter's copy only."""
    usage = read_usage(name, log, metered)
    if usage is None and not (is_preset(name) and cap):
        return None, {}
    if usage is None:  # a capped agent's log that cannot be read: its cost is unknown like any unreported one
        usage = Usage()
    elif exited and usage.session_id is None and not usage.began and usage.error != LOST:
        cap = None  # it spent nothing
    cost = "unknown" if usage.cost_usd is None else f"${usage.cost_usd:.4f}"
    if usage.cost_usd is None and cap:
        cost += f" (up to its cap ${cap:.4f}, counted against the budget as not reported)"
    kinds = ", ".join(f"{k} {n}" for k, n in usage.tokens.items()) or "unknown"
    # (the session named with its agent: a `retry --resume` after the task's agent changed must not pass it on)
    made = f"session {usage.session_id} of {name}" if usage.session_id else "session unknown"
    append_log(str(log), f"usage: cost {cost}; tokens {kinds}; {made}")
    updates = task_updates(cost_usd, tokens, usage)
    if usage.cost_usd is None and cap:
        total = round((unreported or 0.0) + cap, 6)
        if total < MAX_DOLLARS:  # (what a task file may hold: fields.money_field)
            updates["cost_unreported_usd"] = total
    return usage, updates


REVIEW_TAIL = 1 << 20  # bytes of a review's output read for its cost: where an agent's final report is


def session_agent(logs: Iterator[Path], session_id: str) -> str | None:
    """The agent whose session `session_id` is, as the newest of the task's `logs` (newest first) that names it says
    in its `usage:` line; None when none does (removed, or written by an aipm that did not name it)."""
    mark = f"; session {session_id} of ".encode(errors="surrogateescape")
    for log in logs:
        try:
            tail = read_end(log, 64 << 10)  # (its usage line is among its last: only aipm's lines follow it)
        except OSError:
            continue
        at = tail.rfind(mark)
        if at >= 0:
            name = tail[at + len(mark):].split(b"\n", 1)[0].decode(errors="replace")
            return name if name in NAMES else None
    return None


def review_usage(log: Path, start: int = 0) -> tuple[Usage | None, int]:
    """What a review command that runs an agent reported, read from the end of its output (`log`) as each preset
    that reports a cost reads its own: claude's result event (`--output-format json` or `stream-json`), aider's
    cost lines; else the session a claude (stream-json) began and did not report the cost of (killed before its
    result). None for a reviewer that says neither (most commands; claude's text output). Only the end: it is read
    under the launch lock, and a reviewer running a test suite may print gigabytes. Only what follows `start` (the
    output of reviewers counted before: a review stopped, then run again, appends to the log), and the offset read
    to, from which the next reviewer's is read."""
    try:
        data, end = read_since(log, start, REVIEW_TAIL)
    except OSError:
        return None, start  # none, or the worker replaced it with what is not a file
    lines = data.decode(errors="replace").splitlines(keepends=True)
    read = [preset(name).parse(iter(lines)) for name in NAMES if reports_cost(name)]
    return next((u for u in read if u.cost_usd is not None), next((u for u in read if u.session_id), None)), end


def stopped_at_cap(usage: Usage | None, cap: float | None) -> bool:
    """Whether the attempt ended because it spent the cap aipm gave it (`cap`: its record's cost_cap), by its
    agent's word and by the cost it reported: one that says so and spent less (nothing) is no budget's doing, and
    run again for nothing it would run again forever."""
    return (usage is not None and usage.at_cap and cap is not None and usage.cost_usd is not None
            and round(usage.cost_usd - cap, 6) >= 0)


def failure(usage: Usage | None) -> str | None:
    """What the agent's own final report says went wrong, if it says so: claude exits 0 on an API error (a rate
    limit) with `is_error` in its result, aider after one it gave up on, and the attempt, which did nothing, must
    not count as done."""
    return usage.error if usage is not None else None


def task_updates(cost_usd: float | None, tokens: dict[str, int] | None, usage: Usage | None) -> dict[str, Any]:
    """Managed-field updates adding one attempt's usage to the task's totals (nothing for unknown usage)."""
    if usage is None:
        return {}
    updates: dict[str, Any] = {}
    if usage.cost_usd is not None:
        total = round((cost_usd or 0.0) + usage.cost_usd, 6)
        if total < MAX_DOLLARS:  # a total a task file may not hold must not keep the outcome from being written
            updates["cost_usd"] = total
    if usage.tokens:
        total = dict(tokens or {})
        for kind, count in usage.tokens.items():
            total[kind] = total.get(kind, 0) + count
        updates["tokens"] = {k: total[k] for k in TOKEN_KINDS if k in total}
    if usage.session_id:
        updates["session_id"] = usage.session_id
    return updates


def json_lines(lines: Any) -> Any:
    """The JSON objects among a log's lines (agent events); aipm's own lines and stray text are skipped. A control
    character in a string (a raw NUL in a session id) is taken, not the whole event dropped with its cost: each
    field is checked on its own (session, dollars, count)."""
    for line in lines:
        if line.startswith("{"):
            try:
                event = json.loads(line, strict=False)
            except (ValueError, RecursionError):  # (nested deeper than Python's stack: [[[[…]]]])
                continue
            if isinstance(event, dict):
                yield event


# Far above any attempt's tokens, and low enough that totals of such counts stay writable: Python writes no int
# of more than 4300 digits as text, and JSON may hold one of 4300.
MAX_TOKENS = 10**15


def count(value: Any) -> int | None:
    """A token count from an agent's output, or None when it is not a whole number ≥ 0 below MAX_TOKENS."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_TOKENS else None


SESSION_MAX = 256  # characters: a session id is a UUID (36); one of megabytes would be an argv no exec takes


def session(value: Any) -> str | None:
    """A session id from an agent's JSON (a UUID), or None unless it is printable text: JSON may spell a lone
    surrogate (`\\ud800`), which neither the log nor the task file can hold. It is passed back on the agent's command
    line (`--resume ID`, codex's `resume ID`), so none that begins with "-" (an option there) or is overlong."""
    return (value if isinstance(value, str) and 0 < len(value) <= SESSION_MAX and value.isprintable()
            and not value.startswith("-") else None)


def most(known: float | None, reported: float | None) -> float | None:
    """A running total as reported so far: the highest figure, since the real one only grows; a report that says
    less or none (a line a command of the agent's printed) takes nothing away."""
    return max((c for c in (known, reported) if c is not None), default=None)


# Far above any real cost, and low enough that sums of such costs stay finite and writable.
MAX_DOLLARS = 1e12
# The least budget or cap: budgets are shared out in whole micro-dollars, and claude is given a cap with six
# decimals (0.0000004 was `--max-budget-usd 0`).
MIN_DOLLARS = 1e-6


def dollars(value: Any) -> float | None:
    """A cost from an agent's JSON, or None when it is no finite amount ≥ 0 (JSON may say Infinity, or 1e400)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < MAX_DOLLARS:
        return float(value)
    return None
