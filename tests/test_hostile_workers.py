"""Workers that misbehave on purpose (found by a hostile-worker review): one that resets its own task file
(`git checkout`) and ends while its supervisor is dead, a command whose wrapper dies with its supervisor (`pkill -f
aipm`), one that deletes the order's directory and puts it back."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from aipm import adopted, recovery
from aipm.launcher import Launcher, Options
from aipm.project import Project
from aipm.runner import group_members
from aipm.settings import load_settings
from aipm.store import load_order
from conftest import capped_memory, no_workers, state, stop_outside_a_round, task_statuses, wait_for, write_task
from invariants import KILL_OWNER, check, group_alive, journal_command, pid_alive


def _git(root, *args):
    subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args], cwd=root, check=True,
                   capture_output=True)


def _commit_everything(root):
    """A git repository of the project as it is now: what `git checkout` puts back."""
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "order")


def _start_run(project, order="ORD"):
    return subprocess.Popen(
        [sys.executable, "-m", "aipm", "--root", str(project.root), "run", order, "--no-resource-monitoring"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _started(project, *args, env=None):
    """`aipm ARGS --no-resource-monitoring` in the background (in `env`), both its streams into a file: (process,
    file)."""
    out = project.root.parent / f"{project.root.name}.out"
    with open(out, "w") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), *args,
                                 "--no-resource-monitoring"], stdout=handle, stderr=subprocess.STDOUT, env=env)
    return proc, out


def _end_unwatched(project, gate):
    """Run the order, SIGKILL the run once T1's attempt is recorded, then open the gate: the attempt goes on and
    ends with no supervisor. Returns its record."""
    first = _start_run(project)
    rec = wait_for(lambda: _record(project, "T1"))
    wait_for(lambda: _went(rec))
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    gate.touch()
    wait_for(lambda: not pid_alive(rec["pid"]))
    return rec


def _went(rec) -> bool:
    """The attempt's command runs: its wrapper had its go, which follows its record once the round's fsync is done
    (a run killed in between runs nothing, and its next run starts the task again)."""
    return len(group_members(rec["pid"])) > 1


def _pkill(run, rec):
    """What an agent's `pkill -f aipm` does: the supervisor and the attempt's wrapper SIGKILLed, its command left."""
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    os.kill(rec["pid"], signal.SIGKILL)
    wait_for(lambda: not pid_alive(rec["pid"]))


def _alive_beside_the_next(project, journal, rec, starts):
    """Run the order again until the task's next attempt has started (`starts` start lines in the journal): is
    the lost attempt's process group still alive then? Returns (the run, that answer)."""
    run = _start_run(project)
    wait_for(lambda: journal.read_text().count("start") == starts)
    return run, group_alive(rec["pgid"])


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
    _commit_everything(project.root)
    _end_unwatched(project, gate)
    assert task_statuses(order)["T1"] == "QUEUED"  # what the worker left: the reset, with its attempt unrecorded
    if then == "recover":  # a detached owner records it
        (said,) = project.json("recover", "ORD")["recovered"]  # (it waits for that record: its worker had ended)
        assert (said["id"], said["action"], said["status"], said["exit_code"]) == ("T1", "recorded", "FAILED", 3)
        wait_for(lambda: no_workers(project.root))
    else:
        second = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=120)
        assert second.returncode == 1, second.stdout + second.stderr
    task = project.json("status", "ORD")["tasks"][0]
    assert (task["status"], task["attempts"], task["exit_code"]) == ("FAILED", 1, 3), task
    assert journal.read_text().splitlines() == ["ran"], "the attempt ran again instead of being recorded"
    assert no_workers(project.root)


@pytest.mark.parametrize("wrote, code, then_status", [("DONE", 3, "FAILED"), ("QUEUED", 0, "DONE")],
                         ids=["a failure called DONE", "a success called QUEUED"])
def test_a_status_a_worker_wrote_itself_while_its_owner_was_dead_is_no_outcome(project, gate, wrote, code,
                                                                              then_status):
    """A worker's `sed` of its own status, ended while no owner lived, was taken for aipm's outcome of the attempt
    (same attempt number, same start): DONE for an exit 3, and the dependant ran; QUEUED for an exit 0, and the
    task ran again. aipm's outcome says when the attempt ended; the worker's edit does not."""
    order = project.order()
    journal = project.root / "journal.txt"
    write_task(order, "T1", target_files=["a.txt"], max_attempts=1,
               command=f"while [ ! -e {gate} ]; do sleep 0.05; done; echo ran >> {journal}; "
                       f"sed -i 's/^status: .*/status: {wrote}/' orders/ORD/T1.yaml; exit {code}")
    write_task(order, "T2", target_files=["b.txt"], depends_on=["T1"], command=f"echo next >> {journal}")
    _end_unwatched(project, gate)
    assert task_statuses(order)["T1"] == wrote  # what the worker left, its attempt unrecorded
    second = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=120)
    assert second.returncode == (0 if then_status == "DONE" else 1), second.stdout + second.stderr
    task = project.json("status", "ORD")["tasks"][0]
    assert (task["status"], task["attempts"], task["exit_code"]) == (then_status, 1, code), task
    assert journal.read_text().splitlines() == ["ran"] + ["next"] * (then_status == "DONE")
    assert no_workers(project.root)


def test_a_review_a_reviewer_approved_itself_while_its_owner_was_dead_is_no_approval(project, gate):
    """The reviewer wrote COMPLETED into the task file and exited 1 with its owner dead: the task ended COMPLETED."""
    order = project.order()
    write_task(order, "T1", target_files=["a.txt"], max_attempts=1, max_rework=0, command="true",
               review=f"while [ ! -e {gate} ]; do sleep 0.05; done; "
                      "sed -i 's/^status: .*/status: COMPLETED/' orders/ORD/T1.yaml; exit 1")
    first = _start_run(project)
    rec = wait_for(lambda: (r := _record(project, "T1")) and r.get("phase") == "review" and _went(r) and r)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    gate.touch()
    wait_for(lambda: not pid_alive(rec["pid"]))
    assert task_statuses(order)["T1"] == "COMPLETED"
    assert project.aipm("run", "ORD", "--no-resource-monitoring", timeout=120).returncode == 1
    assert task_statuses(order)["T1"] == "REJECTED"
    assert no_workers(project.root)


def test_a_command_whose_wrapper_died_with_its_supervisor_is_ended_before_its_task_runs_again(project, gate):
    order = project.order()
    journal = project.root / "journal.txt"
    # No target files: nothing but the recovery keeps a second attempt from running beside the first.
    write_task(order, "T1", target_files=[],
               command=f"echo start >> {journal}; while [ ! -e {gate} ]; do sleep 0.05; done; echo end >> {journal}")
    first = _start_run(project)
    rec = wait_for(lambda: _record(project, "T1") if journal.exists() else None)
    _pkill(first, rec)
    assert group_alive(rec["pgid"]), "the command should outlive its wrapper for this test"
    # The first attempt's command is ended (it never reaches its end line) before the task starts again.
    second, alive = _alive_beside_the_next(project, journal, rec, 2)
    try:
        assert not alive, "the lost attempt's command still runs beside the new one"
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
    file (none for `exit_code` None: both killed, the end never written)."""
    exit_file = state(project.root, make=True) / "exit" / "ORD" / f"{task}.{attempt}"
    exit_file.parent.mkdir(parents=True, exist_ok=True)
    if exit_code is not None:
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
               exit_code=3, started_at="2025-01-01T00:00:00+00:00",
               finished_at="2025-01-01T00:00:09+00:00")  # the outcome of the record's attempt, as aipm writes one
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


@pytest.mark.parametrize("how", ["mv orders/ORD orders/OLD", "rm -rf orders/ORD",
                                 "rm -rf orders/ORD; echo x > orders/ORD"])
def test_a_run_whose_order_directory_is_renamed_or_deleted_says_so_exits_1_and_keeps_the_outcome(project, gate,
                                                                                                  how):
    """The run saw every task file deleted, waited for T1, dropped its outcome ('gone') and ended 'ORD: no tasks'
    with exit 0. Now it says which directory went, exits 1, and holds T1's outcome for `aipm recover`: once the
    directory is back, T1 is recorded DONE from its exit code, not run again. (A file left where the directory
    was ended the run in a traceback.)"""
    order = project.order()
    journal = project.root.parent / f"{project.root.name}.journal"
    write_task(order, "T1", command=f"while [ ! -e {gate} ]; do sleep 0.05; done; echo T1 >> {journal}")
    write_task(order, "T2", depends_on=["T1"], command=f"echo T2 >> {journal}")
    _commit_everything(project.root)
    run, out = _started(project, "run", "ORD")
    try:
        wait_for(lambda: _record(project, "T1"))
        subprocess.run(how, shell=True, cwd=project.root, check=True)
    finally:
        gate.touch()
    assert run.wait(timeout=120) == 1, out.read_text()
    said = out.read_text()
    assert f"aipm: error: {order}: the order directory was deleted or renamed during the run" in said, said
    assert "Traceback" not in said and "ORD: no tasks" not in said, said
    assert not order.is_dir()
    if order.exists():
        order.unlink()
    _git(project.root, "checkout", "-q", "--", "orders/ORD")  # put back (committed: T1 QUEUED)
    if how.startswith("mv"):  # the renamed directory, as the run left it
        subprocess.run(["rm", "-rf", str(order)], check=True)
        (project.root / "orders" / "OLD").rename(order)
    assert task_statuses(order)["T1"] == ("IN_PROGRESS" if how.startswith("mv") else "QUEUED")
    recover = project.aipm("recover", "ORD", check=True)
    # (its worker had ended: recover says what it recorded)
    assert "ORD/T1: its worker had ended: recorded DONE (exit 0)" in recover.stdout, recover.stdout
    # T2, which recover never names, starts too: said, or a person who asked for a repair sees work start
    assert "starts what that unblocks" in recover.stdout, recover.stdout
    wait_for(lambda: task_statuses(order) == {"T1": "DONE", "T2": "DONE"} and no_workers(project.root))
    assert journal.read_text() == "T1\nT2\n"  # T1 ran once


@pytest.mark.parametrize("where", [".aipm", ".aipm/logs", ".aipm/logs/ORD"])
@pytest.mark.parametrize("what", ["file", "link"])
def test_a_file_or_link_a_worker_leaves_where_aipms_directory_goes_is_moved_aside(project, where, what):
    """`rm -rf .aipm; echo x > .aipm` ended the run in a traceback, and so did every later run; a link at
    `.aipm/logs/ORD` to `src/` had the next attempts' logs written into the project tree."""
    (project.root / "src").mkdir()
    make = ("echo x > " if what == "file" else "ln -s ../../src " if where != ".aipm" else "ln -s src/missing ")
    # Until it stands: aipm may make its directory again between the removal and the planting.
    plant = f"until [ {'-f' if what == 'file' else '-L'} {where} ]; do rm -rf {where}; {make}{where} 2>/dev/null; done"
    write_task(project.order(), "T", target_files=["t/"], command=plant)
    write_task(project.order(), "U", target_files=["u/"], depends_on=["T"], command="echo U")
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert task_statuses(project.order()) == {"T": "DONE", "U": "DONE"}
    assert list((project.root / "src").iterdir()) == []
    assert "U" in (project.root / ".aipm" / "logs" / "ORD" / "U.1.log").read_text()
    aside = list((project.root / where).parent.glob(f"{os.path.basename(where)}.not-a-directory.*"))
    assert aside and all(p.is_symlink() if what == "link" else p.read_text() == "x\n" for p in aside)


def test_a_persons_link_of_the_logs_to_another_place_is_kept_and_written_through(project, tmp_path_factory):
    """Only a link into the project's files is a worker's doing: `.aipm/logs` on another disk is a choice."""
    elsewhere = tmp_path_factory.mktemp("other-disk")
    (project.root / ".aipm").mkdir(exist_ok=True)
    (project.root / ".aipm" / "logs").symlink_to(elsewhere)
    write_task(project.order(), "T", command="echo T")
    assert project.aipm("run", "ORD").returncode == 0
    assert (project.root / ".aipm" / "logs").is_symlink()
    assert "T" in (elsewhere / "ORD" / "T.1.log").read_text()
    assert not list((project.root / ".aipm").glob("logs.not-a-directory.*"))


def test_a_finished_task_a_worker_puts_back_to_queued_runs_again_and_the_run_says_why(project):
    """A worker's `git checkout` of the order put U's file back to QUEUED after U ended DONE: the file is the
    truth for a task no worker runs, so U runs again; the run now says why, in a `reopened` event."""
    order = project.order()
    journal = project.root.parent / f"{project.root.name}.journal"
    write_task(order, "U", target_files=["u.txt"], command=f"echo U >> {journal}")
    write_task(order, "T", target_files=["t.txt"], depends_on=["U"], command="git checkout -q -- orders/ORD/U.yaml")
    _commit_everything(project.root)
    proc = project.aipm("run", "ORD", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(e["task"], e["was"], e["status"]) for e in events if e["event"] == "reopened"] == [
        ("U", "DONE", "QUEUED")], proc.stdout
    assert journal.read_text() == "U\nU\n" and task_statuses(order) == {"U": "DONE", "T": "DONE"}
    plain = project.aipm("run", "ORD")  # nothing left to run, nothing reopened
    assert "reopen" not in plain.stdout + plain.stderr


def test_an_exec_whose_task_file_is_deleted_while_it_runs_says_so_without_a_traceback(project, gate):
    """`aipm exec T1` ended in a KeyError traceback (runloop, then cmd_launch) when T1's file was deleted while it
    ran: the view had dropped the task once its outcome went to the log ('gone')."""
    order = project.order()
    path = write_task(order, "T1", command=f"while [ ! -e {gate} ]; do sleep 0.05; done")
    proc, out = _started(project, "exec", "T1")
    try:
        wait_for(lambda: _record(project, "T1"))
        path.unlink()
    finally:
        gate.touch()
    assert proc.wait(timeout=120) == 1, out.read_text()
    said = out.read_text()
    assert "Traceback" not in said and f"T1: its task file {path} is gone" in said, said
    # Its outcome is held for `aipm recover` once the file is back (tests/test_vanished_task_files.py).
    assert f"{path}: deleted or moved while it ran" in said and not no_workers(project.root), said


# ---- found by a review of the fixes above (its reproductions, renamed) ----


def test_a_lost_attempt_numbered_past_its_count_is_ended_too(project, gate):
    """Same as test_a_command_whose_wrapper_died_with_its_supervisor..., but the lost attempt is the task's second
    try (number 2, attempts counter 1) because an earlier run was stopped with Ctrl-C."""
    order = project.order()
    journal = project.root / "journal.txt"
    write_task(order, "T1", target_files=[],
               command=f"echo start $AIPM_ATTEMPT >> {journal}; while [ ! -e {gate} ]; do sleep 0.05; done; "
                       f"echo end $AIPM_ATTEMPT >> {journal}")
    # A first run, stopped by the user (Ctrl-C): attempt not counted, so the next attempt is attempts 1 again.
    zero = _start_run(project)
    wait_for(lambda: journal.exists() and _record(project, "T1"))
    zero.send_signal(signal.SIGINT)
    assert zero.wait(timeout=30) == 130
    assert task_statuses(order)["T1"] == "QUEUED"
    journal.unlink()
    # Now the hostile case of 8a5e40c: supervisor and wrapper killed, command left running.
    first = _start_run(project)
    rec = wait_for(lambda: _record(project, "T1") if journal.exists() else None)
    assert (rec["attempt"], rec["number"]) == (1, 2)
    _pkill(first, rec)
    assert group_alive(rec["pgid"])
    second, alive = _alive_beside_the_next(project, journal, rec, 2)
    try:
        gate.touch()
        assert second.wait(timeout=60) == 0
    finally:
        gate.touch()
        second.kill()
    assert not alive, "the lost attempt's command still runs beside the new one"


def test_a_dependant_put_back_before_its_dependency_runs(project):
    """The order directory is put back one file at a time (dependant T3 before its dependency T2): the view keeps
    T3 out as invalid ('depends on unknown task') and never reads it again, so `run` ends 0 with T3 never run."""
    import shutil
    order = project.order()
    saved = project.root.parent / f"{project.root.name}.saved"
    journal = project.root.parent / f"{project.root.name}.journal"
    write_task(order, "T1", target_files=["a.txt"],
               command=f"sleep 0.3; rm -rf orders/ORD; mkdir orders/ORD; cp {saved}/T1.yaml {saved}/T3.yaml "
                       f"orders/ORD/; sleep 0.5; cp {saved}/T2.yaml orders/ORD/; sleep 0.3")
    write_task(order, "T2", target_files=["b.txt"], depends_on=["T1"], command=f"echo T2 >> {journal}")
    write_task(order, "T3", target_files=["c.txt"], depends_on=["T2"], command=f"echo T3 >> {journal}")
    shutil.copytree(order, saved)
    proc = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=120)
    assert task_statuses(order)["T3"] == "DONE", (proc.returncode, proc.stdout, task_statuses(order))


def test_a_dependant_added_before_its_dependency_runs(project):
    order = project.order()
    saved = project.root.parent / f"{project.root.name}.saved"
    saved.mkdir()
    journal = project.root.parent / f"{project.root.name}.journal"
    write_task(saved, "T2", target_files=["b.txt"], depends_on=["T1"], command=f"echo T2 >> {journal}")
    write_task(saved, "T3", target_files=["c.txt"], depends_on=["T2"], command=f"echo T3 >> {journal}")
    write_task(order, "T1", target_files=["a.txt"],
               command=f"cp {saved}/T3.yaml orders/ORD/; sleep 0.5; cp {saved}/T2.yaml orders/ORD/; sleep 0.3")
    proc = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=120)
    assert task_statuses(order)["T3"] == "DONE", (proc.returncode, proc.stdout, task_statuses(order))


def test_a_lost_worktree_attempt_is_ended_too(project, gate):
    order = project.order()
    journal = project.root.parent / f"{project.root.name}.journal"
    (project.root / "aipm.yaml").write_text("max_workers: 5\nworkspace: worktree\n")
    write_task(order, "T1", target_files=[],
               command=f"echo start $AIPM_ROOT >> {journal}; while [ ! -e {gate} ]; do sleep 0.05; done; "
                       f"echo end >> {journal}")
    _commit_everything(project.root)
    first = _start_run(project)
    rec = wait_for(lambda: _record(project, "T1") if journal.exists() else None)
    _pkill(first, rec)
    assert group_alive(rec["pgid"])
    try:
        second, alive = _alive_beside_the_next(project, journal, rec, 2)
    finally:
        gate.touch()
    second.wait(timeout=60)
    assert not alive, "the lost attempt's command still runs beside the new one"


def test_an_aipm_run_in_the_lost_attempts_group_does_not_kill_itself(project, gate):
    """The lost attempt's own command restarts aipm (after `pkill -f aipm`): end_remnants' group kill (c4dc16c)
    SIGKILLs the recovering process itself, mid-recovery; subreaper.end() alone spared it."""
    order = project.order()
    journal = project.root.parent / f"{project.root.name}.journal"
    once = project.root.parent / f"{project.root.name}.once"
    write_task(order, "T1", target_files=[],
               command=f"if [ -e {once} ]; then exit 0; fi; touch {once}; "
                       f"while [ ! -e {gate} ]; do sleep 0.05; done; "
                       f"{sys.executable} -m aipm --root {project.root} run ORD --no-resource-monitoring "
                       f"> {journal}.out 2>&1 & p=$!; wait $p; echo nested aipm exit $? >> {journal}")
    first = _start_run(project)
    rec = wait_for(lambda: _record(project, "T1"))
    wait_for(lambda: _went(rec))
    _pkill(first, rec)
    gate.touch()
    # The nested run recovers the task (ending the lost attempt's other processes, not itself) and runs it again.
    wait_for(lambda: task_statuses(order)["T1"] == "DONE", timeout=60)
    wait_for(lambda: not group_alive(rec["pgid"]), timeout=30)


def test_two_lost_attempts_in_a_row_are_both_ended(project, gate):
    """8a5e40c's own scenario, twice in a row: the first lost attempt is ended, the second is not (its re-queue
    gave the attempts counter back, so record.attempt 1 != AIPM_ATTEMPT 2 in the command's environment)."""
    order = project.order()
    journal = project.root.parent / f"{project.root.name}.journal"
    write_task(order, "T1", target_files=[],
               command=f"echo start $AIPM_ATTEMPT >> {journal}; while [ ! -e {gate} ]; do sleep 0.05; done; "
                       f"echo end $AIPM_ATTEMPT >> {journal}")
    run = _start_run(project)
    lost = []
    for n in (1, 2):
        rec = wait_for(lambda: (r := _record(project, "T1")) and r["number"] == n and r)
        wait_for(lambda: journal.exists() and f"start {n}" in journal.read_text())
        _pkill(run, rec)
        lost.append(rec)
        run, alive = _alive_beside_the_next(project, journal, rec, n + 1)
        assert not alive, f"lost attempt {n}'s command runs beside attempt {n + 1}"
    gate.touch()
    assert run.wait(timeout=60) == 0



def test_an_attempt_after_a_retry_that_put_back_an_older_outcome_is_recorded(project):
    """After a `retry` (attempts 0), the committed version the worker puts back has a count as high as the new
    attempt's, or higher: only its start time tells it from this attempt's outcome."""
    order = project.order()
    outside = project.root.parent / project.root.name
    journal, gate = outside.with_suffix(".journal"), outside.with_suffix(".gate")  # outside the audited tree
    write_task(order, "T1", target_files=["a.txt"], max_attempts=3, status="FAILED", attempts=3, exit_code=3,
               started_at="2025-01-01T00:00:00+00:00",
               command=f"while [ ! -e {gate} ]; do sleep 0.05; done; git checkout -q -- orders/ORD/T1.yaml; "
                       f"echo ran >> {journal}")
    _commit_everything(project.root)
    project.aipm("retry", "T1", check=True)
    _end_unwatched(project, gate)
    assert task_statuses(order)["T1"] == "FAILED"  # put back: attempts 3 > the record's 1
    second = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    task = project.json("status", "ORD")["tasks"][0]
    assert (task["status"], task["attempts"], task["exit_code"]) == ("DONE", 1, 0), task
    assert journal.read_text() == "ran\n"


def test_a_task_shown_interrupted_for_its_lost_worker_is_no_dead_end(project):
    """Its run and worker killed, F2 reads INTERRUPTED (`aipm recover` adopts or re-queues it), and `status` marked
    its dependant's `F2✗`, as of a task no run gets past, with a note saying retry: recover, and it goes on."""
    order = project.order()
    write_task(order, "F2", command="true", target_files=["x.txt"], status="IN_PROGRESS", attempts=1)
    write_task(order, "F4", command="true", depends_on=["F2"], target_files=["y.txt"])
    _dead_record(project, order, "F2", 1, None)
    rows = {t["id"]: t for t in project.json("status", "ORD")["tasks"]}
    assert rows["F2"]["status"] == "INTERRUPTED" and "never_runs" not in rows["F4"], rows
    table = project.aipm("status", "ORD", "--wide").stdout
    assert "F2…" in table and "F2✗" not in table and "can never run" not in table, table
    # `ps` named the dead owner's pid for it, which may be another process's by now
    (gone,) = [w for w in project.json("ps")["workers"] if w["task"] == "F2"]
    assert (gone["state"], gone["pid"], gone["cpu_percent"]) == ("gone", None, None), gone


def test_a_requeue_killed_between_its_two_writes_is_finished_by_recovery(project):
    """interrupt() writes INTERRUPTED, then QUEUED, then drops the record: killed after the first write, the task
    stayed INTERRUPTED for good (recovery looked only at running tasks)."""
    order = project.order()
    write_task(order, "A", command="true", target_files=["x.txt"], status="INTERRUPTED", attempts=1)
    _dead_record(project, order, "A", 1, None)
    # No dead end meanwhile for what waits on it (a recovery finishes the re-queue): `logs B -f` ended, and `status`
    # and `why` said `B can never run: A is INTERRUPTED`, where the next run did both.
    write_task(order, "B", command="true", depends_on=["A"], target_files=["y.txt"])
    from aipm.logbook import wait_for_person
    from aipm.runtime import Runtime
    from aipm.store import load_order

    assert wait_for_person(load_order(order, project.root), Runtime(project.root), None) == {}
    assert "never_runs" not in {t["id"]: t for t in project.json("status", "ORD")["tasks"]}["B"]
    assert "can never run" not in project.aipm("why", "B").stdout
    assert project.json("recover", "ORD")["recovered"] == [{"order": "ORD", "id": "A", "action": "requeued"}]
    task = project.json("status", "ORD")["tasks"][0]
    assert (task["status"], task["attempts"]) == ("QUEUED", 0)
    assert project.aipm("run", "ORD", "--no-resource-monitoring", timeout=60).returncode == 0
    assert task_statuses(order) == {"A": "DONE", "B": "DONE"}


# ---- an `aipm run` of its own order started by a worker (found by the hostile-workers review of 2026-12-03) ----


@pytest.mark.parametrize("outer", ["supervising", "killed", "setsid"])
def test_a_run_a_worker_starts_of_its_own_order_does_not_wait_for_that_worker(project, outer):
    """The nested run waited for A, whose worker runs it (A IN_PROGRESS: the order is not finished), so A never
    ended: a deadlock until A's timeout. With its supervisor killed first (KILL_OWNER: the wrapper's parent),
    the nested run's recovery adopted A and waited for its own ancestor; A's timeout then made the nested run kill
    its own group, leaving A IN_PROGRESS. Started by `setsid` (out of the worker's session, still below it), the
    nested run took A for another owner's ('watch A: run by another aipm') and waited until A timed out, FAILED.
    Now the nested run runs what it can (B), ends with exit 1 and leaves A to its owner (the outer run, or a
    detached owner it starts), which records A and starts C."""
    order = project.order()
    journal = project.root / "journal.txt"
    nested = project.root / "nested.rc"
    kill = {"killed": f"{KILL_OWNER}; ", "setsid": "setsid "}.get(outer, "")
    # A's timeout only bounds the deadlock this test would otherwise leave behind: it is never reached with the fix.
    write_task(order, "A", target_files=["nested.rc"], timeout=90, command=journal_command(
        journal, f"{kill}{sys.executable} -m aipm --root {project.root} run ORD --no-resource-monitoring; "
                 f"echo $? > {nested}"))
    write_task(order, "B", target_files=["b.txt"], command=journal_command(journal))
    write_task(order, "C", target_files=["c.txt"], depends_on=["A"], command=journal_command(journal))
    run = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=120)
    assert run.returncode == (-signal.SIGKILL if outer == "killed" else 0), run.stdout + run.stderr
    wait_for(lambda: task_statuses(order) == {"A": "DONE", "B": "DONE", "C": "DONE"} and no_workers(project.root),
             timeout=120)
    assert nested.read_text() == "1\n"  # A was not finished when it ended
    log = (project.root / ".aipm" / "logs" / "ORD" / "A.1.log").read_text()
    assert "skip     ORD/A: this aipm runs inside its worker" in log and "Traceback" not in log, log
    assert check(journal, order) == []  # each task ran once, C after A


def test_an_exec_inside_a_worker_does_not_say_it_runs_inside_it(project):
    """`aipm exec` run by a worker printed 'skip ORD/A: this aipm runs inside its worker ..., so it cannot wait
    for it' as a nested `run` does, though exec waits for no other worker: noise in A's log. `run` still says it."""
    order = project.order()
    aipm = f"{sys.executable} -m aipm --root {project.root}"
    write_task(order, "A", target_files=["a.txt"],
               command=f"{aipm} exec ORD/B --no-resource-monitoring && {aipm} run ORD --no-resource-monitoring")
    write_task(order, "B", target_files=["b.txt"], command="true")
    write_task(order, "C", target_files=["c.txt"], command="true")
    run = project.aipm("exec", "ORD/A", "--no-resource-monitoring", timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr  # the nested run ended with A unfinished
    assert task_statuses(order) == {"A": "FAILED", "B": "DONE", "C": "DONE"}
    log = (project.root / ".aipm" / "logs" / "ORD" / "A.1.log").read_text()
    assert log.count("this aipm runs inside its worker") == 1, log  # the run's, not the exec's
    assert log.index("finish   B") < log.index("skip     ORD/A") < log.index("finish   C"), log


def test_an_aipm_command_a_worker_runs_does_not_hand_the_workers_locks_on(project, gate):
    """A's command ran `aipm launch ORD2`, which inherited A's target locks (a.txt) and passed them on to B's
    detached owner and worker: once A ended, a.txt stayed locked by B ("held by pid N, not an aipm worker"), and A's
    dependant E waited for B to end."""
    order, other = project.order(), project.order("ORD2")
    write_task(order, "A", target_files=["a.txt"],
               command=f"{sys.executable} -m aipm --root {project.root} launch ORD2 --no-resource-monitoring")
    write_task(order, "E", target_files=["a.txt"], depends_on=["A"], command="true")
    write_task(other, "B", target_files=["b.txt"], command=f"while [ ! -e {gate} ]; do sleep 0.05; done")
    run = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=120)  # a lock left to B: E waits for it
    assert run.returncode == 0 and "not an aipm worker" not in run.stdout, run.stdout + run.stderr
    assert task_statuses(other) == {"B": "IN_PROGRESS"}  # still running: E did not wait for it
    gate.touch()
    wait_for(lambda: task_statuses(other) == {"B": "DONE"} and no_workers(project.root))


# ---- a status a worker writes into its own task file (found by the hostile-workers review of 2026-12-03) ----


@pytest.mark.parametrize("owner", ["run", "launch", "recover"])
def test_a_cancelled_status_a_worker_writes_into_its_own_file_is_no_cancel(project, gate, owner):
    """A worker that wrote `status: CANCELLED` into its own task file was taken for the user's cancel: the run left
    the task CANCELLED while its worker went on, dropped the attempt's outcome, and the dependant never ran (exit
    1). Only `aipm cancel` cancels (and stops the worker): the live worker outranks what its file says. With its
    owner killed before it ended, `recover` said 'nothing to recover' while `ps` called the record stale."""
    order = project.order()
    write_task(order, "A", target_files=["a.txt"], command=(
        "sed -i 's/^status: .*/status: CANCELLED/' orders/ORD/A.yaml; "
        f"while [ ! -e {gate} ]; do sleep 0.05; done; echo done > a.txt"))
    write_task(order, "B", target_files=["b.txt"], depends_on=["A"], command="true")
    log = project.root / ".aipm" / "logs" / "ORD" / "A.1.log"
    if owner != "run":  # a detached owner (or, its owner killed, recovery's) puts the status back at the end
        project.aipm("launch", "ORD", "--no-resource-monitoring", check=True)
        rec = wait_for(lambda: task_statuses(order)["A"] == "CANCELLED" and _record(project, "A"))
        if owner == "recover":
            os.kill(rec["owner_pid"], signal.SIGKILL)
            wait_for(lambda: not pid_alive(rec["owner_pid"]))
        gate.touch()
        if owner == "recover":
            wait_for(lambda: not pid_alive(rec["pid"]))
            (said,) = project.json("recover", "ORD")["recovered"]  # (its worker had ended: recorded, not adopted)
            assert (said["id"], said["action"], said["status"], said["exit_code"]) == ("A", "recorded", "DONE", 0)
        wait_for(lambda: task_statuses(order) == {"A": "DONE", "B": "DONE"} and no_workers(project.root))
    else:  # a run puts it back as soon as it sees it, while the worker still runs
        run, out = _started(project, "run", "ORD")
        try:
            wait_for(lambda: log.exists() and "said CANCELLED" in log.read_text()
                     and task_statuses(order)["A"] == "IN_PROGRESS")
            assert group_alive(_record(project, "A")["pgid"]), "the worker was stopped"
        finally:
            gate.touch()
        assert run.wait(timeout=120) == 0, out.read_text()
        assert "said CANCELLED while its worker ran; not an `aipm cancel`: its outcome counts" in out.read_text()
        assert task_statuses(order) == {"A": "DONE", "B": "DONE"}
    assert (project.root / "a.txt").read_text() == "done\n"
    assert "(not an `aipm cancel`: its outcome counts)" in log.read_text()


@pytest.mark.parametrize("first", [("launch", "ORD"), ("run", "ORD"), ("exec", "ORD/A")], ids=lambda a: a[0])
def test_an_exec_of_a_task_another_aipm_runs_waits_for_it_and_exits_by_its_status(project, gate, first):
    """It gave up at once, exit 1 and `A: IN_PROGRESS`, for a task that then ended DONE (`aipm exec A && next`
    failed); a review found it racing each kind of first owner. The task still runs once."""
    journal = project.root.parent / f"{project.root.name}.journal"
    write_task(project.order(), "A", target_files=["a.txt"],
               command=f"echo start >> {journal}; while [ ! -e {gate} ]; do sleep 0.05; done; echo end >> {journal}")
    owner, _ = _started(project, *first)
    try:
        wait_for(lambda: journal.exists())
        second = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "exec", "ORD/A",
                                   "--json", "--no-resource-monitoring"], stdout=subprocess.PIPE, text=True)
        said = second.stdout.readline()  # while A runs: what the second exec does about it
    finally:
        gate.touch()
    out = said + second.communicate(timeout=120)[0]
    events = [json.loads(line) for line in out.splitlines()]
    assert second.returncode == 0, out
    assert events[0]["event"] == "watching" and events[0]["tasks"] == ["A"], out
    assert events[-1]["status"] == "DONE", out
    owner.wait(timeout=120)
    wait_for(lambda: no_workers(project.root))
    assert journal.read_text() == "start\nend\n"


@pytest.mark.parametrize("make", ["mkfifo", "truncate -s 1T"])
@pytest.mark.parametrize("where", ["orders/OTHER/F.yaml", ".aipm/holds/OTHER.json"])
def test_a_fifo_or_sparse_file_a_worker_leaves_in_another_order_or_its_holds_index_hangs_nothing(project, where,
                                                                                                   make):
    """The running tasks of the other orders are read for every plan (`.aipm/holds/<order>.json`, then their task
    files): both were opened as any file, so a FIFO a worker left there (`mkfifo orders/OTHER/F.yaml`) hung the
    run that was to start its successor, and every later launch, run and detect, for ever; and both were read
    whole, so a sparse terabyte there was a MemoryError traceback."""
    write_task(project.order("OTHER"), "X", command="true")
    order = project.order()
    write_task(order, "A", command=f"rm -f {where}; {make} {where}")
    write_task(order, "B", command="true", depends_on=["A"])
    run = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=60, preexec_fn=capped_memory)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stdout + run.stderr
    left = project.root / where
    assert task_statuses(order) == {"A": "DONE", "B": "DONE"} and (left.is_fifo() or left.stat().st_size == 2**40) != (
        where.startswith(".aipm"))  # the index is written anew over it; the order's file is the worker's
    assert project.aipm("detect", "ORD", timeout=60, preexec_fn=capped_memory).returncode == 0


def test_a_restore_says_what_the_file_said_when_its_status_was_left_alone(project):
    """A worker that rewrote only its file's attempts: the run said 'restore A → IN_PROGRESS: its file said
    IN_PROGRESS while its worker ran', which reads as no change at all. It names the attempts it put back.
    Found by a review."""
    order = project.order()
    write_task(order, "A", target_files=["a.txt"], command=(
        "sed -i 's/^attempts: .*/attempts: 7/' orders/ORD/A.yaml; sleep 0.5; echo done > a.txt"))
    proc = project.aipm("run", "ORD", "--no-resource-monitoring")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "restore  A → IN_PROGRESS: its file said attempts 7 while its worker ran" in proc.stdout, proc.stdout
    assert task_statuses(order) == {"A": "DONE"}
    assert "attempts: 1\n" in (order / "A.yaml").read_text()


def test_a_hard_link_a_worker_left_at_a_file_aipm_writes_is_never_written_through(project, tmp_path):
    """A worker that hard-linked a file of the user's (outside the project) to its own log, or to its review's log
    before the review began, had aipm append its lines and the reviewer's output to that file."""
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in ("log.txt", "review.txt"):
        (victim / name).write_text("the user's\n")
    write_task(project.order(), "T", target_files=["t.txt"], review="echo the review says no; exit 1", max_rework=0,
               command=f'ln -f "{victim}/log.txt" "$AIPM_LOG"; ln "{victim}/review.txt" "${{AIPM_LOG%.log}}.review.log"')
    assert project.aipm("run", "ORD").returncode == 1
    assert task_statuses(project.order()) == {"T": "REJECTED"}
    assert {p.name: p.read_text() for p in victim.iterdir()} == {"log.txt": "the user's\n", "review.txt": "the user's\n"}
    assert "the review says no" in (project.root / ".aipm/logs/ORD/T.1.review.log").read_text()
    assert "the review says no" in (project.root / ".aipm/feedback/ORD/T.txt").read_text()


def test_write_bytes_never_truncates_what_a_hard_link_at_its_temp_name_leads_to(tmp_path):
    from aipm.workerfiles import write_bytes

    victim = tmp_path / "victim.txt"
    victim.write_text("the user's\n")
    path = tmp_path / "feedback.txt"
    os.link(victim, tmp_path / f".feedback.txt.{os.getpid()}.tmp")
    write_bytes(path, b"ours\n")
    assert victim.read_text() == "the user's\n" and path.read_text() == "ours\n"


@pytest.mark.parametrize("review", ["true", "echo no; exit 1"])
def test_a_link_of_the_feedback_directory_out_of_the_project_is_moved_aside(project, tmp_path_factory, review):
    """`.aipm/logs` may be a person's link to another disk; the feedback's directory holds no logs: a worker's
    `.aipm/feedback/ORD -> ~` had an approval remove `~/T.txt` and a rejection replace it with the review's
    output."""
    victim = tmp_path_factory.mktemp("victim")  # outside the project
    (victim / "T.txt").write_text("the user's\n")
    (project.root / ".aipm" / "feedback").mkdir(parents=True)
    (project.root / ".aipm" / "feedback" / "ORD").symlink_to(victim)
    write_task(project.order(), "T", target_files=["t.txt"], command="true", review=review, max_rework=0)
    project.aipm("run", "ORD")
    assert task_statuses(project.order())["T"] in ("COMPLETED", "REJECTED")
    assert [(p.name, p.read_text()) for p in victim.iterdir()] == [("T.txt", "the user's\n")]


def test_a_sparse_file_a_worker_left_as_its_reviews_log_is_not_read_whole(project):
    """The review's output is kept as feedback: a worker that made its review's log a sparse file of gigabytes
    before the reviewer appended to it had the owner read it whole into memory."""
    write_task(project.order(), "T", target_files=["t.txt"], review="echo the review says no; exit 1", max_rework=0,
               command='truncate -s 8G "${AIPM_LOG%.log}.review.log"')
    limited = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
               f"sys.argv = ['aipm', '--root', {str(project.root)!r}, 'run', 'ORD']; "
               "runpy.run_module('aipm', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", limited], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert task_statuses(project.order()) == {"T": "REJECTED"}
    feedback = (project.root / ".aipm/feedback/ORD/T.txt").read_bytes()
    assert len(feedback) <= 1 << 20 and feedback.endswith(b"the review says no\n")


@pytest.mark.parametrize("killed", ["owner and wrapper", "owner"])
def test_a_cancel_of_an_attempt_whose_owner_died_ends_all_it_started_and_frees_its_files(project, gate, killed):
    """`aipm cancel` after `pkill -9 -f aipm` (supervisor and wrapper gone, the command left) stopped nothing: its
    worker, the wrapper, was dead, so no group was signalled; the task said CANCELLED, recovery passes CANCELLED
    tasks by, and the command ran on for ever holding the task's lock (`run` waits for such a holder). With only
    the owner dead, the group's kill missed a `setsid` daemon of the attempt, which kept the lock the same way."""
    order = project.order()
    daemon = project.root / "daemon.pid"
    write_task(order, "T1", target_files=["x.txt"],
               command=f"setsid sh -c 'echo $$ > {daemon}; exec sleep 300' & "
                       f"while [ ! -e {gate} ]; do sleep 0.05; done")
    write_task(order, "T2", target_files=["x.txt"], depends_on=[], priority="P3", command="true")
    first = _start_run(project)
    rec = wait_for(lambda: _record(project, "T1") if daemon.exists() and daemon.read_text().strip() else None)
    daemon_pid = int(daemon.read_text())
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    if killed == "owner and wrapper":
        os.kill(rec["pid"], signal.SIGKILL)
        wait_for(lambda: not pid_alive(rec["pid"]))
    assert group_alive(rec["pgid"]) and pid_alive(daemon_pid), "the attempt should outlive its owner for this test"
    try:
        project.aipm("cancel", "T1", "--grace", "1", check=True)
        wait_for(lambda: not group_alive(rec["pgid"]) and not pid_alive(daemon_pid), timeout=15)
        assert task_statuses(order)["T1"] == "CANCELLED"
        assert project.aipm("locks", check=True).stdout.strip() == "no locks held"
        # Nothing of the attempt is left behind: no stale record that `ps` lists and `logs -f` follows for ever.
        assert no_workers(project.root)
        assert "cancelled by the user" in project.aipm("logs", "T1", "-f", timeout=30, check=True).stdout
        project.aipm("run", "ORD", "--no-resource-monitoring", timeout=60)
        assert task_statuses(order)["T2"] == "DONE"
    finally:
        gate.touch()
        for pid in (daemon_pid,):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _ended_with_its_owner_dead(project, code: int):
    """Task A launched; its command kills its owner, then exits `code`: the wrapper leaves the code in the exit file
    and nobody records it (`status` shows A INTERRUPTED: `aipm recover` records it)."""
    order = project.order()
    write_task(order, "A", command=f"{KILL_OWNER}; exit {code}", target_files=["x.txt"])
    project.aipm("launch", "ORD", "--no-resource-monitoring", check=True)
    wait_for(lambda: [w for w in project.json("ps")["workers"] if w["state"] == "gone"])
    (shown,) = project.json("status", "ORD")["tasks"]
    assert (shown["status"], task_statuses(order)) == ("INTERRUPTED", {"A": "IN_PROGRESS"}), shown
    return order


def test_a_cancel_of_an_attempt_that_ended_after_its_owner_died_says_and_keeps_its_exit_code(project):
    """The cancel wrote CANCELLED with `exit_code: null` and the log said only 'cancelled by the user after its
    owner died': the exit code the wrapper left (which `recover` records) was dropped without a word."""
    order = _ended_with_its_owner_dead(project, 3)
    proc = project.aipm("cancel", "A", check=True)
    said = "attempt 1 had ended (exit 3) after its owner died, before that was recorded; cancelled by the user"
    assert proc.stdout.splitlines()[:2] == [
        "A: CANCELLED", f"A: {said} instead (exit_code 3 kept in its task file)"], proc.stdout
    (shown,) = project.json("status", "ORD")["tasks"]
    assert (shown["status"], shown["exit_code"]) == ("CANCELLED", 3), shown
    assert said in project.aipm("logs", "A", check=True).stdout
    assert no_workers(project.root)


def test_recover_of_a_worker_that_had_ended_says_what_it_recorded_not_adopted(project):
    """`aipm recover` said 'adopted: a detached aipm records how its worker ends' of a worker that had ended long
    before (its exit code left in its exit file), as of one still running. It now waits for that record and says
    the status it came to."""
    order = _ended_with_its_owner_dead(project, 3)
    said = project.aipm("recover", "ORD", check=True).stdout
    # (and no more: a FAILED task unblocks nothing, where the line said "a detached aipm starts what that unblocks")
    assert said == "ORD/A: its worker had ended: recorded FAILED (exit 3)\n", said
    (shown,) = project.json("status", "ORD")["tasks"]
    assert (shown["status"], shown["exit_code"]) == ("FAILED", 3), shown
    wait_for(lambda: no_workers(project.root))


def test_recover_of_an_ended_attempt_whose_task_starts_again_at_once_says_the_ended_ones_code(project, gate):
    """Re-queued by the outcome recover waits for, the task's next attempt started at once, and recover said what
    the file showed then: `recorded IN_PROGRESS`, exit code none, for an attempt that had exited 3."""
    order = project.order()
    write_task(order, "A", command=f'if [ "$AIPM_ATTEMPT" = 1 ]; then {KILL_OWNER}; exit 3; fi; '
                                   f'while [ ! -e {gate} ]; do sleep 0.05; done', target_files=["x.txt"], max_attempts=2)
    project.aipm("launch", "ORD", "--no-resource-monitoring", check=True)
    wait_for(lambda: [w for w in project.json("ps")["workers"] if w["state"] == "gone"])
    try:
        (item,) = project.json("recover", "ORD")["recovered"]
        assert (item["action"], item["exit_code"], item.get("next_attempt")) == ("recorded", 3, 2), item
    finally:
        gate.touch()
    wait_for(lambda: task_statuses(order) == {"A": "DONE"} and no_workers(project.root))


def test_recover_of_an_ended_attempt_whose_next_attempt_ran_whole_before_it_looked_says_the_ended_ones(project):
    """recover looked for the outcome it waits for every 50 ms: a next attempt that started and ended between two
    looks (a short command) was taken for the ended attempt's, `recorded DONE` of one that had exited 3. Forced:
    the wait begins only once the detached owner has recorded attempt 1, run attempt 2 and recorded it."""
    order = project.order()
    write_task(order, "A", command=f'if [ "$AIPM_ATTEMPT" = 1 ]; then {KILL_OWNER}; exit 3; fi',
               target_files=["x.txt"], max_attempts=2)
    project.aipm("launch", "ORD", "--no-resource-monitoring", check=True)
    wait_for(lambda: [w for w in project.json("ps")["workers"] if w["state"] == "gone"])
    settings = load_settings(project.root, {"enable_monitoring": False})
    launcher = Launcher(Project(project.root, settings.orders_dir), settings, Options(), monitor=None)
    with launcher.runtime.launch_lock():  # as `aipm recover` does, which then waits with the lock let go
        (item,) = recovery.recover_order(launcher, load_order(order, project.root))
    wait_for(lambda: task_statuses(order) == {"A": "DONE"} and no_workers(project.root))
    task, later = adopted.recorded(launcher.runtime, "ORD", "A", order / "A.yaml", item["ended"])
    assert (item["ended"]["exit_code"], later, task.attempts) == (3, 2, 2), (item, later, task)


def test_retry_of_a_task_whose_worker_was_lost_recovers_it_and_queues_it_but_never_a_live_ones(project, gate):
    """A shown INTERRUPTED for its lost worker: `retry` refused it ('stale; `aipm recover ORD` puts it back'), two
    steps for the user. It now recovers the attempt as recover would (its record dropped, what it came to said)
    and queues the task as new. B, whose worker runs on without its owner, is still refused, its file untouched."""
    order = _ended_with_its_owner_dead(project, 3)
    # (in an order of its own: a launch of ORD would recover A first)
    b = write_task(project.order("LIVE"), "B", command=f"{KILL_OWNER}; while [ ! -e {gate} ]; do sleep 0.05; done",
                   target_files=["b.txt"])
    project.aipm("launch", "LIVE", "--no-resource-monitoring", check=True)
    wait_for(lambda: [w for w in project.json("ps")["workers"] if w["task"] == "B" and w["state"] == "unowned"])
    proc = project.aipm("retry", "A")
    said = "attempt 1 had ended (exit 3) after its owner died, before that was recorded; retried by the user instead"
    assert (proc.returncode, proc.stdout.splitlines()) == (0, ["A: QUEUED", f"A: {said}"]), proc.stdout + proc.stderr
    (a,) = [t for t in project.json("status", "ORD")["tasks"] if t["id"] == "A"]
    assert (a["status"], a["attempts"], a["exit_code"], a["reason"]) == ("QUEUED", 0, None, None), a
    assert said in project.aipm("logs", "A", "--attempt", "1", check=True).stdout
    assert [w["task"] for w in project.json("ps")["workers"]] == ["B"]  # A's record is gone
    before = b.read_bytes()
    refused = project.aipm("retry", "LIVE/B")
    assert refused.returncode == 2 and "it is running (cancel it first)" in refused.stderr, refused.stderr
    assert b.read_bytes() == before
    gate.touch()
    wait_for(lambda: not [w for w in project.json("ps")["workers"] if w["state"] == "unowned"])
    project.aipm("recover", "LIVE", check=True)
    wait_for(lambda: no_workers(project.root))


def test_a_record_left_by_an_owner_killed_after_its_final_write_is_dropped_by_recover_and_ends_logs_follow(project):
    """An owner SIGKILLed between its task's final write and the record's removal left a dead record: `ps` called
    it stale and sent the user to `aipm recover`, which said "nothing to recover" and kept it; `aipm logs T -f` and
    `aipm logs ORDER -f` followed it for ever (only a later run or launch dropped it)."""
    order = project.order()
    gate = project.root / "gate"
    write_task(order, "T1", target_files=["x.txt"],
               command=f"echo working; while [ ! -e {gate} ]; do sleep 0.05; done")
    path = state(project.root) / "workers" / "ORD" / "T1.json"
    run = _start_run(project)
    try:
        rec = wait_for(lambda: _record(project, "T1"))
        saved = path.read_text()
        gate.touch()
        assert run.wait(timeout=60) == 0
    finally:
        gate.touch()
        run.kill()
    path.write_text(saved)  # what the kill after the final write leaves: the record of a finished attempt
    assert task_statuses(order)["T1"] == "DONE" and not pid_alive(rec["pid"])
    assert "working" in project.aipm("logs", "T1", "-f", timeout=30, check=True).stdout
    assert "T1\tworking" in project.aipm("logs", "ORD", "-f", timeout=30, check=True).stdout
    assert "dropped the record of attempt 1" in project.aipm("recover", "ORD", check=True).stdout
    assert no_workers(project.root)
    assert project.aipm("ps", check=True).stdout.strip() == "no workers"


def test_a_string_commands_parent_is_its_wrapper_so_kill_ppid_does_not_end_the_run(project):
    """`kill $PPID` of a shell-string command (an agent meaning its own shell, or `kill -STOP $PPID`) reached the
    supervisor: in the wrapper's subshell $PPID was the wrapper's parent, `aipm run` itself."""
    write_task(project.order(), "T1", target_files=["ppid.txt"], command="echo $PPID > ppid.txt; kill $PPID")
    run = project.aipm("run", "ORD", "--no-resource-monitoring")
    assert run.returncode == 0, run.stdout + run.stderr
    wrapper = re.search(r"start +T1 \(attempt 1, pid (\d+)\)", run.stdout).group(1)
    assert (project.root / "ppid.txt").read_text().strip() == wrapper
    assert task_statuses(project.order())["T1"] == "DONE"


@contextmanager
def _stopped_owner_with_its_worker_ended(project, gate, order):
    """`aipm run ORDER` of one task stopped (Ctrl-Z) while its worker ran, outside a round (the launch lock free:
    what is tested is the wait for the outcome, not for the lock), and that worker ended since: its outcome waits
    for the stopped owner. Yields the stopped run, and lets it go on (SIGCONT) and end after the block."""
    running = project.root / "running"
    write_task(project.order(order), "T1", target_files=["a.txt"],
               command=f"touch {running}; while [ ! -e {gate} ]; do sleep 0.05; done")
    first = _start_run(project, order)
    path = state(project.root) / "workers" / order / "T1.json"
    wait_for(running.exists)
    rec = json.loads(path.read_text())
    stop_outside_a_round(project, first)
    gate.touch()
    wait_for(lambda: not pid_alive(rec["pid"]))  # a zombie: its stopped owner cannot reap it
    try:
        yield first
    finally:
        first.send_signal(signal.SIGCONT)
        first.wait(timeout=60)


def test_ps_of_a_worker_that_ended_shows_no_pid_or_cpu_of_its_stopped_owner(project, gate):
    """`aipm ps` gave a worker that had ended, its outcome held by its stopped `aipm run`, that run's pid, CPU and
    memory (every child of it counted: another worker's too) as the worker's, in a row saying `stopped`, as of a
    worker stopped with `kill -STOP`. It shows no pid or figures, and says the worker ended and who holds its end."""
    with _stopped_owner_with_its_worker_ended(project, gate, "ORD") as first:
        (worker,) = project.json("ps")["workers"]
        shown = {key: worker[key] for key in ("pid", "owner_pid", "elapsed", "cpu_percent", "memory_mb", "state")}
        assert shown == {"pid": None, "owner_pid": first.pid, "elapsed": None, "cpu_percent": None,
                         "memory_mb": None, "state": "held"}, worker
        table = project.aipm("ps", env={"COLUMNS": "200"}, check=True).stdout
        (row,) = [line.split("│")[1:-1] for line in table.splitlines() if "ORD/T1" in line]
        assert [cell.strip() for cell in row] == ["-", "ORD/T1", "work", "-", "-", "-", "ended: its owner is "
                                                  "stopped and records that end once it goes on"], table


def test_a_finished_order_does_not_wait_for_another_orders_owner_that_is_stopped(project, gate):
    """A run of an order that was done waited for any other order's outcome still being recorded: for ever, in
    silence, where that owner (another `aipm run`) was stopped with its worker ended."""
    with _stopped_owner_with_its_worker_ended(project, gate, "Y"):
        write_task(project.order("X"), "U1", target_files=["b.txt"], command="true")
        run = project.aipm("run", "X", "--no-resource-monitoring", timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        assert task_statuses(project.order("X")) == {"U1": "DONE"}
    assert task_statuses(project.order("Y")) == {"T1": "DONE"}


def test_a_run_whose_queued_tasks_can_never_run_does_not_wait_for_another_orders_stopped_owner(project, gate):
    """8c67ae0 let a run of an order that was done end beside another order's stopped owner, but one whose QUEUED
    task waits on a FAILED one (it can never run: `run` alone ends at once, exit 1) still waited, for ever and in
    silence: another order's work was taken to free a dependency of it."""
    with _stopped_owner_with_its_worker_ended(project, gate, "Y"):
        write_task(project.order("X"), "A", target_files=["a.txt"], command="false", status="FAILED", attempts=3)
        write_task(project.order("X"), "B", target_files=["b.txt"], command="true", depends_on=["A"])
        run = project.aipm("run", "X", "--no-resource-monitoring", timeout=60)
        assert run.returncode == 1 and "B can never run: A is FAILED" in run.stderr, run.stdout + run.stderr
        assert task_statuses(project.order("X")) == {"A": "FAILED", "B": "QUEUED"}
    assert task_statuses(project.order("Y")) == {"T1": "DONE"}


def test_a_run_waiting_beside_another_orders_stopped_owner_does_not_look_again_every_fifth_of_a_second(project,
                                                                                                      gate):
    """X's U1 waits for the one worker slot, which Y's ended T1 holds until its stopped owner records the end: the
    run of X planned a whole round every 0.2 s (FINISHING_RECHECK: an outcome being recorded) for as long as that
    owner stayed stopped. It looks every STOPPED_RECHECK (2 s) instead, and starts U1 once the owner went on."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\n")
    with _stopped_owner_with_its_worker_ended(project, gate, "Y"):
        write_task(project.order("X"), "U1", target_files=["b.txt"], command="true")
        second, out = _started(project, "run", "X")
        time.sleep(3)  # started, and waiting (it says nothing of a slot it waits for)

        def wakeups() -> int:  # of its main thread, the one that plans: each timed-out wait is one
            status = (Path(f"/proc/{second.pid}/status")).read_text()
            return int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))

        before = wakeups()
        time.sleep(3)
        assert wakeups() - before <= 6, f"{wakeups() - before} wake-ups in 3 s"
        assert second.poll() is None and task_statuses(project.order("X")) == {"U1": "QUEUED"}, out.read_text()
    assert second.wait(timeout=60) == 0, out.read_text()
    assert task_statuses(project.order("X")) == {"U1": "DONE"}


@pytest.mark.parametrize("command", ["run", "exec"])
def test_a_run_waiting_for_an_outcome_its_stopped_owner_holds_says_so_once(project, gate, command):
    """A second `aipm run` of the order (or `exec` of that task) waited in silence, for ever, for T1's outcome,
    which its owner (stopped after T1's worker ended) holds. Now it says who holds it and that it is stopped, and
    goes on once it is. An exec of another task, which does not wait for T1, says nothing of it. The wait needs a
    person, so the `notify` command is told, once (it was not told at all)."""
    (project.root / "aipm.yaml").write_text("notify: 'true'\n")
    with _stopped_owner_with_its_worker_ended(project, gate, "ORD") as first:
        write_task(project.order(), "T2", target_files=["b.txt"], command="true")
        said = (f"wait     T1: its worker has ended, and its owner (another aipm, pid {first.pid}) is stopped "
                "(Ctrl-Z or SIGSTOP)")
        if command == "exec":
            other = project.aipm("exec", "ORD/T2", "--no-resource-monitoring", timeout=60)
            assert other.returncode == 0 and said not in other.stdout, other.stdout + other.stderr
        second, out = _started(project, *(["run", "ORD"] if command == "run" else ["exec", "ORD/T1"]))
        wait_for(lambda: said in out.read_text())
        assert second.poll() is None  # still waiting
    assert second.wait(timeout=60) == 0, out.read_text()
    assert out.read_text().count(said) == 1, out.read_text()
    assert task_statuses(project.order()) == {"T1": "DONE", "T2": "DONE"}
    told = (project.root / ".aipm" / "notify.log").read_text()
    assert told.count(f"needs_person WAITING: ORD/T1: its worker has ended, and its owner (another aipm, pid "
                      f"{first.pid}) is stopped") == 1, told


def test_logs_f_of_an_attempt_whose_stopped_owner_holds_its_end_says_so_once(project, gate):
    """`aipm logs -f` followed T1 in silence, for ever, after its worker had ended: its owner was stopped before
    recording the outcome. Now it says so on stderr, and ends once the owner goes on."""
    with _stopped_owner_with_its_worker_ended(project, gate, "ORD") as first:
        err = project.root.parent / "logs.err"
        with open(err, "w") as handle:
            follow = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "logs", "-f",
                                       "ORD/T1"], stdout=subprocess.DEVNULL, stderr=handle)
        said = (f"aipm: ORD/T1: its worker has ended, and its owner (pid {first.pid}) is stopped (Ctrl-Z or "
                "SIGSTOP)")
        wait_for(lambda: said in err.read_text())
        assert follow.poll() is None  # still following
    assert follow.wait(timeout=60) == 0, err.read_text()
    assert err.read_text().count(said) == 1, err.read_text()


def test_cancel_of_a_task_whose_run_is_stopped_says_so_and_does_not_wait_for_it(project, gate):
    """`aipm cancel` of a task whose `aipm run` was stopped (Ctrl-Z) stopped the worker, then waited its grace and
    5 s more, in silence, for that run to record the end, which it does only once it goes on; a retry then was
    refused as "being recorded" by a pid, with no word that it was stopped."""
    running = project.root / "running"
    write_task(project.order(), "T1", target_files=["a.txt"],
               command=f"touch {running}; while [ ! -e {gate} ]; do sleep 0.05; done")
    first = _start_run(project)
    wait_for(running.exists)
    stop_outside_a_round(project, first)
    try:
        cancel = project.aipm("cancel", "T1", "--grace", "30", timeout=120)
        assert cancel.returncode == 0 and "T1: CANCELLED" in cancel.stdout, cancel.stdout + cancel.stderr
        assert cancel.stderr == (f"aipm: T1: its worker has ended; its owner records that end (aipm pid {first.pid}), "
                                 f"which is stopped (Ctrl-Z or SIGSTOP): `fg` in its terminal, or `kill -CONT "
                                 f"{first.pid}`, lets it go on; a retry waits for it\n"), cancel.stderr
        retry = project.aipm("retry", "T1")
        assert retry.returncode == 2 and f"(by aipm pid {first.pid}), which is stopped" in retry.stderr, retry.stderr
    finally:
        first.send_signal(signal.SIGCONT)
    first.wait(timeout=60)
    assert task_statuses(project.order()) == {"T1": "CANCELLED"}
    project.aipm("retry", "T1", check=True)


@pytest.mark.parametrize("how", ["run", "launch"])
def test_a_command_that_stops_its_wrapper_does_not_hang_its_task(project, how):
    """`kill -STOP $PPID` in a command stops its wrapper (runner.py sets $PPID to it), which only waits for the
    command and writes its exit code: the command ended, and the task stayed IN_PROGRESS (`aipm ps`: stopped) until
    its timeout, for ever without one. Its owner now lets the wrapper go on and says so in the log. (run: a string
    command under `aipm run`; launch: an argv command under a detached owner.)"""
    command = ("echo before; kill -STOP $PPID; echo after" if how == "run" else
               ["sh", "-c", "echo before; kill -STOP $PPID; echo after"])
    write_task(project.order(), "T1", target_files=["a.txt"], command=command)
    if how == "run":
        run = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
    else:
        project.aipm("launch", "ORD", check=True)
        wait_for(lambda: task_statuses(project.order()) == {"T1": "DONE"})
    assert task_statuses(project.order()) == {"T1": "DONE"}
    log = (project.root / ".aipm/logs/ORD/T1.1.log").read_text()
    assert log.startswith("before\nafter\n") and "was stopped (SIGSTOP): let go on" in log, log
    wait_for(lambda: no_workers(project.root))


def _streamed_start(project, args: tuple[str, ...], size: int = 1 << 18) -> tuple[bytes, str]:
    """The first `size` bytes `aipm ARGS` writes to stdout (in 3 GiB of memory), then the process is killed; and
    what it wrote to stderr. A command that reads its file whole dies of a MemoryError first, having written none."""
    env = dict(os.environ, AIPM_ENABLE_MONITORING="false")
    proc = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), *args], cwd=project.root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=capped_memory)
    try:
        got = b""
        while len(got) < size:
            chunk = proc.stdout.read1(size - len(got))
            if not chunk:
                break
            got += chunk
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=30)
    return got, err.decode(errors="replace")


@pytest.mark.parametrize("json_out", [False, True])
def test_a_sparse_terabyte_log_or_patch_is_copied_out_a_chunk_at_a_time(project, json_out):
    """`aipm logs --json` and `aipm diff` read the log or the kept patch whole: a worker's sparse terabyte there (it
    can write .aipm/) was a MemoryError traceback. They copy it out a chunk at a time now, as `cat` would (and
    `logs` without --json did): what the file holds, from its start, at once."""
    order = project.order()
    write_task(order, "A", command="echo hello")
    assert project.aipm("run", "ORD").returncode == 0
    log = project.root / ".aipm/logs/ORD/A.1.log"
    log.write_bytes(b"hello\n")
    os.truncate(log, 1 << 40)
    patch = project.root / ".aipm/patches/ORD/A.1.patch"
    patch.parent.mkdir(parents=True)
    patch.write_bytes(b"--- a/x\n+++ b/x\n")
    os.truncate(patch, 1 << 40)
    extra = ("--json",) if json_out else ()
    for args, head in ((("logs", "A"), b"hello\n"), (("diff", "A"), b"--- a/x\n+++ b/x\n")):
        out, err = _streamed_start(project, (*args, *extra))
        assert "Traceback" not in err and "MemoryError" not in err, err
        assert len(out) == 1 << 18, (args, out[:200], err)
        if json_out:
            key = "text" if args[0] == "logs" else "patch"
            assert out.startswith(b'{"order": "ORD", "task": "A", '), out[:200]
            assert f'"{key}": "{json.dumps(head.decode())[1:-1]}\\u0000\\u0000'.encode() in out, out[:300]
        else:
            assert out.startswith(head + b"\0\0") and out[len(head):].strip(b"\0") == b"", out[:200]


def test_a_streamed_log_as_json_is_the_json_of_the_whole_log(project):
    """The JSON written a chunk at a time is the JSON of the whole text: characters across a chunk's edge (a
    multi-byte one split in two), bytes that are not UTF-8, and escapes come out as one json.dumps gives them."""
    order = project.order()
    write_task(order, "A", command="echo hello")
    assert project.aipm("run", "ORD").returncode == 0
    log = project.root / ".aipm/logs/ORD/A.1.log"
    body = ("é" * ((1 << 20) - 1)).encode() + b'"\\\t\n\xff\xfe' + "😀 end".encode()  # é's 2 bytes cross 1 MiB
    log.write_bytes(body)
    got = project.json("logs", "A")
    assert got["text"] == body.decode("utf-8", errors="replace")
    assert list(got) == ["order", "task", "attempt", "attempts", "log", "text"]


# What each reader of git's small files makes of one a worker replaced: [commits.at_start(worktree) (HEAD as an
# attempt starts), confine._git_dirs(worktree) (the git directories its rules keep shut), ownrefs.isolated(note),
# the worktrees Repo._notes() names].
_GIT_FILE_READERS = """
import json, os, sys
from pathlib import Path
from aipm import commits, confine
from aipm.workspace import ownrefs
from aipm.workspace.repo import Repo
main, tree, note = (Path(p) for p in sys.argv[1:])
start = commits.at_start(tree)
print(json.dumps([start[:2] if start else start, confine._git_dirs(os.path.realpath(tree)), ownrefs.isolated(note),
                  [str(n) for n, _ in Repo(main)._notes()]]))
"""


@pytest.mark.parametrize("make", ["mkfifo", "truncate -s 1T"])
@pytest.mark.parametrize("where", [".git", "commondir", "gitdir"])
def test_a_fifo_or_sparse_file_a_worker_leaves_in_place_of_its_worktrees_git_files_hangs_nothing(tmp_path, where,
                                                                                                  make):
    """A worktree's `.git` file, and the `commondir` and `gitdir` of its note in the repository's git directory,
    are its worker's to rewrite. They were opened as any file, so a FIFO there held whoever read it for ever (the
    rules of a confined attempt, the check of the worktree's own refs, the pruning of worktrees under the launch
    lock), and read whole to the first newline, so a sparse terabyte there was a MemoryError; the first 4 KiB
    commits.py read of one (the path, then zeros) reached os calls as a path with NUL bytes: a ValueError
    traceback. Each reader now takes such a file for none there."""
    main, tree = tmp_path / "main", tmp_path / "tree"
    main.mkdir()
    _git(main, "init", "-q")
    _git(main, "commit", "-q", "--allow-empty", "-m", "start")
    _git(main, "worktree", "add", "-q", "--detach", str(tree))
    note = main / ".git" / "worktrees" / "tree"
    healthy = _git_file_readers(main, tree, note)
    assert healthy[1] == [str(tree / ".git"), str(note), str(main / ".git")] and healthy[3] == [str(note)]
    path = {".git": tree / ".git", "commondir": note / "commondir", "gitdir": note / "gitdir"}[where]
    if make == "mkfifo":
        path.unlink()
        os.mkfifo(path)
    else:
        os.truncate(path, 1 << 40)  # what `truncate -s 1T` does: the file's line, then zeros
    # None there: no work tree (HEAD not noted; a `.git` that is no file is looked past, to none above); a worktree
    # whose git directory is its own (its common one unknown); a note that names no worktree.
    expected = {".git": [[], [str(tree / ".git")] * (make != "mkfifo"), False, [str(note)]],
                "commondir": [healthy[0], [str(tree / ".git"), str(note)], False, [str(note)]],
                "gitdir": [*healthy[:3], []]}[where]
    assert _git_file_readers(main, tree, note) == expected


def _git_file_readers(main, tree, note) -> list:
    proc = subprocess.run([sys.executable, "-c", _GIT_FILE_READERS, str(main), str(tree), str(note)],
                          capture_output=True, text=True, timeout=60, preexec_fn=capped_memory,
                          env={**os.environ, "GIT_CEILING_DIRECTORIES": str(tree.parent)})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("edit", ["sed -i 's/^status: .*/status: DONE/' orders/ORD/A.yaml",
                                  "git checkout -- orders/ORD/A.yaml"], ids=["writes DONE", "git checkout"])
def test_status_and_graph_show_a_live_worker_whatever_its_file_says(project, tmp_path, edit):
    """`status` (and `--json`, and `graph`) showed what the file said: DONE (or QUEUED) while the worker ran on
    under its detached owner, which writes the outcome only when it ends; a script polling `status --json` for
    DONE went ahead. `detect` and `why` already said that the worker outranks the file."""
    gate = tmp_path / "gate"
    order = project.order()
    write_task(order, "A", target_files=["a.txt"],
               command=f"{edit}; touch {tmp_path / 'edited'}; while [ ! -e {gate} ]; do sleep 0.05; done; exit 1")
    write_task(order, "B", command="true", depends_on=["A"])
    _commit_everything(project.root)
    assert project.aipm("launch", "ORD", "--no-resource-monitoring").returncode == 0
    try:
        wait_for(lambda: (tmp_path / "edited").exists())
        file_says = task_statuses(project.root / "orders/ORD")["A"]
        assert file_says in ("DONE", "QUEUED"), file_says
        shown = {t["id"]: t for t in json.loads(project.aipm("status", "ORD", "--json").stdout)["tasks"]}
        assert shown["A"]["status"] == "IN_PROGRESS", shown["A"]
        assert f"its file says {file_says}, but its worker" in shown["A"]["reason"]
        assert shown["B"]["status"] == "QUEUED"
        table = project.aipm("status", "ORD", env={"COLUMNS": "200"}).stdout
        assert "│ A    │ IN_PROGRESS │" in table and table.splitlines()[-1].startswith("IN_PROGRESS 1"), table
        nodes = {n["id"]: n["status"] for n in json.loads(project.aipm("graph", "ORD", "--json").stdout)["nodes"]}
        assert nodes["A"] == "IN_PROGRESS", nodes
    finally:
        gate.touch()
    wait_for(lambda: task_statuses(project.root / "orders/ORD")["A"] == "FAILED")
    wait_for(lambda: not json.loads(project.aipm("ps", "--json").stdout)["workers"])
    shown = {t["id"]: t for t in json.loads(project.aipm("status", "ORD", "--json").stdout)["tasks"]}
    assert shown["A"]["status"] == "FAILED" and shown["B"]["status"] == "QUEUED"
