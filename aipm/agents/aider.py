"""Aider: `aider --message-file PROMPT --yes-always --no-auto-commits ... FILES` — the targets' files are its files.

Aider runs the one message and exits. After each reply it prints a line such as
`Tokens: 7.4k sent, 1.1k cache write, 4.0k cache hit, 120 received. Cost: $0.01 message, $0.05 session.`
Token counts are rounded by aider (`2.3k`), so the totals are approximate; the cost is the highest `session`
figure (aider's own running total for this run, which only grows: a line printed after it cannot lower it).
Aider keeps no session id.

Those lines are all that aider reports, and only of its main model: the weak model's calls print nothing and are
not in the session figure (models.simple_send_with_retries). It writes commit messages, which --no-auto-commits
turns off (dirty commits with them), and summarises the chat history once it passes max_chat_history_tokens (1k to
8k), in a thread a --message run waits for at its exit: argv sets that limit past any run, as one message's run
never uses the summary.

A `--message-file` run exits 0 whatever became of its message. When aider gives up on an API error it prints
litellm's `litellm.<Name>Error: ...` and, for most, its own explanation ("The API provider has rate limited you.
..."); one it retries says `Retrying in N seconds...` after it; a full context window ends in `Model M has hit a
token limit!`. Such an ending, with no reply after it, is the attempt's error (Usage.error): it did nothing.
"""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

from aipm import agents
from aipm.agents import Attempt, count, dollars, most
from aipm.gitstatus import run_git
from aipm.project import RUNTIME_DIR
from aipm.workerfiles import append_log

PROGRAM = "aider"
RESUMES = False
REPORTS_COST = True
CAPS_COST = False  # no flag caps its spending

_NUMBER = r"(\d+(?:\.\d+)?k?)"
_TOKENS = re.compile(rf"Tokens: {_NUMBER} sent(?:, {_NUMBER} cache write)?(?:, {_NUMBER} cache (?:hit|read))?"
                     rf", {_NUMBER} received")
_COST = re.compile(r"Cost: \$(\d+(?:\.\d+)?) message, \$(\d+(?:\.\d+)?) session")
# aider/coders/base_coder.py send_message and show_exhausted_error; aider/exceptions.py for the explanations.
_API_ERROR = re.compile(r"litellm\.\w+(?:Error|Timeout)\b.*")
_EXPLAINED = re.compile(r"The API provider .*")
_RETRYING = re.compile(r"Retrying in \d+(?:\.\d+)? seconds\.\.\.")
_EXHAUSTED = re.compile(r"Model \S+ has hit a token limit!")


_NO_SUMMARY = 10**9  # tokens of chat history: no summary by the weak model, whose cost aider would not report


def argv(attempt: Attempt) -> list[str]:
    args = [PROGRAM, "--message-file", str(attempt.prompt_file), "--yes-always", "--no-auto-commits",
            # aider would otherwise add `.aider*` to .gitignore and keep its history in the project:
            # both are writes outside the targets.
            "--no-gitignore", "--chat-history-file", str(attempt.log.with_suffix(".aider.chat.md")),
            "--input-history-file", str(attempt.log.with_suffix(".aider.input")),
            "--no-pretty", "--no-stream", "--no-check-update",
            "--max-chat-history-tokens", str(_NO_SUMMARY)]
    if attempt.model_chosen:  # aipm's default (`sonnet`) would override the model configured for aider itself
        args += ["--model", attempt.model]
    # A file named like an option (`-m.txt`: aider read `-m .txt`, its message) is given as `./-m.txt`.
    return args + [f"./{name}" if name.startswith("-") else name for name in files(attempt)]


def files(attempt: Attempt) -> list[str]:
    """The targets as aider's editable files. aider takes files only (a directory among several is an error, a
    lone one the repository to work in), so directories and globs become the files they hold now: in a git work
    tree those git shows (tracked, or untracked and not ignored: not node_modules/, .venv/ or build output, each
    of which would be sent to the model), elsewhere every file."""
    out: list[str] = []
    for target in attempt.targets:
        top = attempt.root / target.path
        # A directory declared (`gen/`) that is not made yet is no file to create: aider would make an empty file
        # of its name, in the way of the directory.
        if not target.is_glob and not target.is_dir and not top.is_dir():
            out.append(target.path)  # a file, or one to create
            continue
        listed = _git_files(attempt.root, target)
        found = ([Path(p) for p in listed] if listed is not None else
                 [p.relative_to(attempt.root) for p in (attempt.root.glob(target.path) if target.is_glob
                                                        else top.rglob("*"))])
        found = [p for p in found if ".git" not in p.parts and p.parts[0] != RUNTIME_DIR
                 and (attempt.root / p).is_file()]
        if not found:
            append_log(str(attempt.log), f"aider: target {target} holds no file yet, so aider is given none for "
                                         "it (it may still create the files its reply names)")
        out += sorted(p.as_posix() for p in found)
    return list(dict.fromkeys(out))


def _git_files(root: Path, target) -> list[str] | None:
    """The files git shows under a directory or glob target, relative to the root; None outside a git work tree
    (or without git)."""
    spec = f":(glob){target.path}" if target.is_glob else (target.path or ".")
    try:
        proc = run_git(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                               "--", spec], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return [p for p in proc.stdout.decode("utf-8", "surrogateescape").split("\0") if p]


def _tokens(text: str | None) -> int | None:
    """A count as aider prints it (`120`, `2.3k`); None when there is none, or it has more digits than a float
    holds (it reads as inf, which no int is), or is past any count (agents.count)."""
    if text is None:
        return None
    n = float(text[:-1]) * 1000 if text.endswith("k") else float(text)
    return count(round(n)) if math.isfinite(n) else None


class Reading(agents.Reading):
    def read(self, line: str) -> None:
        usage = self.found
        if "Tokens: " in line and (m := _TOKENS.search(line)):
            sent, write, hit, received = (_tokens(g) for g in m.groups())
            # aider's "sent" holds the cache reads (litellm counts them into prompt_tokens) and the cache writes
            # (aider adds them); ours keep fresh input apart from cache traffic. The figures are rounded (2.3k): a
            # difference below 0 is about none.
            fresh = None if sent is None else max(0, sent - (write or 0) - (hit or 0))
            for kind, n in (("input", fresh), ("cache_write", write), ("cache_read", hit), ("output", received)):
                if n is not None:
                    usage.tokens[kind] = usage.tokens.get(kind, 0) + n
            usage.turns = (usage.turns or 0) + 1
            usage.error = None  # a reply came after it: aider went on
        text = line.strip()
        if _API_ERROR.fullmatch(text) or _EXHAUSTED.fullmatch(text) or (usage.error and _EXPLAINED.fullmatch(text)):
            usage.error = text  # aider's explanation, when it follows, says it better than litellm's class name
        elif usage.error and _RETRYING.fullmatch(text):
            usage.error = None
        if "Cost: " in line and (m := _COST.search(line)):
            # (400 digits read as inf, which JSON cannot hold)
            usage.cost_usd = most(usage.cost_usd, dollars(float(m.group(2))))
        usage.is_error = True if usage.error else None


parse = Reading.parse
