"""OpenAI Codex CLI: `codex exec --json --sandbox workspace-write ... -` with the prompt on standard input.

`--json` prints one event per line on stdout (progress goes to stderr; both land in the log):
`thread.started` names the session (`thread_id`), each `turn.completed` carries `usage` with `input_tokens`
(cached ones included), `cached_input_tokens` and `output_tokens`; `turn.failed` and `error` report failures.
Codex reports no cost, so `cost_usd` stays unknown. The workspace-write sandbox lets it write inside the project
only (and no network); it cannot narrow writes to the task's targets (`confine: true` does, for every tool).
"""

from __future__ import annotations

from collections.abc import Iterable

from aipm.agents import Attempt, Usage, count, json_lines

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
    return args + ["-"]  # read the prompt from standard input


def parse(lines: Iterable[str]) -> Usage:
    usage = Usage()
    tokens: dict[str, int] = {}
    for event in json_lines(lines):
        kind = event.get("type")
        if kind == "thread.started" and isinstance(event.get("thread_id"), str):
            usage.session_id = event["thread_id"]
        elif kind in ("turn.completed", "turn.failed"):
            usage.turns = (usage.turns or 0) + 1
            usage.is_error = usage.is_error or kind == "turn.failed"
            reported = event.get("usage") if isinstance(event.get("usage"), dict) else {}
            given, cached, out = (count(reported.get(k)) for k in ("input_tokens", "cached_input_tokens",
                                                                    "output_tokens"))
            # Ours count cache reads apart from fresh input, as Claude's do.
            # (a cached count above the input's, which no real turn has, makes the input count unknown, not < 0)
            fresh = given if given is None or cached is None else given - cached if given >= cached else None
            for ours, n in (("input", fresh),
                            ("cache_read", cached), ("output", out)):
                if n is not None:
                    tokens[ours] = tokens.get(ours, 0) + n
        elif kind == "error":
            usage.is_error = True
    usage.tokens = tokens
    return usage
