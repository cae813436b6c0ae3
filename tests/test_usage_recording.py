"""An agent attempt's usage is recorded once, however its owner ends. It is read from the log before its owner
takes the launch lock: a transcript of a gigabyte took seconds to parse, and every other aipm command of the
project (cancel, launch, run) waited."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import no_workers, wait_for, write_task
from test_agents import agent_env, journal, reported, waiting_aider
from aipm import agents
from aipm.runtime import Runtime
from aipm.workerfiles import append_log


def result(cost: float) -> str:
    return json.dumps({"type": "result", "session_id": "S", "total_cost_usd": cost, "usage": {"input_tokens": 1}})


def swap_in_place(path: Path, old: bytes, new: bytes) -> None:
    """Rewrite bytes of the log where they stand: same file, same size, so only a whole new read would see it."""
    data = path.read_bytes()
    assert len(old) == len(new) and data.count(old) == 1
    with open(path, "r+b") as handle:
        handle.seek(data.index(old))
        handle.write(new)


def test_what_is_read_ahead_stands_unless_usage_was_added_since(tmp_path):
    log = tmp_path / "A.1.log"
    log.write_text('{"type": "system", "session_id": "S"}\n' + result(0.25) + "\n")
    agents.read_ahead("claude", log)
    try:
        swap_in_place(log, b"0.25", b"0.99")
        append_log(str(log), "attempt 1 ended: exit 0")  # aipm's own lines hold no usage
        assert agents.read_usage("claude", log).cost_usd == 0.25
        with open(log, "a") as handle:  # written after the read-ahead (a straggler of the agent's): read whole
            handle.write(result(1.5) + "\n")
        assert agents.read_usage("claude", log).cost_usd == 1.5
        replaced = tmp_path / "new.log"
        replaced.write_text(result(0.75) + "\n")
        os.replace(replaced, log)  # another file under the name: read whole
        assert agents.read_usage("claude", log).cost_usd == 0.75
    finally:
        agents.forget(log)
    assert agents.read_usage("claude", log).cost_usd == 0.75


def test_a_read_ahead_is_found_however_the_logs_path_is_spelt(tmp_path):
    """The read-ahead is asked for with the record's text of the path, the usage with a Path made of it."""
    log = tmp_path / "A.1.log"
    log.write_text('{"type": "system", "session_id": "S"}\n' + result(0.25) + "\n")
    spelt = f"{tmp_path}//./A.1.log"
    agents.read_ahead("claude", spelt)
    try:
        swap_in_place(log, b"0.25", b"0.99")  # the same size: only a read-ahead found gives 0.25
        assert agents.read_usage("claude", Path(spelt)).cost_usd == 0.25
    finally:
        agents.forget(spelt)
    assert agents.read_usage("claude", log).cost_usd == 0.99  # forgotten: read whole


@pytest.mark.parametrize("owner", ["run", "launch"])
def test_the_usage_is_read_while_another_process_holds_the_launch_lock(project, gate, owner):
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    path = write_task(project.order(), "A", prompt=f"@cost 0.25\n@wait-for {gate}", target_files=["a.txt"])
    env = agent_env(project)
    run = None
    if owner == "run":
        run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"],
                               env={**os.environ, **env, "AIPM_ENABLE_MONITORING": "false"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    else:  # a detached owner
        project.aipm("launch", "ORD", env=env, check=True)
    wait_for(lambda: journal(project))  # the agent runs
    log = project.root / ".aipm/logs/ORD/A.1.log"
    with Runtime(project.root).launch_lock():
        gate.touch()  # the agent reports its $0.25 and ends
        # Its owner reads the usage while this process holds the lock: the read does not wait for it...
        wait_for(log.with_suffix(".usage.json").exists)
        # ... and is not done again under it, where a whole read would now find $0.99.
        swap_in_place(log, b'"total_cost_usd": 0.25', b'"total_cost_usd": 0.99')
        assert yaml.safe_load(path.read_text())["status"] == "IN_PROGRESS"  # the outcome waits for the lock
    if run is not None:
        out, _ = run.communicate(timeout=120)
        assert run.returncode == 0, out
    wait_for(lambda: no_workers(project.root))
    a = yaml.safe_load(path.read_text())
    assert (a["status"], a["cost_usd"]) == ("DONE", 0.25)
    assert log.read_text().count("usage: cost $0.2500") == 1


def test_an_owner_killed_after_its_read_ahead_leaves_the_usage_to_its_adopter(project, gate):
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    path = write_task(project.order(), "A", prompt=f"@cost 0.25\n@wait-for {gate}", target_files=["a.txt"])
    env = agent_env(project)
    first = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"],
                             env={**os.environ, **env, "AIPM_ENABLE_MONITORING": "false"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: journal(project))  # the agent runs
    log = project.root / ".aipm/logs/ORD/A.1.log"
    with Runtime(project.root).launch_lock():
        gate.touch()
        wait_for(log.with_suffix(".usage.json").exists)  # read ahead; the outcome waits for the lock
        first.kill()
        first.wait(timeout=60)
    assert yaml.safe_load(path.read_text())["status"] == "IN_PROGRESS"
    second = project.aipm("run", "ORD", env=env)
    assert second.returncode == 0 and "adopt" in second.stdout, second.stdout + second.stderr
    a = yaml.safe_load(path.read_text())
    assert (a["status"], a["cost_usd"], a["tokens"]["input"]) == ("DONE", 0.25, 10)
    assert len(journal(project)) == 1  # adopted, not run again


def test_an_attempt_cancelled_after_its_owner_died_keeps_the_cost_it_reported(project, gate):
    """`aipm cancel` stopped the worker; nobody added its $0.04 (its owner was dead, and recovery passed over a
    CANCELLED task), so the order's budget never counted it; a `retry` then dropped the record, and the usage, and
    so did a run of any other order (its plan prunes the records of tasks no longer running). The cancel now
    settles such an attempt itself, as its owner would have: the usage is added once, and nothing is left."""
    path = waiting_aider(project)
    write_task(project.order("OTHER"), "B", command="true", target_files=["b.txt"])
    project.aipm("launch", "ORD", env=agent_env(project), check=True)
    wait_for(lambda: reported(project))
    rec = Runtime(project.root).read_record("ORD", "A")
    os.kill(rec.owner_pid, signal.SIGKILL)
    project.aipm("cancel", "A", check=True)
    wait_for(lambda: no_workers(project.root))
    a = yaml.safe_load(path.read_text())
    assert (a["status"], a["cost_usd"]) == ("CANCELLED", 0.04)
    project.aipm("run", "OTHER", "--no-resource-monitoring", check=True)
    assert "nothing to recover" in project.aipm("recover", "ORD", check=True).stdout  # added once
    assert yaml.safe_load(path.read_text())["cost_usd"] == 0.04
    project.aipm("retry", "A", check=True)  # recorded: nothing holds the retry now
    assert yaml.safe_load(path.read_text())["cost_usd"] == 0.04  # (a retry keeps what was spent)


@pytest.mark.parametrize("command", ["recover", "run"])
def test_a_lost_attempts_usage_is_read_before_its_recovery_takes_the_launch_lock(project, gate, command):
    path = waiting_aider(project)
    project.aipm("launch", "ORD", env=agent_env(project), check=True)
    wait_for(lambda: reported(project))
    rec = Runtime(project.root).read_record("ORD", "A")
    os.kill(rec.owner_pid, signal.SIGKILL)
    os.killpg(rec.pgid, signal.SIGKILL)  # worker and wrapper: no exit code is left, the attempt is re-queued
    wait_for(lambda: not rec.alive())
    log = project.root / ".aipm/logs/ORD/A.1.log"
    with Runtime(project.root).launch_lock():
        recovering = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), command, "ORD"],
                                      env={**os.environ, **agent_env(project), "AIPM_ENABLE_MONITORING": "false"},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(log.with_suffix(".usage.json").exists)  # read while this process holds the lock
        swap_in_place(log, b"$0.04 session", b"$0.09 session")  # a whole read under the lock would find $0.09
    if command == "run":
        wait_for(lambda: reported(project, attempt=2))  # re-queued, then started again
        gate.touch()
    out, _ = recovering.communicate(timeout=120)
    assert recovering.returncode == 0, out
    a = yaml.safe_load(path.read_text())
    assert a["cost_usd"] == (0.04 if command == "recover" else 0.08), a
    assert log.read_text().count("usage: cost $0.0400") == 1
