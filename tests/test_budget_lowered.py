"""A budget lowered during a run applies to the attempts already running (aipm/budgetstop.py), and to those of a
detached `aipm launch`. Real runs with the stand-in `claude` (tests/agents), order.yaml edited while they work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import no_workers, state, wait_for, write_task
from invariants import pid_alive
from test_agents import agent_env, journal


@contextmanager
def running(project, *gates: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """`aipm run ORD` with the stand-ins in the background, and the file its output goes to; at the end the `gates`
    are opened and a run still going is killed, so a failed test leaves no worker waiting."""
    out_path = project.root.parent / f"{project.root.name}.out"
    with open(out_path, "w") as out:
        run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"],
                               env={**os.environ, **agent_env(project), "AIPM_ENABLE_MONITORING": "false"},
                               stdout=out, stderr=subprocess.STDOUT)
    try:
        yield run, out_path
    finally:
        for gate in gates:
            gate.touch()
        if run.poll() is None:
            run.kill()
            run.wait()


def two_capped_attempts(project, gate: Path) -> Path:
    """A and B, claude tasks of $0.30 each, A waiting for `gate` and B for the gate returned (never opened by a
    test): under a budget of $1 both start at once, capped at $0.50 each."""
    b_gate = project.root / "gate-b"
    write_task(project.order(), "A", prompt=f"@cost 0.3\n@wait-for {gate}", target_files=["a.txt"], priority="P0")
    write_task(project.order(), "B", prompt=f"@cost 0.3\n@wait-for {b_gate}", target_files=["b.txt"])
    return b_gate


def test_a_budget_lowered_mid_run_is_said_and_stops_the_running_attempts_once_reached(project, gate):
    """Both attempts started under $1 with caps of $0.50 each; the budget lowered to $0.30 while they ran changed
    nothing for them: A's $0.30 reached it and B went on spending under its old cap, unseen."""
    (project.root / "aipm.yaml").write_text("max_workers: 2\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 1\n")
    with running(project, two_capped_attempts(project, gate)) as (run, out_path):
        wait_for(lambda: len(journal(project)) == 2)  # both agents run, capped at $0.50 each
        (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.3\n")
        wait_for(lambda: "max_cost_usd $0.3000 (order.yaml) is below the order's cost" in out_path.read_text())
        gate.touch()  # A reports $0.30: the new budget is reached, and B could still spend up to $0.50
        assert run.wait(timeout=120) == 1
    said = out_path.read_text()
    assert "stopped B, each counting what it spent (its cap if it did not say)" in said, said
    assert "another aipm" not in said, said
    a, b = (yaml.safe_load((order / f"{t}.yaml").read_text()) for t in ("A", "B"))
    assert (a["status"], a["cost_usd"]) == ("DONE", 0.3), a
    # B stopped before its result: QUEUED again, its attempt not counted, its cap counted as what it may have spent
    assert (b["status"], b["attempts"], b["cost_unreported_usd"]) == ("QUEUED", 0, 0.5), b
    assert sorted(j["task"] for j in journal(project)) == ["A", "B"]  # B never ran again
    assert project.json("status", "ORD")["budget_reached"] is True


def test_a_budget_setting_lowered_mid_run_applies_too(project, gate):
    """The `max_cost_usd` setting was read once, when the run started: lowered in aipm.yaml while A and B ran, it
    changed nothing until the next run, and B went on spending under its old cap past it."""
    (project.root / "aipm.yaml").write_text("max_workers: 2\nmax_cost_usd: 1\nworker:\n  agent: claude\n")
    with running(project, two_capped_attempts(project, gate)) as (run, out_path):
        wait_for(lambda: len(journal(project)) == 2)
        (project.root / "aipm.yaml").write_text("max_workers: 2\nmax_cost_usd: 0.3\nworker:\n  agent: claude\n")
        gate.touch()  # A's end wakes the run: the setting, read again, is reached
        code = run.wait(timeout=60)
    said = out_path.read_text()
    assert code == 1 and "stopped B" in said and "(setting max_cost_usd)" in said, said
    b = yaml.safe_load((project.order() / "B.yaml").read_text())
    assert (b["status"], b["cost_unreported_usd"]) == ("QUEUED", 0.5), b


def test_a_settings_file_saved_invalid_mid_run_keeps_the_runs_budget(project, gate):
    """Read again mid-run, a settings file saved invalid must not end the run: one line, and the budget it had."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\nmax_cost_usd: 1\nworker:\n  agent: claude\n")
    write_task(project.order(), "A", prompt=f"@cost 0.3\n@wait-for {gate}", target_files=["a.txt"])
    with running(project) as (run, out_path):
        wait_for(lambda: len(journal(project)) == 1)
        (project.root / "aipm.yaml").write_text("max_workers: 1\nmax_cost_usd: -1\nworker:\n  agent: claude\n")
        gate.touch()
        code = run.wait(timeout=120)
    said = out_path.read_text()
    assert code == 0 and "Traceback" not in said, said
    (line,) = [line for line in said.splitlines() if line.startswith("ignored")]
    assert "aipm.yaml" in line and "max_cost_usd" in line and "the run keeps max_cost_usd $1.00" in line, line


@pytest.mark.parametrize("killed", [False, True], ids=["one run", "the run killed and run again"])
def test_an_attempt_that_spends_past_its_cap_is_no_lowered_budget(project, gate, killed):
    """Claude Code stops at its --max-budget-usd only after the turn in flight, so an attempt may report a little
    more than its cap. Nothing was lowered, yet the run said the running attempts' caps were 'given under a higher
    budget' and, the budget reached, stopped B half-way, charging it its whole cap. B now finishes. Also when the
    run that gave the caps was killed (SIGKILL) and run again: the new run, adopting A and B, knew the limit they
    were given under only if their records say it (the killed run kept it in its memory)."""
    (project.root / "aipm.yaml").write_text("max_workers: 2\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 1\n")
    b_gate = project.root / "gate-b"
    # Both start capped at $0.50; A spends past its cap and reports $1.05, which reaches the budget.
    write_task(order, "A", prompt=f"@cost 2\n@overshoot 0.55\n@wait-for {gate}", target_files=["a.txt"],
               priority="P0")
    write_task(order, "B", prompt=f"@cost 0.3\n@wait-for {b_gate}", target_files=["b.txt"])
    if killed:
        with running(project) as (run, _):
            wait_for(lambda: len(journal(project)) == 2)
            os.kill(run.pid, signal.SIGKILL)
            run.wait()
    with running(project, gate, b_gate) as (run, out_path):
        wait_for(lambda: len(journal(project)) == 2 and out_path.read_text().count("adopt") == 2 * killed)
        gate.touch()
        wait_for(lambda: yaml.safe_load((order / "A.yaml").read_text()).get("cost_usd") == 1.05)
        b_gate.touch()
        run.wait(timeout=120)
    said = out_path.read_text()
    assert "higher budget" not in said and "stopped B" not in said, said
    b = yaml.safe_load((order / "B.yaml").read_text())
    assert (b["status"], b["cost_usd"], b.get("cost_unreported_usd")) == ("DONE", 0.3, None), b


def lower_task_limit(path: Path, limit: float) -> None:
    """The user's edit of a task file aipm rewrites meanwhile: its `max_cost_usd` line only, saved atomically."""
    text = "".join(f"max_cost_usd: {limit}\n" if line.startswith("max_cost_usd:") else line
                   for line in path.read_text().splitlines(keepends=True))
    path.with_suffix(".new").write_text(text)
    os.replace(path.with_suffix(".new"), path)


def test_a_tasks_own_limit_lowered_to_its_cost_mid_attempt_stops_the_attempt(project, gate):
    """A task's own max_cost_usd lowered while its attempt ran (capped at the $0.70 the old $1 left) changed nothing:
    the attempt went on spending against a limit already reached."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\nworker:\n  agent: claude\n")
    path = write_task(project.order(), "A", prompt=f"@cost 0.2\n@wait-for {gate}", target_files=["a.txt"],
                      max_cost_usd=1, cost_usd=0.3)
    with running(project) as (run, out_path):
        wait_for(lambda: len(journal(project)) == 1)
        assert "--max-budget-usd 0.7" in " ".join(journal(project)[0]["argv"])
        lower_task_limit(path, 0.3)
        wait_for(lambda: "stopped it" in out_path.read_text())
        assert run.wait(timeout=120) == 1
    said = out_path.read_text()
    (line,) = [line for line in said.splitlines() if "stopped it" in line]
    assert line.startswith("budget   ORD/A: budget reached") and "max_cost_usd $0.3000" in line, said
    a = yaml.safe_load(path.read_text())
    assert (a["status"], a.get("attempts", 0), a["cost_unreported_usd"], a["max_cost_usd"]) == ("QUEUED", 0, 0.7, 0.3)
    assert len(journal(project)) == 1


def test_a_tasks_own_limit_lowered_below_its_running_cap_is_said_once(project, gate):
    """Lowered to $0.50, above its $0.30 cost but below what the attempt may still spend ($0.70): nothing was said,
    and the task passed its new limit unseen. It is said once, however often aipm rewrites the file meanwhile."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\nworker:\n  agent: claude\n")
    path = write_task(project.order(), "A", prompt=f"@cost 0.3\n@wait-for {gate}", target_files=["a.txt"],
                      max_cost_usd=1, cost_usd=0.3)
    with running(project) as (run, out_path):
        wait_for(lambda: len(journal(project)) == 1)
        lower_task_limit(path, 0.5)
        wait_for(lambda: "its running attempt may still spend" in out_path.read_text())
        gate.touch()  # not stopped: it may not spend its whole cap
        assert run.wait(timeout=120) == 0
    said = out_path.read_text()
    lines = [line for line in said.splitlines() if "its running attempt may still spend" in line]
    assert len(lines) == 1 and "max_cost_usd $0.5000" in lines[0] and "aipm cancel A" in lines[0], said
    a = yaml.safe_load(path.read_text())
    assert (a["status"], a["cost_usd"]) == ("DONE", 0.6), a



def launched(project, limit: float, where: str) -> None:
    """The settings (a notify command that notes each event in `notes.txt`) and order.yaml of two capped attempts,
    with the budget `limit` in `where`: order.yaml or aipm.yaml (the setting)."""
    notes = project.root / "notes.txt"
    (project.root / "aipm.yaml").write_text(
        "max_workers: 2\nworker:\n  agent: claude\n"
        f"notify: 'echo \"$AIPM_EVENT $AIPM_STATUS ${{AIPM_TASK_ID:-}}\" >> {notes}'\n"
        + (f"max_cost_usd: {limit}\n" if where == "aipm.yaml" else ""))
    (project.order() / "order.yaml").write_text(
        "id: ORD\n" + (f"max_cost_usd: {limit}\n" if where == "order.yaml" else ""))


@pytest.mark.parametrize("where", ["order.yaml", "aipm.yaml"])
def test_a_budget_lowered_while_launch_runs_is_said_in_the_logs_and_stops_the_attempts_once_reached(
        project, gate, where):
    """The detached owners of `aipm launch` followed no budget: lowered below what their running attempts held, it
    was said nowhere, and B went on spending under its old cap once A's cost had reached the new one. Each owner
    now says it in its attempt's log and to the notify command, as `run` says it, and B's owner stops B."""
    launched(project, 1, where)
    b_gate = two_capped_attempts(project, gate)
    try:
        assert project.aipm("launch", "ORD", env=agent_env(project)).returncode == 0
        wait_for(lambda: len(journal(project)) == 2)  # both agents run, capped at $0.50 each
        owners = owner_pids(project)
        launched(project, 0.3, where)
        logs = project.root / ".aipm" / "logs" / "ORD"
        below = f"max_cost_usd $0.3000 ({'order.yaml' if where == 'order.yaml' else 'setting max_cost_usd'}) is below"
        wait_for(lambda: all(below in (logs / f"{t}.1.log").read_text() for t in "AB"))
        gate.touch()  # A reports $0.30: the new budget is reached, and B could still spend up to $0.50
        wait_for(lambda: "stopped B" in (logs / "B.1.log").read_text())  # (said once the stop is done)
        wait_for(lambda: no_workers(project.root))
    finally:
        b_gate.touch()
    said = (logs / "B.1.log").read_text()
    assert "budget   ORD: budget reached" in said and "stopped B, each counting what it spent" in said, said
    a, b = (yaml.safe_load((project.order() / f"{t}.yaml").read_text()) for t in ("A", "B"))
    assert (a["status"], a["cost_usd"]) == ("DONE", 0.3), a
    assert (b["status"], b.get("attempts", 0), b["cost_unreported_usd"]) == ("QUEUED", 0, 0.5), b
    assert sorted(j["task"] for j in journal(project)) == ["A", "B"]  # B never ran again
    notes = project.root / "notes.txt"  # (its command runs detached: each line lands when it has run)
    wait_for(lambda: notes.exists() and notes.read_text().count("budget BUDGET_LOWERED") == 2)  # the lowering, B's stop
    wait_for(lambda: not any(map(pid_alive, owners)))
    told = lowered_told(project)  # both owners found the lowering: told once, and B's stop by B's owner
    assert len(told) == 2 and " is below " in told[0] and "stopped B" in told[1], told


def test_a_tasks_own_limit_lowered_to_its_cost_while_launch_runs_stops_the_attempt(project, gate):
    """As in `run` (above), for the detached owner: its task's own max_cost_usd lowered to what the task had cost
    left the attempt spending, unseen, up to the $0.70 cap the old limit gave it."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\nworker:\n  agent: claude\n")
    path = write_task(project.order(), "A", prompt=f"@cost 0.2\n@wait-for {gate}", target_files=["a.txt"],
                      max_cost_usd=1, cost_usd=0.3)
    assert project.aipm("launch", "ORD", env=agent_env(project)).returncode == 0
    wait_for(lambda: len(journal(project)) == 1)
    lower_task_limit(path, 0.3)
    wait_for(lambda: "stopped it" in (project.root / ".aipm" / "logs" / "ORD" / "A.1.log").read_text())
    wait_for(lambda: no_workers(project.root))
    said = (project.root / ".aipm" / "logs" / "ORD" / "A.1.log").read_text()
    (line,) = [line for line in said.splitlines() if "stopped it" in line]
    assert "budget   ORD/A: budget reached" in line and "max_cost_usd $0.3000" in line, said
    a = yaml.safe_load(path.read_text())
    assert (a["status"], a.get("attempts", 0), a["cost_unreported_usd"]) == ("QUEUED", 0, 0.7), a
    assert len(journal(project)) == 1


def owner_pids(project) -> list[int]:
    """The owners of the order's running attempts, as their records name them."""
    import json

    return [json.loads(path.read_text())["owner_pid"] for path in (state(project.root) / "workers").rglob("*.json")]


def lowered_told(project) -> list[str]:
    """The BUDGET_LOWERED notices sent, as the sender noted each in `.aipm/notify.log` (before the command ran)."""
    log = project.root / ".aipm" / "notify.log"
    return [line for line in log.read_text().splitlines() if "budget BUDGET_LOWERED:" in line] if log.exists() else []


def test_a_budget_lowered_mid_run_is_told_to_the_notify_command_as_launch_tells_it(project, gate):
    """`aipm run` printed the lowered budget and its stop, and told the notify command nothing of either (a detached
    owner of `aipm launch` tells it). Now the same notices: AIPM_EVENT budget, AIPM_STATUS BUDGET_LOWERED."""
    launched(project, 1, "order.yaml")
    with running(project, two_capped_attempts(project, gate)) as (run, out_path):
        wait_for(lambda: len(journal(project)) == 2)
        launched(project, 0.3, "order.yaml")
        wait_for(lambda: "max_cost_usd $0.3000 (order.yaml) is below the order's cost" in out_path.read_text())
        gate.touch()
        assert run.wait(timeout=120) == 1
    told = lowered_told(project)
    assert len(told) == 2, told
    (below,) = [line for line in out_path.read_text().splitlines() if " is below " in line]
    assert told[0].endswith(f"budget BUDGET_LOWERED: {below.removeprefix('budget   ')}"), (told, below)
    assert "ORD: budget reached" in told[1] and "stopped B" in told[1], told
    notes = project.root / "notes.txt"
    wait_for(lambda: notes.exists() and notes.read_text().count("budget BUDGET_LOWERED") == 2)


def test_a_budget_lowered_under_four_detached_owners_is_told_once(project, gate):
    """Four `aipm launch` owners, each of one capped attempt, all woken by the same edit of order.yaml: each told
    the notify command of the lowering, four notices of one change. One now (the first owner to find it), while
    each attempt's log still says it."""
    (project.root / "aipm.yaml").write_text(
        f"max_workers: 4\nworker:\n  agent: claude\nnotify: 'echo \"$AIPM_STATUS\" >> {project.root / 'notes.txt'}'\n")
    (project.order() / "order.yaml").write_text("id: ORD\nmax_cost_usd: 1\n")
    for task in "ABCD":  # capped at $0.25 each; $0.05 each spent in all: the lowered budget is never reached
        write_task(project.order(), task, prompt=f"@cost 0.05\n@wait-for {gate}", target_files=[f"{task}.txt"])
    try:
        assert project.aipm("launch", "ORD", "--no-resource-monitoring", env=agent_env(project)).returncode == 0
        wait_for(lambda: len(journal(project)) == 4)
        owners = owner_pids(project)
        assert len(set(owners)) == 4, owners
        (project.order() / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.3\n")
        logs = project.root / ".aipm" / "logs" / "ORD"
        wait_for(lambda: all(" is below " in (logs / f"{t}.1.log").read_text() for t in "ABCD"))
    finally:
        gate.touch()
    wait_for(lambda: not any(map(pid_alive, owners)))
    told = lowered_told(project)
    assert len(told) == 1 and "ORD: max_cost_usd $0.3000 (order.yaml) is below" in told[0], told
    assert {yaml.safe_load((project.order() / f"{t}.yaml").read_text())["status"] for t in "ABCD"} == {"DONE"}


def test_a_lowered_budget_is_said_once_while_the_running_attempts_end(project, gate):
    """Lowered to $0.70 below the $1 that A's and B's caps ($0.50 each) hold: said once. A's end ($0.30 recorded, B
    still holding $0.50) left it below again, by another figure, and the run said the same lowering a second time."""
    (project.root / "aipm.yaml").write_text("max_workers: 2\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 1\n")
    b_gate = two_capped_attempts(project, gate)
    with running(project, b_gate) as (run, out_path):
        wait_for(lambda: len(journal(project)) == 2)
        (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.7\n")
        wait_for(lambda: " is below " in out_path.read_text())
        gate.touch()  # A reports $0.30: $0.30 spent and B's $0.50 cap are still more than $0.70
        wait_for(lambda: yaml.safe_load((order / "A.yaml").read_text())["status"] == "DONE")
        b_gate.touch()  # B reports $0.30: $0.60 in all, within the budget
        assert run.wait(timeout=120) == 0
    said = out_path.read_text()
    assert len([line for line in said.splitlines() if " is below " in line]) == 1, said
