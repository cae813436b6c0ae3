"""The order's spending ledger (aipm/spending.py): what attempts spent counts against the budget whatever happens
to the task files that recorded it. Real runs with the stand-in `claude` (tests/agents)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from conftest import state, wait_for, write_task
from invariants import pid_alive
from test_agents import agent_env, journal

# The worker that undoes A's record once A's cost is in its file: it deletes the file, or puts it back as git has
# it (QUEUED, no cost), as an agent's `git checkout .` or `git stash` would.
UNDO = {
    "deleted": "rm orders/ORD/A.yaml",
    "checked out": "git checkout -q -- orders/ORD/A.yaml",
}


@pytest.mark.parametrize("undo", UNDO)
def test_a_task_file_deleted_or_reverted_by_a_worker_gives_the_budget_no_room(project, undo):
    """A worker deleting or reverting the task file that recorded an attempt's cost took that cost off the order's
    total: the budget, reached, had room again, and C (deleted) or A again (reverted) spent past it."""
    (project.root / "aipm.yaml").write_text("max_workers: 2\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.1\n")
    write_task(order, "A", prompt="@cost 0.1", target_files=["a.txt"])
    wait = "until grep -q cost_usd orders/ORD/A.yaml; do sleep 0.05; done"
    write_task(order, "B", command=f"{wait}; {UNDO[undo]}", target_files=["b.txt"])
    write_task(order, "C", prompt="@cost 0.1", target_files=["c.txt"], depends_on=["B"])
    (project.root / ".gitignore").write_text("journal.jsonl\nstand-in-claude-costs.json\n")  # the stand-in's
    subprocess.run(["git", "init", "-q"], cwd=project.root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=project.root, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "order"],
                   cwd=project.root, check=True)
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 1 and "budget reached" in proc.stderr, proc.stdout + proc.stderr
    assert [j["task"] for j in journal(project)] == ["A"], proc.stdout  # neither C nor A again
    status = project.json("status", "ORD")
    assert (status["cost_usd"], status["budget_reached"]) == (0.1, True), status
    assert {t["id"]: t["status"] for t in status["tasks"]}["C"] == "QUEUED"
    assert "budget reached" in project.aipm("why", "C").stdout
    # Nor does a later run or launch find room.
    assert project.aipm("launch", "ORD", env=agent_env(project)).returncode == 1
    assert [j["task"] for j in journal(project)] == ["A"]


def test_the_ledger_outlives_a_cleaned_runtime_directory(project):
    """`git clean -fdx` removes `.aipm/`: the state directory's copy of the ledger still counts."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.1\n")
    write_task(order, "A", prompt="@cost 0.1", target_files=["a.txt"], priority="P0")
    write_task(order, "C", prompt="@cost 0.1", target_files=["c.txt"], priority="P2")
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 1
    subprocess.run(["rm", "-rf", str(project.root / ".aipm")], check=True)
    (order / "A.yaml").unlink()
    assert project.json("status", "ORD")["cost_usd"] == 0.1
    assert project.aipm("launch", "ORD", env=agent_env(project)).returncode == 1
    assert [j["task"] for j in journal(project)] == ["A"]


def test_a_reviewer_that_runs_an_agent_adds_its_cost_to_the_task_and_the_budget(project):
    """A review command running claude was a command like any other: what it spent was in no task's cost_usd and
    not against the budget, which B then passed."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.15\n")
    reviewer = "echo '@cost 0.05' | claude -p --output-format stream-json --verbose"
    write_task(order, "A", prompt="@cost 0.1", target_files=["a.txt"], priority="P0", review=reviewer)
    write_task(order, "B", prompt="@cost 0.1", target_files=["b.txt"], priority="P2")
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 1 and "budget reached" in proc.stderr, proc.stdout + proc.stderr
    assert [j["task"] for j in journal(project)] == ["A", "A"]  # its work, then its review; never B
    status = project.json("status", "ORD")
    tasks = {t["id"]: t for t in status["tasks"]}
    assert (tasks["A"]["status"], tasks["A"]["cost_usd"], tasks["B"]["status"]) == ("COMPLETED", 0.15, "QUEUED")
    log = (project.root / ".aipm" / "logs" / "ORD" / "A.1.log").read_text()
    assert "review usage: cost $0.0500 (added to the task's cost_usd and the order's budget)" in log, log


# A review running the stand-in claude, which reports the cost in `review-cost` and then (its verdict not given yet)
# waits for `gate`, as a review whose tests hang after its agent's report would.
LINGERING_REVIEWER = ("printf '@cost %s\\n' \"$(cat review-cost)\" | claude -p --output-format stream-json --verbose; "
                      "test -e gate || exec sleep 600")


def review_entries(project) -> list[float]:
    """The costs the order's ledger holds of A's reviews."""
    lines = (project.root / ".aipm" / "spent" / "ORD.jsonl").read_text().splitlines()
    return sorted(entry["cost_usd"] for entry in map(json.loads, lines) if entry["phase"] == "review")


@pytest.mark.parametrize("how", ["timeout", "cancel", "stop", "killed"])
def test_a_reviewer_killed_after_its_report_counts_what_it_reported_once(project, gate, how):
    """A claude reviewer killed without a verdict after it reported $0.05 (its owner's timeout, a stop of the run,
    `aipm cancel`, SIGKILL of the run and then of the reviewer): cancelled, stopped or killed, its cost was counted nowhere, and the review run
    again ($0.03) was counted as the larger of the two reports in its log. Now each reviewer's report counts once,
    the stopped one's when it stops, as a stopped attempt's does."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\nworker:\n  agent: claude\n")
    (project.root / "review-cost").write_text("0.05\n")
    path = write_task(project.order(), "A", prompt="@cost 0.1", target_files=["a.txt"], review=LINGERING_REVIEWER,
                      max_rework=0, **({"timeout": 3} if how == "timeout" else {}))
    env = {**os.environ, **agent_env(project), "AIPM_ENABLE_MONITORING": "false"}
    argv = [sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"]
    run = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if how == "timeout":
            assert run.wait(timeout=120) == 1
            a = yaml.safe_load(path.read_text())
            assert (a["status"], a["cost_usd"], review_entries(project)) == ("REJECTED", 0.15, [0.05]), a
            return
        review_log = project.root / ".aipm" / "logs" / "ORD" / "A.1.review.log"
        wait_for(lambda: review_log.exists() and '"type": "result"' in review_log.read_text())
        record = json.loads((state(project.root) / "workers" / "ORD" / "A.json").read_text())
        if how == "cancel":
            assert project.aipm("cancel", "A").returncode == 0
            run.wait(timeout=60)
            a = yaml.safe_load(path.read_text())
            assert (a["status"], a["cost_usd"], review_entries(project)) == ("CANCELLED", 0.15, [0.05]), a
            return
        run.send_signal(signal.SIGTERM if how == "stop" else signal.SIGKILL)
        run.wait(timeout=60)
        if how == "killed":  # its owner gone, the reviewer is killed too: the next run finds no verdict
            os.killpg(record["pgid"], signal.SIGKILL)
            wait_for(lambda: not pid_alive(record["pid"]))
        else:  # counted as it stops
            a = yaml.safe_load(path.read_text())
            assert (a["status"], a["cost_usd"], review_entries(project)) == ("IN_REVIEW", 0.15, [0.05]), a
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    (project.root / "review-cost").write_text("0.03\n")
    gate.touch()
    assert subprocess.run(argv, env=env, capture_output=True).returncode == 0
    a = yaml.safe_load(path.read_text())
    assert (a["status"], a["cost_usd"], review_entries(project)) == ("COMPLETED", 0.18, [0.03, 0.05]), a


def test_a_reviewer_killed_before_its_report_is_said_to_have_spent_unknown(project, gate):
    """A claude reviewer killed by the timeout before its result spent what no line says (a review has no cap, as a
    capped attempt has): nothing said it. Its log now says the cost is unknown and counted nowhere."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\nworker:\n  agent: claude\n")
    reviewer = f"echo '@wait-for {gate}' | claude -p --output-format stream-json --verbose"
    path = write_task(project.order(), "A", prompt="@cost 0.1", target_files=["a.txt"], review=reviewer,
                      max_rework=0, timeout=3)
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 1
    a = yaml.safe_load(path.read_text())
    assert (a["status"], a["cost_usd"]) == ("REJECTED", 0.1), a
    session = json.loads((project.root / ".aipm" / "logs" / "ORD" / "A.1.review.log").read_text().splitlines()[0])
    (line,) = [line for line in (project.root / ".aipm" / "logs" / "ORD" / "A.1.log").read_text().splitlines()
               if "] review usage:" in line]
    assert f"cost unknown (its agent's session {session['session_id']} reported none" in line, line


def test_a_ledger_is_read_as_it_grows_a_line_once_whole_and_an_entry_never_lowered(tmp_path):
    """Read on every plan, the ledger is parsed from where the last read ended: a line caught half-written is read
    once whole, and an attempt's entry written again with less (a worker's line) does not lower it."""
    import json

    from aipm import spending

    path = tmp_path / "ORD.jsonl"

    def add(text: str) -> dict:
        with open(path, "a") as handle:
            handle.write(text)
        return spending._entries(str(path))

    def line(attempt: int, cost: float) -> str:
        return json.dumps({"task": "A", "attempt": attempt, "definition": "d", "cost_usd": cost,
                           "cost_unreported_usd": 0.0})

    assert add(line(1, 0.1) + "\n") == {("A", 1, "work", ""): ("d", 0.1, 0.0, None)}
    assert add(line(2, 0.2)) == {("A", 1, "work", ""): ("d", 0.1, 0.0, None)}  # half-written
    assert add("\n[1]\n" + line(1, 0.05) + "\n") == {("A", 1, "work", ""): ("d", 0.1, 0.0, None),
                                                      ("A", 2, "work", ""): ("d", 0.2, 0.0, None)}


def test_a_ledger_that_cannot_be_written_leaves_the_outcome_recorded(project):
    """A file a worker left where the state directory's ledgers go (`spent`): the ledger's directory could not be
    made, and that must not keep the attempt's outcome and cost from the task file; the other copy still has it."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 1\n")
    write_task(order, "A", prompt="@cost 0.1", target_files=["a.txt"])
    (state(project.root, make=True) / "spent").write_text("not a directory\n")
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert project.json("status", "ORD")["tasks"][0]["cost_usd"] == 0.1
    assert '"cost_usd": 0.1' in (project.root / ".aipm" / "spent" / "ORD.jsonl").read_text()


def _lose_ledger_line(project, attempt: int) -> None:
    """What a failed ledger write leaves: the work entry of `attempt` of A in neither ledger."""
    import json

    from aipm.runtime import Runtime

    for path in Runtime(project.root).ledger_paths("ORD"):
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if (json.loads(line)["attempt"], json.loads(line).get("phase", "work")) != (attempt, "work")]
        path.write_text("".join(kept))


# A, run once for $0.30, then made again as a new file (another prompt, no cost) or edited in place (its cost_usd
# kept), and run for $0.40: what the order spent is $0.70 either way.
REDEFINE = {
    "made again": lambda order: write_task(order, "A", prompt="@cost 0.4", target_files=["a.txt"]),
    "edited in place": lambda order: (order / "A.yaml").write_text(
        (order / "A.yaml").read_text().replace("@cost 0.3", "@cost 0.4").replace("status: DONE", "status: QUEUED")),
}


@pytest.mark.parametrize("redefine", REDEFINE)
def test_a_task_made_again_whose_ledger_write_failed_still_owes_the_old_ones_cost(project, redefine):
    """A made again under its name (another definition) ran for $0.40 and its ledger write failed: its file's $0.40
    was no less than the ledger's $0.30 (the old A's), so the old A's cost was counted nowhere and the order's
    budget of $0.70 had room again. Edited in place, its file holds the old cost too: counted once, not twice."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.7\n")
    write_task(order, "A", prompt="@cost 0.3", target_files=["a.txt"])
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 0
    REDEFINE[redefine](order)
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode in (0, 1)
    _lose_ledger_line(project, 2)
    status = project.json("status", "ORD")
    file_cost = {"made again": 0.4, "edited in place": 0.7}[redefine]
    assert status["tasks"][0]["cost_usd"] == file_cost, status
    assert (status["cost_usd"], status["budget_reached"]) == (0.7, True), status


def test_attempts_numbered_again_after_the_runtime_directory_was_cleaned_are_each_counted(project):
    """A worker's `git clean -fdx` (the logs that number attempts gone) and `git checkout` of the task file (its cost
    gone): the next attempt took number 1 again, and the ledger, which keeps one entry per attempt number, counted
    the two $0.10 attempts as one. The budget had room for a third."""
    import shutil

    (project.root / "aipm.yaml").write_text("max_workers: 1\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.2\n")
    path = write_task(order, "A", prompt="@cost 0.1", target_files=["a.txt"])
    as_written = path.read_text()
    for _ in range(2):
        assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 0
        shutil.rmtree(project.root / ".aipm")
        path.write_text(as_written)
    status = project.json("status", "ORD")
    assert (status["cost_usd"], status["budget_reached"]) == (0.2, True), status
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 1
    assert len(journal(project)) == 2


def test_a_task_edited_in_place_whose_file_says_less_than_its_ledger_counts_its_old_cost_once(project):
    """A ran twice for $0.10 each, then its file was put back as it was after the first ($0.10: a `git checkout`)
    and its prompt edited in place. Its file's $0.10 is part of the old definition's $0.20 in the ledger, yet until
    its next attempt the budget counted both: $0.30, the budget of $0.30 reached, and A held back."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.3\n")
    path = write_task(order, "A", prompt="@cost 0.1", target_files=["a.txt"])
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 0
    once = path.read_text()
    path.write_text(once.replace("status: DONE", "status: QUEUED"))
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 0
    path.write_text(once.replace("@cost 0.1", "@cost 0.05").replace("status: DONE", "status: QUEUED"))
    status = project.json("status", "ORD")
    assert (status["tasks"][0]["cost_usd"], status["cost_usd"], status["budget_reached"]) == (0.1, 0.2, False), status
    assert [t["id"] for t in project.json("detect", "ORD")["launchable"]] == ["A"]
    # Its attempt (capped at the $0.10 left) says what its file held: still counted once.
    assert project.aipm("run", "ORD", env=agent_env(project)).returncode == 0
    status = project.json("status", "ORD")
    assert (status["tasks"][0]["cost_usd"], status["cost_usd"]) == (0.15, 0.25), status
    assert len(journal(project)) == 3


def test_an_attempt_that_exited_with_no_cost_reported_is_not_called_killed(project):
    """A claude attempt that exits 0 with a result that has no cost is charged its cap (it may have spent that), and
    every line that says so said it was not reported "by killed attempts": none was killed."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 1\n")
    write_task(order, "A", prompt="@cost 0.22", target_files=["a.txt"], priority="P0")
    write_task(order, "B", prompt="@cost none", target_files=["b.txt"], max_cost_usd=0.5)
    proc = project.aipm("run", "ORD", env=agent_env(project))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    b = yaml.safe_load((order / "B.yaml").read_text())
    assert (b["status"], b["reason"], b["cost_unreported_usd"]) == ("DONE", "exit 0", 0.5), b
    line = project.aipm("status", "ORD").stdout.splitlines()[-1]
    assert "cost $0.2200 spent, up to $0.5000 more not reported by their attempts of max_cost_usd $1.00" in line, line
    assert "killed" not in line
