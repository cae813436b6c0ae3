"""JSON Schema (draft 2020-12) for task files and order.yaml, for editors and other tools.

Generated from the validator's own lists (fields.TASK_KEYS, store.ORDER_KEYS, model.Status, model.Priority,
model.MANAGED_FIELDS), so a key or status added there appears here, and a key without a description here fails
loudly rather than silently dropping out of the schema. The schema is advisory: `aipm validate` stays the
authority (it also checks what JSON Schema cannot say: the id matches the file name, dependencies exist, no
cycles, target files stay inside the project).

The package ships the generated files in aipm/schemas/ so that `# yaml-language-server: $schema=...` lines
can point at them; `python -m aipm.schema` rewrites them after a change.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from aipm import agents
from aipm.model import ID_PATTERN, MANAGED_FIELDS, Priority, Status
from aipm.fields import MAX_COUNT, MAX_TALLY, MAX_TIMEOUT, RAY_SHARE, TASK_KEYS
from aipm.store import ORDER_KEYS

DIALECT = "https://json-schema.org/draft/2020-12/schema"
SHIPPED_DIR = Path(__file__).resolve().parent / "schemas"
KINDS = ("task", "order")

# The loader treats an empty value (`key:`) as absent, so every key also accepts null.
_STRING = {"type": ["string", "null"]}
_STRINGS = {"type": ["array", "null"], "items": {"type": "string"}}
# Strings that reach a command line hold no NUL byte (fields.NUL_WORD); a word is not blank either.
_NO_NUL = r"^[^\x00]*$"
_WORD = r"^[^\x00]*[^\s\x00][^\x00]*$"
# A string runs through /bin/sh -c (not blank); a list is argv and must name a program.
_COMMAND = {"type": ["string", "array", "null"], "pattern": _WORD, "items": {"type": "string", "pattern": _NO_NUL},
            "prefixItems": [{"type": "string", "minLength": 1, "pattern": _NO_NUL}], "minItems": 1}
_SETUP = {**_COMMAND, "pattern": f"^$|{_WORD}"}  # "" for none
# fields.one_line: one line by Python's splitlines() (its breaks: _BREAKS), after the final "\n"s (`>` gives one)
# are dropped; so at most one other break, as the last character before them.
_BREAKS = r"\n\r\v\f\x1c-\x1e\x85\u2028\u2029"
_LINE = {"type": ["string", "null"], "pattern": rf"^[^{_BREAKS}]*[{_BREAKS[2:]}]?\n*$"}
_NAME = {"type": ["string", "null"], "pattern": _WORD}
# a path: not blank, and no line break (a worker's AIPM_TARGET_FILES is one per line) or NUL (fields.task_from_mapping),
# nor a backslash (paths.normalize)
_PATHS = {"type": ["array", "null"],
          "items": {"type": "string", "pattern": r"^[^\n\r\x00\\]*[^\s\x00\\][^\n\r\x00\\]*$"}}
_ID = f"^{ID_PATTERN.pattern}$"
# a budget or cap: fields.money_field
_BUDGET = {"type": ["number", "null"], "minimum": agents.MIN_DOLLARS, "exclusiveMaximum": agents.MAX_DOLLARS}
# 0 (none) or at least Ray's smallest share
_SHARE = {"type": "number", "minimum": 0, "not": {"exclusiveMinimum": 0, "exclusiveMaximum": RAY_SHARE}}
_GPUS = {**_SHARE, "if": {"exclusiveMinimum": 1}, "then": {"multipleOf": 1}}  # whole above one, as Ray has them
_RELATIVE = r"^(?!/)(?!(?:.*/)?\.\.(?:/|$))\S"  # inside the project: not absolute, no `..`
_POSITIVE = {"type": ["integer", "null"], "minimum": 1}
_COUNT = {"type": ["integer", "null"], "minimum": 0}

# Why each key exists, in the words of the contract; the type rules mirror fields.task_from_mapping.
_TASK_FIELDS: dict[str, tuple[dict[str, Any], str]] = {
    # Unlike the other keys, an empty `id:` is an error (it would not equal the file name).
    "id": ({"type": ["string", "null"], "pattern": _ID}, "Optional (empty: absent); when present it must equal the file name without .yaml."),
    "title": (_LINE, "One line saying what the task does."),
    "status": ({"type": ["string", "null"], "enum": [s.value for s in Status] + [None], "default": "QUEUED"},
               "Where the task stands; default QUEUED."),
    "priority": ({"type": ["string", "null"], "enum": [p.value for p in Priority] + [None], "default": "P1"},
                 "P0 (most urgent) .. P3; default P1."),
    "depends_on": ({**_STRINGS, "uniqueItems": True, "default": []},
                   "Ids of tasks in the same order that must be DONE or COMPLETED first."),
    "target_files": ({**_PATHS, "default": []},
                     "Files the task may edit: a file, a directory (everything below it) or a glob. "
                     "Tasks whose target files overlap never run at the same time."),
    "command": (_COMMAND, "What the worker runs: a string (run by /bin/sh -c) or a list (argv, no shell). "
                          "Without it the project's worker template (worker.command in aipm.yaml) runs."),
    "prompt": (_STRING, "Text for an agent worker, given on standard input (not blank in a task without command)."),
    "model": (_NAME, "Model name passed to the worker template as {model}."),
    "review": (_SETUP, "Review command: exit 0 approves (COMPLETED), non-zero sends the task to REWORK; default "
                       "review.command; \"\" for none."),
    "timeout": ({"type": ["integer", "string", "null"], "minimum": 1, "maximum": MAX_TIMEOUT,
                 "pattern": "^[Nn][Oo][Nn][Ee]$"},
                "Seconds before the worker's whole process group is killed; none: no limit, whatever aipm.yaml's "
                "timeout says."),
    "max_attempts": ({**_POSITIVE, "maximum": MAX_COUNT}, "Tries: a failed or timed-out attempt is retried until this many have run "
                                "(attempts a review sent back are reworks and do not count)."),
    "attempts": ({**_COUNT, "maximum": MAX_TALLY}, "Attempts started so far."),
    "reworks": ({**_COUNT, "maximum": MAX_TALLY}, "Times a review sent the task back for another attempt "
                "(at most max_rework)."),
    "started_at": (_STRING, "When the latest attempt started."),
    "finished_at": (_STRING, "When the latest attempt or review ended."),
    "exit_code": ({"type": ["integer", "null"]}, "Exit code of the latest attempt."),
    "resources": ({"type": ["object", "null"], "additionalProperties": False, "properties": {
        "cpus": _SHARE,
        "memory_mb": {"type": "integer", "minimum": 0},
        "gpus": _GPUS,
    }}, "What one attempt needs: the Ray resource request with --runner ray; on this machine, a share of its "
        "CPUs and memory. 0 asks for none (cpus: 0 also with Ray, where a task without cpus asks for 1)."),
    "max_rework": ({**_COUNT, "maximum": MAX_COUNT}, "Times a review may send the task back before it is REJECTED; default max_rework."),
    "reason": (_STRING, "Why the latest attempt ended as it did: 'exit 3', 'timed out after 60 s', "
                        "'review rejected: ...', 'scope: wrote ...', 'cancelled', 'interrupted: ...'."),
    "agent": ({"type": ["string", "null"], "enum": [*agents.NAMES, None]},
              "Agent preset for a task without `command`: its command line, permission rules and usage "
              "parsing. Default: the worker.agent setting."),
    "max_cost_usd": (_BUDGET,
                     "The task's budget in US dollars over all its attempts: each attempt of an agent whose CLI "
                     "takes a cap (claude --max-budget-usd) may spend what the earlier ones left, and none starts "
                     "once their cost_usd (and cost_unreported_usd) reach it."),
    "cost_usd": ({"type": ["number", "null"], "minimum": 0, "exclusiveMaximum": agents.MAX_DOLLARS},
                 "What the task's attempts cost in total, as the agent reported it; absent when unknown."),
    "cost_unreported_usd": ({"type": ["number", "null"], "minimum": 0, "exclusiveMaximum": agents.MAX_DOLLARS},
                            "The caps of capped attempts that ended without reporting their cost (killed): what "
                            "they may have spent at most, beyond cost_usd; counted against the task's and the order's budgets."),
    "tokens": ({"type": ["object", "null"], "additionalProperties": False,
                "properties": {k: {"type": "integer", "minimum": 0} for k in agents.TOKEN_KINDS}},
               "Tokens the task's attempts used in total, by kind; a kind the agent did not report is absent."),
    "session_id": (_STRING, "The agent's own session of the latest attempt; `aipm retry --resume` continues it."),
    "preemptions": ({**_COUNT, "maximum": MAX_TALLY}, "Times a more urgent task stopped this one (`run --preempt`); it is stopped at most "
                            "twice."),
    "confine": ({"type": ["boolean", "null"]},
                "Confine the worker to its target files with the kernel's Landlock (default: the `confine` "
                "setting). Refused at launch where the kernel has no Landlock."),
    "workspace": ({"type": ["string", "null"], "enum": ["shared", "worktree", None]},
                  "Where the worker runs: the shared project tree, or its own git worktree whose changes are "
                  "merged back when approved; default the `workspace` setting."),
    "workspace_setup": (_SETUP, "Command run in a new worktree before the worker (e.g. `uv sync`); "
                                "default the `workspace_setup` setting; \"\" for none."),
    "workspace_copy": ({"type": ["array", "null"], "items": {"type": "string", "pattern": _RELATIVE}},
                       "Globs of ignored files copied into a new worktree (e.g. `.env`); "
                       "default the `workspace_copy` setting."),
}

_ORDER_FIELDS: dict[str, tuple[dict[str, Any], str]] = {
    "id": ({"type": ["string", "null"], "pattern": _ID}, "The order id; default the directory name."),
    "title": (_LINE, "One line saying what the order delivers."),
    "description": (_STRING, "Anything else a reader should know."),
    "max_cost_usd": ({"anyOf": [_BUDGET, {"type": "string", "pattern": "^\\s*[Nn][Oo][Nn][Ee]\\s*$"}]},
                     "Budget in US dollars: once the tasks' recorded cost_usd (and cost_unreported_usd) reach it, "
                     "no new attempt starts. `none`: no budget, whatever the max_cost_usd setting gives the "
                     "orders that set none."),
}


def _properties(keys: tuple[str, ...], fields: dict[str, tuple[dict[str, Any], str]],
                managed: tuple[str, ...] = ()) -> dict[str, Any]:
    props = {}
    for key in keys:
        rule, text = fields[key]  # KeyError here: a key the validator knows but the schema does not describe
        prop = {**rule, "description": text}
        if key in managed:
            # readOnly: the owning authority (aipm) writes it; editors may warn on hand edits.
            prop["readOnly"] = True
            prop["description"] = text + " Written by aipm."
        props[key] = prop
    return props


def task_schema() -> dict[str, Any]:
    return {
        "$schema": DIALECT,
        "title": "aipm task file",
        "description": "One task of an order: <ORDER>/<TASK_ID>.yaml. Check with `aipm validate`.",
        "type": "object",
        "properties": _properties(TASK_KEYS, _TASK_FIELDS, MANAGED_FIELDS),
        "additionalProperties": False,
        # An agent's task (no command) with a blank prompt would start the agent with nothing to do.
        "if": {"properties": {"command": {"type": "null"}}},
        "then": {"properties": {"prompt": {"type": ["string", "null"], "pattern": r"\S"}}},
    }


def order_schema() -> dict[str, Any]:
    return {
        "$schema": DIALECT,
        "title": "aipm order.yaml",
        "description": "Optional metadata of an order directory. Check with `aipm validate`.",
        "type": "object",
        "properties": _properties(ORDER_KEYS, _ORDER_FIELDS),
        "additionalProperties": False,
    }


def schema_text(kind: str) -> str:
    """The schema as printed by `aipm schema` and stored in aipm/schemas/ (byte for byte)."""
    schema = {"task": task_schema, "order": order_schema}[kind]()
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def shipped_path(kind: str) -> Path:
    return SHIPPED_DIR / f"{kind}.schema.json"


def main() -> int:
    """Regenerate the shipped schema files (run after changing the task or order keys)."""
    SHIPPED_DIR.mkdir(exist_ok=True)
    for kind in KINDS:
        shipped_path(kind).write_text(schema_text(kind), encoding="utf-8")
        print(shipped_path(kind))
    return 0


if __name__ == "__main__":
    sys.exit(main())
