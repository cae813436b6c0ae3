"""Workers whose output is hostile by accident: one endless line in an agent's transcript, a log replaced with a
FIFO."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from conftest import task_statuses, write_task

LINE = 400 << 20  # bytes of one line without a newline
MEMORY = 400 << 20  # the address space `run` may use: far more than it needs, less than twice the line


def test_an_endless_line_in_an_agents_log_does_not_exhaust_the_owners_memory(project):
    """Reading the attempt's usage held the log's longest line whole, decoded: a worker that printed gigabytes
    without a newline made its owner run out of memory (MemoryError here, under a limit; the OOM killer without
    one, and every later run that adopted the attempt read it again)."""
    bin_dir = project.root / "bin"
    bin_dir.mkdir()
    claude = bin_dir / "claude"
    claude.write_text(f"#!/bin/sh\ncat > /dev/null\nhead -c {LINE} /dev/zero | tr '\\0' x; echo\n"
                      """echo '{"type": "result", "total_cost_usd": 0.25, "session_id": "s1"}'\n""")
    claude.chmod(0o755)
    order = project.order()
    write_task(order, "A", agent="claude", prompt="go", target_files=["a.txt"])

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))

    env = dict(os.environ, AIPM_ENABLE_MONITORING="false", PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"],
                          capture_output=True, text=True, env=env, timeout=300, preexec_fn=limit_memory)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert task_statuses(order) == {"A": "DONE"}
    assert project.json("status", "ORD")["tasks"][0]["cost_usd"] == 0.25  # the event after the line still counts


REPLACE_LOG = 'rm "$AIPM_LOG"; mkfifo "$AIPM_LOG"'


@pytest.mark.parametrize("how", ["command", "agent"])
def test_a_worker_that_replaces_its_log_with_a_fifo_does_not_hang_its_run_or_logs(project, how):
    """Opening the log at the attempt's end (aipm's closing line, under the launch lock; an agent's usage) waited
    for ever for a peer of the FIFO: the run never ended, its task stayed IN_PROGRESS and every aipm command that
    needs the lock waited too. `aipm logs` hung on the same open."""
    order = project.order()
    env = dict(os.environ, AIPM_ENABLE_MONITORING="false")
    if how == "agent":
        bin_dir = project.root / "bin"
        bin_dir.mkdir()
        claude = bin_dir / "claude"
        claude.write_text(f"#!/bin/sh\ncat > /dev/null\n{REPLACE_LOG}\n")
        claude.chmod(0o755)
        env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
        write_task(order, "A", agent="claude", prompt="go", target_files=["a.txt"])
    else:
        write_task(order, "A", command=REPLACE_LOG, target_files=["a.txt"])
    aipm = [sys.executable, "-m", "aipm", "--root", str(project.root)]
    proc = subprocess.run([*aipm, "run", "ORD"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert task_statuses(order) == {"A": "DONE"}
    log = project.root / ".aipm" / "logs" / "ORD" / "A.1.log"
    assert log.is_fifo()  # the worker's replacement is left as it is
    shown = subprocess.run([*aipm, "logs", "A"], capture_output=True, text=True, env=env, timeout=60)
    assert (shown.returncode, shown.stderr) == (
        2, f"aipm: error: cannot read the log {log}: not a regular file (its worker replaced it)\n")


def test_a_fifo_a_worker_leaves_for_the_next_attempts_prompt_does_not_hang_that_attempt(project):
    """The next attempt's prompt (and the settings a `claude` attempt gets) were written with a plain open():
    a FIFO the failed first attempt left at `A.2.prompt.md` held its run for ever before the second could start."""
    bin_dir = project.root / "bin"
    bin_dir.mkdir()
    claude = bin_dir / "claude"
    claude.write_text('#!/bin/sh\ncat > /dev/null\nmkfifo "${AIPM_LOG%.1.log}.2.prompt.md" 2>/dev/null\nexit 1\n')
    claude.chmod(0o755)
    order = project.order()
    write_task(order, "A", agent="claude", prompt="go", target_files=["a.txt"], max_attempts=2)
    env = dict(os.environ, AIPM_ENABLE_MONITORING="false", PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert task_statuses(order) == {"A": "FAILED"}
    assert (project.root / ".aipm" / "logs" / "ORD" / "A.2.prompt.md").read_text() == "go"


def test_a_fifo_a_worker_leaves_for_its_review_log_fails_the_review_closed_and_the_run_ends(project):
    """The review's log was opened by posix_spawn's file action, which waited on the FIFO with its spawner (the
    run, under the launch lock) for ever; the task stayed IN_REVIEW. Now the review cannot start: sent back."""
    order = project.order()
    write_task(order, "A", command='mkfifo "${AIPM_LOG%.log}.review.log"', review="true", max_rework=1,
               target_files=["a.txt"])
    env = dict(os.environ, AIPM_ENABLE_MONITORING="false")
    proc = subprocess.run([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert task_statuses(order) == {"A": "REJECTED"}
    assert "review could not start" in project.json("status", "ORD")["tasks"][0]["reason"]


def test_a_fifo_a_worker_leaves_for_its_scope_audits_start_does_not_hang_its_run(project):
    """The scope audit's saved start (`A.1.scope.json`, beside the log) was read with a plain open(): a FIFO the
    worker left there held its run for ever, under the launch lock, when the attempt ended (a task without
    targets, whose start `run` does not watch; every attempt of a detached owner)."""
    from test_hostile_workers import _commit_everything

    order = project.order()
    write_task(order, "A", command='s="${AIPM_LOG%.log}.scope.json"; rm -f "$s"; mkfifo "$s"')
    _commit_everything(project.root)
    env = dict(os.environ, AIPM_ENABLE_MONITORING="false")
    proc = subprocess.run([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert task_statuses(order) == {"A": "DONE"}


def test_a_fifo_left_where_a_scope_audits_start_is_written_is_replaced(tmp_path):
    """It was written through `<name>.tmp` with a plain open(): a FIFO a worker left at the next attempt's name
    held that attempt's start for ever."""
    from aipm import scope

    path = tmp_path / "A.2.scope.json"
    os.mkfifo(tmp_path / "A.2.scope.json.tmp")
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from aipm import scope; "
                    "scope._write_json(Path(sys.argv[1]), ['watched', 1])", str(path)], check=True, timeout=30)
    assert isinstance(scope.load(path), scope.Watched) and not (tmp_path / "A.2.scope.json.tmp").exists()
