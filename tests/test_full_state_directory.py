"""A full state directory (`/tmp/aipm-<uid>/...`: a small tmpfs mounted over it, root only): aipm says what it
cannot do, holds nothing it cannot record, and picks up once there is room again."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest
import yaml

from conftest import no_workers, state, task_statuses, wait_for, write_task
from invariants import check, journal_command, spans, worker_records
from test_agents import STAND_INS
from test_chaos import Proc

from aipm.runtime import Runtime


@pytest.fixture
def full_state(project):
    """The project's state directory on a 256 KiB tmpfs; `fill()` takes every byte of it, `free()` gives it back."""
    path = state(project.root, make=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    filler = path / "filler"

    class Disk:
        @staticmethod
        def fill() -> None:
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
            try:
                while True:
                    os.write(fd, b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            finally:
                os.close(fd)

        @staticmethod
        def free() -> None:
            filler.unlink()

    try:
        yield Disk
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_worker_that_cannot_be_adopted_for_want_of_room_is_reported_and_adopted_later(project, full_state, gate):
    """`run`, `launch` and `recover` died with a traceback (ENOSPC in Supervisor.adopt's write_record; `launch`'s
    detached adopter too, in the task's log) when a dead owner's live worker was to be adopted with the state
    directory full."""
    order = project.order()
    journal = project.root / "journal.txt"
    write_task(order, "A", target_files=["a.txt"],
               command=journal_command(journal, f"while [ ! -e {gate} ]; do sleep 0.05; done"))
    write_task(order, "B", target_files=["b.txt"], depends_on=["A"], command=journal_command(journal))
    first = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD",
                              "--no-resource-monitoring"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rec = wait_for(lambda: next((r for r in worker_records(project.root) if r.get("pid")), None))
    first.send_signal(signal.SIGKILL)  # its worker goes on, waiting for the gate, with no owner
    first.wait(timeout=30)
    full_state.fill()
    said = f"cannot adopt its worker: {state(project.root) / 'workers' / 'ORD' / 'A.json'}: No space left on device"
    for args in (("launch", "ORD"), ("recover", "ORD")):
        proc = project.aipm(*args, timeout=120)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out
        assert said in out and "Traceback" not in out, out
    # The detached adopters `launch` and `recover` started could not take the record either: each says so in the
    # task's log. Both are waited for: one that came to try only once the room below was freed adopted A and
    # started B before this test's `run` could (under CI's load: 'watch B: run by another aipm').
    log = project.root / ".aipm" / "logs" / "ORD" / "A.1.log"
    wait_for(lambda: log.read_text().count("aipm: cannot adopt the worker of A") == 2)
    assert "Traceback" not in log.read_text()
    # `run` says so too, and waits for the worker (its end may bring room): then it adopts what it left.
    run = Proc(project.root, "run", "ORD", "--no-resource-monitoring")
    try:
        run.wait_lines(1)
        assert run.lines[:1] == [f"failed   A: {said}\n"], run.output
        assert task_statuses(order) == {"A": "IN_PROGRESS", "B": "QUEUED"}
        assert [r["owner_pid"] for r in worker_records(project.root)] == [rec["owner_pid"]]  # the dead owner still
        full_state.free()
        gate.touch()
        assert run.wait(timeout=120) == 0, run.output
    finally:
        run.kill()
    assert "Traceback" not in run.output, run.output
    assert "watch" not in run.output, run.output  # its owner is dead: no other aipm runs A
    assert task_statuses(order) == {"A": "DONE", "B": "DONE"}
    assert check(journal, order) == []  # A ran once, B after it


def test_a_start_that_cannot_write_its_record_names_the_record_not_the_task_file(project, full_state):
    """`failed A: <root>/orders/ORD/A.yaml: [Errno 28] No space left on device`: the task file's disk had room; the
    worker record in the state directory did not."""
    order = project.order()
    journal = project.root / "journal.txt"
    write_task(order, "A", target_files=["a.txt"], command=journal_command(journal))
    assert project.aipm("run", "ORD", "--no-resource-monitoring", timeout=120).returncode == 0  # its lock file made
    project.aipm("retry", "A", check=True)
    full_state.fill()
    proc = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=120)
    record = state(project.root) / "workers" / "ORD" / "A.json"
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"failed   A: {record}: No space left on device" in proc.stdout, proc.stdout + proc.stderr
    assert "A.yaml" not in proc.stdout + proc.stderr
    assert task_statuses(order) == {"A": "QUEUED"} and worker_records(project.root) == []  # undone
    logs = project.root / ".aipm" / "logs" / "ORD"
    # Nor did it leave an empty log behind, which took the attempt's number: the next attempt's log was A.3.log.
    assert sorted(p.name for p in logs.glob("A.*.log")) == ["A.1.log"]
    full_state.free()
    assert project.aipm("run", "ORD", "--no-resource-monitoring", timeout=120).returncode == 0
    assert len(spans(journal)) == 2  # the first run and this one: the failed start ran nothing
    assert sorted(p.name for p in logs.glob("A.*.log")) == ["A.1.log", "A.2.log"]


def test_a_reviewer_whose_record_cannot_be_written_is_reported_and_runs_once_there_is_room(project, full_state):
    """A's work exited 0 and IN_REVIEW was written; its reviewer's record could not be: run said `cannot record the
    outcome of A (exit 0): <root>/orders/ORD/A.yaml: No space left on device`, naming a file that had been written.
    Once there was room, the next run left A INTERRUPTED (`exit code lost`: the record still said the work ran):
    its work is done (IN_REVIEW says it exited 0), so only its review runs."""
    order = project.order()
    runs, reviews = project.root / "runs", project.root / "reviews"
    write_task(order, "A", target_files=["a.txt"], review=f"echo reviewed >> {reviews}",
               command=f"echo ran >> {runs}; touch {project.root / 'worked'}; "
                       f"while [ ! -e {project.root / 'full'} ]; do sleep 0.05; done")
    run = Proc(project.root, "run", "ORD", "--no-resource-monitoring")
    try:
        wait_for(lambda: (project.root / "worked").exists())
        full_state.fill()
        (project.root / "full").touch()
        assert run.wait(timeout=120) == 1, run.output
    finally:
        run.kill()
    record = state(project.root) / "workers" / "ORD" / "A.json"
    assert f"cannot record the outcome of A (exit 0): {record}: No space left on device; its work's outcome is " \
           "written (IN_REVIEW), its review did not start: the next run (or `aipm recover`) starts it" in run.output, \
        run.output
    assert "A.yaml" not in run.output and "Traceback" not in run.output, run.output
    full_state.free()
    proc = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "review   A again (its review was lost without a verdict)" in proc.stdout, proc.stdout
    assert task_statuses(order) == {"A": "COMPLETED"}
    assert runs.read_text() == "ran\n" and reviews.read_text() == "reviewed\n"  # the work ran once


def test_an_outcome_written_in_part_adds_the_attempts_usage_once(project, full_state, tmp_path_factory):
    """A's agent reported $0.25 and 15 tokens; IN_REVIEW was written with them, its reviewer's record could not be.
    The next run restored IN_PROGRESS (the reviewer never ran) and added the usage again: $0.50 and 30 tokens for
    one attempt (a SIGKILL of the owner between those two writes did the same), as the attempt's start had no cost
    to put back. Now its review runs (lostreviews.review_unrecorded) and the usage stays counted once."""
    gate = tmp_path_factory.mktemp("outside") / "gate"  # outside the project: opening it is no change of A's
    (project.root / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    path = write_task(project.order(), "A", prompt=f"@cost 0.25\n@wait-for {gate}", target_files=["a.txt"],
                      review="true")
    env = {"PATH": f"{STAND_INS}{os.pathsep}{os.environ['PATH']}"}
    log = project.root / ".aipm" / "logs" / "ORD" / "A.1.log"
    run = Proc(project.root, "run", "ORD", "--no-resource-monitoring", env={**os.environ, **env})
    try:
        wait_for(lambda: log.exists() and '"session_id"' in log.read_text())  # the agent runs
        full_state.fill()
        gate.touch()
        assert run.wait(timeout=120) == 1, run.output
    finally:
        gate.touch()
        run.kill()
    assert "cannot record the outcome of A" in run.output, run.output
    assert yaml.safe_load(path.read_text())["status"] == "IN_REVIEW"
    full_state.free()
    again = project.aipm("run", "ORD", "--no-resource-monitoring", env=env, timeout=120)
    assert "review   A again" in again.stdout and "restore" not in again.stdout, again.stdout + again.stderr
    a = yaml.safe_load(path.read_text())
    assert (a["cost_usd"], a["tokens"]) == (0.25, {"input": 10, "output": 5, "cache_read": 0, "cache_write": 0}), a


def test_a_cancel_that_cannot_mark_its_attempt_changes_nothing_and_says_so(project, full_state, gate):
    """`aipm cancel` marks the attempt it stops before it writes CANCELLED (a CANCELLED with no mark is taken for
    the worker's own write). With no room for the mark it ended in a StateWriteError traceback; now one line, exit
    1, the task and its worker as they were, and a cancel once there is room does it."""
    path = write_task(project.order(), "A", target_files=["a.txt"],
                      command=f"while [ ! -e {gate} ]; do sleep 0.05; done")
    project.aipm("launch", "ORD", check=True)
    rec = wait_for(lambda: (r := Runtime(project.root).read_record("ORD", "A")) is not None and r.worker_alive() and r)
    before = path.read_text()
    full_state.fill()
    proc = project.aipm("cancel", "A")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("aipm: error: cannot cancel A: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "No space left on device" in proc.stderr and "nothing was changed" in proc.stderr, proc.stderr
    assert path.read_text() == before and rec.worker_alive()
    full_state.free()
    project.aipm("cancel", "A", "--grace", "2", check=True)
    wait_for(lambda: no_workers(project.root))
    assert yaml.safe_load(path.read_text())["status"] == "CANCELLED"


def test_a_cancel_whose_write_failed_leaves_no_mark_to_turn_the_attempts_end_into_a_cancel(project, gate):
    """`aipm cancel` marks the attempt before it writes CANCELLED; when that write failed (here the order's disk
    full) the cancel ended in a traceback and stopped nothing, but its mark stayed, and the attempt's own end (exit
    3) was then recorded CANCELLED. Now it says in one line why it could not, and leaves no mark."""
    order = project.order()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(order)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        (order / "order.yaml").write_text("id: ORD\n")
        write_task(order, "T", target_files=["a.txt"], command=f"while [ ! -e {gate} ]; do sleep 0.05; done; exit 3")
        run = Proc(project.root, "run", "ORD", "--no-resource-monitoring")
        wait_for(lambda: task_statuses(order)["T"] == "IN_PROGRESS" and worker_records(project.root))
        filler = order / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            with pytest.raises(OSError):
                while True:
                    os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
        cancel = project.aipm("cancel", "T", timeout=60)
        assert (cancel.returncode, cancel.stderr.count("\n")) == (1, 1), cancel.stdout + cancel.stderr
        assert "cannot cancel T: " in cancel.stderr and "No space left on device" in cancel.stderr, cancel.stderr
        filler.unlink()
        gate.touch()
        assert run.wait(timeout=120) == 1, run.output
        assert task_statuses(order) == {"T": "FAILED"}
    finally:
        subprocess.run(["umount", "-l", str(order)], check=False)


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_a_state_directory_that_cannot_be_written_at_all_is_one_line_not_a_traceback(project, full_state, how):
    """/tmp full (a test suite filled it) or remounted read-only (disk errors) before the project's first round:
    `run`, `launch`, `recover`, `cancel` and `retry` each died with a Python traceback (note_orphans' write). Now
    one line names the file and what the machine said, exit 1, and the task file is as it was."""
    order = project.order()
    path = write_task(order, "T", command="true")
    before = path.read_bytes()
    full_state.fill()
    if how == "read-only":
        full_state.free()
        subprocess.run(["mount", "-o", "remount,ro", str(state(project.root))], check=True)
    said = "No space left on device" if how == "full" else "Read-only file system"
    for args in (("run", "ORD"), ("launch", "ORD"), ("recover",), ("cancel", "T"), ("retry", "T")):
        done = project.aipm(*args)
        assert done.returncode == 1 and "Traceback" not in done.stderr, (args, done.stderr)
        [line] = done.stderr.splitlines()
        assert line.startswith(f"aipm: error: {state(project.root)}") and said in line, (args, line)
    assert path.read_bytes() == before and task_statuses(order) == {"T": "QUEUED"}
