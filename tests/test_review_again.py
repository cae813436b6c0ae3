"""A review stopped by its owner (Ctrl-C or SIGTERM of `run`/`exec`) or lost without a verdict (its owner and it
SIGKILLed) runs again for the same attempt: the attempt's work is done and paid for, so it is not run (and paid)
again. Real runs with the stand-in `claude` of tests/agents, which journals each run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from conftest import no_workers, state, wait_for, write_task
from test_agents import agent_env, journal
from test_workspace import git, project_in, repo  # noqa: F401 - repo is a fixture


def reviewed_task(project, gate):
    """A claude task that reports $0.25; its review says it has begun, then waits for the gate and approves."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    begun = project.root / "reviewing"
    review = f'touch "{begun}"; while [ ! -e "{gate}" ]; do sleep 0.05; done'
    path = write_task(project.order(), "A", prompt="@cost 0.25", target_files=["a.txt"], review=review)
    return path, begun


def start(project, *args: str) -> subprocess.Popen:
    env = {**os.environ, **agent_env(project), "AIPM_ENABLE_MONITORING": "false"}
    return subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def fields(path) -> tuple:
    task = yaml.safe_load(path.read_text())
    return task["status"], task["attempts"], task.get("cost_usd")


@pytest.mark.parametrize("command, stop, why", [
    (("run", "ORD"), signal.SIGINT, "stopped by the user (Ctrl-C)"),
    (("exec", "A"), signal.SIGINT, "stopped by the user (Ctrl-C)"),
    (("run", "ORD"), signal.SIGTERM, "stopped by SIGTERM"),
], ids=["run", "exec", "run-SIGTERM"])
def test_ctrl_c_during_the_review_runs_only_the_review_again(project, gate, command, stop, why):
    path, begun = reviewed_task(project, gate)
    first = start(project, *command)
    wait_for(begun.exists)
    first.send_signal(stop)
    out, _ = first.communicate(timeout=60)
    assert first.returncode == 130, out
    assert "review of A; it runs again on the next run" in out
    # Not "re-queued: none": the line said nothing of the review it stopped.
    assert "stopped  by signal; reviews stopped, their work kept: A\n" in out and "re-queued" not in out, out
    assert fields(path) == ("IN_REVIEW", 1, 0.25)  # its work kept, not re-queued
    # status, why and ps say what the run said: IN_REVIEW, its review runs again (they said INTERRUPTED, and ps
    # called the record stale).
    again = f"review {why}; it runs again on the next run, its work kept"
    (row,) = project.json("status", "ORD")["tasks"]
    assert (row["status"], row["reason"]) == ("IN_REVIEW", again), row
    assert f"IN_REVIEW │ P1  │            │ a.txt        │ 1/1   │ 0/3     │ {again}" in \
        project.aipm("status", "ORD", "--wide").stdout
    assert project.aipm("why", "A").stdout == f"A cannot start:\n  - status is IN_REVIEW ({again})\n"
    assert project.json("why", "A")["status"] == "IN_REVIEW"
    (worker,) = project.json("ps")["workers"]
    assert worker["state"] == "review_pending", worker
    assert "review pending: it runs again on the next run" in project.aipm("ps", env={"COLUMNS": "200"}).stdout
    retry = project.aipm("retry", "A")
    assert retry.returncode != 0 and "`aipm recover ORD` runs its review again" in retry.stderr, retry.stderr
    gate.touch()
    proc = project.aipm(*command, env=agent_env(project))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "review   A again (its review was stopped)" in proc.stdout
    assert fields(path) == ("COMPLETED", 1, 0.25)  # the cost counted once
    assert len(journal(project)) == 1  # the agent ran once
    log = (project.root / ".aipm/logs/ORD/A.1.log").read_text()
    assert f"review of A stopped ({why}); it runs again on the next run" in log
    assert f"review of attempt 1 stopped ({why}): it runs again" in log


@pytest.mark.parametrize("command", [("run", "ORD"), ("exec", "A")], ids=["run", "exec"])
def test_no_review_after_a_stopped_review_keeps_the_work_unreviewed(project, gate, command):
    """`--no-review` after a stopped review ran the agent again and counted its cost twice (the review could not
    run, so the task was re-queued): its work exited 0 and is kept, so the task ends DONE, as without review."""
    path, begun = reviewed_task(project, gate)
    first = start(project, *command, "--json")
    wait_for(begun.exists)
    first.send_signal(signal.SIGINT)
    out, _ = first.communicate(timeout=60)
    assert first.returncode == 130 and fields(path) == ("IN_REVIEW", 1, 0.25), out
    (stop,) = [event for line in out.splitlines() if (event := json.loads(line))["event"] == "interrupted"]
    assert (stop["requeued"], stop["reviews_stopped"]) == ([], ["A"]), out
    proc = project.aipm(*command, "--no-review", env=agent_env(project))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "A → DONE (exit 0; stopped review not run again: no review command now)" in proc.stdout, proc.stdout
    assert fields(path) == ("DONE", 1, 0.25)  # the cost counted once
    assert len(journal(project)) == 1  # the agent ran once
    assert "review of attempt 1 stopped (stopped by the user (Ctrl-C)): no review command now; the attempt's work " \
           "is kept, unreviewed" in (project.root / ".aipm/logs/ORD/A.1.log").read_text()


@pytest.mark.parametrize("adopter", ["recover", "run"])
def test_a_review_killed_with_its_owner_runs_again(project, gate, adopter):
    path, begun = reviewed_task(project, gate)
    first = start(project, "run", "ORD")
    wait_for(begun.exists)
    record = json.loads((state(project.root) / "workers/ORD/A.json").read_text())
    assert record["phase"] == "review"
    first.kill()
    os.killpg(record["pgid"], signal.SIGKILL)  # the reviewer and its wrapper: no exit code is left
    first.communicate(timeout=60)
    (row,) = project.json("status", "ORD")["tasks"]
    assert (row["status"], row["reason"]) == \
        ("IN_REVIEW", "review lost without a verdict; it runs again on the next run, its work kept"), row
    assert project.json("ps")["workers"][0]["state"] == "review_pending"
    gate.touch()
    if adopter == "recover":
        proc = project.aipm("recover", "ORD", env=agent_env(project))
        assert "ORD/A: its review runs again" in proc.stdout, proc.stdout + proc.stderr
        wait_for(lambda: no_workers(project.root))  # the detached owner ran the review
    else:
        proc = project.aipm("run", "ORD", env=agent_env(project))
        assert proc.returncode == 0 and "review   A again (its review was lost without a verdict)" in proc.stdout, \
            proc.stdout + proc.stderr
    assert fields(path) == ("COMPLETED", 1, 0.25)
    assert len(journal(project)) == 1
    assert "review of attempt 1 lost without a verdict: it runs again" in \
        (project.root / ".aipm/logs/ORD/A.1.log").read_text()


@pytest.mark.parametrize("worktree_kept, no_review", [(True, False), (False, False), (True, True)],
                         ids=["kept", "removed", "kept-no-review"])
def test_a_worktree_task_reviews_again_unless_its_worktree_is_gone(repo, tmp_path, gate, worktree_kept, no_review):
    """Its work is only in its worktree: reviewed again there and merged (with `--no-review`, merged unreviewed:
    DONE); removed while the review was stopped, there is nothing to review, so the task goes back to the queue as
    before, and the log says why."""
    project = project_in(repo, config="workspace: worktree\nscope_audit: false\n")
    runs, begun = tmp_path / "runs", tmp_path / "reviewing"
    path = write_task(project.order(), "T", target_files=["src/a.txt"],
                      command=f'echo "attempt $AIPM_ATTEMPT" >> "{runs}"; echo done >> src/a.txt',
                      review=f'touch "{begun}"; while [ ! -e "{gate}" ]; do sleep 0.05; done')
    first = start(project, "run", "ORD")
    wait_for(begun.exists)
    first.send_signal(signal.SIGINT)
    out, _ = first.communicate(timeout=60)
    assert first.returncode == 130 and "it runs again on the next run" in out, out
    worktree = json.loads((state(repo) / "workers/ORD/T.json").read_text())["workspace"]
    if not worktree_kept:
        git(repo, "worktree", "remove", "--force", worktree)
    gate.touch()
    proc = project.aipm("run", "ORD", *["--no-review"] * no_review)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert runs.read_text().splitlines() == (["attempt 1"] if worktree_kept else ["attempt 1", "attempt 2"])
    assert yaml.safe_load(path.read_text())["status"] == ("DONE" if no_review else "COMPLETED")
    assert (repo / "src/a.txt").read_text().endswith("done\n")  # merged once
    assert (repo / "src/a.txt").read_text().count("done") == 1
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    gone = f"review of T cannot run again: its worktree {worktree} is gone; its work runs again"
    assert (gone in log) != worktree_kept
    assert "by signal" not in proc.stdout, proc.stdout  # no signal stopped anything in that run


def test_reviews_named_with_review_in_their_order_or_task_get_exit_files_of_their_own(tmp_path):
    """A review's exit file is its attempt's with `.review` after it: a name holding `.review` (an order `pr.review`,
    tasks `a.review1` and `a.review2`) must not be cut there. The owner is killed while both reviews wait; one
    rejects, then the other approves; the next run adopts both, each with its own verdict."""
    from conftest import Project
    from test_chaos import Proc

    project = Project(tmp_path)
    order = project.order("pr.review")
    gate, rejected, approved = tmp_path / "gate", tmp_path / "rejected", tmp_path / "approved"
    wait = f'until [ -e "{gate}" ]; do sleep 0.01; done; '
    write_task(order, "a.review1", target_files=["x.py"], command="true", max_rework=0,
               review=wait + f'until [ -e "{rejected}" ]; do sleep 0.01; done; touch "{approved}"; exit 0')
    write_task(order, "a.review2", target_files=["y.py"], command="true", max_rework=0,
               review=wait + f'touch "{rejected}"; exit 1')
    first = Proc(tmp_path, "run", "pr.review", "--no-resource-monitoring")
    try:
        wait_for(lambda: sum(line.startswith("review") for line in first.lines) == 2, timeout=60)
        first.p.kill()
        first.wait(60)
    finally:
        gate.touch()
        first.kill()
    wait_for(approved.exists, timeout=30)
    project.aipm("run", "pr.review", "--no-resource-monitoring")
    wait_for(lambda: no_workers(tmp_path))
    statuses = {p.stem: yaml.safe_load(p.read_text())["status"] for p in order.glob("*.yaml")}
    assert statuses == {"a.review1": "COMPLETED", "a.review2": "REJECTED"}


CRASH_HOOK = os.path.join(os.path.dirname(__file__), "hooks", "crash_after_rework")


@pytest.mark.parametrize("max_rework, final, action", [(3, "QUEUED", "requeued"), (0, "REJECTED", "rejected")])
def test_a_rework_its_owner_died_in_goes_on_at_the_next_recovery(project, max_rework, final, action):
    """A rejected review is two writes, REWORK then QUEUED (REJECTED past max_rework). An owner killed between
    them left the task in REWORK for good: `recover` said there was nothing to recover, and `run` exited 1 at
    once without running it or saying why."""
    (project.root / "aipm.yaml").write_text(f"max_rework: {max_rework}\n")
    path = write_task(project.order(), "T", command="true", review="echo no; exit 1", target_files=["t"])
    write_task(project.order(), "D", command="true", depends_on=["T"])
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [CRASH_HOOK, os.environ.get("PYTHONPATH")])),
           "AIPM_CRASH_AFTER_REWORK": "1"}
    crashed = project.aipm("run", "ORD", env=env)
    assert crashed.returncode == 9, crashed.stderr
    task = yaml.safe_load(path.read_text())
    assert (task["status"], task["reworks"]) == ("REWORK", 1)
    assert project.json("recover", "ORD")["recovered"] == [{"order": "ORD", "id": "T", "action": action}]
    task = yaml.safe_load(path.read_text())
    assert (task["status"], task["reworks"]) == (final, 1 if final == "QUEUED" else 0)  # (rejected: no rework)
    assert no_workers(project.root) and "its owner was gone" in project.aipm("logs", "T").stdout


def test_a_run_moves_a_rework_its_owner_died_in_on(project):
    """The next `run` recovers it too, and goes on to the reviews that are left (max_rework 1: one more)."""
    (project.root / "aipm.yaml").write_text("max_rework: 1\n")
    path = write_task(project.order(), "T", command="true", review="echo no; exit 1", target_files=["t"])
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [CRASH_HOOK, os.environ.get("PYTHONPATH")])),
           "AIPM_CRASH_AFTER_REWORK": "1"}
    assert project.aipm("run", "ORD", env=env).returncode == 9
    again = project.aipm("run", "ORD")
    assert again.returncode == 1, again.stdout + again.stderr
    task = yaml.safe_load(path.read_text())
    assert (task["status"], task["reworks"], task["attempts"]) == ("REJECTED", 1, 2), task


def test_a_review_run_again_is_judged_on_its_own_output(project, gate):
    """A review run again after a stop appends to the stopped run's log: its feedback's head, and the reason taken
    from it, were the stopped run's output (`review rejected: first run, stopped`), not the verdict's."""
    seen = project.root.parent / "reviewed-once"
    review = (f'if [ -e "{seen}" ]; then echo "second run: FAIL"; exit 1; fi; touch "{seen}"; echo "first run, '
              f'stopped"; while [ ! -e "{gate}" ]; do sleep 0.05; done')
    write_task(project.order(), "A", command="true", review=review, max_rework=0)
    first = start(project, "run", "ORD")
    wait_for(seen.exists)
    first.send_signal(signal.SIGINT)
    out, _ = first.communicate(timeout=60)
    assert first.returncode == 130, out
    proc = project.aipm("run", "ORD")
    assert "A → REJECTED (review rejected: second run: FAIL)" in proc.stdout, proc.stdout
    feedback = (project.root / ".aipm/feedback/ORD/A.txt").read_text()
    assert "second run: FAIL" in feedback and "first run" not in feedback, feedback
    assert "first run, stopped" in (project.root / ".aipm/logs/ORD/A.1.review.log").read_text()  # (kept in its log)


@pytest.mark.parametrize("edit", ["s/^review: .*/review: 'true'/", "/^review:/d"], ids=["weakened", "removed"])
def test_a_review_run_again_is_the_one_its_attempt_started_with(project, gate, edit):
    """A worker that rewrote (or removed) `review` in its own task file was judged by the review it started with,
    until a Ctrl-C during that review: run again, the review was the file's (approved: COMPLETED), or none (DONE,
    unreviewed). The run again is the attempt's own review too."""
    path = project.order() / "A.yaml"
    (project.root / "rv.sh").write_text(f'while [ ! -e "{gate}" ]; do sleep 0.05; done; echo "no: needs tests"; exit 1\n')
    write_task(project.order(), "A", command=f"sed -i \"{edit}\" {path}", review="sh rv.sh", max_rework=0)
    first = start(project, "run", "ORD")
    wait_for(lambda: yaml.safe_load(path.read_text()).get("status") == "IN_REVIEW")
    first.send_signal(signal.SIGINT)
    out, _ = first.communicate(timeout=60)
    assert first.returncode == 130, out
    gate.touch()
    proc = project.aipm("run", "ORD")
    assert "A → REJECTED (review rejected: no: needs tests)" in proc.stdout, proc.stdout + proc.stderr
