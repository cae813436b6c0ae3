"""`aipm logs ORDER [-f]`: every worker's lines of an order, each tagged with its task id (parallel --tag)."""

import subprocess
import sys

from conftest import no_workers, task_statuses, wait_for, write_task


def test_logs_of_an_order_tag_every_line_with_its_task(project):
    order = project.order()
    write_task(order, "A", command="echo a1; echo a2", target_files=["a"])
    write_task(order, "B", command="echo b1; printf 'b2 no newline'", target_files=["b"])
    write_task(order, "C", command='echo "c attempt $AIPM_ATTEMPT"; [ "$AIPM_ATTEMPT" = 2 ]', max_attempts=2)
    assert project.aipm("run", "ORD", "--no-resource-monitoring").returncode == 0
    out = project.aipm("logs", "ORD", check=True).stdout.splitlines()
    assert all("\t" in line for line in out), out
    by_task = {}
    for line in out:
        tag, text = line.split("\t", 1)
        by_task.setdefault(tag, []).append(text)
    assert set(by_task) == {"A", "B", "C"}
    assert by_task["A"][:2] == ["a1", "a2"]
    assert by_task["B"][0] == "b1" and by_task["B"][1].startswith("b2 no newline")
    # Both attempts of C, the first before the second.
    attempts = [t for t in by_task["C"] if t.startswith("c attempt")]
    assert attempts == ["c attempt 1", "c attempt 2"]
    # A task argument still means that task's own log, untagged.
    assert project.aipm("logs", "A", check=True).stdout.splitlines()[:2] == ["a1", "a2"]


def test_logs_order_follow_picks_up_a_new_attempt_and_ends_with_the_order(project, gate):
    order = project.order()
    write_task(order, "A", max_attempts=2, command=(
        f'echo "attempt $AIPM_ATTEMPT"; [ "$AIPM_ATTEMPT" = 2 ] && exit 0; '
        f'while [ ! -e {gate} ]; do sleep 0.05; done; exit 1'))
    project.aipm("launch", "ORD", check=True)
    log = project.root / ".aipm" / "logs" / "ORD" / "A.1.log"
    wait_for(lambda: log.exists() and "attempt 1" in log.read_text())
    follower = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "logs", "ORD", "-f"],
                                stdout=subprocess.PIPE, text=True)
    # Only once the follower has shown the first attempt is the second one allowed to start.
    first = follower.stdout.readline()
    assert first == "A\tattempt 1\n"
    gate.touch()
    rest, _ = follower.communicate(timeout=120)  # it ends by itself once the order is settled
    assert follower.returncode == 0
    lines = rest.splitlines()
    assert "A\tattempt 2" in lines
    assert lines.index("A\tattempt 2") > next(i for i, l in enumerate(lines) if "attempt 1 ended: exit 1" in l)
    assert task_statuses(order) == {"A": "DONE"}
    wait_for(lambda: no_workers(project.root))


def test_logs_follow_of_a_task_not_started_yet_waits_for_its_first_attempt(project):
    """`aipm logs B -f` before B has run exited 2 ('no log ... yet'), unlike `tail -F`: it now waits while B may
    still start, then follows its log to B's end. Without -f, or for a task that can no longer run, it still
    says there is no log (exit 2)."""
    order = project.order()
    write_task(order, "B", command="echo hello-from-b", target_files=["b"])
    write_task(project.order("O2"), "X", command="true", status="CANCELLED")
    write_task(project.order("O2"), "Y", command="true", depends_on=["X"])
    assert project.aipm("logs", "B").returncode == 2
    assert project.aipm("logs", "O2/X", "-f", timeout=30).returncode == 2  # cancelled: it will never run
    behind = project.aipm("logs", "O2/Y", "-f", timeout=30)  # nor will what waits on it
    assert behind.returncode == 2 and "O2/Y can never run: X is CANCELLED" in behind.stderr, behind.stderr
    follower = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "logs", "B", "-f"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        said = follower.stderr.readline()  # it waits (and says so) before B has run
        assert said.startswith("waiting for ORD/B to start"), said
        assert project.aipm("run", "ORD", "--no-resource-monitoring").returncode == 0
        out, err = follower.communicate(timeout=60)
    finally:
        follower.kill()
    assert follower.returncode == 0, out + err
    assert "hello-from-b" in out
