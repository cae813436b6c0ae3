"""Claude Code in print mode: `claude -p --output-format stream-json --verbose` (stream-json needs --verbose).

The prompt arrives on standard input. Every event is one JSON line in the log; the last one,
`{"type": "result", ..., "total_cost_usd", "usage", "num_turns", "session_id", "is_error"}`, carries the usage:
this run's own, since a resumed session is forked (see argv). A run prints one result, and its cost only grows:
the highest cost printed counts, so a line printed after it (by a command the agent ran) cannot lower it.

Permissions: a task with target_files gets its own `--settings` file that allows `Edit(...)` on its targets
only, denies edits to aipm's own files, and installs a PreToolUse hook (aipm.agents.guard) that denies every
Edit/Write/MultiEdit/NotebookEdit outside the targets: permission rules alone have been reported to leak.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from aipm import agents
from aipm.agents import Attempt, count, dollars, json_lines, most, session
from aipm.confine import boot_path
from aipm.paths import Target
from aipm.workerfiles import write_bytes

PROGRAM = "claude"
RESUMES = True
REPORTS_COST = True
CAPS_COST = True  # --max-budget-usd
EDIT_TOOLS = "Edit|Write|MultiEdit|NotebookEdit"
# Claude's usage keys → ours.
_TOKENS = {"input_tokens": "input", "output_tokens": "output", "cache_read_input_tokens": "cache_read",
           "cache_creation_input_tokens": "cache_write"}


def argv(attempt: Attempt) -> list[str]:
    args = [PROGRAM, "-p", "--output-format", "stream-json", "--verbose", "--model", attempt.model]
    if attempt.targets:
        args += ["--settings", str(write_settings(attempt))]
    if attempt.max_cost_usd is not None:
        args += ["--max-budget-usd", dollars_arg(attempt.max_cost_usd)]
    if attempt.resume:
        # A resumed session starts from the cost it had at its last exit (Claude Code restores it), so its result's
        # total_cost_usd, and the --max-budget-usd cap, would count the earlier attempts again: they are recorded
        # already. A fork goes on with the whole conversation under a new session id whose cost starts at 0.
        args += ["--resume", attempt.resume, "--fork-session"]
    return args


def dollars_arg(amount: float) -> str:
    """A cap as claude reads it, never rounded up: a share of an order's budget is cut to whole micro-dollars, and
    `:g` would round 1234.5678 to 1234.57."""
    return f"{amount:.6f}".rstrip("0").rstrip(".")


def _rule_path(root: Path, target: Target) -> str:
    """A target as a permission-rule path: `//` starts an absolute path; a directory covers all below it."""
    full = (root / target.path).as_posix() if target.path else root.as_posix()
    return "/" + full + ("/**" if target.is_dir else "")


# Claude Code runs the hook in the project: isolated (-I -S) and given aipm's own path, as confine.prefix boots, so
# a `json.py` or `aipm/` the agent wrote there is not imported in place of the guard's (`-m` put the project first).
_GUARD_BOOT = ("import json, sys; sys.path += json.loads(sys.argv.pop(1)); from aipm.agents.guard import main; "
               "sys.exit(main())")


def settings(attempt: Attempt, guard_file: Path) -> dict:
    """The per-attempt Claude Code settings: edit rules for the targets and the PreToolUse guard."""
    root = attempt.root
    hook = shlex.join([sys.executable, "-I", "-S", "-c", _GUARD_BOOT, json.dumps(boot_path()), str(guard_file)])
    hook += " || exit 2"  # a guard that cannot run blocks the edit: any other exit lets Claude Code go on
    return {
        "permissions": {
            "allow": [f"Edit({_rule_path(root, t)})" for t in attempt.targets],
            # Deny wins over allow in Claude Code, so these hold even if a target is drawn too wide. A directory
            # holding the task's worktree (the runtime directory) gets none: it would deny the targets too; the
            # hook guards it.
            "deny": [f"Edit(/{p.as_posix()}/**)" for p in attempt.protected
                     if not (attempt.workspace and attempt.workspace.is_relative_to(p))],
        },
        "hooks": {"PreToolUse": [{"matcher": EDIT_TOOLS,
                                  "hooks": [{"type": "command", "command": hook}]}]},
    }


def write_settings(attempt: Attempt) -> Path:
    guard_file = attempt.log.with_suffix(".guard.json")
    write_bytes(guard_file, json.dumps({
        "root": str(attempt.root), "allow": [str(t) for t in attempt.targets],
        "deny": [str(p) for p in attempt.protected],
        "workspace": str(attempt.workspace) if attempt.workspace else None,
    }, indent=2).encode() + b"\n")
    path = attempt.log.with_suffix(".claude-settings.json")
    write_bytes(path, json.dumps(settings(attempt, guard_file), indent=2).encode() + b"\n")
    return path


class Reading(agents.Reading):
    def read(self, line: str) -> None:
        usage = self.found
        for event in json_lines([line]):
            usage.began = True
            if (found := session(event.get("session_id"))) is not None:
                usage.session_id = found  # known from the first event, even if the run dies
            if event.get("type") != "result":
                continue
            usage.cost_usd = most(usage.cost_usd, dollars(event.get("total_cost_usd")))
            reported = event.get("usage") if isinstance(event.get("usage"), dict) else {}
            usage.tokens = {ours: n for theirs, ours in _TOKENS.items()
                            if (n := count(reported.get(theirs))) is not None}
            usage.turns = count(event.get("num_turns"))
            usage.is_error = event.get("is_error") if isinstance(event.get("is_error"), bool) else None
            if isinstance(event.get("subtype"), str) and event["subtype"].startswith("error"):
                usage.is_error = True  # error_max_turns has been seen with is_error false: the run did not finish
            usage.error = _error(event) if usage.is_error else None
            usage.at_cap = usage.is_error is True and event.get("subtype") == "error_max_budget_usd"


parse = Reading.parse


def _error(result: dict) -> str:
    """An error result in a few words: its subtype (error_max_turns, error_max_budget_usd, ...), or, for an API
    error that claude reports as subtype "success" with is_error (and exit 0), the first line of its text."""
    subtype, text = result.get("subtype"), result.get("result")
    if subtype == "error_max_budget_usd":  # the word alone read as the agent's fault, not aipm's cap
        return f"{subtype}: it spent the cap aipm gave this attempt (--max-budget-usd), what the budget left it"
    if isinstance(subtype, str) and subtype and subtype != "success":
        return subtype
    if isinstance(text, str) and text.strip():
        return text.strip().splitlines()[0]
    return "is_error"
