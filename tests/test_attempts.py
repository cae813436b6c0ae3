"""Attempt numbers: every attempt of a task has its own number and files for the task's whole life (issue 12.1)."""

import yaml

from conftest import task_statuses, write_task


def _agent_project(project, max_rework: int = 0):
    """A worker template that echoes its prompt (review feedback included) and its attempt number."""
    (project.root / "aipm.yaml").write_text(yaml.safe_dump({
        "max_workers": 2, "max_rework": max_rework,
        "worker": {"command": ["sh", "-c", 'echo "attempt=$AIPM_ATTEMPT"; cat']},
    }))
    order = project.order()
    write_task(order, "T01", prompt="Do the thing.", review="test -e approve")
    return order


def test_a_retried_task_gets_new_attempt_files_and_starts_clean(project):
    order = _agent_project(project)
    logs = project.root / ".aipm" / "logs" / "ORD"
    # Attempt 1: the review rejects it (max_rework 0): REJECTED, with review feedback kept for a rework.
    (project.root / "approve").unlink(missing_ok=True)
    assert project.aipm("run", "ORD").returncode == 1
    assert task_statuses(order) == {"T01": "REJECTED"}
    first_log = (logs / "T01.1.log").read_text()
    first_prompt = (logs / "T01.1.prompt.md").read_text()
    assert "attempt=1" in first_log

    retried = project.aipm("retry", "T01")
    assert retried.returncode == 0, retried.stderr
    data = yaml.safe_load((order / "T01.yaml").read_text())
    assert (data["status"], data["attempts"], data["reworks"]) == ("QUEUED", 0, 0)
    assert (data["started_at"], data["finished_at"], data["exit_code"]) == (None, None, None)

    (project.root / "approve").touch()
    assert project.aipm("run", "ORD").returncode == 0
    assert task_statuses(order) == {"T01": "COMPLETED"}
    # The old attempt's files are untouched; the new attempt has its own number and files.
    assert (logs / "T01.1.log").read_text() == first_log
    assert (logs / "T01.1.prompt.md").read_text() == first_prompt
    second_log = (logs / "T01.2.log").read_text()
    assert "attempt=2" in second_log and "attempt=1" not in second_log
    # The retried task starts clean: no feedback from the rejected run in its prompt or environment.
    assert "Review feedback" not in (logs / "T01.2.prompt.md").read_text()
    assert "Review feedback" not in second_log
    # `logs` shows the newest attempt; `--attempt N` any other.
    newest = project.aipm("logs", "T01")
    assert newest.returncode == 0 and "attempt=2" in newest.stdout and "attempt=1" not in newest.stdout
    old = project.aipm("logs", "T01", "--attempt", "1")
    assert old.returncode == 0 and "attempt=1" in old.stdout and "attempt=2" not in old.stdout
    missing = project.aipm("logs", "T01", "--attempt", "7")
    assert missing.returncode == 2 and "attempts with a log: 1, 2" in missing.stderr


def test_an_interrupted_attempt_keeps_its_number(project):
    """An attempt that aipm interrupts is not counted (its counter is given back), but its log stays its own."""
    order = project.order()
    write_task(order, "A", command='echo "attempt=$AIPM_ATTEMPT"')
    logs = project.root / ".aipm" / "logs" / "ORD"
    logs.mkdir(parents=True)
    (logs / "A.1.log").write_text("the log of an interrupted attempt 1\n")
    assert project.aipm("run", "ORD").returncode == 0
    assert (logs / "A.1.log").read_text() == "the log of an interrupted attempt 1\n"
    assert "attempt=2" in (logs / "A.2.log").read_text()
    assert yaml.safe_load((order / "A.yaml").read_text())["attempts"] == 1


def test_logs_of_a_task_are_not_mixed_with_a_task_whose_id_extends_it(project):
    order = project.order()
    write_task(order, "T", command="echo from-T")
    # T.x's second attempt has the highest number in the directory: `T.x.2.log` is not T's attempt "x.2".
    write_task(order, "T.x", command='echo from-T.x; test "$AIPM_ATTEMPT" = 2', max_attempts=2)
    assert project.aipm("run", "ORD").returncode == 0
    out = project.aipm("logs", "T").stdout
    assert "from-T" in out and "from-T.x" not in out


def test_logs_follow_goes_on_to_the_next_attempt(project):
    """`logs -f` started during attempt 1 follows attempt 2 when attempt 1 fails and the task is retried."""
    import subprocess
    import sys

    from conftest import wait_for

    order = project.order()
    root = project.root
    write_task(order, "A", max_attempts=2, command='echo "out-$AIPM_ATTEMPT"; '
               'while [ ! -e "gate$AIPM_ATTEMPT" ]; do sleep 0.02; done; [ "$AIPM_ATTEMPT" = 2 ]')
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(root), "run", "ORD",
                            "--no-resource-monitoring", "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root)
    try:
        log1 = root / ".aipm" / "logs" / "ORD" / "A.1.log"
        wait_for(lambda: log1.exists() and "out-1" in log1.read_text(), timeout=60)
        follow = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(root), "logs", "A", "-f"],
                                  stdout=subprocess.PIPE, text=True, cwd=root)
        first = follow.stdout.readline()  # it follows attempt 1 now
        (root / "gate1").touch()
        wait_for(lambda: "out-2" in (root / ".aipm" / "logs" / "ORD" / "A.2.log").read_text()
                 if (root / ".aipm" / "logs" / "ORD" / "A.2.log").exists() else False, timeout=60)
        (root / "gate2").touch()
        out, _ = follow.communicate(timeout=60)
        out = first + out
        assert run.wait(timeout=60) == 0
    finally:
        run.kill()
        run.wait()
    assert "out-1" in out and "out-2" in out, out + run.stdout.read()
    assert out.index("out-1") < out.index("==> A.2.log <==") < out.index("out-2"), out
    assert task_statuses(order) == {"A": "DONE"}
