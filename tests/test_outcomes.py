"""Outcomes say why (issue 12): the `reason` of every ending, tries and reworks apart, `add` limits, warnings."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import yaml

from conftest import no_workers, state, task_statuses, wait_for, write_task
from aipm import outcome


def test_every_ending_names_its_reason_in_events_status_and_why(project):
    order = project.order()
    write_task(order, "EXIT", command="exit 3", max_attempts=2)
    write_task(order, "SLOW", command="sleep 60", timeout=1)
    write_task(order, "PICKY", command="true", review="echo 'E501 line too long'; echo second line; exit 1",
               max_rework=0)
    write_task(order, "KILLED", command="kill -9 $PPID")
    write_task(order, "FINE", command="true", review="true")
    proc = project.aipm("run", "ORD", "--json", "--no-resource-monitoring")
    assert proc.returncode == 1, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    finished = [(e["task"], e["status"], e["reason"]) for e in events if e["event"] == "finished"]
    assert ("EXIT", "QUEUED", "exit 3") in finished and ("EXIT", "FAILED", "exit 3") in finished
    assert ("SLOW", "FAILED", "timed out after 1 s") in finished
    assert ("PICKY", "REJECTED", "review rejected: E501 line too long") in finished
    assert ("FINE", "COMPLETED", "review approved") in finished
    assert ("KILLED", "FAILED", "killed by SIGKILL") in finished  # $PPID is the worker process itself
    # The reason outlives the run: `status` and `why` in a later invocation read it from the task files.
    rows = {t["id"]: t for t in project.json("status", "ORD")["tasks"]}
    assert rows["SLOW"]["reason"] == "timed out after 1 s"
    assert rows["PICKY"]["reason"] == "review rejected: E501 line too long"
    table = project.aipm("status", "ORD", "--wide").stdout
    assert "timed out after 1 s" in table and "review rejected: E501 line too long" in table
    why = project.aipm("why", "PICKY").stdout
    assert "status is REJECTED (review rejected: E501 line too long)" in why
    assert project.json("why", "SLOW")["last_outcome"] == "timed out after 1 s"


def test_cancel_and_recovery_say_so(project):
    order = project.order()
    write_task(order, "C", command="true")
    write_task(order, "LOST", command="true", status="IN_PROGRESS", attempts=1)  # its worker left no trace
    project.aipm("cancel", "C", check=True)
    project.aipm("recover", "ORD", check=True)
    rows = {t["id"]: t for t in project.json("status", "ORD")["tasks"]}
    assert (rows["C"]["status"], rows["C"]["reason"]) == ("CANCELLED", "cancelled")
    assert (rows["LOST"]["status"], rows["LOST"]["reason"]) == ("QUEUED", "interrupted: worker gone")
    assert "last attempt: interrupted: worker gone" in project.aipm("why", "LOST").stdout
    project.aipm("retry", "C", check=True)  # a retry starts clean
    assert project.json("status", "ORD")["tasks"][0]["reason"] is None


def test_an_adopted_worker_that_times_out_is_recorded_as_timed_out(project):
    order = project.order()
    write_task(order, "SLOW", command="sleep 60", timeout=4)
    first = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD",
                              "--no-resource-monitoring"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = state(project.root) / "workers" / "ORD" / "SLOW.json"
    wait_for(lambda: record.exists() and json.loads(record.read_text())["pgid"])
    first.send_signal(signal.SIGKILL)  # the worker outlives its supervisor; the next run adopts it
    first.wait(timeout=30)
    assert task_statuses(order)["SLOW"] == "IN_PROGRESS", "the supervisor should die before the timeout"
    second = project.aipm("run", "ORD", "--no-resource-monitoring")
    assert second.returncode == 1
    assert "adopt    SLOW" in second.stdout
    assert "finish   SLOW → FAILED (timed out after 4 s)" in second.stdout, second.stdout
    data = yaml.safe_load((order / "SLOW.yaml").read_text())
    assert (data["status"], data["reason"]) == ("FAILED", "timed out after 4 s")
    log = (project.root / ".aipm" / "logs" / "ORD" / "SLOW.1.log").read_text()
    assert "killed from outside" not in log and "timed out after 4 s" in log
    assert no_workers(project.root)


def test_tries_and_reworks_are_counted_apart(project):
    order = project.order()
    runs = project.root / "runs"
    # The first run succeeds and is sent back by the review; every later run fails.
    write_task(order, "T", max_attempts=2,
               command=f"echo x >> {runs}; [ $(wc -l < {runs}) -eq 1 ]", review="echo 'needs work'; exit 1")
    proc = project.aipm("run", "ORD", "--no-resource-monitoring")
    assert proc.returncode == 1
    row = project.json("status", "ORD")["tasks"][0]
    # Three attempts: one sent back by the review (a rework), then two failed tries, max_attempts 2.
    assert (row["status"], row["attempts"], row["tries"], row["reworks"]) == ("FAILED", 3, 2, 1)
    assert (row["max_attempts"], row["max_rework"], row["reason"]) == (2, 3, "exit 1")
    assert runs.read_text().count("x") == 3
    table = project.aipm("status", "ORD", "--wide").stdout
    line = next(line for line in table.splitlines() if " T " in line)
    assert "│ 2/2 " in line and "│ 1/3 " in line, table


def test_a_rejected_task_shows_its_reworks_used_of_allowed_never_past_the_limit(project):
    """max_rework 1 and a review that always rejects: two attempts, one rework round, then REJECTED. Status
    showed `0/1` tries and `2/1` reworks (the final rejection counted as a rework it never got); the counts are
    used of allowed, add up to the attempts, and `status`, `status --json` and the dashboard's rows agree."""
    order = project.order()
    write_task(order, "T", max_attempts=1, max_rework=1, command="true", review="echo 'needs work'; exit 1")
    assert project.aipm("run", "ORD", "--no-resource-monitoring").returncode == 1
    row = project.json("status", "ORD")["tasks"][0]
    assert (row["status"], row["attempts"], row["tries"], row["reworks"]) == ("REJECTED", 2, 1, 1)
    assert (row["max_attempts"], row["max_rework"]) == (1, 1)
    # The file says so too: it said 2, counting the rejection for good, which sent the task to no attempt
    assert yaml.safe_load((order / "T.yaml").read_text())["reworks"] == 1
    table = project.aipm("status", "ORD", "--wide").stdout
    line = next(line for line in table.splitlines() if " T " in line)
    assert line.count("│ 1/1 ") == 2, table


def test_add_sets_timeout_attempts_and_rework(project):
    project.order()
    project.aipm("add", "ORD", "T", "--command", "true", "--target-file", "a.txt", "--timeout", "60",
                 "--max-attempts", "2", "--max-rework", "1", check=True)
    data = yaml.safe_load((project.root / "orders" / "ORD" / "T.yaml").read_text())
    assert (data["timeout"], data["max_attempts"], data["max_rework"]) == (60, 2, 1)
    row = project.json("status", "ORD")["tasks"][0]
    assert (row["max_attempts"], row["max_rework"]) == (2, 1)
    project.aipm("add", "ORD", "N", "--command", "true", "--timeout", "none", check=True)  # as a file may say
    assert yaml.safe_load((project.root / "orders" / "ORD" / "N.yaml").read_text())["timeout"] == "none"
    assert project.json("status", "ORD")["tasks"][0]["id"] == "N"
    bad = project.aipm("add", "ORD", "U", "--command", "true", "--timeout", "soon")
    assert bad.returncode == 2 and "'--timeout': 'soon' is not a positive whole number" in bad.stderr, bad.stderr
    bad = project.aipm("add", "ORD", "U", "--command", "true", "--max-rework", "-1")
    assert bad.returncode == 2 and "max_rework" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (project.root / "orders" / "ORD" / "U.yaml").exists()


def test_agent_task_without_target_files_warns_at_add_validate_and_launch(project):
    (project.root / "aipm.yaml").write_text('worker:\n  command: ["cat"]\n')
    order = project.order()
    write_task(order, "SCOPED", prompt="edit a", target_files=["a.txt"])
    write_task(order, "SCRIPT", command="true")  # a command task without targets: the user chose what it runs
    added = project.aipm("add", "ORD", "FREE", "--prompt", "do anything")
    validated = project.aipm("validate", "ORD")
    launched = project.aipm("launch", "ORD")
    for proc in (added, validated, launched):
        assert proc.returncode == 0, proc.stderr
        warnings = [line for line in proc.stderr.splitlines() if line.startswith("aipm: warning:")]
        assert len(warnings) == 1 and "FREE.yaml: target_files:" in warnings[0], proc.stderr
        assert "may edit any file" in warnings[0]
    wait_for(lambda: set(task_statuses(order).values()) == {"DONE"})
    wait_for(lambda: no_workers(project.root))
    # Finished tasks cannot edit anything any more: no warning for them.
    assert "warning" not in project.aipm("launch", "ORD").stderr


def test_a_task_file_not_named_yaml_is_named_in_a_warning(project):
    """T1.yml is no task (the contract reads *.yaml): validate said 'ok (0 tasks)' and run exited 0 at once,
    having run nothing, without a word. Now a warning names it; exit codes are unchanged."""
    order = project.order()
    (order / "T1.yml").write_text("command: touch built\ntarget_files: [built]\n")
    (order / "T2.YAML").write_text("command: 'true'\n")
    write_task(order, "T3", command="true")
    for args in (("validate", "ORD"), ("run", "ORD"), ("launch", "ORD"), ("exec", "T3")):
        proc = project.aipm(*args)
        assert proc.returncode == 0, (args, proc.stderr)
        warned = [line for line in proc.stderr.splitlines() if line.startswith("aipm: warning:")]
        assert [line.split(": ")[2] for line in warned] == [f"{order}/T1.yml", f"{order}/T2.YAML"], args
        assert "rename it T1.yaml" in warned[0], warned
    assert not (project.root / "built").exists()


def test_a_task_name_that_is_no_file_is_named_in_a_warning(project):
    """D.yaml a directory, F.yaml a FIFO, L.yaml a link to nothing: skipped by the loader without a word."""
    order = project.order()
    (order / "D.yaml").mkdir()
    os.mkfifo(order / "F.yaml")
    (order / "L.yaml").symlink_to("nowhere.yaml")
    write_task(order, "T3", command="true")
    for args in (("validate", "ORD"), ("run", "ORD")):
        proc = project.aipm(*args)
        assert proc.returncode == 0, (args, proc.stderr)
        warned = [line for line in proc.stderr.splitlines() if line.startswith("aipm: warning:")]
        assert warned == [f"aipm: warning: {order}/{name}: not read: {kind}, not a task file" for name, kind in
                          (("D.yaml", "a directory"), ("F.yaml", "a FIFO"), ("L.yaml", "a link to nothing"))], warned
    assert project.statuses() == {"T3": "DONE"}


def test_missing_worker_program_blames_the_template_once(project):
    (project.root / "aipm.yaml").write_text('worker:\n  command: ["no-such-agent-xyz", "-p"]\n')
    order = project.order()
    write_task(order, "AGENT", prompt="hi", target_files=["a.txt"])
    write_task(order, "CMD", command=["no-such-tool-xyz"], target_files=["b.txt"])
    proc = project.aipm("launch", "ORD")
    assert proc.returncode == 1
    lines = dict(line.split(": ", 1) for line in proc.stderr.splitlines() if line.startswith("failed "))
    assert lines["failed AGENT"] == ("program 'no-such-agent-xyz' not found on PATH; install it or fix "
                                     "worker.command (the worker template) in aipm.yaml")
    assert lines["failed CMD"].startswith(
        "program 'no-such-tool-xyz' not found on PATH; install it or fix `command` in ")
    assert lines["failed CMD"].endswith("CMD.yaml")
    assert set(task_statuses(order).values()) == {"QUEUED"}


def test_a_missing_program_given_by_its_path_is_not_said_missing_from_path(project, tmp_path):
    """PATH is not searched for a path: the message said "not found on PATH" of /nonexistent/prog."""
    write_task(project.order(), "P", command=[str(tmp_path / "nonexistent" / "prog")])
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 1
    assert f"failed   P: program '{tmp_path / 'nonexistent' / 'prog'}' does not exist or is not executable; install " \
           "it or fix `command` in " in proc.stdout, proc.stdout
    # and a task named by a path to a file that is not there is named by that file, not `.yaml.yaml`
    proc = project.aipm("why", "orders/ORD/NOPE.yaml")
    assert proc.returncode == 2 and f"no file NOPE.yaml in {project.order()}" in proc.stderr, proc.stderr


def test_status_and_why_keep_why_a_launch_failed_and_the_fix(project):
    """A launch that failed with `program ... not found` left no trace once its output was gone: `status` showed
    the task QUEUED with no reason, and `aipm why` said `AGENT can start now.`. The reason is kept in the task
    file (it stays QUEUED, as the contract says) until an attempt starts; a launch failing the same way again
    does not rewrite the file."""
    (project.root / "aipm.yaml").write_text('worker:\n  command: ["no-such-agent-xyz"]\n')
    order = project.order()
    path = write_task(order, "AGENT", prompt="hi", target_files=["a.txt"])
    error = ("program 'no-such-agent-xyz' not found on PATH; install it or fix worker.command (the worker template) "
             "in aipm.yaml")
    assert project.aipm("launch", "ORD").returncode == 1
    (row,) = project.json("status", "ORD")["tasks"]
    assert (row["status"], row["reason"], row["attempts"]) == ("QUEUED", f"launch failed: {error}", 0), row
    assert f"launch failed: {error}" in project.aipm("status", "ORD", "--wide").stdout
    assert project.aipm("why", "AGENT").stdout == f"AGENT can start now, but its last launch failed: {error}\n"
    assert project.json("why", "AGENT")["last_outcome"] == f"launch failed: {error}"
    written = os.stat(path)
    assert project.aipm("run", "ORD").returncode == 1  # fails the same way: the file is not written again
    assert (os.stat(path).st_ino, os.stat(path).st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    tools = project.root / "bin"
    tools.mkdir()
    (tools / "no-such-agent-xyz").write_text("#!/bin/sh\nexit 0\n")
    (tools / "no-such-agent-xyz").chmod(0o755)
    proc = project.aipm("run", "ORD", env={"PATH": f"{tools}{os.pathsep}{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = project.json("status", "ORD")["tasks"]
    assert (row["status"], row["reason"]) == ("DONE", "exit 0")  # the attempt's own reason replaced it


def test_run_says_a_failed_launch_once_though_it_tries_it_every_round(project):
    """A missing worker program: `run` tries the launch again at each wake-up (the program may be installed
    meanwhile), and printed the same 'failed' line each time, once per start or finish of the other tasks."""
    (project.root / "aipm.yaml").write_text('worker:\n  command: ["no-such-agent-xyz"]\n')
    order = project.order()
    write_task(order, "AGENT", prompt="hi", target_files=["a.txt"])
    for i in range(5):
        write_task(order, f"C{i}", command="true", target_files=[f"c{i}"], depends_on=[f"C{i - 1}"] if i else [])
    proc = project.aipm("run", "ORD", "--no-resource-monitoring")
    assert proc.returncode == 1
    failed = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("failed")]
    assert failed == ["failed   AGENT: program 'no-such-agent-xyz' not found on PATH; install it or fix "
                      "worker.command (the worker template) in aipm.yaml"], proc.stdout
    assert task_statuses(order) == {"AGENT": "QUEUED", **{f"C{i}": "DONE" for i in range(5)}}


def test_run_says_a_failed_launch_again_after_another_process_launched_the_task(project, gate):
    """A failed launch was said once per run: when another process launched the task meanwhile (its program on
    that process's PATH) and the launch failed again after that attempt, `run` said nothing, and the task sat
    QUEUED with the run silent about it."""
    order = project.order()
    write_task(order, "A", command=["tool-xyz"], max_attempts=3, target_files=["a"])
    write_task(order, "B", command=f'i=0; while [ ! -e "{gate}" ] && [ $i -lt 2400 ]; do sleep 0.05; i=$((i+1)); done',
               target_files=["b"])
    tools = project.root / "bin"
    tools.mkdir()
    (tools / "tool-xyz").write_text('#!/bin/sh\nrm -f "$0"; exit 1\n')  # runs once: the next launch fails again
    (tools / "tool-xyz").chmod(0o755)
    out = project.root / "run.jsonl"
    with out.open("w") as handle:
        run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD", "--json",
                                "--no-resource-monitoring"], stdout=handle, stderr=subprocess.DEVNULL)

    def failures() -> int:
        return sum('"launch_failed"' in line and '"A"' in line for line in out.read_text().splitlines())

    try:
        wait_for(lambda: failures() == 1 and '"started"' in out.read_text())
        other = project.aipm("launch", "ORD", env={"PATH": f"{tools}{os.pathsep}{os.environ['PATH']}"})
        assert "started A" in other.stdout, other.stdout + other.stderr
        wait_for(lambda: yaml.safe_load((order / "A.yaml").read_text()).get("exit_code") == 1)
        wait_for(lambda: not (state(project.root) / "workers" / "ORD" / "A.json").exists())
    finally:
        gate.touch()
        assert run.wait(timeout=120) == 1
    assert failures() == 2, out.read_text()
    assert task_statuses(order) == {"A": "QUEUED", "B": "DONE"}


def test_exec_whose_launch_failed_does_not_say_the_task_can_start(project):
    """exec of a task that never started prints why; after a failed launch that printout found no reason and
    said 'A can start now.' between the error and 'A: QUEUED'."""
    (project.root / "aipm.yaml").write_text('worker:\n  command: ["no-such-agent-xyz"]\n')
    write_task(project.order(), "A", prompt="hi", target_files=["a.txt"])
    proc = project.aipm("exec", "A")
    assert proc.returncode == 1
    assert (proc.stdout + proc.stderr).splitlines() == [
        "failed   A: program 'no-such-agent-xyz' not found on PATH; install it or fix worker.command (the worker "
        "template) in aipm.yaml", "A: QUEUED (launch failed: program 'no-such-agent-xyz' not found on PATH; install "
        "it or fix worker.command (the worker template) in aipm.yaml)"], (proc.stdout, proc.stderr)


def test_exec_parallel_names_the_attempt_of_detached_tasks(project):
    order = project.order()
    write_task(order, "A", command="true", target_files=["a"])
    write_task(order, "B", command="true", target_files=["b"])
    proc = project.aipm("exec", "A", "--parallel", "--no-resource-monitoring")
    assert proc.returncode == 0, proc.stderr
    assert "start    B (attempt 1, pid " in proc.stdout and ", detached)" in proc.stdout, proc.stdout
    assert "attempt detached" not in proc.stdout
    wait_for(lambda: set(task_statuses(order).values()) == {"DONE"})
    wait_for(lambda: no_workers(project.root))


def test_exec_parallel_does_not_call_its_own_detached_tasks_another_aipms(project, gate):
    """exec --parallel printed 'watch    B: run by another aipm (a detached `aipm launch` or another `aipm run`);
    this run waits for them and goes on from there' for B, which it had started itself, and then exited at once
    without waiting for B."""
    order = project.order()
    started = project.root / "b-started"
    write_task(order, "A", command=f"while [ ! -e {started} ]; do sleep 0.05; done", target_files=["a"])
    write_task(order, "B", command=f"touch {started}; while [ ! -e {gate} ]; do sleep 0.05; done",
               target_files=["b"])
    proc = project.aipm("exec", "A", "--parallel", "--no-resource-monitoring")  # A ends once B runs
    assert proc.returncode == 0, proc.stderr
    assert task_statuses(order) == {"A": "DONE", "B": "IN_PROGRESS"}  # B was running when exec looked again
    assert ", detached)" in proc.stdout and "watch" not in proc.stdout, proc.stdout
    gate.touch()
    wait_for(lambda: task_statuses(order)["B"] == "DONE" and no_workers(project.root))


def test_status_never_cuts_a_path(project):
    order = project.order()
    path = "src/" + "/".join(f"directory_{i}" for i in range(8)) + "/module.py"
    write_task(order, "T", command="true", target_files=[path])
    narrow = project.aipm("status", "ORD", env={"COLUMNS": "80"}).stdout
    assert "…" not in narrow
    cells = "".join(line.split("│")[5].strip() for line in narrow.splitlines() if line.count("│") > 5)
    assert cells == path
    wide = project.aipm("status", "ORD", "--wide", env={"COLUMNS": "80"}).stdout
    assert path in wide


def test_reason_words():
    assert outcome.exited(0) == "exit 0" and outcome.exited(-9) == "killed by SIGKILL"
    assert outcome.exited(143) == "exit 143 (SIGTERM)" and outcome.exited(200) == "exit 200"
    assert outcome.review_rejected("\n\n  first\nsecond\n", 1) == "review rejected: first"
    assert outcome.review_rejected("", 4) == "review rejected (exit 4)"
    long = outcome.scope(f"file_{i}.py" for i in range(100))
    assert len(long) <= outcome.MAX_LENGTH and long.endswith("…") and "\n" not in long
    # cut after a whole word ("(t…" told nothing), the separator before it dropped
    assert re.fullmatch(r"file_\d+\.py", long[:-1].split()[-1]), long
    assert len(long) > outcome.MAX_LENGTH - 40
    unbroken = outcome.one_line("x" * 50 + " " + "y" * 300)  # a word longer than what a cut may drop: cut inside it
    assert len(unbroken) == outcome.MAX_LENGTH and unbroken.endswith("y…"), unbroken


def test_spent_exit_files_are_removed_by_the_next_recovery(project):
    """Exit files carry an outcome to whoever records it; once it is in the task file (and the worker record is
    dropped) the next `run`, `launch` or `recover` removes them (a state directory kept one per attempt ever made:
    22,000 after 22 runs of one 1000-task order at one path). Covered: a retried failure, a reviewed task (its
    work and review exit files). An exit file whose outcome is not recorded yet stays: here a worker's owner is
    SIGKILLed, the worker ends (exit 3), and the recovery that adopts it must leave the file to the adopter."""
    order = project.order()
    write_task(order, "RETRY", command="test -e tried || { touch tried; exit 1; }", target_files=["tried"],
               max_attempts=2)
    write_task(order, "REVIEWED", command="true", target_files=["r.txt"], review="true")
    gate = project.root / "gate"
    write_task(order, "ORPHAN", command=f"touch began; while [ ! -e {gate} ]; do sleep 0.05; done; exit 3",
               target_files=["x.txt"], max_attempts=1, priority="P0")
    assert project.aipm("launch", "ORD", "--max-workers", "1").returncode == 0
    record = state(project.root) / "workers" / "ORD" / "ORPHAN.json"
    wait_for((project.root / "began").exists)
    owner = json.loads(record.read_text())["owner_pid"]
    os.kill(owner, signal.SIGKILL)
    gate.touch()
    exits = state(project.root) / "exit" / "ORD"
    wait_for(lambda: (exits / "ORPHAN.1").exists() and (exits / "ORPHAN.1").read_text().split()[:1] == ["3"])
    assert project.aipm("run", "ORD", "--no-resource-monitoring").returncode == 1  # ORPHAN failed
    assert task_statuses(order) == {"RETRY": "DONE", "REVIEWED": "COMPLETED", "ORPHAN": "FAILED"}
    assert "exit 3" in yaml.safe_load((order / "ORPHAN.yaml").read_text())["reason"]
    assert project.aipm("recover", "ORD").returncode == 0
    assert list(exits.iterdir()) == []


def test_the_sweep_of_spent_exit_files_never_follows_a_link_nor_stops_at_a_directory(project, tmp_path):
    """A worker (unconfined, it can write aipm's state directory) that made the order's exit directory a link to
    one of the user's had every file there removed by the next sweep; a directory it made there failed every
    `run` and `recover` of the order with a traceback (unlink of a directory)."""
    write_task(project.order(), "T", command="true", target_files=["t.txt"])
    assert project.aipm("run", "ORD").returncode == 0
    exits = state(project.root) / "exit" / "ORD"
    exits.rmdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("the user's\n")
    exits.symlink_to(victim)
    proc = project.aipm("recover", "ORD")
    assert proc.returncode == 0, proc.stderr
    assert (victim / "notes.txt").read_text() == "the user's\n"
    exits.unlink()
    (exits / "made-by-a-worker").mkdir(parents=True)
    (exits / "T.9").write_text("0\n")  # spent: no record names it
    for args in (("recover", "ORD"), ("run", "ORD")):
        proc = project.aipm(*args)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in exits.iterdir()) == ["made-by-a-worker"]


def test_a_reviewer_whose_first_line_is_in_colour_has_its_verdict_recorded(project):
    """Linters and test runners print colour: the reason (the reviewer's first line) held ESC, the task file
    would not parse with it, and the task stayed IN_REVIEW with 'cannot record the outcome'."""
    write_task(project.order(), "T", target_files=["t.txt"], command="true", max_rework=0,
               review="printf '\\033[31mFAIL\\033[0m tests\\n'; exit 1")
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 1 and "cannot record" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert task_statuses(project.order()) == {"T": "REJECTED"}
    assert yaml.safe_load((project.order() / "T.yaml").read_text())["reason"] == "review rejected: FAIL tests"


def test_a_missing_review_program_is_refused_before_the_work_runs(project, tmp_path):
    """A typo in a review's program was found only once the work had run (and an agent been paid): its 127 was a
    rejection, the task sent back and run again until REJECTED, each attempt paid. It is refused at launch now, as
    a missing worker program is, naming what to fix; the work never runs. A shell line is the shell's to judge, and
    a path in the tree may be the task's own making: neither is refused."""
    order = project.order()
    write_task(order, "TASK", command="echo w > w.txt", target_files=["w.txt"], review=["no-such-reviewer-xyz", "x"])
    (project.root / "aipm.yaml").write_text('review:\n  command: ["no-such-default-reviewer-xyz"]\n')
    write_task(order, "DEFAULT", command="echo d > d.txt", target_files=["d.txt"])
    write_task(order, "MADE", command="printf '#!/bin/sh\\nexit 0\\n' > check.sh; chmod +x check.sh",
               target_files=["check.sh"], review=["./check.sh"])
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"failed   TASK: review: program 'no-such-reviewer-xyz' not found on PATH; install it or fix `review` in " \
           f"{order / 'TASK.yaml'}" in proc.stdout, proc.stdout
    assert "failed   DEFAULT: review: program 'no-such-default-reviewer-xyz' not found on PATH; install it or fix " \
           "review.command in aipm.yaml" in proc.stdout, proc.stdout
    assert project.statuses() == {"TASK": "QUEUED", "DEFAULT": "QUEUED", "MADE": "COMPLETED"}, proc.stdout
    assert not (project.root / "w.txt").exists() and not (project.root / "d.txt").exists()
    # --no-review runs no review: nothing to refuse
    proc = project.aipm("run", "ORD", "--no-review")
    assert proc.returncode == 0 and project.statuses()["TASK"] == "DONE", proc.stdout + proc.stderr


@pytest.mark.parametrize("edit", ["s/^review: .*/review: 'true'/", "/^review:/d"], ids=["weakened", "removed"])
def test_a_worker_that_rewrites_its_own_review_is_judged_by_the_one_it_started_with(project, edit):
    """A worker that made its review pass by editing its own task file (`review: "false"` → `"true"`, or the line
    removed) was approved by the review it chose (COMPLETED, or DONE unreviewed), with no word of the edit."""
    order = project.order()
    path = write_task(order, "W", command=f"sed -i \"{edit}\" {order / 'W.yaml'}; echo w > w.txt",
                      target_files=["w.txt"], review="false", max_rework=0)
    proc = project.aipm("run", "ORD")
    assert project.statuses() == {"W": "REJECTED"}, proc.stdout + proc.stderr
    assert "review rejected" in proc.stdout, proc.stdout
    assert "was edited while attempt 1 ran" in (project.root / ".aipm/logs/ORD/W.1.log").read_text()
    assert yaml.safe_load(path.read_text()).get("review") != "false"  # (the edit stays: the person's to keep or undo)


def test_an_empty_review_takes_a_task_out_of_the_projects_review(project):
    """With review.command in aipm.yaml, no task could go without it: `review: null` is the setting's, and `""` was
    refused (`is empty`). `""` is none now, as it is for workspace_setup."""
    (project.root / "aipm.yaml").write_text('review:\n  command: "exit 1"\n')
    order = project.order()
    write_task(order, "OWN", command="true", review="")
    write_task(order, "SETTING", command="true", max_rework=0)
    proc = project.aipm("run", "ORD")
    assert project.statuses() == {"OWN": "DONE", "SETTING": "REJECTED"}, proc.stdout + proc.stderr
