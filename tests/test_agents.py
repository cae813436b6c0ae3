"""Agent presets: their command lines and permission files, usage parsing, cost in the task files and `status`,
budgets, the notify hook and `retry --resume` — run against stand-in `claude`, `codex` and `aider` executables
(tests/agents/) that print what the real CLIs print."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import FIXTURES, REPO, capped_memory, no_workers, snapshot, state, task_statuses, wait_for, write_task
from aipm import agents, landlock, meter
from aipm.agents import Attempt, aider, claude, codex, guard
from aipm.paths import normalize

STAND_INS = REPO / "tests" / "agents"
SAMPLES = FIXTURES / "agents"


def agent_env(project, **extra) -> dict:
    """PATH with the stand-ins first, and a journal of every agent run."""
    return {"PATH": f"{STAND_INS}{os.pathsep}{os.environ['PATH']}",
            "FAKE_AGENT_JOURNAL": str(project.root / "journal.jsonl"), **extra}


def journal(project) -> list[dict]:
    path = project.root / "journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def attempt(tmp_path: Path, targets=("src/app.py", "docs/", "tests/**/*.py"), **kw) -> Attempt:
    log = tmp_path / ".aipm" / "logs" / "ORD" / "T.1.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    prompt = log.with_suffix(".prompt.md")
    prompt.write_text("do it\n")
    values = dict(root=tmp_path, prompt_file=prompt, log=log, model="sonnet", model_chosen=False,
                  targets=tuple(normalize(t) for t in targets),
                  protected=(tmp_path / ".aipm", tmp_path / "orders" / "ORD"))
    return Attempt(**{**values, **kw})


def task_file(order: Path, task: str) -> dict:
    return yaml.safe_load((order / f"{task}.yaml").read_text())


# ---- command lines and permission files -----------------------------------------------------------------


def test_claude_argv_and_its_permission_files(tmp_path):
    a = attempt(tmp_path, max_cost_usd=0.5, resume="sess-1")
    argv = claude.argv(a)
    settings_file = a.log.with_suffix(".claude-settings.json")
    assert argv == ["claude", "-p", "--output-format", "stream-json", "--verbose", "--model", "sonnet",
                    "--settings", str(settings_file), "--max-budget-usd", "0.5", "--resume", "sess-1",
                    "--fork-session"]
    settings = json.loads(settings_file.read_text())
    root = tmp_path.as_posix()
    assert settings["permissions"]["allow"] == [f"Edit(/{root}/src/app.py)", f"Edit(/{root}/docs/**)",
                                                f"Edit(/{root}/tests/**/*.py)"]
    assert settings["permissions"]["deny"] == [f"Edit(/{root}/.aipm/**)", f"Edit(/{root}/orders/ORD/**)"]
    (entry,) = settings["hooks"]["PreToolUse"]
    assert entry["matcher"] == "Edit|Write|MultiEdit|NotebookEdit"
    assert "aipm.agents.guard" in entry["hooks"][0]["command"]
    assert json.loads(a.log.with_suffix(".guard.json").read_text())["allow"] == ["src/app.py", "docs/",
                                                                               "tests/**/*.py"]


def test_claude_without_targets_gets_no_rules(tmp_path):
    argv = claude.argv(attempt(tmp_path, targets=()))
    assert "--settings" not in argv and "--max-budget-usd" not in argv and "--resume" not in argv


def test_codex_argv_reads_the_prompt_from_stdin_in_the_workspace_sandbox(tmp_path):
    assert codex.argv(attempt(tmp_path)) == ["codex", "exec", "--json", "--sandbox", "workspace-write",
                                             "--skip-git-repo-check", "-"]
    # A model someone chose is passed; a resume goes after the options, as `codex exec ... resume ID -`.
    assert codex.argv(attempt(tmp_path, model="gpt-5-codex", model_chosen=True, resume="th-9"))[-5:] == [
        "--model", "gpt-5-codex", "resume", "th-9", "-"]


def test_aider_argv_makes_the_targets_its_files(tmp_path):
    for name in ("tests/unit/test_b.py", "tests/test_a.py", "tests/notes.txt", "docs/a.md", "docs/sub/b.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    a = attempt(tmp_path)
    argv = aider.argv(a)
    assert argv[:5] == ["aider", "--message-file", str(a.prompt_file), "--yes-always", "--no-auto-commits"]
    assert "--no-gitignore" in argv
    # Its history files go to the runtime directory, not the project.
    assert argv[argv.index("--chat-history-file") + 1].startswith(str(tmp_path / ".aipm"))
    # aider takes files only: a directory, like a glob, becomes the files it holds.
    assert argv[-5:] == ["src/app.py", "docs/a.md", "docs/sub/b.md", "tests/test_a.py", "tests/unit/test_b.py"]


def test_aider_is_given_a_file_named_like_an_option_as_a_path(tmp_path):
    """A target `-m.txt` reached aider as `-m .txt`: the message `.txt` instead of the task's, and no file."""
    argv = aider.argv(attempt(tmp_path, targets=("-m.txt", "--notes.txt", "a-b.txt")))
    assert argv[-3:] == ["./-m.txt", "./--notes.txt", "a-b.txt"]


def test_aider_is_told_of_a_directory_target_without_files(tmp_path):
    (tmp_path / "docs").mkdir()
    a = attempt(tmp_path, targets=("docs/", "src/app.py"))
    assert aider.argv(a)[-1:] == ["src/app.py"]
    assert "aider: target docs/ holds no file yet" in a.log.read_text()


def test_aider_is_not_given_a_directory_target_not_made_yet_as_a_file(tmp_path):
    """`adir2/` did not exist: it was passed as a file name, and aider makes an empty file of a name it is given,
    which would then stand where the task is to make the directory."""
    (tmp_path / "README").write_text("")
    a = attempt(tmp_path, targets=("adir2/", "README"))
    argv = aider.argv(a)
    assert argv[-1] == "README" and "adir2" not in argv
    assert "aider: target adir2/ holds no file yet" in a.log.read_text()


def test_aider_gets_a_model_only_when_one_was_chosen(tmp_path):
    assert "--model" not in aider.argv(attempt(tmp_path))  # aider's own configured model is used
    argv = aider.argv(attempt(tmp_path, model="gpt-4o", model_chosen=True))
    assert argv[argv.index("--model") + 1] == "gpt-4o"


# ---- the PreToolUse guard -------------------------------------------------------------------------------


def run_hook(a: Attempt, call: dict, cwd: Path | str = "/") -> dict | None:
    """Run the hook command exactly as the settings file gives it to Claude Code, with the call on stdin."""
    claude.argv(a)
    settings = json.loads(a.log.with_suffix(".claude-settings.json").read_text())
    command = settings["hooks"]["PreToolUse"][0]["hooks"][0]["command"]
    proc = subprocess.run(["/bin/sh", "-c", command], input=json.dumps(call) if isinstance(call, dict) else call,
                          capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def pre_tool_use(root: Path, tool: str, path: str) -> dict:
    key = "notebook_path" if tool == "NotebookEdit" else "file_path"
    return {"session_id": "s", "transcript_path": "/tmp/t.jsonl", "cwd": str(root), "permission_mode": "default",
            "hook_event_name": "PreToolUse", "tool_name": tool,
            "tool_input": {key: path, "old_string": "a", "new_string": "b"}, "tool_use_id": "toolu_1"}


def denied(answer: dict | None) -> bool:
    return bool(answer) and answer["hookSpecificOutput"]["permissionDecision"] == "deny"


def test_the_hook_denies_an_edit_outside_the_targets(tmp_path):
    a = attempt(tmp_path)
    answer = run_hook(a, pre_tool_use(tmp_path, "Edit", str(tmp_path / "setup.py")))
    assert denied(answer)
    assert "setup.py is not among this task's target_files" in answer["hookSpecificOutput"][
        "permissionDecisionReason"]
    for tool, path in (("Write", "../outside.txt"), ("MultiEdit", str(tmp_path / "orders/ORD/T.yaml")),
                       ("Edit", ".aipm/workers/x.json"), ("NotebookEdit", "nb.ipynb"),
                       ("Write", "tests/data.json")):
        assert denied(run_hook(a, pre_tool_use(tmp_path, tool, path))), (tool, path)


def test_the_hook_lets_edits_of_the_targets_through(tmp_path):
    a = attempt(tmp_path)
    for tool, path in (("Edit", str(tmp_path / "src/app.py")), ("Write", "docs/new/page.md"),
                       ("MultiEdit", "tests/unit/test_x.py"), ("Read", str(tmp_path / "setup.py"))):
        assert run_hook(a, pre_tool_use(tmp_path, tool, path)) is None, (tool, path)


def test_the_hook_fails_closed(tmp_path):
    a = attempt(tmp_path)
    assert denied(run_hook(a, "not json"))
    assert denied(run_hook(a, {"tool_name": "Write", "tool_input": {}}))
    # Each of these made the hook die with a traceback, exit 1: Claude Code takes that for a non-blocking error,
    # and the edit went on.
    outside = str(tmp_path.parent / "elsewhere.txt")
    assert denied(run_hook(a, {**pre_tool_use(tmp_path, "Write", outside + "\0"), "cwd": str(tmp_path)}))  # ValueError
    assert denied(run_hook(a, {**pre_tool_use(tmp_path, "Write", "x.txt"), "cwd": ["not", "a", "path"]}))  # TypeError
    nested = json.dumps(pre_tool_use(tmp_path, "Write", outside))[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert denied(run_hook(a, nested))  # RecursionError


@pytest.mark.parametrize("module", ["json", "os", "aipm"])
def test_the_hook_is_not_taken_over_by_a_module_in_the_project(tmp_path, module):
    """Claude Code runs the hook in the project, and `python -m` put the project first on the import path: a
    `json.py` the agent wrote there (or an `aipm/` package) ran in place of the guard's own, which crashed (exit 1,
    to Claude Code a non-blocking error: the edit went on) or answered nothing (allowed)."""
    a = attempt(tmp_path)
    planted = tmp_path / (f"{module}/__init__.py" if module == "aipm" else f"{module}.py")
    planted.parent.mkdir(exist_ok=True)
    planted.write_text("import sys\nsys.exit(0 if 'aipm' in __name__ else 1)\n")
    assert denied(run_hook(a, pre_tool_use(tmp_path, "Write", str(tmp_path / "setup.py")), cwd=tmp_path))
    assert run_hook(a, pre_tool_use(tmp_path, "Write", "docs/a.md"), cwd=tmp_path) is None


def test_the_hook_follows_symlinks_out_of_a_target(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "link.md").symlink_to(tmp_path / "setup.py")
    rules = {"root": str(tmp_path), "allow": ["docs/"], "deny": []}
    assert guard.verdict(pre_tool_use(tmp_path, "Edit", "docs/link.md"), rules) is not None
    assert guard.verdict(pre_tool_use(tmp_path, "Edit", "docs/real.md"), rules) is None


def test_claude_in_a_worktree_is_guarded_in_its_worktree_not_the_main_tree(project):
    root = project.root
    (root / "aipm.yaml").write_text("worker:\n  agent: claude\nworkspace: worktree\n")
    (root / "src").mkdir()
    (root / "src" / "a.py").write_text("old\n")
    # "new content", not a same-size "new": an edit within the second of the worktree's checkout that keeps the
    # size is missed by the capture (repo.capture's index copy loses git's racy-entry check; reported).
    write_task(project.order(), "A", target_files=["src/a.py"],
               prompt=f"@write src/a.py new content\n@write {root / 'src/a.py'} shared\n@write other.txt no")
    # The stand-in's own journal and costs, in the main tree: the test's, which the main tree's audit must not see.
    (root / ".gitignore").write_text("journal.jsonl\nstand-in-claude-costs.json\n")
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "i"]):
        subprocess.run(["git", *args], cwd=root, check=True)
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (root / ".aipm/logs/ORD/A.1.log").read_text()
    # The target in its worktree was written and merged back; the main tree's copy and a non-target were not.
    assert (root / "src/a.py").read_text() == "new content\n" and not (root / "other.txt").exists()
    assert f"{root / 'src/a.py'} is outside this task's worktree" in log
    assert "other.txt is not among this task's target_files" in log
    rules = json.loads((root / ".aipm/logs/ORD/A.1.claude-settings.json").read_text())["permissions"]
    worktree = root / ".aipm/worktrees/ORD/A"
    assert rules["allow"] == [f"Edit(/{worktree}/src/a.py)"]
    assert rules["deny"] == [f"Edit(/{root}/orders/ORD/**)", f"Edit(/{worktree}/orders/ORD/**)"]


def test_the_hook_of_a_worktree_task_protects_aipm_but_its_own_worktree(tmp_path):
    worktree = tmp_path / ".aipm" / "worktrees" / "ORD" / "T"
    a = attempt(tmp_path, root=worktree, workspace=worktree,
                protected=(tmp_path / ".aipm", tmp_path / "orders/ORD", worktree / "orders/ORD"))
    assert run_hook(a, pre_tool_use(worktree, "Edit", "src/app.py")) is None
    for path in (tmp_path / ".aipm/logs/x", worktree / "orders/ORD/T.yaml", tmp_path / "src/app.py",
                 tmp_path / ".aipm/worktrees/ORD/OTHER/src/app.py"):
        assert denied(run_hook(a, pre_tool_use(worktree, "Write", str(path)))), path


# ---- usage parsing --------------------------------------------------------------------------------------


def parse(name: str, sample: str) -> agents.Usage:
    with open(SAMPLES / sample) as handle:
        return agents.preset(name).parse(handle)


def test_claude_usage_from_the_result_event():
    usage = parse("claude", "claude-stream-json.jsonl")
    assert usage.cost_usd == pytest.approx(0.0423915)
    assert usage.tokens == {"input": 15, "output": 215, "cache_read": 47414, "cache_write": 5832}
    assert (usage.session_id, usage.turns, usage.is_error) == ("9b1f4c2e-5d7a-4e0b-8c3f-2a6d1e9b7c40", 5, False)


def test_claude_usage_of_a_failed_attempt():
    usage = parse("claude", "claude-stream-json-error.jsonl")
    assert usage.is_error is True
    assert usage.cost_usd == pytest.approx(0.0187)  # a failed attempt still costs
    assert usage.tokens["cache_write"] == 4096 and usage.turns == 2


def test_claude_killed_before_its_result_keeps_the_session_and_no_cost():
    lines = (SAMPLES / "claude-stream-json.jsonl").read_text().splitlines()[:3]
    usage = claude.parse(lines + ["[aipm 12:00:00] attempt 1 killed by SIGKILL"])
    assert usage.session_id == "9b1f4c2e-5d7a-4e0b-8c3f-2a6d1e9b7c40"
    assert usage.cost_usd is None and usage.tokens == {} and usage.is_error is None


def test_codex_usage_from_turn_completed():
    usage = parse("codex", "codex-exec-json.jsonl")
    assert usage.cost_usd is None  # codex reports no cost: unknown, not 0
    assert usage.tokens == {"input": 24763 - 24448, "cache_read": 24448, "output": 122}
    assert (usage.session_id, usage.turns, usage.is_error) == ("0199a213-81c0-7800-8aa1-bbab2a035a53", 1, False)


def test_codex_failed_turn():
    usage = codex.parse(['{"type":"thread.started","thread_id":"t"}',
                         '{"type":"turn.failed","error":{"message":"stream error"}}'])
    assert usage.is_error is True and usage.tokens == {} and usage.session_id == "t"
    assert usage.error == "stream error"


def events(*items: dict) -> list[str]:
    return [json.dumps(item) + "\n" for item in items]


def test_a_codex_error_it_retried_past_is_no_error_and_one_it_stopped_at_is():
    """An `error` event made the attempt's usage is_error for good, though codex retried past it and its turn
    completed; one no turn's end followed (codex gave up there, exiting 0 before openai/codex#4309) was no error."""
    started, retried = {"type": "thread.started", "thread_id": "t"}, {"type": "error", "message":
                                                                      "Reconnecting... 1/5 (stream disconnected)"}
    done = {"type": "turn.completed", "usage": {"input_tokens": 9, "cached_input_tokens": 4, "output_tokens": 2}}
    usage = codex.parse(events(started, retried, {"type": "error", "message": "stream error: x; retrying 2/5 in 1s"},
                               done))
    assert (usage.is_error, usage.error, usage.tokens) == (False, None, {"input": 5, "cache_read": 4, "output": 2})
    assert codex.parse(events(started, {"type": "error", "message": "unexpected status 401"}, done)).error is None
    stopped = codex.parse(events(started, retried, {"type": "error", "message": "unexpected status 401\nmore"}))
    assert (stopped.is_error, stopped.error) == (True, "unexpected status 401")
    assert codex.parse(events(started, retried)).is_error is None  # (nothing ended yet: unknown)


def test_codex_usage_from_its_older_json_events():
    """Before 0.44 `codex exec --json` printed its protocol's events ({"id", "msg"}), whose token counts were read as
    unknown: each response's own usage (summed), then, from 0.3x, the session's total (the last counts)."""
    configured = {"id": "0", "msg": {"type": "session_configured", "session_id": "s-1", "model": "gpt-5"}}
    response = {"id": "1", "msg": {"type": "token_count", "input_tokens": 100, "cached_input_tokens": 40,
                                   "output_tokens": 7, "reasoning_output_tokens": 3, "total_tokens": 107}}
    complete = {"id": "1", "msg": {"type": "task_complete", "last_agent_message": "done"}}
    usage = codex.parse(events(configured, response, response, complete))
    assert (usage.session_id, usage.tokens, usage.turns, usage.is_error) == (
        "s-1", {"input": 120, "cache_read": 80, "output": 14}, 1, False)

    def total(n: int) -> dict:
        figures = {"input_tokens": 100 * n, "cached_input_tokens": 40 * n, "output_tokens": 7 * n}
        return {"id": "1", "msg": {"type": "token_count", "info": {"total_token_usage": figures,
                                                                    "last_token_usage": figures}}}
    usage = codex.parse(events(configured, total(1), {"id": "1", "msg": {"type": "token_count", "info": None}},
                               total(3), {"id": "1", "msg": {"type": "stream_error", "message": "retrying"}},
                               complete))
    assert (usage.tokens, usage.error) == ({"input": 180, "cache_read": 120, "output": 21}, None)
    failed = codex.parse(events(configured, total(1), {"id": "1", "msg": {"type": "error", "message": "quota"}}))
    assert (failed.error, failed.tokens["output"]) == ("quota", 7)
    assert codex.parse(events({"type": "session.created", "session_id": "s-2"})).session_id == "s-2"


def test_a_codex_turn_that_failed_fails_its_attempt_whatever_the_exit_code(project):
    """codex exec exited 0 after a failed turn before openai/codex#4309 (September 2025): the attempt, which did
    nothing, was DONE. A transient `error` event codex retries past (Reconnecting...) is no failure of its own."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: codex\n")
    write_task(project.order(), "A", prompt="@api-error You've hit your usage limit.", target_files=["a.txt"])
    write_task(project.order(), "B", prompt="@fail", target_files=["b.txt"])
    write_task(project.order(), "C", prompt="fine", target_files=["c.txt"])
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 1
    a, b, c = (task_file(project.order(), t) for t in "ABC")
    assert (a["status"], a["exit_code"]) == ("FAILED", 0)
    assert a["reason"] == "exit 0; the agent reported an error: You've hit your usage limit."
    assert b["reason"] == "exit 1; the agent reported an error: stand-in failure"
    assert c["status"] == "DONE"


def test_aider_usage_from_its_report_lines():
    usage = parse("aider", "aider-output.txt")
    assert usage.cost_usd == pytest.approx(0.02)  # the last `session` figure
    assert usage.tokens == {"input": 4200 - 2100 + 6400 - 3900, "cache_write": 2100, "cache_read": 3900,
                            "output": 118 + 41}
    assert usage.session_id is None and usage.turns == 2


def test_unknown_usage_adds_nothing_to_the_totals():
    assert agents.task_updates(None, None, None) == {}
    assert agents.task_updates(None, None, agents.Usage()) == {}
    updates = agents.task_updates(0.25, {"input": 5, "output": 1},
                                  agents.Usage(cost_usd=0.5, tokens={"input": 10, "cache_read": 3}, session_id="s2"))
    assert updates == {"cost_usd": 0.75, "tokens": {"input": 15, "output": 1, "cache_read": 3}, "session_id": "s2"}


def test_codex_cached_input_above_the_input_leaves_the_fresh_input_unknown():
    usage = codex.parse(['{"type": "turn.completed", "usage": {"input_tokens": 5, "cached_input_tokens": 10, '
                         '"output_tokens": 1}}'])
    assert usage.tokens == {"cache_read": 10, "output": 1}  # not input -5, which no task file may hold


def test_a_total_that_would_not_be_finite_is_not_added():
    assert agents.task_updates(1e308, None, agents.Usage(cost_usd=9e307)) == {}
    assert agents.task_updates(999_999_999_999.5, None, agents.Usage(cost_usd=0.5)) == {}  # no task file holds it


@pytest.mark.parametrize("key", ["cost_usd", "cost_unreported_usd"])
def test_a_recorded_cost_past_any_amount_is_one_line_and_exit_2(project, key):
    """Two tasks of 1e308 were taken: the order's cost added up to inf, and `status --json` wrote it as Infinity,
    which no JSON reader takes (the dashboard's /api/board too)."""
    order = project.order()
    for name in ("A", "B"):
        (order / f"{name}.yaml").write_text(f"id: {name}\nprompt: x\nstatus: DONE\n{key}: 1.0e+308\n")
    before = snapshot(project.root)
    for command in (("status", "ORD", "--json"), ("validate", "ORD"), ("run", "ORD")):
        proc = project.aipm(*command)
        assert proc.returncode == 2, proc.stdout[-300:] + proc.stderr
        (line,) = proc.stderr.splitlines()
        assert f"{key}: must be a number of US dollars from 0 below 1,000,000,000,000" in line, line
    assert snapshot(project.root) == before


# ---- real runs with the stand-ins -----------------------------------------------------------------------


def test_claude_run_records_cost_and_tokens_in_the_task_file_and_status(project):
    (project.root / "aipm.yaml").write_text("max_workers: 2\nworker:\n  agent: claude\n")
    order = project.order()
    write_task(order, "A", prompt="@cost 0.125\n@tokens 100 20 300 40\n@write a.txt hello", target_files=["a.txt"])
    write_task(order, "B", prompt="@cost 0.5\n@tokens 7 3 0 0", target_files=["b.txt"])
    write_task(order, "C", command="true")  # a plain command: its cost is unknown
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a = task_file(order, "A")
    assert a["cost_usd"] == 0.125
    assert a["tokens"] == {"input": 100, "output": 20, "cache_read": 300, "cache_write": 40}
    assert a["session_id"] and (project.root / "a.txt").read_text() == "hello\n"
    assert "cost_usd" not in task_file(order, "C") and "tokens" not in task_file(order, "C")
    data = project.json("status", "ORD")
    by_id = {t["id"]: t for t in data["tasks"]}
    assert by_id["A"]["cost_usd"] == 0.125 and by_id["B"]["tokens"]["input"] == 7
    assert "cost_usd" not in by_id["C"] and "tokens" not in by_id["C"]
    assert data["cost_usd"] == 0.625
    table = project.aipm("status", "ORD").stdout
    assert "$0.1250" in table and "cost $0.6250" in table
    # Per attempt in the runtime directory, beside the agent's whole transcript.
    log = project.root / ".aipm" / "logs" / "ORD" / "A.1.log"
    assert json.loads(log.with_suffix(".usage.json").read_text())["cost_usd"] == 0.125
    assert '"type": "result"' in log.read_text()
    (run,) = [j for j in journal(project) if j["task"] == "A"]
    assert run["argv"][:5] == ["-p", "--output-format", "stream-json", "--verbose", "--model"]
    assert "@cost 0.125" in run["prompt"]  # the prompt reached it on standard input


def test_status_json_gives_the_orders_tokens_as_the_sum_of_its_tasks(project):
    """CONTRACT.md: `cost_usd`, `tokens` in `status --json` per task and per order; the order had no tokens."""
    (project.root / "aipm.yaml").write_text("max_workers: 3\nworker:\n  agent: claude\n")
    order = project.order()
    write_task(order, "A", prompt="@tokens 100 20 300 40", target_files=["a.txt"])
    write_task(order, "B", prompt="@tokens 7 3 0 0\n@fail-attempt 1", max_attempts=2, target_files=["b.txt"])
    write_task(order, "X", agent="codex", prompt="@tokens 50 9 200 0", target_files=["x.txt"])
    write_task(order, "C", command="true")  # no tokens
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 0
    data = project.json("status", "ORD")
    tasks = [t.get("tokens", {}) for t in data["tasks"]]
    assert data["tokens"] == {k: sum(t.get(k, 0) for t in tasks) for k in agents.TOKEN_KINDS}
    assert data["tokens"] == {"input": 100 + 14 + 50, "output": 20 + 6 + 9, "cache_read": 300 + 200,
                              "cache_write": 40}
    (order / "A.yaml").write_text("id: A\nprompt: x\n")
    (order / "B.yaml").write_text("id: B\nprompt: x\n")
    (order / "X.yaml").write_text("id: X\nprompt: x\n")
    assert "tokens" not in project.json("status", "ORD")  # none known: left out, never 0


def test_an_agent_reporting_an_infinite_cost_still_ends_and_its_cost_is_unknown(project):
    """JSON's Infinity (1e400 reads as it too) passed as a cost ≥ 0: the outcome, which must hold a finite
    cost_usd, could never be written, and the task stayed running for every later run."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    write_task(project.order(), "A", prompt="@cost inf", target_files=["a.txt"])
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a = task_file(project.order(), "A")
    assert a["status"] == "DONE" and "cost_usd" not in a


@pytest.mark.parametrize("agent", ["claude", "codex"])
def test_a_session_id_no_file_can_hold_is_not_recorded_and_the_attempt_ends(project, agent):
    """JSON's \\ud800 (a lone surrogate) as the session id: writing it to the log raised UnicodeEncodeError, the run
    died with a traceback, and every later run died so too, the task never leaving IN_PROGRESS."""
    (project.root / "aipm.yaml").write_text(f"worker:\n  agent: {agent}\n")
    write_task(project.order(), "A", prompt='@cost 0.25\n@session "S\\ud800"', target_files=["a.txt"])
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a = task_file(project.order(), "A")
    assert a["status"] == "DONE" and "session_id" not in a and a["tokens"]["output"] == 5
    assert (a.get("cost_usd"), "cost_usd" in a) == ((0.25, True) if agent == "claude" else (None, False))


@pytest.mark.parametrize("agent", ["claude", "codex"])
@pytest.mark.parametrize("session_id", ["--dangerously-skip-permissions", "s" * 300], ids=["option", "overlong"])
def test_a_session_id_that_would_be_an_option_or_overlong_is_not_recorded(project, agent, session_id):
    """The session id goes back on the agent's command line with `retry --resume` (`--resume ID`, codex's positional
    `resume ID`): one printed as an option was recorded, and codex would have taken it for one."""
    (project.root / "aipm.yaml").write_text(f"worker:\n  agent: {agent}\n")
    write_task(project.order(), "A", prompt=f"@cost 0.25\n@session {json.dumps(session_id)}", target_files=["a.txt"])
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a = task_file(project.order(), "A")
    assert a["status"] == "DONE" and "session_id" not in a and a["tokens"]["output"] == 5, a


# (raw control characters are no JSON; json.loads took no such line, so an event's cost went with its session id)
@pytest.mark.parametrize("session_id, cost, counted", [
    ('"S\x00\tx"', ', "total_cost_usd": 0.01', {"cost_usd": 0.01}),  # a raw NUL and tab: the cost counts
    ('"S\\n\\u0000x"', "", {"cost_unreported_usd": 0.5}),  # valid JSON, no cost: it began, so its cap counts
    ('"S\x00x"', ', "total_cost_usd": "0.01"', {"cost_unreported_usd": 0.5}),  # a malformed cost: still unknown
], ids=["raw NUL", "escaped, no cost", "malformed cost"])
def test_a_session_id_no_file_can_hold_drops_neither_the_cost_nor_the_cap(project, tmp_path, session_id, cost,
                                                                          counted):
    """A claude result whose session id held a NUL and a newline was dropped whole: its $0.01 never counted, and
    with no session id read the attempt was taken for one that never began, its cap not counted either."""
    events = [f'{{"type": "system", "subtype": "init", "session_id": {session_id}}}',
              f'{{"type": "result", "subtype": "success", "is_error": false, "num_turns": 1, "session_id": '
              f'{session_id}{cost}, "usage": {{"input_tokens": 3, "output_tokens": 2}}}}']
    env = agent_printing(tmp_path, "claude", "\n".join(events) + "\n")
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    (project.order() / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.5\n")
    write_task(project.order(), "A", prompt="x", target_files=["a.txt"])
    proc = project.aipm("run", "ORD", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a = task_file(project.order(), "A")
    assert a["status"] == "DONE" and "session_id" not in a and a["tokens"] == {"input": 3, "output": 2}, a
    assert {k: a[k] for k in ("cost_usd", "cost_unreported_usd") if k in a} == counted
    assert "session unknown" in (project.root / ".aipm/logs/ORD/A.1.log").read_text(errors="replace")


def agent_printing(tmp_path: Path, agent: str, text: str) -> dict:
    """The environment of a run whose `agent` (claude, aider...) prints `text` and exits 0."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / f"{agent}.out").write_text(text)
    (bin_dir / agent).write_text(f"#!/bin/sh\ncat '{bin_dir / agent}.out'\n")
    (bin_dir / agent).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_an_aider_session_cost_past_any_amount_is_unknown_and_the_json_stays_json(project, tmp_path):
    """aider's cost was taken as printed: a `$1000…0 session` of 400 digits read as inf, and `run --json` and the
    usage file said "cost_usd": Infinity, which no JSON reader takes. Bounded as claude's costs are now."""
    env = agent_printing(tmp_path, "aider",
                         "Tokens: 10 sent, 5 received. Cost: $0.01 message, $1" + "0" * 400 + ".00 session.\n")
    (project.root / "aipm.yaml").write_text("worker:\n  agent: aider\n")
    write_task(project.order(), "A", prompt="x", target_files=["a.txt"])
    proc = project.aipm("run", "ORD", "--json", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    def strict(text: str):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text}"))

    events = [strict(line) for line in proc.stdout.splitlines()]
    assert [e.get("cost_usd") for e in events if e["event"] == "finished"] == [None]
    assert strict((project.root / ".aipm/logs/ORD/A.1.usage.json").read_text())["cost_usd"] is None
    a = task_file(project.order(), "A")
    assert a["status"] == "DONE" and "cost_usd" not in a and a["tokens"] == {"input": 10, "output": 5}


@pytest.mark.parametrize("count", ["1" + "0" * 400, "1" + "0" * 400 + "k"])
def test_an_aider_token_count_past_any_number_is_unknown_and_the_attempt_ends(project, tmp_path, count):
    """A count of 400 digits read as inf, and int(inf) raised OverflowError: `run` died with a traceback before
    recording the attempt, and so did every later run on recovering it, the task never leaving IN_PROGRESS."""
    env = agent_printing(tmp_path, "aider", f"Tokens: {count} sent, 5 received. Cost: $0.01 message, $0.01 session.\n")
    (project.root / "aipm.yaml").write_text("worker:\n  agent: aider\n")
    write_task(project.order(), "A", prompt="x", target_files=["a.txt"])
    proc = project.aipm("run", "ORD", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a = task_file(project.order(), "A")
    assert (a["status"], a["cost_usd"], a["tokens"]) == ("DONE", 0.01, {"output": 5}), a


def test_a_token_count_past_any_number_is_unknown_so_the_totals_stay_writable(project):
    """JSON holds an int of 4300 digits, which Python reads and writes; the total of two such attempts has 4301,
    which it will not write as text (ValueError): `run` died recording the second attempt, and so did every later
    run on recovering it, the task never leaving IN_PROGRESS."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    huge = "9" * 4300
    write_task(project.order(), "A", prompt=f"@cost 0.01\n@tokens {huge} 5 0 0\n@fail-attempt 1", max_attempts=2,
               target_files=["a.txt"])
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(journal(project)) == 2
    a = task_file(project.order(), "A")
    assert (a["status"], a["cost_usd"], a["tokens"]) == ("DONE", 0.02, {"output": 10, "cache_read": 0,
                                                                         "cache_write": 0}), a


def test_a_line_nested_deeper_than_pythons_stack_is_passed_over(project, tmp_path):
    """json.loads raises RecursionError, no ValueError, for [[[[…]]]] nested 100000 deep: `run` died with a
    traceback before recording the attempt, and so did every later run on recovering it (task IN_PROGRESS)."""
    events = [{"type": "system", "subtype": "init", "session_id": "S"},
              {"type": "result", "subtype": "success", "is_error": False, "session_id": "S", "total_cost_usd": 0.25,
               "usage": {"input_tokens": 3, "output_tokens": 2}}]
    nested = '{"type": "user", "content": ' + "[" * 100_000 + "]" * 100_000 + "}"
    env = agent_printing(tmp_path, "claude", "\n".join([json.dumps(events[0]), nested, json.dumps(events[1])]) + "\n")
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    write_task(project.order(), "A", prompt="x", target_files=["a.txt"])
    proc = project.aipm("run", "ORD", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a = task_file(project.order(), "A")
    assert (a["status"], a["cost_usd"], a["tokens"]) == ("DONE", 0.25, {"input": 3, "output": 2}), a


def test_a_failed_attempt_with_is_error_still_adds_its_cost(project):
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    order = project.order()
    write_task(order, "A", prompt="@cost 0.25\n@fail-attempt 1", max_attempts=2)
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a = task_file(order, "A")
    assert (a["status"], a["attempts"], a["cost_usd"]) == ("DONE", 2, 0.5)
    first = json.loads((project.root / ".aipm/logs/ORD/A.1.usage.json").read_text())
    assert first["is_error"] is True and first["cost_usd"] == 0.25


def test_an_agent_that_exits_0_reporting_an_error_fails_its_attempt(project):
    """Claude Code exits 0 on an API error (a rate limit), saying so only in its result (is_error, subtype
    "success"): the attempt, which did nothing, was DONE with reason "exit 0", and its dependants started."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    order = project.order()
    write_task(order, "A", prompt="@api-error API Error: Rate limit reached", max_attempts=2)
    write_task(order, "B", prompt="@cost 0.5\n@tokens 1 1 0 0\n@fail")
    write_task(order, "C", prompt="after A", depends_on=["A"])
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    a, b = task_file(order, "A"), task_file(order, "B")
    assert (a["status"], a["attempts"]) == ("FAILED", 2)  # retried, as a failed attempt is
    assert "C" not in [j["task"] for j in journal(project)]
    # A non-zero exit says what the agent's result called its error; a failed attempt's cost still counts.
    assert b["status"] == "FAILED" and b["reason"] == "exit 1; the agent reported an error: error_during_execution"
    assert b["cost_usd"] == 0.5


def test_an_exit_0_api_error_is_the_reason_of_the_failed_attempt(project):
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    write_task(project.order(), "A", prompt="@api-error API Error: Rate limit reached")
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 1
    a = task_file(project.order(), "A")
    assert (a["status"], a["exit_code"]) == ("FAILED", 0)
    assert a["reason"] == "exit 0; the agent reported an error: API Error: Rate limit reached"
    usage = json.loads((project.root / ".aipm/logs/ORD/A.1.usage.json").read_text())
    assert usage["is_error"] is True and usage["error"] == "API Error: Rate limit reached"


@pytest.mark.parametrize("kind, error", [
    ("auth", "The API provider is not able to authenticate you. Check your API key."),
    ("rate-limit", "The API provider has rate limited you. Try again later or check your quotas."),
    ("context", "Model anthropic/claude-sonnet-4-20250514 has hit a token limit!"),
])
def test_an_aider_api_error_it_gave_up_on_fails_the_attempt(project, kind, error):
    """aider exits 0 after a --message-file run whatever became of its message: an attempt whose key was refused,
    whose rate limit outlasted aider's retries, or whose context was full was DONE, and its review judged an
    untouched tree."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: aider\n")
    write_task(project.order(), "A", prompt=f"@api-error {kind}", target_files=["a.txt"])
    write_task(project.order(), "B", prompt="after A", target_files=["b.txt"], depends_on=["A"])
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 1
    a = task_file(project.order(), "A")
    assert (a["status"], a["exit_code"]) == ("FAILED", 0)
    assert a["reason"] == f"exit 0; the agent reported an error: {error}"
    assert [j["task"] for j in journal(project)] == ["A"]


def test_an_aider_error_it_retried_past_is_no_failure():
    """A rate limit aider retried past, and a reply that quotes aider's error text, end in a reply: no error."""
    lines = ["litellm.RateLimitError: AnthropicException - rate limited\n",
             "The API provider has rate limited you. Try again later or check your quotas.\n",
             "Retrying in 0.2 seconds...\n", "Model x has hit a token limit!\n",
             "Tokens: 1.2k sent, 30 received. Cost: $0.01 message, $0.01 session.\n"]
    assert aider.parse(lines).error is None and aider.parse(lines[:2]).error == lines[1].strip()


@pytest.mark.parametrize("confined", [False, True])
def test_an_agent_that_rewrites_its_log_is_charged_what_it_reported(project, confined):
    """Usage was read from the log, which the worker writes (its standard output; a confined one may still write it
    by name): an agent that cut its log after its result and put a result that cost nothing there was charged $0,
    and the order's budget did not see the attempt's cost."""
    if confined and landlock.unavailable():
        pytest.skip(f"kernel without usable Landlock: {landlock.unavailable()}")
    (project.root / "aipm.yaml").write_text(f"worker:\n  agent: claude\nconfine: {str(confined).lower()}\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 10\n")
    write_task(order, "A", prompt="@cost 0.5\n@tokens 7 3 0 0\n@rewrite-log", target_files=["a.txt"])
    proc = project.aipm("run", "ORD", env=agent_env(project, FAKE_AGENT_JOURNAL=""))  # (no journal to write)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (project.root / ".aipm/logs/ORD/A.1.log").read_text()
    assert '"total_cost_usd": 0}' in log and '"total_cost_usd": 0.5' not in log  # it did rewrite its log
    a = task_file(order, "A")
    assert (a["cost_usd"], a["tokens"]) == (0.5, {"input": 7, "output": 3, "cache_read": 0, "cache_write": 0})
    status = json.loads(project.aipm("status", "ORD", "--json").stdout)
    assert status["cost_usd"] == 0.5


@pytest.mark.parametrize("how", ["delete", "forge"])
def test_an_agent_that_tampers_with_the_meters_copy_fails_with_its_cost_unknown(project, how):
    """An unconfined agent may remove the meter's copy of its usage report, or put one of its own there: with the copy
    gone its usage was read from its log, which it had rewritten, and an attempt that cost $0.5 was DONE at $0 (a
    forged copy was read as it was). The meter sees its copy changed, removes what is there, and the attempt's usage
    is unknown: it fails, saying why, and charges nothing it did not report."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    write_task(project.order(), "A", prompt=f"@cost 0.5\n@rewrite-log\n@tamper-copy {how}", target_files=["a.txt"])
    run = project.aipm("run", "ORD", env=agent_env(project, FAKE_AGENT_JOURNAL=""))
    assert run.returncode == 1, run.stdout + run.stderr
    a = task_file(project.order(), "A")
    assert a["status"] == "FAILED" and "cost_usd" not in a and a["reason"].startswith(
        "exit 0; its usage report is lost: the meter's copy of it was removed or changed"), a
    log = (project.root / ".aipm/logs/ORD/A.1.log").read_text()
    assert "the meter's copy of the agent's usage report" in log and "usage: cost unknown" in log, log


def test_an_agent_that_kills_its_meter_fails_charged_what_it_reported(project):
    """An unconfined agent may kill the meter (it is in the agent's process group): the attempt ends as killed (its
    wrapper's command was the meter) and is charged what the meter kept before, not the $0 of the log it rewrote."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    write_task(project.order(), "A", prompt="@cost 0.5\n@kill-meter\n@rewrite-log", target_files=["a.txt"])
    run = project.aipm("run", "ORD", env=agent_env(project, FAKE_AGENT_JOURNAL=""))
    assert run.returncode == 1, run.stdout + run.stderr
    a = task_file(project.order(), "A")
    assert (a["status"], a["cost_usd"], a["exit_code"]) == ("FAILED", 0.5, 137), a


def test_an_attempt_whose_number_lost_its_log_is_charged_its_own_usage_not_the_earlier_attempts(project):
    """An attempt's number was used again once its log was gone (a person removed it; the spent exit file went with
    its outcome): the meter appended to the copy the earlier attempt of that number left, and the new attempt was
    charged the larger of the two results ($0.5 for an attempt that cost $0.1). The copy now keeps its number."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    order = project.order()
    write_task(order, "A", prompt="@cost 0.5", target_files=["a.txt"])
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 0
    (project.root / ".aipm/logs/ORD/A.1.log").unlink()
    project.aipm("retry", "A", check=True)
    (order / "A.yaml").write_text((order / "A.yaml").read_text().replace("@cost 0.5", "@cost 0.1"))
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 0
    assert task_file(order, "A")["cost_usd"] == pytest.approx(0.6)
    assert '"total_cost_usd": 0.1' in (project.root / ".aipm/logs/ORD/A.2.log").read_text()  # a number of its own


def test_a_result_printed_after_the_agents_own_costs_it_no_less(project):
    """claude prints one result, whose total_cost_usd only grows within a run (aider's `$… session` figure likewise):
    a line printed after it that says less (by a command the agent ran, onto the agent's standard output) was taken
    as the attempt's cost, and hid the rest from the budget."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    write_task(project.order(), "A", prompt="@cost 0.5\n@fake-result", target_files=["a.txt"])
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 0
    assert task_file(project.order(), "A")["cost_usd"] == 0.5
    report = "Tokens: 1.2k sent, 30 received. Cost: $0.01 message, {} session.\n"
    assert aider.parse([report.format("$0.05"), report.format("$0.00")]).cost_usd == 0.05


def metered(tmp_path: Path, agent: str, output: bytes, chunk: int) -> list[str]:
    """The lines the meter keeps of `output`, fed to it `chunk` bytes at a time as the pipe would cut it."""
    copy = tmp_path / "copy"
    fd = os.open(copy, os.O_WRONLY | os.O_CREAT)
    fed = meter.Copy(agent, fd)
    for at in range(0, len(output), chunk):
        fed.feed(output[at:at + chunk])
    fed.end()
    os.close(fd)
    with open(copy, encoding="utf-8", errors="replace") as handle:  # as read_usage reads it: universal newlines
        return handle.readlines()


@pytest.mark.parametrize("agent, sample", [("claude", "claude-stream-json.jsonl"),
                                           ("claude", "claude-stream-json-error.jsonl"),
                                           ("codex", "codex-exec-json.jsonl"), ("aider", "aider-output.txt")])
def test_the_meters_copy_reads_as_the_whole_output_does(tmp_path, agent, sample):
    """The meter keeps only the lines that change the usage, however the pipe cuts the output; a line too long to
    be read (agents.LONGEST) is passed over as read_usage passes it, whatever it ends with."""
    output = (SAMPLES / sample).read_bytes()
    output += b"x" * agents.LONGEST + b'{"type":"result","total_cost_usd":0}\nCost: $0.00 message, $0.00 session.'
    kept = metered(tmp_path, agent, output, 4093)
    assert agents.preset(agent).parse(kept) == parse(agent, sample)
    assert len(kept) < len(output.splitlines())


def test_the_meters_copy_reads_a_carriage_return_as_the_copy_is_read(tmp_path):
    """The copy is read back with universal newlines (a lone \\r ends a line), the meter read only \\n: aider's error
    after a progress line ending in \\r changed nothing the meter read, was left out of the copy, and an attempt that
    gave up on a rate limit was DONE."""
    output = b"Tokens: 1.2k sent, 30 received. Cost: $0.01 message, $0.01 session.\nwait\rlitellm.RateLimitError: x\n"
    whole = aider.parse(io.StringIO(output.decode(), newline=None))
    assert whole.error == "litellm.RateLimitError: x"
    assert aider.parse(metered(tmp_path, "aider", output, 7)) == whole


def long_run(agent: str) -> tuple[list[str], int]:
    """A run of over 10,000 lines in the sample's format, turn after turn, and how many lines change its usage."""
    lines = (SAMPLES / {"claude": "claude-stream-json.jsonl", "codex": "codex-exec-json.jsonl",
                        "aider": "aider-output.txt"}[agent]).read_text().splitlines(keepends=True)
    if agent == "claude":  # one session, many messages, one result
        return lines[:1] + lines[1:-1] * (10_000 // (len(lines) - 2) + 1) + lines[-1:], 2
    if agent == "aider":  # every reply reports its tokens and the session's cost so far
        reply = [line for line in lines if not line.startswith("Tokens:")] + [
            "Tokens: 1.2k sent, 30 received. Cost: $0.01 message, $SESSION session.\n"]
        turns = 10_000 // len(reply) + 1
        return [line.replace("SESSION", f"{n / 100:.2f}") for n in range(1, turns + 1) for line in reply], turns
    turn, (done,) = lines[1:-1], lines[-1:]  # codex: every turn reports the thread's total so far
    totals, turns = json.loads(done)["usage"], 10_000 // len(turn) + 1
    return lines[:1] + [line for n in range(1, turns + 1) for line in [*turn, json.dumps(
        {"type": "turn.completed", "usage": {k: v * n for k, v in totals.items()}}) + "\n"]], 1 + turns


@pytest.mark.parametrize("agent", ["claude", "codex", "aider"])
def test_the_meter_weighs_every_line_of_a_long_run_and_its_copy_reads_as_the_run(tmp_path, agent):
    """The meter re-parsed all it had kept for each new line (a codex run of 10,200 lines cost 4 s of CPU), so past
    256 kept lines it kept every line unweighed. It now reads each line once, where it left off: the copy holds
    just the lines that change the usage, and reads as the whole run does."""
    lines, changing = long_run(agent)
    assert len(lines) > 10_000
    kept = metered(tmp_path, agent, "".join(lines).encode(), 65_521)
    whole = agents.preset(agent).parse(lines)
    assert agents.preset(agent).parse(kept) == whole
    assert whole.turns and len(kept) == changing, len(kept)


def test_an_agent_that_stops_its_parent_does_not_stall_its_meter(project):
    """The meter was the agent's parent: an agent's `kill -STOP $PPID` stopped it, nothing read the agent's output
    any more, and the task hung until its timeout (FAILED, its cost unrecorded). The agent's parent is now a process
    of the meter's that only waits for it, which the meter lets go on."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    write_task(project.order(), "A", prompt="@cost 0.2\n@stop-parent", target_files=["a.txt"], timeout=60)
    run = project.aipm("run", "ORD", env=agent_env(project), timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert task_file(project.order(), "A")["cost_usd"] == 0.2
    log = (project.root / ".aipm/logs/ORD/A.1.log").read_text()
    assert "aipm: the agent stopped its parent" in log and '"total_cost_usd": 0.2' in log, log


def test_an_attempt_ends_with_its_agent_though_a_process_it_left_holds_its_output(project, gate):
    """The agent's output is a pipe the meter reads: a process the agent left behind holds it open, and a meter that
    read to its end would hold the attempt until that process ended."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    write_task(project.order(), "A", prompt=f"@cost 0.2\n@leave-behind {gate}", target_files=["a.txt"])
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 0
    assert not gate.exists() and task_file(project.order(), "A")["cost_usd"] == 0.2


def test_claude_parse_names_the_error_of_an_error_result():
    def result(**kw):
        return json.dumps({"type": "result", "session_id": "S", "total_cost_usd": 0.1, **kw}) + "\n"
    assert claude.parse([result(subtype="error_max_turns", is_error=True)]).error == "error_max_turns"
    assert claude.parse([result(subtype="success", is_error=True, result="API Error: 529\nmore")]).error \
        == "API Error: 529"
    assert claude.parse([result(subtype="success", is_error=False, result="done")]).error is None
    assert claude.parse([result(subtype="success", is_error=True)]).error == "is_error"
    # An error subtype is an error whatever is_error says (error_max_turns has been seen with false).
    assert claude.parse([result(subtype="error_max_turns", is_error=False)]).error == "error_max_turns"
    assert claude.parse([result(subtype="error_during_execution")]).is_error is True


def test_claude_hook_stops_a_write_outside_the_targets_in_a_real_run(project):
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    order = project.order()
    write_task(order, "A", prompt="@write mine.txt ok\n@write theirs.txt no", target_files=["mine.txt"])
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (project.root / "mine.txt").exists()
    assert not (project.root / "theirs.txt").exists()
    assert "theirs.txt is not among this task's target_files" in (project.root / ".aipm/logs/ORD/A.1.log").read_text()


@pytest.mark.parametrize("agent", ["claude", "codex", "aider"])
def test_an_agent_gets_its_targets_normalised(project, agent):
    """AIPM_TARGET_FILES held the targets as written (`./src/../a.txt`), while the preset's own rules had them
    normalised."""
    (project.root / "src").mkdir()
    write_task(project.order(), "A", agent=agent, prompt="@write a.txt ok", target_files=["./src/../a.txt", "src"])
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run,) = journal(project)
    assert run["targets"] == "a.txt\nsrc/"


def test_aider_spends_nothing_on_its_weak_model_that_it_would_not_report(project):
    """aider summarises a chat history past its model's max_chat_history_tokens (1k to 8k) with its weak model, and
    neither its Tokens nor its Cost line counts that call: a reply of 5k tokens made an attempt cost more than it
    was charged. A one-message run never uses the summary, so the limit is set past any run (commit messages, the
    weak model's other work, are off with --no-auto-commits)."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: aider\n")
    write_task(project.order(), "A", prompt="@cost 0.03\n@tokens 5000 400 0 0", target_files=["a.txt"])
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 0
    assert [run["agent"] for run in journal(project)] == ["aider"]
    assert task_file(project.order(), "A")["cost_usd"] == 0.03


def test_codex_and_aider_runs(project):
    (project.root / "aipm.yaml").write_text("worker:\n  agent: codex\n")
    order = project.order()
    write_task(order, "X", prompt="@tokens 50 9 200 0\n@write x.txt from-codex", target_files=["x.txt"])
    write_task(order, "Y", agent="aider", prompt="@cost 0.03\n@tokens 2300 120 0 0\n@write y.txt from-aider",
               target_files=["y.txt"])
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    x, y = task_file(order, "X"), task_file(order, "Y")
    assert "cost_usd" not in x and x["tokens"] == {"input": 50, "output": 9, "cache_read": 200}
    assert x["session_id"]
    assert y["cost_usd"] == 0.03 and y["tokens"] == {"input": 2300, "output": 120}
    assert (project.root / "x.txt").read_text() == "from-codex\n"
    assert (project.root / "y.txt").read_text() == "from-aider\n"
    runs = {j["agent"]: j for j in journal(project)}
    assert runs["aider"]["argv"][-1] == "y.txt"
    assert runs["codex"]["argv"][-1] == "-"


def test_aider_input_tokens_leave_out_the_cache_reads_its_sent_figure_holds(project):
    """aider's `sent` is litellm's prompt_tokens (cache reads included) plus the cache writes: only the writes were
    taken off, so every cache hit was counted twice, as input and as cache_read."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: aider\n")
    write_task(project.order(), "A", prompt="@cost 0.02\n@tokens 120 40 600 210", target_files=["a.txt"])
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 0
    assert "930 sent, 210 cache write, 600 cache hit" in (project.root / ".aipm/logs/ORD/A.1.log").read_text()
    assert task_file(project.order(), "A")["tokens"] == {"input": 120, "output": 40, "cache_read": 600,
                                                         "cache_write": 210}


def test_aider_runs_with_directory_targets(project):
    (project.root / "aipm.yaml").write_text("max_workers: 1\nworker:\n  agent: aider\n")
    (project.root / "docs").mkdir()
    (project.root / "docs" / "a.md").write_text("old\n")
    order = project.order()
    write_task(order, "A", prompt="@write docs/a.md new", target_files=["docs/", "y.txt"])
    write_task(order, "B", prompt="@write docs/a.md newer", target_files=["docs/"], depends_on=["A"])
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (project.root / "docs" / "a.md").read_text() == "newer\n"  # B's lone directory gave aider its file
    first, second = (j["argv"] for j in journal(project))
    assert first[-2:] == ["docs/a.md", "y.txt"] and second[-1] == "docs/a.md" and "docs" not in second


# ---- budgets --------------------------------------------------------------------------------------------


def test_the_budget_stops_new_attempts_and_run_says_so(project):
    (project.root / "aipm.yaml").write_text("max_workers: 1\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.2\n")
    for name in ("T1", "T2", "T3"):
        write_task(order, name, prompt="@cost 0.1", target_files=[f"{name}.txt"])
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    statuses = {t["id"]: t["status"] for t in project.json("status", "ORD")["tasks"]}
    assert statuses == {"T1": "DONE", "T2": "DONE", "T3": "QUEUED"}  # T2 started below the budget, then finished
    stop_lines = [line for line in proc.stderr.splitlines() if "budget reached" in line]
    assert len(stop_lines) == 1 and "max_cost_usd $0.2000 (order.yaml)" in stop_lines[0], proc.stderr
    assert [j["task"] for j in journal(project)] == ["T1", "T2"]
    why = project.aipm("why", "T3")
    assert "budget reached" in why.stdout, why.stdout
    blocked = {b["id"]: b["reason"] for b in project.json("detect", "ORD")["blocked"]}
    assert blocked["T3"] == "budget"
    launch = project.aipm("launch", "ORD", env=agent_env(project))
    assert launch.returncode == 1 and "budget reached" in launch.stderr
    assert project.statuses()["T3"] == "QUEUED"
    # Raising the budget lets the order go on.
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 1\n")
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 0


def test_aider_attempts_that_take_no_cap_share_the_budget_as_capped_ones_do(project, gate):
    """aider takes no spending cap, so its attempts held no share: under a $0.10 budget all three started at once and
    spent three times it. Each now needs a least share to start, and holds one while it runs."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: aider\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.1\n")
    for name in ("T1", "T2", "T3"):
        write_task(order, name, prompt=f"@cost 0.08\n@wait-for {gate}", target_files=[f"{name}.txt"])
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD",
                            "--no-resource-monitoring"], env={**os.environ, **agent_env(project)},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: journal(project))
        assert len(project.json("ps")["workers"]) == 1
        blocked = {b["id"]: b["reason"] for b in project.json("detect", "ORD")["blocked"]}
        assert [blocked.get(t) for t in ("T2", "T3")] == ["budget", "budget"], blocked
    finally:
        gate.touch()
        out = run.communicate(timeout=120)[0]
    assert run.returncode == 1, out
    # T1 spent $0.08; T2 started with all that was left ($0.02: aider cannot be held to it); then the budget stops.
    assert project.statuses() == {"T1": "DONE", "T2": "DONE", "T3": "QUEUED"}, out
    assert len(journal(project)) == 2


def test_launches_racing_an_owners_start_never_start_aider_attempts_past_the_budget(project, gate):
    """The record a launch writes for the owner it started, under the launch lock, named no agent until that owner
    had started its worker: a planner that took the lock in between (a second `aipm launch`, a standby owner, an
    owner starting successors) counted the running aider attempt's least share as nothing, and started a second
    one under a budget that paid for one. Three launches race each order; the stand-in journals each start, and no
    attempt ends before every launch and owner is done, so the journal is every attempt that ran at once."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: aider\n")
    orders = [f"ORD{n}" for n in range(3)]
    for name in orders:
        order = project.order(name)
        (order / "order.yaml").write_text(f"id: {name}\nmax_cost_usd: 0.1\n")
        for task in ("T1", "T2", "T3"):
            write_task(order, task, prompt=f"@cost 0.08\n@wait-for {gate}", target_files=[f"{task}.txt"])
    env = {**os.environ, **agent_env(project), "AIPM_ENABLE_MONITORING": "false"}
    try:
        for name in orders:
            launches = [subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "launch", name,
                                          "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True) for _ in range(3)]
            outs = [p.communicate(timeout=60) for p in launches]
            started = [t["id"] for out, _ in outs for t in json.loads(out)["launched"]]
            assert len(started) == 1, f"{name}: {started} started under a budget with one least share: {outs}"
        wait_for(lambda: len(journal(project)) >= len(orders))  # each started owner's worker has begun
        assert len(project.json("ps")["workers"]) == len(journal(project)) == len(orders), journal(project)
    finally:
        gate.touch()
    wait_for(lambda: no_workers(project.root), timeout=60)


def test_only_a_known_agent_that_spends_with_no_cap_holds_a_least_share():
    """A record naming an agent this aipm does not know (a newer aipm's) crashed every plan of its order
    (ModuleNotFoundError from the preset's import): it holds nothing."""
    from aipm import budget

    assert [budget.uncapped(a) for a in ("aider", "claude", "codex", "command", "gemini", "")] == \
        [True, False, False, False, False, False]


def test_aider_tasks_with_budgets_of_their_own_below_a_share_still_start_one_at_a_time(project, gate):
    """A task's own max_cost_usd cannot hold an aider attempt to it: each still needs a whole least share of the
    order's budget (three of $0.03 each started at once under $0.10), and what they hold is said as what is left."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: aider\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.1\n")
    for name in ("T1", "T2"):
        write_task(order, name, prompt=f"@cost 0.02\n@wait-for {gate}", target_files=[f"{name}.txt"],
                   max_cost_usd=0.03)
    launch = project.json("launch", "ORD", "--no-resource-monitoring", env=agent_env(project))
    try:
        assert [t["id"] for t in launch["launched"]] == ["T1"], launch
        # (at once: the record the launch wrote for T1's owner holds its share before that owner starts its worker)
        assert "may spend $0.1000 more, of max_cost_usd $0.1000" in project.json("why", "T2")["reasons"][0]["detail"]
    finally:
        gate.touch()
    wait_for(lambda: project.statuses()["T1"] == "DONE")


def test_the_budget_setting_applies_when_order_yaml_has_none(project):
    (project.root / "aipm.yaml").write_text("max_workers: 1\nmax_cost_usd: 0.1\nworker:\n  agent: claude\n")
    order = project.order()
    for name in ("T1", "T2"):
        write_task(order, name, prompt="@cost 0.1")
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 1
    assert "setting max_cost_usd" in proc.stderr
    assert project.statuses() == {"T1": "DONE", "T2": "QUEUED"}


def test_an_order_yaml_saying_none_has_no_budget_whatever_the_setting(project):
    """The max_cost_usd setting budgets every order whose order.yaml sets none, and `max_cost_usd: none` there
    was refused ("must be a number"): no order could be left without a budget. It now means no budget for that
    order; another order still has the setting's."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\nmax_cost_usd: 0.1\nworker:\n  agent: claude\n")
    free, held = project.order("FREE"), project.order("HELD")
    (free / "order.yaml").write_text("id: FREE\nmax_cost_usd: None\n")
    for order in (free, held):
        for name in ("T1", "T2", "T3"):
            write_task(order, name, prompt="@cost 0.1", target_files=[f"{order.name}-{name}.txt"])
    assert project.aipm("validate", "FREE").returncode == 0
    proc = project.aipm("run", "FREE", env=agent_env(project))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "budget" not in proc.stderr
    assert set(project.statuses("FREE").values()) == {"DONE"}
    assert "max_cost_usd" not in project.json("status", "FREE")
    assert project.json("status", "HELD")["max_cost_usd"] == 0.1
    proc = project.aipm("run", "HELD", env=agent_env(project))
    assert proc.returncode == 1 and "setting max_cost_usd" in proc.stderr, proc.stderr
    assert project.statuses("HELD") == {"T1": "DONE", "T2": "QUEUED", "T3": "QUEUED"}


def test_reviewed_attempts_add_up_and_the_budget_stops_them(project):
    # Each rejected attempt's cost must stay recorded after its review ends, or the budget is never reached.
    (project.root / "aipm.yaml").write_text("max_workers: 1\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.15\n")
    write_task(order, "A", prompt="@cost 0.05", review="false", max_rework=5)
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "budget reached" in proc.stderr and "restore" not in proc.stdout, proc.stdout + proc.stderr
    assert len(journal(project)) == 3  # $0.10 after two is below the budget; $0.15 after three reaches it
    a = task_file(order, "A")
    assert (a["status"], a["cost_usd"]) == ("QUEUED", 0.15)


# Claude reports its cost only in its final result: an attempt killed before it may have spent up to its cap.


def test_caps_of_killed_attempts_count_against_the_budget(project):
    """A review found attempts killed by their timeout counted as $0: repeated timeouts ran an order past its
    budget while aipm said it was fine. Now each one's cap counts, apart from the cost, as spent at most."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.25\n")
    write_task(order, "A", prompt="@wait-for never-made", timeout=1, max_attempts=5)
    for other in "BC":  # (a task's own max_cost_usd is spent over its attempts: one attempt each at $0.1)
        write_task(order, other, prompt="@wait-for never-made", priority="P0", timeout=1, max_cost_usd=0.1,
                   target_files=[f"{other}.txt"])
    proc = project.aipm("run", "ORD", "--json", env=agent_env(project))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert _caps(project) == [0.1, 0.1, 0.05]  # the third gets what is left; then nothing is left to give
    a = task_file(order, "A")
    assert (a["status"], a["attempts"], a.get("cost_usd")) == ("QUEUED", 1, None), a  # no cost is made up
    assert a["cost_unreported_usd"] == pytest.approx(0.05)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["detail"] for e in events if e["event"] == "budget"] == [
        "budget reached: the order's attempts cost $0.0000 spent, up to $0.2500 more not reported by their "
        "attempts of max_cost_usd $0.2500 (order.yaml); raise it to go on"]
    status = project.json("status", "ORD")
    assert "cost_usd" not in status and status["cost_unreported_usd"] == pytest.approx(0.25), status
    assert status["budget_reached"] and status["tasks"][0]["cost_unreported_usd"] == pytest.approx(0.05), status
    table = project.aipm("status", "ORD").stdout
    assert ("cost unknown: up to $0.2500 not reported by their attempts of max_cost_usd $0.2500 (reached)"
            in table), table
    # It is the task file's: a later run (a restart) is refused too, and `retry` keeps it like the cost.
    launch = project.aipm("launch", "ORD", env=agent_env(project))
    assert launch.returncode == 1 and "not reported by their attempts" in launch.stderr, launch.stderr
    assert project.aipm("retry", "A").returncode == 0
    assert task_file(order, "A")["cost_unreported_usd"] == pytest.approx(0.05)
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 1
    assert len(journal(project)) == 3


def test_a_tasks_own_budget_is_spent_over_its_attempts_not_given_whole_to_each(project):
    """The contract's task `max_cost_usd`: "no new attempt once reached". Each attempt was capped at the whole
    limit, so a $0.10 task whose attempts failed at $0.08 each ran three of them and cost $0.24. Now each attempt
    gets what its earlier ones left, and none starts once nothing is left; other tasks go on."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\nworker:\n  agent: claude\n")
    order = project.order()
    write_task(order, "A", prompt="@cost 0.08\n@fail", priority="P0", max_attempts=3, max_cost_usd=0.1,
               target_files=["a.txt"])
    write_task(order, "B", prompt="@cost 0.01", priority="P1", max_cost_usd=0.05, target_files=["b.txt"])
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert _caps(project) == [0.1, pytest.approx(0.02), 0.05], journal(project)
    assert ("budget   ORD/A: budget reached: the task's attempts cost $0.1000 of its max_cost_usd $0.1000; raise it "
            "to go on") in proc.stdout + proc.stderr
    a = task_file(order, "A")
    # (claude stops at its cap: the second attempt, stopped at the $0.02 the limit left it, is not counted)
    assert (a["status"], a["attempts"], a["cost_usd"]) == ("QUEUED", 1, pytest.approx(0.1)), a
    assert project.statuses()["B"] == "DONE"
    why = project.aipm("why", "A").stdout
    assert "budget reached: the task's attempts cost $0.1000 of its max_cost_usd $0.1000" in why, why
    write_task(order, "C", prompt="x", depends_on=["A"], target_files=["c.txt"])  # (added once the run ended)
    behind = "C will not start until A does: budget reached: the task's attempts cost $0.1000 of its max_cost_usd"
    assert behind.removeprefix("C ") in project.aipm("why", "C").stdout
    rows = {t["id"]: t for t in project.json("status", "ORD")["tasks"]}
    assert (rows["A"]["max_cost_usd"], rows["A"]["budget_reached"]) == (0.1, True), rows["A"]
    assert rows["C"]["never_runs"] == {"task": "A", "status": "QUEUED", "all": [{"task": "A", "status": "QUEUED"}]}
    status = project.aipm("status", "ORD", "--wide").stdout
    assert "$0.1000 of $0.1000 (reached)" in status and behind in status, status
    again = project.aipm("run", "ORD", env=agent_env(project))
    assert again.returncode == 1 and f"aipm: {behind}" in again.stderr, again.stderr
    launch = project.aipm("launch", "ORD", env=agent_env(project))  # said as the order's budget is, not 'nothing to
    assert launch.returncode == 1, launch.stdout + launch.stderr  # launch' and exit 0
    assert "aipm: ORD/A: budget reached: the task's attempts cost $0.1000" in launch.stderr, launch.stderr
    assert "nothing to launch" not in launch.stdout
    # A's file put back as it was (an agent's `git checkout`): its cost is the spending ledger's, for these lines too
    write_task(order, "A", prompt="@cost 0.08\n@fail", priority="P0", max_attempts=3, max_cost_usd=0.1,
               target_files=["a.txt"])
    reset = project.aipm("run", "ORD", env=agent_env(project))
    assert reset.returncode == 1 and f"aipm: {behind}" in reset.stderr, reset.stderr
    assert len(journal(project)) == 3  # a later run or launch starts no attempt of it either


def test_a_budget_spent_to_the_last_share_by_a_killed_attempt_is_reached(project):
    """$0.7 spent and the $0.1 share of an attempt killed before its report are 0.7999999999999999 as floats: the
    budget of $0.8 was not 'reached' (status, --json, no `budget` line) and yet nothing could start, `why` saying
    'budget held ... its running attempts may spend $0.0000 more ... waits for them to end' with none running."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.8\n")
    write_task(order, "A", prompt="@cost 0.7", priority="P0", target_files=["a.txt"])
    write_task(order, "B", prompt="@wait-for never-made", priority="P1", timeout=1, max_attempts=1,
               target_files=["b.txt"])
    write_task(order, "C", prompt="@cost 0.05", priority="P2", target_files=["c.txt"])
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 1 and "stopped: budget reached" in proc.stderr, proc.stdout + proc.stderr
    assert _caps(project) == [0.8, 0.1]
    assert project.statuses() == {"A": "DONE", "B": "FAILED", "C": "QUEUED"}
    assert project.json("status", "ORD")["budget_reached"] is True
    assert "budget reached" in project.aipm("why", "C").stdout


@pytest.mark.parametrize("limit", [0.8, 0.8000004])
def test_a_budget_with_less_than_a_micro_dollar_left_is_reached(project, limit):
    """A limit that is no whole number of micro-dollars (0.8000004, which money_field takes) with 0.8 spent leaves
    less than the least share: `available` gave nothing, yet `reached` compared 0.8 with 0.8000004, so the run
    ended 1 without its `budget` line and `why` said 'budget held ... waits for them to end' with nothing running."""
    order = project.order()
    (order / "order.yaml").write_text(f"id: ORD\nmax_cost_usd: {limit}\n")
    write_task(order, "A", title="a", status="DONE", command="true", target_files=["a.txt"], cost_usd=0.7)
    write_task(order, "B", title="b", status="FAILED", command="true", target_files=["b.txt"],
               cost_unreported_usd=0.1)
    write_task(order, "C", title="c", command="true", target_files=["c.txt"])
    assert project.json("status", "ORD")["budget_reached"] is True
    assert "budget reached" in project.aipm("why", "C").stdout
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 1 and "stopped: budget reached" in proc.stderr, proc.stdout + proc.stderr
    assert project.statuses() == {"A": "DONE", "B": "FAILED", "C": "QUEUED"}


def test_a_killed_attempt_that_reported_its_cost_counts_its_cost_not_its_cap(project):
    (project.root / "aipm.yaml").write_text("max_workers: 1\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 1\n")
    write_task(order, "A", prompt="@cost 0.04\n@linger", timeout=1, max_attempts=2, max_cost_usd=0.3)
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    a = task_file(order, "A")
    assert (a["status"], a["cost_usd"]) == ("FAILED", 0.08) and "cost_unreported_usd" not in a, a
    assert "timed out" in a["reason"], a
    status = project.json("status", "ORD")
    assert status["cost_usd"] == pytest.approx(0.08) and "cost_unreported_usd" not in status, status


def test_an_attempt_whose_agent_never_began_counts_no_cap(project):
    """claude refusing its command line (an older Claude Code: unknown option '--max-budget-usd') exits at once,
    before its first event: it spent nothing. Its cap was counted as spent, so the first such attempt 'reached'
    the budget ('not reported by their attempts'), kept in the task file for every later run."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.3\n")
    write_task(order, "R", prompt="@refuse", priority="P0", max_attempts=3, target_files=["r.txt"])
    write_task(order, "G", prompt="@cost 0.1", priority="P2", target_files=["g.txt"])
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 1 and "budget" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert project.statuses() == {"R": "FAILED", "G": "DONE"}
    r = task_file(order, "R")
    assert "cost_unreported_usd" not in r and "cost_usd" not in r, r
    assert [j["task"] for j in journal(project)] == ["R", "R", "R", "G"]
    assert "usage: cost unknown; tokens unknown" in (project.root / ".aipm/logs/ORD/R.1.log").read_text()
    status = project.json("status", "ORD")
    assert (status["cost_usd"], status["budget_reached"]) == (0.1, False) and "cost_unreported_usd" not in status


def test_an_attempt_killed_before_its_agents_first_event_counts_its_cap(project):
    """Only an attempt that exited by itself with no event of claude's spent nothing for sure: one killed (its
    timeout, a start hung on an MCP server) counts its cap, whatever its log holds."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.3\n")
    write_task(order, "A", prompt="@hang", timeout=1, max_attempts=1, max_cost_usd=0.1, target_files=["a.txt"])
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    a = task_file(order, "A")
    assert (a["status"], a.get("cost_usd"), a["cost_unreported_usd"]) == ("FAILED", None, 0.1), a
    assert "up to its cap $0.1000" in (project.root / ".aipm/logs/ORD/A.1.log").read_text()


def test_settle_counts_the_cap_of_an_attempt_without_a_reported_cost(tmp_path):
    log = tmp_path / "T.1.log"
    log.write_text(json.dumps({"type": "system", "subtype": "init", "session_id": "s1"}) + "\n")
    usage, updates = agents.settle("claude", log, 0.5, None, cap=0.2, unreported=0.1)
    assert usage.cost_usd is None and "cost_usd" not in updates
    assert updates["cost_unreported_usd"] == pytest.approx(0.3)
    assert "counted against the budget as not reported" in log.read_text()
    # no cap (no budget): unknown stays unknown, as before
    assert "cost_unreported_usd" not in agents.settle("claude", log, 0.5, None)[1]
    # codex and aider take no cap, so their attempts never get one to count (Record.cost_cap stays None)
    assert not agents.caps_cost("codex") and not agents.caps_cost("aider") and agents.caps_cost("claude")

def test_claudes_cap_is_never_rounded_up(tmp_path):
    argv = claude.argv(attempt(tmp_path, max_cost_usd=1234.567891))
    assert argv[argv.index("--max-budget-usd") + 1] == "1234.567891"  # `:g` made it 1234.57


def test_a_task_cap_below_its_share_of_the_order_budget_wins(project):
    """A's own $0.1 is less than an equal half of the order's $1: it gets that, and B what A cannot use."""
    (project.root / "aipm.yaml").write_text("max_workers: 2\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 1\n")
    write_task(order, "A", prompt="hi", target_files=["a.txt"], max_cost_usd=0.1)
    write_task(order, "B", prompt="hi", target_files=["b.txt"])
    assert project.aipm("run", "ORD", "--no-auto-scaling", env=agent_env(project)).returncode == 0
    caps = {j["task"]: j["argv"][j["argv"].index("--max-budget-usd") + 1] for j in journal(project)}
    assert caps == {"A": "0.1", "B": "0.9"}


def test_a_task_budget_is_passed_to_claude(project):
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    write_task(project.order(), "A", prompt="hi", max_cost_usd=2.5)
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 0
    argv = journal(project)[0]["argv"]
    assert argv[argv.index("--max-budget-usd") + 1] == "2.5"


# ---- stopped attempts: what they reported before the stop still counts -----------------------------------


def waiting_aider(project, **fields) -> Path:
    """An aider task whose attempts report $0.04, then go on until the gate opens."""
    return write_task(project.order(), "A", agent="aider", prompt=f"@cost 0.04\n@wait-for {project.root / 'gate'}",
                      target_files=["a.txt"], **fields)


def reported(project, attempt: int = 1) -> bool:
    log = project.root / f".aipm/logs/ORD/A.{attempt}.log"
    return log.exists() and "session." in log.read_text()


def test_a_cancelled_attempt_keeps_the_cost_it_reported(project, gate):
    path = waiting_aider(project)
    project.aipm("launch", "ORD", env=agent_env(project), check=True)
    wait_for(lambda: reported(project))
    project.aipm("cancel", "A", check=True)
    wait_for(lambda: no_workers(project.root))
    a = yaml.safe_load(path.read_text())
    assert (a["status"], a["cost_usd"]) == ("CANCELLED", 0.04)
    assert "usage: cost $0.0400" in (project.root / ".aipm/logs/ORD/A.1.log").read_text()


@pytest.mark.parametrize("owner", ["alive", "killed"])
def test_a_cancelled_claude_attempt_that_reported_no_cost_counts_its_cap(project, gate, owner):
    """Claude's cost comes only in its final result: cancelled before it, its cap counts against the budget. Also
    when the cancel itself settles the attempt, its owner SIGKILLed (that settling was written without the cap and
    counted nothing)."""
    from conftest import state

    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.3\n")
    path = write_task(order, "A", agent="claude", prompt=f"@cost 0.04\n@wait-for {project.root / 'gate'}",
                      target_files=["a.txt"])
    project.aipm("launch", "ORD", env=agent_env(project), check=True)
    wait_for(lambda: journal(project))
    if owner == "killed":
        os.kill(json.loads((state(project.root) / "workers" / "ORD" / "A.json").read_text())["owner_pid"],
                signal.SIGKILL)
    project.aipm("cancel", "A", "--grace", "1", check=True)
    wait_for(lambda: no_workers(project.root))
    a = yaml.safe_load(path.read_text())
    assert (a["status"], a.get("cost_usd"), a["cost_unreported_usd"]) == ("CANCELLED", None, 0.3), a
    assert project.json("status", "ORD")["budget_reached"]


def test_ctrl_c_of_run_keeps_the_cost_the_attempt_reported(project, gate):
    path = waiting_aider(project)
    env = {**os.environ, **agent_env(project), "AIPM_ENABLE_MONITORING": "false"}
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: reported(project))
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=60) == 130
    a = yaml.safe_load(path.read_text())
    assert (a["status"], a["attempts"], a["cost_usd"]) == ("QUEUED", 0, 0.04)


@pytest.mark.parametrize("ledger, limit, said", [
    (None, "0.2", "budget   ORD: budget reached: the order's attempts cost $0.0000 spent, up to $0.2000 more not "
                  "reported by their attempts of max_cost_usd $0.2000 (order.yaml); raise it to go on"),
    (0.1, "0.3", "budget   ORD: budget reached"),
])
def test_ctrl_c_whose_stopped_claude_attempts_fill_the_budget_says_so_then(project, gate, ledger, limit, said):
    """A user trial: two claude tasks shared a $0.20 budget, Ctrl-C stopped both before their result, and their
    caps ($0.10 each) counted as spent. `run` said only `stopped by signal; re-queued: A, B`; the next `run` started
    nothing and said `budget reached` for the first time. Now the Ctrl-C says it, with what to do. With `ledger`,
    part of the budget was spent by a task whose file is gone (the spending ledger has its cost): the Ctrl-C judged
    the budget by the task files alone, and said nothing."""
    from aipm.runtime import Runtime

    order = project.order()
    (order / "order.yaml").write_text(f"id: ORD\nmax_cost_usd: {limit}\n")
    if ledger is not None:
        Runtime(project.root).ledger_paths("ORD", writing=True)[0].write_text(json.dumps(
            {"task": "G", "attempt": 1, "phase": "work", "definition": "", "cost_usd": ledger,
             "cost_unreported_usd": 0.0}) + "\n")
    for name in "AB":
        write_task(order, name, agent="claude", prompt=f"@cost 0.01\n@wait-for {gate}", target_files=[f"{name}.txt"])
    write_task(order, "C", command="true", depends_on=["A"], target_files=["c.txt"])
    env = {**os.environ, **agent_env(project), "AIPM_ENABLE_MONITORING": "false"}
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(journal(project)) == 2)
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 130, out + err
    assert said in out, out + err
    assert project.json("status", "ORD")["budget_reached"]


def test_ctrl_c_whose_stopped_claude_attempt_fills_its_tasks_own_budget_says_so_then(project, gate):
    """The same of a task's own max_cost_usd: its first attempt is capped at all of it, so a Ctrl-C before the
    result spends it (as far as aipm can tell). `run` said only `stopped by signal`; the next run started nothing."""
    write_task(project.order(), "A", agent="claude", prompt=f"@cost 0.01\n@wait-for {gate}", max_cost_usd=0.3,
               target_files=["a.txt"])
    env = {**os.environ, **agent_env(project), "AIPM_ENABLE_MONITORING": "false"}
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: journal(project))
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 130, out + err
    assert ("budget   ORD/A: budget reached: the task's attempts cost unknown: up to $0.3000 not reported by their "
            "attempts of its max_cost_usd $0.3000; raise it to go on") in out, out + err


def test_ctrl_c_right_after_a_checkout_of_the_task_file_keeps_the_cost_the_attempt_reported(project, gate):
    """The file put back (QUEUED, no cost) and the run stopped before it restored the file: the stop took the
    attempt for another's and dropped its record with its usage unread (a review saw it in 2 of 9 runs; the
    run is held with SIGSTOP here so that the reset and the Ctrl-C reach it together)."""
    path = waiting_aider(project)
    original = path.read_bytes()
    env = {**os.environ, **agent_env(project), "AIPM_ENABLE_MONITORING": "false"}
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: reported(project))
    run.send_signal(signal.SIGSTOP)
    try:
        reset = path.with_name(".reset.tmp")
        reset.write_bytes(original)
        os.replace(reset, path)  # as `git checkout` does
        run.send_signal(signal.SIGINT)
    finally:
        run.send_signal(signal.SIGCONT)
    assert run.wait(timeout=60) == 130
    a = yaml.safe_load(path.read_text())
    assert (a["status"], a["attempts"], a.get("cost_usd")) == ("QUEUED", 0, 0.04)


def test_a_preempted_attempt_keeps_the_cost_it_reported(project, gate):
    path = waiting_aider(project, priority="P3")
    env = {**os.environ, **agent_env(project), "AIPM_ENABLE_MONITORING": "false"}
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD", "--preempt"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: reported(project))
    # The urgent task opens the gate, so the second attempt of A reports its $0.04 and ends.
    write_task(project.order(), "URGENT", priority="P0", target_files=["a.txt"], command=f"touch {gate}")
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 0, out
    a = yaml.safe_load(path.read_text())
    assert (a["status"], a["preemptions"], a["cost_usd"]) == ("DONE", 1, 0.08)


def test_an_attempt_recovered_after_its_owner_died_keeps_the_cost_it_reported(project, gate):
    from aipm.runtime import Runtime

    path = waiting_aider(project)
    project.aipm("launch", "ORD", env=agent_env(project), check=True)
    wait_for(lambda: reported(project))
    rec = Runtime(project.root).read_record("ORD", "A")
    os.kill(rec.owner_pid, signal.SIGKILL)  # first, or it would record the worker's end itself
    os.killpg(rec.pgid, signal.SIGKILL)  # worker and wrapper: no exit code is left
    wait_for(lambda: not rec.alive())
    assert "requeued" in project.aipm("recover", "ORD", check=True).stdout
    a = yaml.safe_load(path.read_text())
    assert (a["status"], a["cost_usd"]) == ("QUEUED", 0.04)


def test_an_attempt_whose_exit_code_was_lost_keeps_the_cost_it_reported(project, gate):
    from aipm.runtime import Runtime

    path = waiting_aider(project)
    project.aipm("launch", "ORD", env=agent_env(project), check=True)
    wait_for(lambda: reported(project))
    rec = Runtime(project.root).read_record("ORD", "A")
    os.kill(rec.owner_pid, signal.SIGKILL)  # so that the adopter reads the exit file
    gate.touch()
    exit_file = Path(rec.exit_file)
    wait_for(lambda: exit_file.exists() and exit_file.read_text().strip())
    exit_file.write_text("")  # as when the wrapper's write of it failed (a full disk)
    said = project.aipm("recover", "ORD", env=agent_env(project), check=True).stdout
    assert "its worker had ended: recorded INTERRUPTED (interrupted: exit code lost)" in said, said
    wait_for(lambda: no_workers(project.root))
    a = yaml.safe_load(path.read_text())
    assert (a["status"], a["cost_usd"]) == ("INTERRUPTED", 0.04)


# ---- notify ---------------------------------------------------------------------------------------------


def test_notify_runs_on_failure_and_at_the_end_of_the_order(project):
    notes = project.root / "notes.txt"
    (project.root / "aipm.yaml").write_text(
        "worker:\n  agent: claude\n"
        f"notify: 'echo \"$AIPM_EVENT $AIPM_STATUS ${{AIPM_TASK_ID:-}}\" >> {notes}'\n")
    order = project.order()
    write_task(order, "BAD", prompt="@fail")
    write_task(order, "GOOD", prompt="fine")
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 1
    # The command runs detached: wait for what it writes, not for a time.
    lines = wait_for(lambda: len(notes.read_text().splitlines()) >= 2 and notes.read_text().splitlines()
                     if notes.exists() else None)
    assert sorted(lines) == ["failed FAILED BAD", "order_finished INCOMPLETE "]
    assert "failed FAILED: ORD/BAD is FAILED" in (project.root / ".aipm" / "notify.log").read_text()


def test_a_relative_notify_command_runs_in_the_project_root_wherever_aipm_was_started(project):
    """`notify: [./scripts/notify.sh]` ran in the working directory of the aipm that sent it: from a subdirectory
    it was "not found", and nothing was told (the worker template beside it ran, from the root)."""
    (project.root / "scripts").mkdir()
    script = project.root / "scripts" / "notify.sh"
    script.write_text('#!/bin/sh\necho "$AIPM_EVENT $(pwd)" >> "$AIPM_ROOT/notified.txt"\n')
    script.chmod(0o755)
    (project.root / "aipm.yaml").write_text("notify: [./scripts/notify.sh]\n")
    write_task(project.order(), "BAD", command="exit 3", target_files=["a.txt"])
    (project.root / "src").mkdir()
    proc = subprocess.run([sys.executable, "-m", "aipm", "run", "ORD"], cwd=project.root / "src", text=True,
                          capture_output=True, env=dict(os.environ, AIPM_ENABLE_MONITORING="false"), timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    told = project.root / "notified.txt"
    lines = wait_for(lambda: told.exists() and len(told.read_text().splitlines()) >= 2 and told.read_text())
    assert sorted(lines.splitlines()) == [f"failed {project.root}", f"order_finished {project.root}"], lines


def test_notify_after_a_retry_names_the_attempt_whose_log_it_gives(project):
    """AIPM_ATTEMPT was the count since the last `retry` (1 again), while the worker's AIPM_ATTEMPT, the log's
    name and `aipm logs --attempt` use the attempt's serial: after a retry the hook was told attempt 1 of a
    failure whose log is attempt 2, and `aipm logs T --attempt $AIPM_ATTEMPT` showed the older failure."""
    notes = project.root / "notes.txt"
    (project.root / "aipm.yaml").write_text(
        f"notify: 'echo \"${{AIPM_TASK_ID:-}} $AIPM_ATTEMPT ${{AIPM_LOG:-}}\" >> {notes}'\n")
    write_task(project.order(), "A", command="echo worker-attempt-$AIPM_ATTEMPT; exit 3")
    assert project.aipm("run", "ORD").returncode == 1
    assert project.aipm("retry", "A").returncode == 0
    assert project.aipm("run", "ORD").returncode == 1
    def failures() -> list[str]:  # the hook runs detached: wait for both failures' lines, not for a time
        lines = notes.read_text().splitlines() if notes.exists() else []
        return [line for line in lines if line.startswith("A ")]

    wait_for(lambda: len(failures()) == 2)
    lines = failures()
    log = str(project.root / ".aipm" / "logs" / "ORD" / "A.2.log")
    assert lines[-1] == f"A 2 {log}"
    assert "worker-attempt-2" in project.aipm("logs", "A", "--attempt", "2").stdout


def test_ended_notify_commands_do_not_pile_up_as_zombies_of_a_run(project):
    """A notify command is re-parented to the run (a child subreaper) once its detaching shell exits, and nothing
    waited for it: each failure left a `[sh] <defunct>` below a long `aipm run` until the run ended. Now those
    that ended are collected when the next attempt ends or the next notification starts."""
    import psutil

    notes, gate = project.root / "notes.txt", project.root / "gate"
    (project.root / "aipm.yaml").write_text(f"max_workers: 1\nnotify: 'echo \"${{AIPM_TASK_ID:-}}\" >> {notes}'\n")
    order = project.order()

    def after(task: str) -> str:  # poll (no sleep as a clock): the previous failure has been told
        return f"until grep -qx {task} {notes} 2>/dev/null; do sleep 0.05; done; "

    write_task(order, "F1", command="exit 3", priority="P0")
    write_task(order, "F2", command=after("F1") + "exit 3", priority="P1")
    write_task(order, "F3", command=after("F2") + "exit 3", priority="P2")
    write_task(order, "L", command=after("F3") + f"until [ -e {gate} ]; do sleep 0.05; done", priority="P3")
    env = dict(os.environ, AIPM_ENABLE_MONITORING="false")
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        me = psutil.Process(run.pid)

        def notifiers() -> list[psutil.Process]:  # the run's children that are no worker (workers: aipm-worker)
            out = []
            for child in me.children():
                try:
                    if "aipm-worker" not in " ".join(child.cmdline()):
                        out.append(child)
                except psutil.ZombieProcess:
                    out.append(child)
                except psutil.NoSuchProcess:
                    pass
            return out

        def state(child: psutil.Process) -> str | None:  # None: reaped between the listing and this read
            try:
                return child.status()
            except psutil.NoSuchProcess:
                return None

        def settled() -> bool:  # L runs, all three failures were told, and every notify command has ended
            lines = notes.read_text().split() if notes.exists() else []
            alive = [c for c in notifiers() if state(c) not in (psutil.STATUS_ZOMBIE, None)]
            return lines == ["F1", "F2", "F3"] and not alive and task_statuses(order)["L"] == "IN_PROGRESS"

        wait_for(settled)
        zombies = [c.pid for c in notifiers() if state(c) == psutil.STATUS_ZOMBIE]
        assert len(zombies) <= 1, f"ended notify commands never collected: {zombies}"  # F3's, until L ends
        gate.touch()
        assert run.wait(timeout=120) == 1
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()


def test_a_notify_command_is_never_taken_for_an_attempts_leftover(project):
    """When an attempt ends, its owner ends the processes it left behind, recognising notify commands by their
    environment; one that cleared it (`env -i`) must still be spared: the owner knows the pids it started."""
    notes = project.root / "notes.txt"
    (project.root / "aipm.yaml").write_text(
        f'max_workers: 1\nnotify: ["env", "-i", "/bin/sh", "-c", "sleep 1; echo late >> {notes}"]\n')
    order = project.order()
    write_task(order, "BAD", command="exit 3", priority="P0")  # fails first: a notify command starts
    write_task(order, "GOOD", command="sleep 0.5", priority="P1")  # ends while that command still sleeps
    assert project.aipm("run", "ORD").returncode == 1
    wait_for(lambda: notes.exists() and notes.read_text() == "late\nlate\n")  # the failure's and the order's end


def test_an_attempt_whose_exit_code_was_lost_is_notified_as_a_failure_is(project, gate):
    """The worker ended with its run killed, and its exit file was left empty (the code never reached the disk):
    the next run leaves the task INTERRUPTED for a person to check and retry, as a failure is left, but the
    `notify` command was told only of the order's end."""
    notes = project.root / "notes.txt"
    (project.root / "aipm.yaml").write_text(
        f"notify: 'echo \"$AIPM_EVENT $AIPM_STATUS ${{AIPM_TASK_ID:-}}\" >> {notes}'\n")
    ready = project.root / "ready"
    write_task(project.order(), "T", command=f'touch "{ready}"; while [ ! -e "{gate}" ]; do sleep 0.05; done')
    first = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"],
                             env=dict(os.environ, AIPM_ENABLE_MONITORING="false"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(ready.exists)
    first.kill()
    first.wait()
    gate.touch()  # the worker ends with no owner to record it
    exit_file = state(project.root) / "exit" / "ORD" / "T.1"
    wait_for(lambda: exit_file.exists() and exit_file.read_text())
    exit_file.write_text("")  # the code never reached the disk
    assert project.aipm("run", "ORD").returncode == 1
    assert project.statuses() == {"T": "INTERRUPTED"}
    wait_for(lambda: notes.exists() and len(notes.read_text().splitlines()) >= 2)
    assert sorted(notes.read_text().splitlines()) == ["interrupted INTERRUPTED T", "order_finished INCOMPLETE "]
    assert "interrupted INTERRUPTED: ORD/T is INTERRUPTED after attempt 1 (exit code lost; check its work, then " \
        "`aipm retry`); log: " in (project.root / ".aipm" / "notify.log").read_text()


def test_a_notify_command_that_cannot_run_changes_nothing(project):
    (project.root / "aipm.yaml").write_text('notify: ["/nonexistent/bell", "ring"]\n')
    write_task(project.order(), "A", command="exit 3")
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert project.statuses() == {"A": "FAILED"}
    log = project.root / ".aipm" / "notify.log"
    wait_for(lambda: "/nonexistent/bell" in log.read_text())


def test_a_fifo_a_worker_leaves_at_the_notify_log_hangs_nothing(project):
    """`.aipm/notify.log` was opened as any file: a FIFO a worker left there held its run for ever once a failure
    was to be told (and the command's shell, opening it for the command's output). Now the command still runs,
    its output to nowhere, and the worker's FIFO is left as it is."""
    notes = project.root / "notes.txt"
    (project.root / "aipm.yaml").write_text(f"notify: 'echo \"$AIPM_EVENT\" >> {notes}'\n")
    write_task(project.order(), "A", command="rm -f .aipm/notify.log; mkfifo .aipm/notify.log; exit 3")
    proc = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert project.statuses() == {"A": "FAILED"} and (project.root / ".aipm" / "notify.log").is_fifo()
    wait_for(lambda: notes.exists() and sorted(notes.read_text().split()) == ["failed", "order_finished"])


# ---- retry --resume -------------------------------------------------------------------------------------


def failed_with_a_session(project, agent: str) -> tuple[Path, str]:
    """An order whose task A failed under `agent`, and the session id recorded for it."""
    (project.root / "aipm.yaml").write_text(f"worker:\n  agent: {agent}\n")
    order = project.order()
    write_task(order, "A", prompt="@fail")
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 1
    return order, task_file(order, "A")["session_id"]


@pytest.mark.parametrize("left", ["feedback", "resume"])
def test_a_sparse_terabyte_left_as_the_feedback_or_the_resumed_session_is_not_read(project, left):
    """The next attempt's prompt takes its review's feedback, and its command line the session `retry --resume`
    left: both are in `.aipm/`, where a worker's sparse terabyte (`truncate -s 1T`) was read whole by the run
    that started the attempt (a MemoryError traceback). Such a file is none."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    write_task(project.order(), "A", prompt="do it")
    hostile = project.root / ".aipm" / left / "ORD" / "A.txt"
    hostile.parent.mkdir(parents=True)
    hostile.touch()
    os.truncate(hostile, 2**40)
    proc = project.aipm("run", "ORD", env=agent_env(project), timeout=60, preexec_fn=capped_memory)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert task_statuses(project.order()) == {"A": "DONE"}
    [run] = journal(project)
    assert "--resume" not in run["argv"]
    assert (project.root / ".aipm/logs/ORD/A.1.prompt.md").read_text() == "do it"


def test_retry_resume_continues_the_agent_session(project):
    order, session = failed_with_a_session(project, "claude")
    proc = project.aipm("retry", "A", "--resume")
    assert proc.returncode == 0 and session in proc.stdout
    (order / "A.yaml").write_text((order / "A.yaml").read_text().replace("@fail", "try again"))
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 0
    first, second = journal(project)
    assert "--resume" not in first["argv"]
    assert second["argv"][second["argv"].index("--resume") + 1] == session
    # Used once: a plain retry starts a fresh session.
    project.aipm("retry", "A", check=True)
    project.aipm("run", "ORD", env=agent_env(project), check=True)
    assert "--resume" not in journal(project)[2]["argv"]


def test_a_resumed_claude_attempt_is_charged_its_own_cost_once(project):
    """Claude Code's `--resume S` starts from the cost session S had at its last exit (restoreCostStateForSession):
    the resumed attempt's total_cost_usd held the earlier attempts' cost, which aipm had recorded already, so it was
    added again, and its --max-budget-usd cap counted it too (an attempt capped at its share stopped at once).
    With --fork-session the conversation goes on under a new session id whose cost starts at 0."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    order = project.order()
    write_task(order, "A", prompt="@cost 0.15\n@fail", max_cost_usd=0.3)
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 1
    session = task_file(order, "A")["session_id"]
    project.aipm("retry", "A", "--resume", check=True)
    (order / "A.yaml").write_text((order / "A.yaml").read_text().replace("@cost 0.15", "@cost 0.1")
                               .replace("@fail", "ok"))
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a = task_file(order, "A")
    assert (a["status"], a["cost_usd"]) == ("DONE", 0.25)
    argv = journal(project)[1]["argv"]
    assert argv[argv.index("--resume") + 1] == session and "--fork-session" in argv
    assert a["session_id"] != session  # the fork's: a later `retry --resume` continues from where this one ended


def test_status_json_and_the_board_give_each_tasks_session_when_known(project):
    """`status --json` left out the session `retry --resume` continues: a script had to read the task file."""
    from aipm.board import order_board
    from aipm.launcher import Launcher, Options
    from aipm.project import Project
    from aipm.settings import load_settings

    order = project.order()
    session = "9b1f4c2e-5d7a-4e0b-8c3f-2a6d1e9b7c40"
    write_task(order, "A", agent="claude", prompt="x", status="FAILED", attempts=1, session_id=session)
    write_task(order, "B", command="true")  # no agent session: left out, never null
    rows = {t["id"]: t for t in project.json("status", "ORD")["tasks"]}
    assert rows["A"]["session_id"] == session and "session_id" not in rows["B"]
    settings = load_settings(project.root)
    launcher = Launcher(Project(project.root, settings.orders_dir), settings, Options(dry_run=True), monitor=None)
    rows = {t["id"]: t for t in order_board(launcher, order)["tasks"]}  # what /api/board sends
    assert rows["A"]["session_id"] == session and "session_id" not in rows["B"]


@pytest.mark.parametrize("agent, field", [("aider", "agent"), ("claude", "session_id")])
def test_retry_resume_refused_without_a_session_to_resume(project, agent, field):
    order = project.order()
    write_task(order, "A", agent=agent, prompt="x", status="FAILED")
    before = snapshot(project.root)
    proc = project.aipm("retry", "A", "--resume")
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert "A.yaml" in line and field in line
    assert snapshot(project.root) == before


# ---- bad settings -----------------------------------------------------------------------------------------


def test_a_bad_worker_agent_setting_is_one_line_and_exit_2(project):
    (project.root / "aipm.yaml").write_text("worker:\n  agent: gpt\n")
    write_task(project.order(), "A", prompt="x")
    before = snapshot(project.root)
    for command in (("run", "ORD"), ("launch", "ORD"), ("config",)):
        proc = project.aipm(*command)
        assert proc.returncode == 2, proc.stderr
        (line,) = proc.stderr.splitlines()
        assert "worker.agent" in line and "'gpt' is not one of command, claude, codex, aider" in line
    assert snapshot(project.root) == before


@pytest.mark.parametrize("value", ["-1", "ten", "1.0e+309", ".nan", "1.0e+308", "1.0e+12", "0.0000004"])
@pytest.mark.parametrize("where", ["order.yaml", "aipm.yaml", "task"])
def test_a_bad_budget_is_one_line_and_exit_2(project, where, value):
    """1e308 (meant as no limit) was taken, and `run` died with a traceback sharing it out in micro-dollars; less
    than a micro-dollar was taken too, and nothing ever started ('budget held ... waits for them to end' with
    nothing running), or claude got `--max-budget-usd 0`."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n"
                                            + f"max_cost_usd: {value}\n" * (where == "aipm.yaml"))
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\n" + f"max_cost_usd: {value}\n" * (where == "order.yaml"))
    path = order / "A.yaml"
    path.write_text("id: A\nprompt: x\ntarget_files: [a.txt]\n" + f"max_cost_usd: {value}\n" * (where == "task"))
    before = snapshot(project.root)
    for command in (("run", "ORD"), ("launch", "ORD"), ("validate", "ORD")):
        proc = project.aipm(*command, env=agent_env(project))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        (line,) = proc.stderr.splitlines()
        assert "max_cost_usd" in line and (where in line or where == "task" and str(path) in line), line
    assert snapshot(project.root) == before and journal(project) == []


def test_a_missing_agent_program_is_refused_at_launch(project):
    """The message names the setting that chose the preset (it named worker.command, the template, which a
    preset does not use)."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: codex\n")
    order = project.order()
    write_task(order, "A", prompt="x")
    write_task(order, "B", prompt="x", agent="aider")
    proc = project.aipm("launch", "ORD", env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1
    assert ("program 'codex' not found on PATH; install it or fix worker.agent (the agent preset) in aipm.yaml"
            in proc.stderr), proc.stderr
    assert f"program 'aider' not found on PATH; install it or fix `agent` in {order / 'B.yaml'}" in proc.stderr
    assert project.statuses() == {"A": "QUEUED", "B": "QUEUED"}


# ---- racing workers, killed supervisors ----------------------------------------------------------------


def _caps(project) -> list[float]:
    """The --max-budget-usd each claude attempt was given, in the order they ran."""
    argvs = [j["argv"] for j in journal(project)]
    assert all("--max-budget-usd" in argv for argv in argvs), argvs  # under a budget every attempt is capped
    return [float(argv[argv.index("--max-budget-usd") + 1]) for argv in argvs]


def test_attempts_started_together_share_the_budget_so_it_holds(project):
    """A user trial: budget $0.05, four claude tasks of $0.05 each, four workers: all four started at once with no
    cap, each spent $0.05, the order cost $0.20 and `run` said DONE 4, exit 0. Now they share it, and a share is no
    less than MIN_SHARE ($0.10) while more could start: one starts, with all of it, and finishes."""
    (project.root / "aipm.yaml").write_text("max_workers: 4\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.05\n")
    for i in range(4):
        write_task(order, f"T{i}", prompt="@cost 0.05", target_files=[f"f{i}.txt"])
    proc = project.aipm("run", "ORD", "--no-auto-scaling", env=agent_env(project))
    status = project.json("status", "ORD")
    assert status["cost_usd"] <= 0.05 and status["budget_reached"], status
    assert _caps(project) == [0.05]
    assert sorted(t["status"] for t in status["tasks"]) == ["DONE", "QUEUED", "QUEUED", "QUEUED"], status
    assert proc.returncode == 1 and "over budget" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_fewer_micro_dollars_left_than_attempts_start_only_as_many_as_get_one(project):
    """A review found two micro-dollars left shared by three attempts starting together: each was given a cap of
    $0 (the share cut to whole micro-dollars), none could spend anything, and each failed for good. Less than a
    least share left, one attempt gets all of it; stopped at that cap, it is not counted against its task."""
    (project.root / "aipm.yaml").write_text("max_workers: 5\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.05\n")
    write_task(order, "T0", command="true", status="DONE", cost_usd=0.049998)
    for n in range(1, 4):
        write_task(order, f"T{n}", prompt="@cost 0.001", target_files=[f"f{n}.txt"])
    project.aipm("run", "ORD", "--no-auto-scaling", env=agent_env(project))
    assert _caps(project) == [0.000002]  # the others wait, and then the budget is reached
    status = project.json("status", "ORD")
    assert status["cost_usd"] <= 0.05 and status["budget_reached"], status
    assert sorted(t["status"] for t in status["tasks"]) == ["DONE", "QUEUED", "QUEUED", "QUEUED"], status


def test_a_small_budget_runs_fewer_attempts_at_once_and_one_stopped_at_its_cap_waits_for_more(project):
    """A tester's order: $0.25, five claude tasks needing $0.10 each. Each was given $0.05, all five stopped at it
    and ended FAILED ('fix it, then `aipm retry`'): $0.25 spent, nothing done, no `budget` line. Now no share is
    below $0.10 while more could start (two of $0.125, then the $0.05 left), an attempt stopped at the cap aipm gave
    it is the budget's doing (QUEUED, attempt not counted), and the run ends with the budget's one line."""
    (project.root / "aipm.yaml").write_text("max_workers: 5\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.25\n")
    for i in range(1, 6):
        write_task(order, f"T{i}", prompt="@cost 0.10", target_files=[f"f{i}.txt"])
    proc = project.aipm("run", "ORD", "--no-resource-monitoring", env=agent_env(project))
    said = proc.stdout + proc.stderr
    assert proc.returncode == 1, said
    assert _caps(project) == [0.125, 0.125, 0.05], journal(project)
    assert project.statuses() == {"T1": "DONE", "T2": "DONE", "T3": "QUEUED", "T4": "QUEUED", "T5": "QUEUED"}
    t3 = task_file(order, "T3")
    assert (t3["attempts"], t3["cost_usd"]) == (0, 0.05), t3
    assert ("finish   T3 → QUEUED (exit 1; stopped at the cap aipm gave it ($0.0500, --max-budget-usd), what the "
            "budget left it; attempt not counted)") in proc.stdout, said
    assert [line for line in proc.stdout.splitlines() if line.startswith("budget")] == [
        "budget   ORD: budget reached: the order's attempts cost $0.2500 of max_cost_usd $0.2500 (order.yaml); "
        "raise it to go on"], said
    assert "FAILED" not in said and "retry" not in said, said


def test_a_ramp_up_shares_the_budget_among_the_attempts_that_would_run_together(project, gate):
    """A tester's order on a half-busy machine ($3, three claude tasks, one start per second): the first attempt
    was given all of the budget, and the others waited for it to end ('budget held'). Each is given a third now, and
    the ramp's second is the only wait."""
    (project.root / "aipm.yaml").write_text("max_workers: 5\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 3\n")
    for i in range(1, 4):
        write_task(order, f"T{i}", prompt=f"@cost 0.01\n@wait-for {gate}", target_files=[f"f{i}.txt"])
    env = {**os.environ, **agent_env(project), "AIPM_FAKE_LOAD": "60,10", "AIPM_ENABLE_MONITORING": "true"}
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD", "--max-cpu",
                            "100"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: len(journal(project)) == 3, timeout=20)  # all three run before any ends
    finally:
        gate.touch()
        out = run.communicate(timeout=60)[0]
    assert "ramping up" in out and "budget held" not in out, out
    assert _caps(project) == [1, 1, 1]
    assert run.returncode == 0, out


def test_the_budget_holds_with_launchers_racing_and_workers_finishing_in_parallel(project):
    """Two detached `aipm launch` and an `aipm run` of the same order race; owners start successors as tasks end.
    Whatever the interleaving, what the attempts recorded never adds up to more than the budget, and no attempt
    was ever given more than the budget."""
    (project.root / "aipm.yaml").write_text("max_workers: 3\nworker:\n  agent: claude\nmax_attempts: 2\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.3\n")
    costs = [0.02, 0.05, 0.2, 0.03, 0.08, 0.01, 0.12, 0.04]
    for i, cost in enumerate(costs):
        write_task(order, f"T{i}", prompt=f"@cost {cost}", target_files=[f"f{i}.txt"])
    env = {**os.environ, **agent_env(project), "AIPM_ENABLE_MONITORING": "false"}
    racers = [subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
              for args in (["launch", "ORD"], ["launch", "ORD"], ["run", "ORD"])]
    for racer in racers:
        racer.wait(timeout=120)
    wait_for(lambda: no_workers(project.root), timeout=120)
    recorded = [task_file(order, f"T{i}").get("cost_usd") or 0 for i in range(len(costs))]
    assert sum(recorded) <= 0.3 + 1e-9, recorded
    caps = _caps(project)
    assert max(caps) <= 0.3 and len(caps) >= 3, caps
    assert project.json("status", "ORD")["cost_usd"] == pytest.approx(sum(recorded))


def test_tasks_that_cost_nothing_start_while_running_attempts_hold_the_whole_budget(project, gate):
    """An end-to-end session: two claude tasks shared the order's budget, and its lint command and codex task, which
    spend nothing against it, waited (`budget held`) until a claude attempt ended, with free worker slots."""
    (project.root / "aipm.yaml").write_text("max_workers: 4\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 5\n")
    for name in ("A", "B"):
        write_task(order, name, priority="P0", prompt=f"@cost 0.01\n@wait-for {gate}", target_files=[f"{name}.txt"])
    # (after FIRST: ready only once A and B hold the whole budget)
    write_task(order, "FIRST", priority="P0", command="true", target_files=["first.txt"])
    write_task(order, "LINT", command="true", depends_on=["FIRST"], target_files=["lint.txt"])
    write_task(order, "CODEX", agent="codex", prompt="x", depends_on=["FIRST"], target_files=["codex.txt"])
    write_task(order, "C", priority="P2", prompt="@cost 0.01", depends_on=["FIRST"], target_files=["c.txt"])
    env = {**os.environ, **agent_env(project), "AIPM_ENABLE_MONITORING": "false"}
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: task_statuses(order)["LINT"] == "DONE" and task_statuses(order)["CODEX"] == "DONE")
        assert task_statuses(order)["C"] == "QUEUED"  # a claude task still waits for a share
        # (B started with A, but its agent, a Python program, may write its line after `true` ended twice: in CI
        # once the journal had A's alone. A B held back would never write it while the gate stays shut.)
        wait_for(lambda: sorted(j["task"] for j in journal(project) if j["agent"] == "claude") == ["A", "B"])
    finally:
        gate.touch()
        out, err = run.communicate(timeout=60)
    assert run.returncode == 0, out + err


def a_holding_the_budget(project) -> Path:
    """Under an order budget of $0.10, A's detached attempt (its gate, returned, shut) holds it all; B is written
    meanwhile."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.1\n")
    gate = project.root / "gate"
    write_task(order, "A", prompt=f"@cost 0.03\n@wait-for {gate}", target_files=["a.txt"])
    assert project.aipm("launch", "ORD", env=agent_env(project)).returncode == 0
    wait_for(lambda: journal(project))
    write_task(order, "B", prompt="@cost 0.05", target_files=["b.txt"])
    return gate


def test_running_attempts_hold_their_share_until_they_end(project):
    """An attempt holds its cap while it works: a task written meanwhile waits (reason `budget`, no stop), and
    starts with what the ended attempt left."""
    gate = a_holding_the_budget(project)
    blocked = {b["id"]: b for b in project.json("detect", "ORD")["blocked"]}["B"]
    assert blocked["reason"] == "budget" and "budget held" in blocked["detail"], blocked
    launch = project.aipm("launch", "ORD", env=agent_env(project))
    assert launch.returncode == 0 and "budget reached" not in launch.stderr, launch.stderr  # it waits; no stop
    assert project.statuses()["B"] == "QUEUED"
    gate.touch()
    wait_for(lambda: project.statuses()["A"] == "DONE")
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 0
    assert _caps(project) == [0.1, 0.07]
    assert project.json("status", "ORD")["cost_usd"] == pytest.approx(0.08)


def test_a_task_held_by_the_shares_of_tasks_not_running_says_so(project):
    """$0.30 and five claude tasks on a busy machine, nothing running: B1 would start, B2 and B3 were deferred for
    the load, and B4 was said held because 'its running attempts may spend $0.3000 more', of attempts that did not
    exist: the shares were B1's, B2's and B3's. It names them, and running attempts only where there are some."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.30\n")
    for i in range(1, 6):
        write_task(order, f"B{i}", prompt="@cost 0.01", target_files=[f"b{i}.txt"])
    env = {**agent_env(project), "AIPM_FAKE_LOAD": "50,10", "AIPM_ENABLE_MONITORING": "true"}
    launch = project.aipm("launch", "ORD", "--max-cpu", "1", "--max-workers", "4", "--dry-run", env=env)
    lines = launch.stdout.splitlines()
    assert launch.returncode == 0 and {"would start B1", "deferred B2: machine busy (cpu 50%, memory 10%)",
                                       "deferred B3: machine busy (cpu 50%, memory 10%)"} < set(lines), launch.stdout
    said = ("deferred B4: budget held: the order's attempts cost $0.0000 and $0.3000 is the shares of B1, B2, B3, "
            "ranked before it, which start first, of max_cost_usd $0.3000 (order.yaml); waits for them to end")
    assert said in lines and "running attempts" not in launch.stdout, launch.stdout


def test_detect_and_why_share_the_budget_as_launch_does(project):
    """$0.25 gives two claude attempts a least share each: `launch` started A and B and deferred C-E ('budget held'),
    while `detect` listed all five as launchable and `why C` said it could start now. The plan shares the budget
    among the tasks it chooses, so every command says the same; F waits on A, and for that alone."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.25\n")
    for name in "ABCDE":
        write_task(order, name, prompt="@cost 0.01", target_files=[f"{name}.txt"])
    write_task(order, "F", prompt="@cost 0.01", depends_on=["A"], target_files=["F.txt"])
    env = {**agent_env(project), "AIPM_ENABLE_MONITORING": "false"}
    detect = project.json("detect", "ORD", env=env)
    assert [t["id"] for t in detect["launchable"]] == ["A", "B"], detect
    assert "budget held" in project.aipm("why", "C", env=env).stdout
    launch = project.json("launch", "ORD", "--dry-run", env=env)
    assert [t["id"] for t in launch["launched"]] == ["A", "B"], launch
    assert [(d["id"], d["reason"]) for d in launch["deferred"]] == [("C", "budget"), ("D", "budget"),
                                                                     ("E", "budget")], launch
    # unmonitored, as above: on a busy machine run started A alone and B later, with what A left ($0.115)
    assert project.aipm("run", "ORD", "--no-resource-monitoring", env=agent_env(project)).returncode == 0
    assert set(project.statuses().values()) == {"DONE"}
    assert _caps(project)[:2] == [0.125, 0.125], journal(project)  # the first two, a half each


def test_exec_of_a_task_the_budget_holds_back_waits_for_the_running_attempts(project):
    """`aipm exec B` while A's attempt held what was left of the budget exited 1 at once, saying `budget held ...
    waits for them to end`: it now waits, as it does for a busy machine, and runs B once A has ended."""
    gate = a_holding_the_budget(project)
    exec_ = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "exec", "B", "--json"],
                             env={**os.environ, **agent_env(project), "AIPM_ENABLE_MONITORING": "false"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        event = json.loads(exec_.stdout.readline())
        assert event["event"] == "deferred" and event["tasks"] == ["B"] and "budget held" in event["detail"], event
        gate.touch()
        out, err = exec_.communicate(timeout=120)
    finally:
        gate.touch()
        exec_.kill()
    assert exec_.returncode == 0, out + err
    assert project.statuses() == {"A": "DONE", "B": "DONE"}
    assert _caps(project) == [0.1, 0.07]


def test_an_exec_that_an_attempt_holding_the_budget_runs_does_not_wait_for_that_attempt(project):
    """A's agent runs `aipm exec B`; A holds the whole budget, so B is held back until A ends, which it cannot
    before its exec does: that exec waited for ever (held tasks are deferred, and exec waits on a deferral). An
    attempt that runs this aipm holds nothing it waits for: it says why B cannot start, and that it does not wait
    (the reason alone, 'waits for them to end', read as if it did), and exits 1."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.1\n")
    inner = project.root.parent / "inner"
    write_task(order, "A", prompt=f"@cost 0.01\n@shell timeout 60 {sys.executable} -m aipm exec B > {inner}.out "
               f"2>&1; echo $? > {inner}.rc", target_files=["a.txt"], priority="P0")
    write_task(order, "B", prompt="@cost 0.01", target_files=["b.txt"])
    run = project.aipm("run", "ORD", env=agent_env(project), timeout=120)
    said = (project.root.parent / "inner.out").read_text()
    assert (project.root.parent / "inner.rc").read_text() == "1\n", said
    assert "budget held" in said and "this exec runs inside an attempt, which does not wait" in said, said
    assert run.returncode == 0 and project.statuses() == {"A": "DONE", "B": "DONE"}, run.stdout + run.stderr


def test_a_run_that_ends_over_its_budget_says_so(project):
    """aider takes no cap: its attempt, started below the budget, ends above it. The run says the order went over
    its budget, once; every task is DONE, so it exits 0 (it exited 1, where the contract says 0 for a run whose
    every task is DONE or COMPLETED)."""
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.05\n")
    write_task(order, "A", prompt="@cost 0.2", agent="aider", target_files=["a.txt"])
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 0 and project.statuses() == {"A": "DONE"}, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("budget")]
    assert lines == ["budget   ORD: over budget: the order's attempts cost $0.2000, more than max_cost_usd $0.0500 "
                     "(order.yaml)"], proc.stdout
    events = [json.loads(line) for line in project.aipm("run", "ORD", "--json", env=agent_env(project)).stdout.splitlines()]
    assert [e["detail"] for e in events if e["event"] == "budget"] == [lines[0].split(": ", 1)[1]]
    assert events[-1]["exit_code"] == 0


def test_a_budget_the_agent_cannot_count_is_warned_about(project):
    """A user trial: `aipm init`'s worker template runs `claude -p` as a plain command, which reports no cost, so
    `max_cost_usd: 0.01` never stopped anything and no command said why."""
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.01\n")
    for name in ("P1", "P2"):
        write_task(order, name, prompt="@cost 0.05", target_files=[f"{name}.txt"])
    write_task(order, "C", command="true")  # its own command: not an agent, nothing to warn about
    expected = (f"aipm: warning: {order / 'order.yaml'}: max_cost_usd $0.0100 of order ORD cannot be enforced: P1, "
                "P2 run the worker.command template (worker.agent: command), which reports no cost, so their "
                "attempts count as nothing against it; set `worker.agent: claude` in aipm.yaml")
    (project.root / "aipm.yaml").write_text('worker:\n  command: ["claude", "-p"]\n')
    for args in (["validate", "ORD"], ["run", "ORD"]):
        proc = project.aipm(*args, env=agent_env(project))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        warned = [line for line in proc.stderr.splitlines() if "max_cost_usd" in line]
        assert len(warned) == 1 and warned[0].startswith(expected), proc.stderr
    for name in ("P1", "P2", "C"):
        write_task(order, name, prompt="@cost 0.001", target_files=[f"{name}.txt"])
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    assert "max_cost_usd" not in project.aipm("validate", "ORD").stderr
    write_task(order, "X", agent="codex", prompt="x", target_files=["x.txt"])  # one task: said of one
    assert ("cannot be enforced: X runs codex, which reports no cost, so its attempts count as nothing against it; "
            "run it with an agent that reports cost (claude, aider)") in project.aipm("validate", "ORD").stderr


def test_a_tasks_own_budget_that_nothing_counts_against_is_warned_about(project):
    """A task's own max_cost_usd on a command task, or on one whose agent reports no cost (codex): `validate` said
    `ok`, `run` ran it with no word, and `status` showed `- of $0.1000` as if that budget were kept."""
    order = project.order()
    write_task(order, "A", command="true", max_cost_usd=0.1, target_files=["a.txt"])
    write_task(order, "B", agent="codex", prompt="x", max_cost_usd=0.2, target_files=["b.txt"])
    write_task(order, "C", agent="claude", prompt="@cost 0.01", max_cost_usd=0.3, target_files=["c.txt"])
    said = [line for line in project.aipm("validate", "ORD", env=agent_env(project)).stderr.splitlines()
            if "max_cost_usd" in line]
    assert said == [
        f"aipm: warning: {order / 'A.yaml'}: max_cost_usd $0.1000 cannot be enforced: the task runs its own command, "
        "which reports no cost, so its attempts count as nothing against it",
        f"aipm: warning: {order / 'B.yaml'}: max_cost_usd $0.2000 cannot be enforced: the task runs codex, which "
        "reports no cost, so its attempts count as nothing against it"], said


def test_a_supervisor_killed_mid_attempt_leaves_the_usage_to_the_next_one(project):
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    order = project.order()
    gate = project.root / "gate"
    write_task(order, "A", prompt=f"@cost 0.2\n@wait-for {gate}")
    env = {**os.environ, **agent_env(project), "AIPM_ENABLE_MONITORING": "false"}
    first = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: journal(project))  # the agent runs
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    gate.touch()
    second = project.aipm("run", "ORD", env=agent_env(project))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "adopt" in second.stdout
    a = task_file(order, "A")
    assert (a["status"], a["cost_usd"]) == ("DONE", 0.2)
    assert len(journal(project)) == 1  # adopted, not run again


def test_retry_resume_refuses_a_session_of_another_agent_than_the_tasks_now(project):
    """A task's session was claude's; its agent was then made codex: `retry --resume` passed claude's session to
    `codex exec resume`, whose attempt failed for it. The session's agent is named in the attempt's log (its usage
    line): such a retry is refused, exit 2, nothing changed; back under claude it goes through."""
    order, session = failed_with_a_session(project, "claude")
    (project.root / "aipm.yaml").write_text("worker:\n  agent: codex\n")
    before = snapshot(project.root)
    proc = project.aipm("retry", "A", "--resume")
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stdout + proc.stderr
    assert proc.stderr == (f"aipm: error: {order / 'A.yaml'}: session_id: {session} is a session of claude, and the "
                           "task's agent is now codex; retry without --resume (or make its agent claude again)\n")
    assert snapshot(project.root) == before
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    assert project.aipm("retry", "A", "--resume").returncode == 0


def test_retry_resume_with_codex_uses_exec_resume(project):
    _, thread = failed_with_a_session(project, "codex")
    project.aipm("retry", "A", "--resume", check=True)
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 1  # still @fail; the argv is the point
    assert journal(project)[1]["argv"][-3:] == ["resume", thread, "-"]


def test_a_resumed_codex_attempt_counts_only_its_own_tokens(project):
    """codex's turn.completed usage is its thread's running total, and `exec resume` restores the total the thread
    had: a resumed attempt's figures held every earlier attempt's tokens, which aipm had recorded already."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: codex\n")
    order = project.order()
    write_task(order, "A", prompt="@tokens 100 10 50 0")
    project.aipm("run", "ORD", env=agent_env(project), check=True)
    for tokens in ("7 3 1 0", "20 2 0 0"):  # resumed twice: each attempt counts from the one it resumes
        project.aipm("retry", "A", "--resume", check=True)
        (order / "A.yaml").write_text(re.sub(r"@tokens [0-9 ]+", f"@tokens {tokens}", (order / "A.yaml").read_text()))
        project.aipm("run", "ORD", env=agent_env(project), check=True)
    a = task_file(order, "A")
    assert a["tokens"] == {"input": 127, "output": 15, "cache_read": 51}
    assert [j["argv"][-3:-1] for j in journal(project)][1:] == [["resume", a["session_id"]]] * 2
    usage = json.loads((project.root / ".aipm/logs/ORD/A.3.usage.json").read_text())
    assert usage["tokens"] == {"input": 20, "output": 2, "cache_read": 0}


def test_a_resumed_codex_attempts_baseline_is_read_from_the_meters_copy_not_the_log(project):
    """The total a resumed thread had was read from the earlier attempt's log, which its worker writes: a total
    appended to it (`echo '{"type":"turn.completed",...}' >> $AIPM_LOG`) raised the baseline, so the next attempt's
    own tokens counted as none. It is read where that attempt's usage is read: the meter's copy."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: codex\n")
    order = project.order()
    write_task(order, "A", prompt="@tokens 100 10 50 0")
    project.aipm("run", "ORD", env=agent_env(project), check=True)
    forged = {"type": "turn.completed", "usage": {"input_tokens": 10**6, "cached_input_tokens": 10**6,
                                                  "output_tokens": 10**6}}
    with open(project.root / ".aipm/logs/ORD/A.1.log", "a") as log:
        log.write(json.dumps(forged) + "\n")
    project.aipm("retry", "A", "--resume", check=True)
    (order / "A.yaml").write_text(re.sub(r"@tokens [0-9 ]+", "@tokens 7 3 1 0", (order / "A.yaml").read_text()))
    project.aipm("run", "ORD", env=agent_env(project), check=True)
    usage = json.loads((project.root / ".aipm/logs/ORD/A.2.usage.json").read_text())
    assert usage["tokens"] == {"input": 7, "output": 3, "cache_read": 1}, usage


def test_codex_usage_is_the_last_total_less_the_resumed_threads():
    events = [json.dumps({"type": "thread.started", "thread_id": "T"}) + "\n",
              f"[aipm 10:00:00] {codex.BASELINE} " + json.dumps(
                  {"input_tokens": 150, "cached_input_tokens": 50, "output_tokens": 10}) + "\n",
              json.dumps({"type": "turn.completed", "usage": {"input_tokens": 160, "cached_input_tokens": 51,
                                                              "output_tokens": 13}}) + "\n"]
    assert codex.parse(events).tokens == {"input": 9, "cache_read": 1, "output": 3}
    assert codex.parse([events[0], events[2]]).tokens == {"input": 109, "cache_read": 51, "output": 13}


def test_aider_is_not_given_what_git_ignores_under_a_directory_target(tmp_path):
    """Every file on disk under `.` or `src/` went to aider's chat: node_modules/, .venv/, build output."""
    import subprocess

    for name in ("src/app.py", "src/gen/out.o", "node_modules/x/index.js", "notes.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / ".gitignore").write_text("node_modules/\n*.o\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "src/app.py", ".gitignore"], cwd=tmp_path, check=True)
    assert aider.files(attempt(tmp_path, targets=("./",))) == [".gitignore", "notes.md", "src/app.py"]
    assert aider.files(attempt(tmp_path, targets=("src/",))) == ["src/app.py"]
    assert aider.files(attempt(tmp_path, targets=("**/*.js", "src/*.o"))) == []
