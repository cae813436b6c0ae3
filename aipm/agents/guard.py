"""The PreToolUse hook of the claude preset: deny any file edit outside the task's target files.

Claude Code runs it before each Edit/Write/MultiEdit/NotebookEdit with the tool call as JSON on standard input
(`tool_name`, `tool_input.file_path` or `notebook_path`, `cwd`). It answers on standard output with
`{"hookSpecificOutput": {"hookEventName": "PreToolUse", "permissionDecision": "deny", ...}}` to refuse, and
nothing to let the call go on to Claude's own permission rules. It fails closed: a call it cannot decide on
(unreadable, or odd: a path with a NUL byte) is denied.

Usage: `python -m aipm.agents.guard GUARD_JSON` — the file the preset wrote: {"root", "allow", "deny", "workspace"}
(`workspace`: the task's worktree, editable although it lies in a denied directory, the runtime directory).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from aipm.paths import PathError, normalize, overlaps

EDIT_TOOLS = frozenset({"Edit", "Write", "MultiEdit", "NotebookEdit"})


def verdict(call: Any, rules: dict) -> str | None:
    """Why this tool call must be denied, or None when it may go on."""
    if not isinstance(call, dict):
        return "aipm guard: unreadable tool call; denied"
    tool_input = call.get("tool_input") if isinstance(call.get("tool_input"), dict) else {}
    if call.get("tool_name") not in EDIT_TOOLS:
        return None
    raw = tool_input.get("file_path") or tool_input.get("notebook_path")
    if not isinstance(raw, str) or not raw:
        return "aipm guard: the edit names no file; denied"
    root = os.path.realpath(rules["root"])
    # realpath: a symlink inside a target must not lead the edit elsewhere.
    full = os.path.realpath(os.path.join(call.get("cwd") or root, raw))
    own = rules.get("workspace") and os.path.realpath(rules["workspace"])  # the task's worktree, in .aipm/
    for protected in rules.get("deny", ()):
        protected = os.path.realpath(protected)
        if _within(full, protected) and not (own and _within(own, protected) and _within(full, own)):
            return f"{raw} belongs to aipm ({protected}); a task never edits it"
    rel = os.path.relpath(full, root)
    if rel == ".." or rel.startswith(".." + os.sep):
        where = "this task's worktree" if own else "the project"
        return f"{raw} is outside {where} ({root})"
    try:
        wanted = normalize(rel)
        if any(overlaps(wanted, normalize(t)) for t in rules["allow"]):
            return None
    except PathError:
        pass
    return (f"{rel} is not among this task's target_files ({', '.join(rules['allow'])}); "
            "edit only those files")


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top + os.sep)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        with open(args[0], encoding="utf-8") as handle:
            rules = json.load(handle)
        call = json.loads(sys.stdin.read() or "null")
        reason = verdict(call, rules)
    except Exception as exc:  # a hook that dies (exit 1) is a non-blocking error: the edit would go on
        reason = f"aipm guard cannot decide ({type(exc).__name__}: {exc}); denied"
    if reason is not None:
        print(json.dumps({"hookSpecificOutput": {"hookEventName": "PreToolUse", "permissionDecision": "deny",
                                                 "permissionDecisionReason": reason}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
