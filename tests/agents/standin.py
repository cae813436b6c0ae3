"""Shared parts of the stand-in agent CLIs (`claude`, `codex`, `aider` here): prompt directives and a journal.

The stand-ins print what the real CLIs print (see fixtures/agents/) and do only what a prompt tells them.
Directives, one per line anywhere in the prompt:

    @cost 0.10               report this cost in US dollars (`@cost none`: report none); claude stops at its
                             --max-budget-usd instead, reporting that much, with an error
    @overshoot 0.05          claude: stopped at its --max-budget-usd, report this much more than it (the turn in
                             flight, which Claude Code finishes before it stops)
    @tokens IN OUT CR CW     report these token counts (input, output, cache read, cache write)
    @fail                    end the run with an error (exit 1)
    @fail-attempt N          ... only when AIPM_ATTEMPT is N
    @api-error TEXT          claude: end as Claude Code does on an API error (a rate limit): a result of subtype
                             "success" with is_error true and TEXT as its result, no tokens, and exit 0;
                             aider: print what aider prints when it gives up on its message, and exit 0 as it
                             does, TEXT being `auth`, `rate-limit` (retried until aider gives up) or `context`;
                             codex: fail its turn with TEXT as its error (turn.failed), and exit 0
    @write PATH TEXT         write TEXT to PATH, through the agent's own permission checks
    @wait-for PATH           wait until PATH exists before finishing (claude: before its result; aider: after its
                             report)
    @linger                  claude: after its result, stay alive until killed (the cost is reported already)
    @leave-behind PATH       claude: after its result, start a process that keeps its standard output open until
                             PATH exists, and exit
    @fake-result             claude: after its result, print another that cost nothing, as a command it ran could
    @rewrite-log             claude: after its result, truncate its standard output and rewrite its log ($AIPM_LOG)
                             with a result that cost nothing, as a command the agent ran could
    @session "ID"            claude, codex: report this session id, a JSON string (escapes such as \ud800 kept)
    @refuse                  claude: exit 1 before any event, refusing its command line (an older Claude Code)
    @hang                    claude: hang before any event until killed (a start stuck on an MCP server)
    @stop-parent             claude: before its result, stop its parent (`kill -STOP $PPID`, as a command may)
    @kill-meter              claude: once its result is in its log, SIGKILL the meter that reads its output
    @tamper-copy HOW         claude: after its result (and @rewrite-log), remove the meter's copy of it (`delete`)
                             or put one there that cost nothing (`forge`), as an unconfined command could

With FAKE_AGENT_JOURNAL set, each run appends one JSON line {"agent", "argv", "prompt", "attempt", "task",
"targets"} (targets: AIPM_TARGET_FILES).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


@dataclass
class Directives:
    cost: float | None = 0.001
    tokens: tuple[int, int, int, int] = (10, 5, 0, 0)
    fail: bool = False
    writes: list[tuple[str, str]] = field(default_factory=list)
    gate: str | None = None
    shell: str | None = None  # a command the agent runs before it waits at the gate (`sh -c`)
    api_error: str | None = None
    linger: bool = False
    rewrite_log: bool = False
    fake_result: bool = False
    leave_behind: str | None = None
    session: str | None = None
    refuse: bool = False
    hang: bool = False
    stop_parent: bool = False
    kill_meter: bool = False
    tamper_copy: str | None = None
    overshoot: float = 0.0


# Directives that are a switch, or take the rest of their line as it is: the field of Directives each sets.
SWITCHES = {"@fail": "fail", "@refuse": "refuse", "@hang": "hang", "@stop-parent": "stop_parent",
            "@kill-meter": "kill_meter", "@linger": "linger", "@rewrite-log": "rewrite_log",
            "@fake-result": "fake_result"}
WORDS = {"@api-error": "api_error", "@tamper-copy": "tamper_copy", "@leave-behind": "leave_behind",
         "@wait-for": "gate", "@shell": "shell"}


def directives(prompt: str) -> Directives:
    d = Directives()
    for line in prompt.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word in SWITCHES:
            setattr(d, SWITCHES[word], True)
        elif word in WORDS:
            setattr(d, WORDS[word], rest.strip())
        elif word == "@cost":
            d.cost = None if rest.strip() == "none" else float(rest)
        elif word == "@overshoot":
            d.overshoot = float(rest)
        elif word == "@tokens":
            d.tokens = tuple(int(n) for n in rest.split())
        elif word == "@fail-attempt":
            d.fail = d.fail or rest.strip() == os.environ.get("AIPM_ATTEMPT")
        elif word == "@session":
            d.session = json.loads(rest)
        elif word == "@write":
            path, _, text = rest.partition(" ")
            d.writes.append((path, text))
    return d


def journal(agent: str, argv: list[str], prompt: str) -> None:
    path = os.environ.get("FAKE_AGENT_JOURNAL")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"agent": agent, "argv": argv, "prompt": prompt,
                                     "attempt": os.environ.get("AIPM_ATTEMPT"),
                                     "task": os.environ.get("AIPM_TASK_ID"),
                                     "targets": os.environ.get("AIPM_TARGET_FILES")}) + "\n")


def options(argv: list[str], with_values: set[str]) -> tuple[dict[str, str | bool], list[str]]:
    """`--flag value` and `--switch` options, and the positional arguments, in the order given."""
    opts: dict[str, str | bool] = {}
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in with_values:
            opts[arg] = next(args)
        elif arg.startswith("-") and arg != "-":
            opts[arg] = True
        else:
            rest.append(arg)
    return opts, rest


def emit(event: dict) -> None:
    print(json.dumps(event), flush=True)
