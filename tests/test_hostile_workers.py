"""Workers that misbehave on purpose (found by a hostile-worker review): one that resets its own task file
(`git checkout`) and ends while its supervisor is dead, a command whose wrapper dies with its supervisor (`pkill -f
aipm`), one that deletes the order's directory and puts it back."""

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import no_workers, state, task_statuses, wait_for, write_task
from invariants import group_alive, pid_alive


def _git(root, *args):
    subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args], cwd=root, check=True,
                   capture_output=True)


def _start_run(project, order="ORD"):
    return subprocess.Popen(
        [sys.executable, "-m", "aipm", "--root", str(project.root), "run", order, "--no-resource-monitoring"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _record(project, task):
    path = state(project.root) / "workers" / "ORD" / f"{task}.json"
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if rec.get("pid") else None


@pytest.mark.parametrize("then", ["run", "recover"])
def test_a_worker_that_reset_its_file_and_ended_after_the_kill_keeps_its_exit_code_and_runs_once(project, gate,
                                                                                                 then):
    order = project.order()
    journal = project.root / "journal.txt"
    # The attempt puts the committed file back (QUEUED, no attempts) once its supervisor is dead, then fails.
    write_task(order, "T1", target_files=["a.txt"], max_attempts=1,
               command=f"while [ ! -e {gate} ]; do sleep 0.05; done; git checkout -q -- orders/ORD/T1.yaml; "
                       f"echo ran >> {journal}; exit 3")
    _git(project.root, "init", "-q")
    _git(project.root, "add", "-A")
    _git(project.root, "commit", "-qm", "order")
    first = _start_run(project)
    rec = wait_for(lambda: _record(project, "T1"))
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    gate.touch()
    wait_for(lambda: not pid_alive(rec["pid"]))
    assert task_statuses(order)["T1"] == "QUEUED"  # what the worker left: the reset, with its attempt unrecorded
    if then == "recover":  # a detached owner records it
        assert project.json("recover", "ORD")["recovered"] == [{"order": "ORD", "id": "T1", "action": "adopted"}]
        wait_for(lambda: no_workers(project.root))
    else:
        second = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=120)
        assert second.returncode == 1, second.stdout + second.stderr
    task = project.json("status", "ORD")["tasks"][0]
    assert (task["status"], task["attempts"], task["exit_code"]) == ("FAILED", 1, 3), task
    assert journal.read_text().splitlines() == ["ran"], "the attempt ran again instead of being recorded"
    assert no_workers(project.root)


def test_a_command_whose_wrapper_died_with_its_supervisor_is_ended_before_its_task_runs_again(project, gate):
    order = project.order()
    journal = project.root / "journal.txt"
    # No target files: nothing but the recovery keeps a second attempt from running beside the first.
    write_task(order, "T1", target_files=[],
               command=f"echo start >> {journal}; while [ ! -e {gate} ]; do sleep 0.05; done; echo end >> {journal}")
    first = _start_run(project)
    rec = wait_for(lambda: _record(project, "T1") if journal.exists() else None)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    os.kill(rec["pid"], signal.SIGKILL)  # the wrapper (what `pkill -f aipm` matches), not its command
    wait_for(lambda: not pid_alive(rec["pid"]))
    assert group_alive(rec["pgid"]), "the command should outlive its wrapper for this test"
    second = _start_run(project)
    try:
        # The first attempt's command is ended (it never reaches its end line) before the task starts again.
        wait_for(lambda: journal.read_text().count("start") == 2)
        assert not group_alive(rec["pgid"]), "the lost attempt's command still runs beside the new one"
        gate.touch()
        assert second.wait(timeout=60) == 0
    finally:
        gate.touch()
        second.kill()
    assert journal.read_text().splitlines() == ["start", "start", "end"]
    assert task_statuses(order)["T1"] == "DONE"
    assert no_workers(project.root)


def _dead_record(project, order, task, attempt, exit_code):
    """What an owner killed after the attempt's end leaves: a record whose worker and owner are gone, and its exit
    file."""
    exit_file = state(project.root, make=True) / "exit" / "ORD" / f"{task}.{attempt}"
    exit_file.parent.mkdir(parents=True, exist_ok=True)
    exit_file.write_text(f"{exit_code}\n")
    records = state(project.root) / "workers" / "ORD"
    records.mkdir(parents=True, exist_ok=True)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that existed and is gone
    (records / f"{task}.json").write_text(json.dumps({
        "order": "ORD", "order_dir": str(order), "task": task, "task_file": str(order / f"{task}.yaml"),
        "attempt": attempt, "targets": ["x.txt"], "log": str(project.root / f"{task}.log"),
        "exit_file": str(exit_file), "started_at": "2025-01-01T00:00:00+00:00", "owner_pid": dead.pid,
        "owner_ctime": 1.0, "pid": dead.pid, "ctime": 1.0, "pgid": dead.pid, "number": attempt}))
    return records / f"{task}.json"


def test_retry_after_a_kill_that_left_the_record_behind_runs_the_task_afresh(project):
    """The outcome (FAILED, exit 3) is in the file; the record outlived it. `retry` is the user's word: the record
    goes, and the next run runs the task instead of recording the old exit code over the retry."""
    order = project.order()
    journal = project.root / "journal.txt"
    write_task(order, "A", command=f"echo ran >> {journal}", target_files=["x.txt"], status="FAILED", attempts=1,
               exit_code=3)
    record = _dead_record(project, order, "A", 1, 3)
    project.aipm("retry", "A", check=True)
    assert not record.exists()
    assert project.aipm("run", "ORD", "--no-resource-monitoring", timeout=120).returncode == 0
    assert journal.read_text() == "ran\n" and task_statuses(order)["A"] == "DONE"


def test_retry_of_a_task_whose_last_attempt_was_never_recorded_is_refused(project):
    order = project.order()
    path = write_task(order, "A", command="true", target_files=["x.txt"], status="FAILED", attempts=1, exit_code=3)
    _dead_record(project, order, "A", 2, 0)  # attempt 2 ended after the file was put back to attempt 1's outcome
    before = path.read_bytes()
    proc = project.aipm("retry", "A")
    assert proc.returncode == 2 and "never recorded; `aipm recover ORD` records it" in proc.stderr, proc.stderr
    assert path.read_bytes() == before
    project.aipm("recover", "ORD", check=True)
    wait_for(lambda: no_workers(project.root))
    done = project.json("status", "ORD")["tasks"][0]
    assert (done["status"], done["attempts"], done["exit_code"]) == ("DONE", 2, 0)


@pytest.mark.parametrize("how", ["rm -rf orders/ORD; git checkout -q -- orders/ORD",
                                 "git stash -u -q; sleep 0.2; git stash pop -q"])
def test_an_order_directory_a_worker_deletes_and_puts_back_still_runs_to_the_end(project, how):
    """The directory comes back as a new inode: `run` watched the old one and ended (exit 0) with T3 never run."""
    order = project.order()
    journal = project.root.parent / f"{project.root.name}.journal"  # outside the tree: `git stash -u` takes it
    write_task(order, "T1", target_files=["a.txt"], command=f"sleep 0.3; {how}; sleep 0.3")
    write_task(order, "T3", target_files=["c.txt"], depends_on=["T1"], command=f"echo ran >> {journal}")
    _git(project.root, "init", "-q")
    _git(project.root, "add", "aipm.yaml")
    if how.startswith("rm"):
        _git(project.root, "add", "orders")  # a checkout puts back what was committed
    _git(project.root, "commit", "-qm", "order")
    proc = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert task_statuses(order) == {"T1": "DONE", "T3": "DONE"}, proc.stdout
    assert journal.read_text() == "ran\n"
    assert no_workers(project.root)
