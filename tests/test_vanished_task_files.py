"""Task files that disappear while their worker runs (deleted alone or with their order directory, by a worker or
the user): the attempt's outcome is held for `aipm recover` until the file is back as it was, and never recorded
into another task made under the same name."""

import os
import subprocess
import sys
import time

import pytest
import yaml

from conftest import no_workers, state, task_statuses, wait_for, write_task
from test_agents import agent_env, journal as agent_runs
from test_hostile_workers import _commit_everything, _git, _record, _started


def _journal(project):
    return project.root.parent / f"{project.root.name}.journal"  # outside the tree: not a scope finding


def _gated(gate, journal, name, before=""):
    return f"{before}while [ ! -e {gate} ]; do sleep 0.05; done; echo {name} >> {journal}"


def _another_t1(order, journal):
    """The user makes the order's T1 again, as another task (another command and targets), QUEUED."""
    write_task(order, "T1", target_files=["new.txt"], command=f"echo new >> {journal}")


@pytest.mark.parametrize("then", ["run", "recover"])
def test_a_held_outcome_is_not_recorded_into_another_task_made_under_its_name(project, gate, then):
    """The order directory went mid-run (its outcome held), then the user made T1 again with another command:
    the next `run` (or `recover`) recorded the old attempt's exit 0 into it, DONE without ever running."""
    order = project.order()
    journal = _journal(project)
    write_task(order, "T1", target_files=["a.txt"], command=_gated(gate, journal, "old"))
    _commit_everything(project.root)
    run, out = _started(project, "run", "ORD")
    try:
        wait_for(lambda: _record(project, "T1"))
        subprocess.run(["rm", "-rf", str(order)], check=True)
    finally:
        gate.touch()
    assert run.wait(timeout=120) == 1, out.read_text()
    _another_t1(order, journal)
    said = "attempt 1 (exit 0) not recorded: " + f"{order / 'T1.yaml'} now holds another task"
    if then == "recover":
        recover = project.aipm("recover", "ORD", check=True)
        assert f"ORD/T1: discarded: {said}" in recover.stdout, recover.stdout
        assert no_workers(project.root) and task_statuses(order) == {"T1": "QUEUED"}
    second = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert (f"discard  T1: {said}" in second.stdout) == (then == "run"), second.stdout
    assert task_statuses(order) == {"T1": "DONE"} and journal.read_text() == "old\nnew\n"
    assert said in (project.root / ".aipm" / "logs" / "ORD" / "T1.1.log").read_text()
    assert no_workers(project.root)


def test_the_usage_of_a_discarded_agent_attempt_is_said_and_added_to_no_task(project, gate):
    """The old attempt's $0.25 went into the new task's cost_usd with its outcome; discarded, it is said where it
    is (its log) and the new task costs only its own $0.50. The order's cost, which its budget counts, still has
    it: discarded, it was spent all the same (spending.py)."""
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    order = project.order()
    write_task(order, "T1", prompt=f"@cost 0.25\n@wait-for {gate}", target_files=["a.txt"])
    env = agent_env(project)
    with open(project.root.parent / f"{project.root.name}.out", "w") as out:
        run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"],
                               env={**os.environ, **env, "AIPM_ENABLE_MONITORING": "false"}, stdout=out,
                               stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _record(project, "T1") and agent_runs(project))  # the agent runs
        subprocess.run(["rm", "-rf", str(order)], check=True)
    finally:
        gate.touch()
    assert run.wait(timeout=120) == 1
    write_task(order, "T1", prompt="@cost 0.5", target_files=["a.txt"])
    second = project.aipm("run", "ORD", env=env, timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    log = project.root / ".aipm" / "logs" / "ORD" / "T1.1.log"
    assert f"not recorded: {order / 'T1.yaml'} now holds another task" in second.stdout, second.stdout
    assert (f"its usage is added to no task, its cost still counts against the order's budget (see {log})"
            in second.stdout), second.stdout
    assert log.read_text().count("usage: cost $0.2500") == 1
    task = yaml.safe_load((order / "T1.yaml").read_text())
    assert (task["status"], task["cost_usd"]) == ("DONE", 0.5), task
    status = project.json("status", "ORD")
    assert (status["tasks"][0]["cost_usd"], status["cost_usd"]) == (0.5, 0.75), status


def test_a_run_does_not_put_its_attempt_back_into_another_task_made_under_its_name(project, gate):
    """Made again while the worker still ran: the run wrote the attempt's IN_PROGRESS back into the new file (as
    for a `git checkout`), then recorded the old attempt's exit 0 there: the new T1 DONE without running."""
    order = project.order()
    journal = _journal(project)
    write_task(order, "T1", target_files=["a.txt"], command=_gated(gate, journal, "old"))
    write_task(order, "T2", depends_on=["T1"], command=f"echo T2 >> {journal}")
    run, out = _started(project, "run", "ORD")
    try:
        wait_for(lambda: _record(project, "T1"))
        subprocess.run(["rm", "-rf", str(order)], check=True)
        _another_t1(order, journal)
        write_task(order, "T2", depends_on=["T1"], command=f"echo T2 >> {journal}")
        # Nothing shows that the run has read the new files (a restore was the bug): give it a moment to, so it
        # would restore (restore_owned) before the attempt's end; if it is slower, the end is what is checked.
        time.sleep(1.0)
    finally:
        gate.touch()
    assert run.wait(timeout=120) == 0, out.read_text()
    said = out.read_text()
    assert f"discard  T1: attempt 1 (exit 0) not recorded: {order / 'T1.yaml'} now holds another task" in said, said
    assert "restore  T1" not in said, said
    assert task_statuses(order) == {"T1": "DONE", "T2": "DONE"} and journal.read_text() == "old\nnew\nT2\n"
    assert no_workers(project.root)


@pytest.mark.parametrize("then", ["put back", "another task", "still gone"])
def test_a_task_file_deleted_mid_run_says_so_exits_1_and_holds_the_outcome(project, gate, then):
    """A task file deleted while its worker ran (not its directory): the run said 'gone', ended 0 with the order
    'DONE', and dropped the outcome with the exit file, so the file put back (`git checkout`) ran T1 again. Now it
    is held as for a deleted order directory: recorded once the file is back as it was; discarded for another
    task made there; dropped, said, by a `recover` while the file is still gone."""
    order = project.order()
    journal = _journal(project)
    # (no targets: the gate the test opens in the tree is no scope finding)
    path = write_task(order, "T1", command=_gated(gate, journal, "T1", "rm orders/ORD/T1.yaml; "))
    write_task(order, "T2", command=f"echo T2 >> {journal}")
    _commit_everything(project.root)
    run, out = _started(project, "run", "ORD")
    try:
        wait_for(lambda: _record(project, "T1") and not path.exists())
    finally:
        gate.touch()
    assert run.wait(timeout=120) == 1, out.read_text()
    said = out.read_text()
    assert f"aipm: error: cannot record the outcome of T1 (exit 0): {path}: deleted or moved while it ran" in said
    assert "Traceback" not in said and task_statuses(order) == {"T2": "DONE"}, said
    assert any((state(project.root) / "exit" / "ORD").glob("T1.*")), "the exit code was not kept"
    if then == "put back":
        _git(project.root, "checkout", "-q", "--", "orders/ORD/T1.yaml")  # committed: QUEUED
        assert "ORD/T1: its worker had ended: recorded DONE" in project.aipm("recover", "ORD", check=True).stdout
        wait_for(lambda: task_statuses(order) == {"T1": "DONE", "T2": "DONE"} and no_workers(project.root))
        assert sorted(journal.read_text().splitlines()) == ["T1", "T2"]  # T1 ran once
        return
    if then == "still gone":
        recover = project.aipm("recover", "ORD", check=True)
        assert (f"ORD/T1: dropped: attempt 1 (exit 0) not recorded: its task file {path} is still gone"
                in recover.stdout), recover.stdout
        assert no_workers(project.root)
    _another_t1(order, journal)  # (after a drop: whatever is put there now runs afresh)
    second = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert ("discard  T1: attempt 1 (exit 0) not recorded" in second.stdout) == (then == "another task")
    assert task_statuses(order) == {"T1": "DONE", "T2": "DONE"}
    assert sorted(journal.read_text().splitlines()) == ["T1", "T2", "new"]
    assert no_workers(project.root)


def test_a_task_file_a_worker_deletes_and_puts_back_before_its_end_is_recorded(project):
    order = project.order()
    write_task(order, "T1", target_files=["a.txt"],
               command="rm orders/ORD/T1.yaml; sleep 0.3; git checkout -q -- orders/ORD/T1.yaml; sleep 0.3")
    write_task(order, "T2", depends_on=["T1"], command="true")
    _commit_everything(project.root)
    run = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert task_statuses(order) == {"T1": "DONE", "T2": "DONE"} and no_workers(project.root)


def test_a_fifo_a_worker_leaves_in_place_of_its_task_file_hangs_nothing(project):
    """A worker that replaced its own task file with a FIFO (`rm T1.yaml; mkfifo T1.yaml`): its owner opened the
    FIFO to record the outcome and waited for a writer for ever, under the launch lock (every aipm command of the
    project hung, SIGTERM too). Now the file is refused as no regular file and the outcome held, as for a broken
    file: the run ends 1, and once the file is put back `aipm recover` records it."""
    order = project.order()
    path = write_task(order, "T1", command="rm orders/ORD/T1.yaml; mkfifo orders/ORD/T1.yaml")
    _commit_everything(project.root)
    run = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=60)
    said = run.stdout + run.stderr
    assert run.returncode == 1, said
    assert f"cannot record the outcome of T1 (exit 0): {path}: not a regular file" in said, said
    assert "Traceback" not in said and path.is_fifo()
    for args in (("cancel", "ORD/T1"), ("why", "ORD/T1"), ("retry", "ORD/T1")):  # each opened it too
        proc = project.aipm(*args, timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    path.unlink()
    _git(project.root, "checkout", "-q", "--", "orders/ORD/T1.yaml")
    assert "ORD/T1: its worker had ended: recorded DONE" in project.aipm("recover", "ORD", check=True).stdout
    wait_for(lambda: task_statuses(order) == {"T1": "DONE"} and no_workers(project.root))


@pytest.mark.parametrize("recover_first", [False, True], ids=["back, recover", "recover, back"])
@pytest.mark.parametrize("owner", ["alive", "killed"])
def test_cancel_stops_the_worker_of_a_task_whose_file_was_moved_and_its_return_records_the_cancel(project, owner,
                                                                                                 recover_first):
    """`aipm cancel ORD/T` of a running task whose file the user had moved away refused ('no file T.yaml', exit 2)
    while `aipm ps` listed its worker: nothing could stop it but a kill by hand. Now the worker is stopped, and
    once the file is back the attempt's end is recorded as the user's cancel, not as a failure (exit 143).
    A `recover` before the file was back dropped the attempt, and with it the cancel: the file put back was
    re-queued and the cancelled task ran again. Now that recover frees its files and keeps the cancel."""
    order, journal = project.order(), _journal(project)
    run, out, pid = _running(project, f"echo began >> {journal}; sleep 60; echo ended >> {journal}", journal)
    if owner == "killed":
        run.kill()
        run.wait()
    away = project.root.parent / "T.yaml.away"
    os.replace(order / "T.yaml", away)
    cancel = project.aipm("cancel", "ORD/T", "--grace", "1", timeout=60)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert f"ORD/T: its worker (pid {pid}) was stopped" in cancel.stdout, cancel.stdout
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z")
    if owner == "alive":
        assert run.wait(timeout=60) == 1, out.read_text()
    dropped = project.aipm("recover", "ORD", timeout=60).stdout if recover_first else ""
    assert no_workers(project.root) == recover_first  # (dropped: its files are free meanwhile)
    os.replace(away, order / "T.yaml")
    if recover_first:  # (the cancel's word, not "`aipm recover` re-queues it")
        [row] = project.json("status", "ORD")["tasks"]
        assert row["reason"].endswith("while its task file was gone; `aipm recover` writes CANCELLED"), row
    recover = project.aipm("recover", "ORD", timeout=60)
    assert recover.returncode == 0, recover.stdout + recover.stderr
    wait_for(lambda: task_statuses(order) == {"T": "CANCELLED"})
    wait_for(lambda: no_workers(project.root))  # (recover's owner drops the record after its write)
    assert project.aipm("run", "ORD", timeout=60).returncode == 1  # nothing to run: cancelled
    assert journal.read_text() == "began\n"
    assert ("put back now, it is CANCELLED by the next recover or run" in dropped) == recover_first, dropped
    assert project.aipm("cancel", "ORD/NOPE").returncode == 2  # no file and no worker: the refusal stands


@pytest.mark.parametrize("named", ["path", "order path"])
def test_cancel_by_the_path_of_a_task_file_that_was_deleted_stops_its_worker(project, named):
    """`aipm cancel` takes a task as TASK, ORDER/TASK (the order by id or by its directory's path) or the path of its
    file; only the ids reached a running task whose file was deleted: by a path it still refused ('no file
    T.yaml.yaml', exit 2) while its worker ran on."""
    order, journal = project.order(), _journal(project)
    run, out, pid = _running(project, f"echo began >> {journal}; sleep 60", journal)
    os.unlink(order / "T.yaml")
    arg = str(order / "T.yaml") if named == "path" else f"{os.path.relpath(order, project.root)}/T"
    cancel = project.aipm("cancel", arg, "--grace", "1", timeout=60)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert f"ORD/T: its worker (pid {pid}) was stopped" in cancel.stdout, cancel.stdout
    assert run.wait(timeout=60) == 1, out.read_text()
    assert project.aipm("cancel", str(order / "NOPE.yaml")).returncode == 2


def _running(project, command: str, journal):
    """Task T (target a.txt) of ORD running `command` under a `run`, begun (its `journal` made): (the run, its
    output file, T's worker pid)."""
    write_task(project.order(), "T", target_files=["a.txt"], command=command)
    run, out = _started(project, "run", "ORD")
    wait_for(lambda: _record(project, "T") and journal.exists())
    return run, out, _record(project, "T")["pid"]


@pytest.mark.parametrize("cleaned", ["by its worker", "again before the recover"])
def test_recover_records_a_held_outcome_after_a_worker_removed_aipms_directory(project, cleaned):
    """A worker that deleted its task file and then `.aipm/` (`rm -rf .aipm`): the run said the file put back is
    recorded by `aipm recover`, but that recover said `cannot adopt its worker: No such file or directory`, exit 1,
    every time (the adopting owner's log had no directory, and the error named no file), and the outcome was never
    recorded. Now the directory is made again (with its .gitignore), as every write under `.aipm/` does."""
    order = project.order("D")
    write_task(order, "A", title="x", target_files=["x"], command="rm orders/D/A.yaml; rm -rf .aipm; echo bye")
    _commit_everything(project.root)
    run = project.aipm("run", "D", "--no-resource-monitoring", timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "once the file is back as it was (`git checkout` of it, say), `aipm recover` records it" in run.stderr
    if cleaned == "again before the recover":
        _git(project.root, "clean", "-qfdx")  # a person's, or another worker's
        assert not (project.root / ".aipm").exists()
    _git(project.root, "checkout", "-q", "--", "orders/D/A.yaml")
    recover = project.aipm("recover", "D")
    assert recover.returncode == 0 and "D/A: its worker had ended: recorded DONE" in recover.stdout, (
        recover.stdout + recover.stderr)
    wait_for(lambda: task_statuses(order) == {"A": "DONE"} and no_workers(project.root))
    assert "attempt 1 ended: exit 0" in (project.root / ".aipm" / "logs" / "D" / "A.1.log").read_text()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=project.root, capture_output=True, text=True)
    assert status.stdout.splitlines() == [" M orders/D/A.yaml"]  # `.aipm/` made again, git-ignored again


def test_an_adoption_recover_cannot_make_names_the_file_and_is_made_once_it_can(project):
    """What stays in the way of the adopting owner's log (a directory a worker left under its name) is said with
    the file's name, not a bare "Is a directory"; once it is gone, recover records the outcome."""
    order = project.order("D")
    write_task(order, "A", target_files=["x"], command="rm orders/D/A.yaml; echo bye")
    _commit_everything(project.root)
    assert project.aipm("run", "D", "--no-resource-monitoring", timeout=120).returncode == 1
    _git(project.root, "checkout", "-q", "--", "orders/D/A.yaml")
    log = project.root / ".aipm" / "logs" / "D" / "A.1.log"
    log.rename(log.with_name("kept"))
    log.mkdir()
    recover = project.aipm("recover", "D")
    assert recover.returncode == 1
    assert f"D/A: cannot adopt its worker: {log}: Is a directory" in recover.stdout + recover.stderr, recover
    assert task_statuses(order) == {"A": "QUEUED"}
    log.rmdir()
    assert "D/A: its worker had ended: recorded DONE" in project.aipm("recover", "D", check=True).stdout
    wait_for(lambda: task_statuses(order) == {"A": "DONE"} and no_workers(project.root))
