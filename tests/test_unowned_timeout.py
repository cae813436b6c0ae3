"""A task's time limit holds with no owner alive: the worker's wrapper keeps it (runner.begin, wrapper.c).

`run` SIGKILLed while a worker runs past its `timeout:` left the worker running, IN_PROGRESS, until another aipm
adopted it: the timeout lived only in the dead owner. Now the wrapper stops the group itself (SIGTERM, SIGKILL after
the grace) and notes it in the exit file, so the `recover` that comes later records the attempt as timed out, as a
live owner would have.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from aipm import runner, wrapper
from aipm.stopping import KILL_GRACE
from conftest import no_workers, state, task_statuses, wait_for, write_task
from invariants import group_alive

LIMIT = 2
# Generous: the limit, the wrapper's margin after it and the grace, with room for a loaded machine; far short of the
# command's own end (SLEEP), so a group that nobody stops is seen alive.
GONE_WITHIN = LIMIT + runner.LATE + KILL_GRACE + 20  # (runner.LATE: the margin the wrapper gives a live owner)
SLEEP = 120
# `run` as the CLI starts it, in a process where the compiled wrapper is not to be had (no compiler): the shell's.
_NO_COMPILED = ("import runpy, sys; from aipm import wrapper; wrapper._found['path'] = None; sys.argv[0] = 'aipm'; "
                "runpy.run_module('aipm', run_name='__main__')")


def _start_run(project, compiled: bool) -> subprocess.Popen:
    python = ["-m", "aipm"] if compiled else ["-c", _NO_COMPILED]
    return subprocess.Popen([sys.executable, *python, "--root", str(project.root), "run", "ORD"],
                            cwd=project.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, AIPM_ENABLE_MONITORING="false"))


def _running(pgid: int, name: str) -> bool:
    """`name` runs in the group: its wrapper had its go (a launcher killed before it runs nothing)."""
    for proc in psutil.process_iter(["name"]):
        try:
            if proc.info["name"] == name and os.getpgid(proc.pid) == pgid:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def _kill_owner_while_running(project, compiled: bool, phase: str = "work") -> int:
    """Start `run`, SIGKILL it once the task's `sleep` runs (in `phase`); the worker's process group."""
    run = _start_run(project, compiled)
    record = state(project.root) / "workers" / "ORD" / "TO.json"

    def sleeping() -> int:
        try:
            rec = json.loads(record.read_text())
        except (OSError, ValueError):
            return 0
        return rec["pgid"] if rec.get("phase") == phase and rec.get("pgid") and _running(rec["pgid"], "sleep") else 0

    try:
        pgid = wait_for(sleeping)
    finally:
        run.kill()
        run.wait()
    return pgid


def _ends_with_nobody_watching(project, pgid: int) -> None:
    """The group is gone by shortly after the limit with no aipm alive, and the task is still IN_PROGRESS (nothing
    recorded it: the wrapper only kept the limit)."""
    try:
        wait_for(lambda: not group_alive(pgid), GONE_WITHIN)
    finally:
        runner.signal_group(pgid, signal.SIGKILL)  # (before the fix: the test's own leftovers)
    assert task_statuses(project.root / "orders" / "ORD")["TO"] in ("IN_PROGRESS", "IN_REVIEW")


def _recovered(project) -> dict:
    assert project.aipm("recover", "ORD").returncode == 0
    order = project.root / "orders" / "ORD"
    # Until it ends for good: with an attempt left, the owner `recover` started records the first QUEUED, then runs
    # the next (a wait for "not running" saw that QUEUED in between, under load).
    wait_for(lambda: no_workers(project.root) and task_statuses(order)["TO"] in ("FAILED", "REJECTED"))
    return yaml.safe_load((order / "TO.yaml").read_text())


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled-wrapper", "shell-wrapper"])
@pytest.mark.parametrize("max_attempts", [1, 2])
def test_a_timeout_holds_when_its_owner_was_sigkilled(project, compiled, max_attempts):
    if compiled and wrapper.binary() is None:
        pytest.skip("the wrapper cannot be built here (no cc / x86-64)")
    write_task(project.order(), "TO", command=f"sleep {SLEEP}", timeout=LIMIT, max_attempts=max_attempts,
               target_files=["x"])
    pgid = _kill_owner_while_running(project, compiled)
    _ends_with_nobody_watching(project, pgid)
    task = _recovered(project)  # (with an attempt left, the owner `recover` started runs it: it times out too)
    assert (task["status"], task["attempts"], task["reason"]) == ("FAILED", max_attempts, f"timed out after {LIMIT} s")
    log = (project.root / ".aipm" / "logs" / "ORD" / "TO.1.log").read_text()
    assert "time limit passed with no owner stopping it" in log and "killed from outside" not in log, log
    assert f"attempt 1 ended: timed out after {LIMIT} s" in log, log


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled-wrapper", "shell-wrapper"])
def test_an_attempt_that_ended_past_its_limit_with_no_owner_is_no_success(project, compiled):
    """The wrapper keeps the limit only runner.LATE s after its owner's, so that a live owner stays the one that
    stops it. A command that ended by itself in between, exit 0, with its owner dead, was recorded DONE by the aipm
    that adopted it: the exit file now says when it ended (on the boot clock), past the record's deadline."""
    if compiled and wrapper.binary() is None:
        pytest.skip("the wrapper cannot be built here (no cc / x86-64)")
    late = LIMIT + 2  # past the owner's limit, well before the wrapper's (LIMIT + runner.LATE)
    assert late + 2 < LIMIT + runner.LATE
    write_task(project.order(), "TO", command=f"sleep {late}", timeout=LIMIT, max_attempts=1, target_files=["x"])
    pgid = _kill_owner_while_running(project, compiled)
    _ends_with_nobody_watching(project, pgid)
    task = _recovered(project)
    assert (task["status"], task["reason"]) == ("FAILED", f"timed out after {LIMIT} s"), task
    log = (project.root / ".aipm" / "logs" / "ORD" / "TO.1.log").read_text()
    assert "time limit passed with no owner stopping it" not in log, log  # it ended by itself, unstopped


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled-wrapper", "shell-wrapper"])
def test_a_command_that_ignores_the_sigterm_goes_with_its_whole_group_after_the_grace(project, compiled):
    if compiled and wrapper.binary() is None:
        pytest.skip("the wrapper cannot be built here (no cc / x86-64)")
    write_task(project.order(), "TO", command=f"trap '' TERM; sleep {SLEEP} & sleep {SLEEP}; wait", timeout=LIMIT,
               max_attempts=1, target_files=["x"])
    pgid = _kill_owner_while_running(project, compiled)
    _ends_with_nobody_watching(project, pgid)
    task = _recovered(project)
    assert (task["status"], task["reason"]) == ("FAILED", f"timed out after {LIMIT} s"), task


def test_a_timeout_holds_when_the_detached_owner_of_launch_was_sigkilled(project):
    write_task(project.order(), "TO", command=f"sleep {SLEEP}", timeout=LIMIT, max_attempts=1, target_files=["x"])
    assert project.aipm("launch", "ORD").returncode == 0
    record = state(project.root) / "workers" / "ORD" / "TO.json"
    rec = wait_for(lambda: record.exists() and (r := json.loads(record.read_text()))["pgid"]
                   and _running(r["pgid"], "sleep") and r)
    os.kill(rec["owner_pid"], signal.SIGKILL)  # its aipm.work
    _ends_with_nobody_watching(project, rec["pgid"])
    task = _recovered(project)
    assert (task["status"], task["reason"]) == ("FAILED", f"timed out after {LIMIT} s"), task


def test_a_review_timeout_holds_when_its_owner_was_sigkilled(project):
    write_task(project.order(), "TO", command="true", review=f"sleep {SLEEP}", timeout=LIMIT, max_attempts=1,
               max_rework=0, target_files=["x"])
    pgid = _kill_owner_while_running(project, True, phase="review")
    _ends_with_nobody_watching(project, pgid)
    task = _recovered(project)
    assert (task["status"], task["reason"]) == ("REJECTED", f"review timed out after {LIMIT} s"), task


def test_ps_says_a_worker_whose_owner_was_killed_runs_with_nobody_watching(project):
    """`aipm ps` said `alive` for it, as for any worker: nothing told that no aipm would record its end."""
    write_task(project.order(), "TO", command=f"sleep {SLEEP}", max_attempts=1, target_files=["x"])
    pgid = _kill_owner_while_running(project, wrapper.binary() is not None)
    try:
        [worker] = project.json("ps")["workers"]
        assert (worker["state"], worker["alive"]) == ("unowned", True), worker
        table = project.aipm("ps", env={"COLUMNS": "200"}, check=True).stdout  # (narrower, the cell wraps)
        assert "alive, its owner gone (aipm recover adopts it)" in table, table
        # ...and `why`, which said only "status is IN_PROGRESS"
        why = project.aipm("why", "TO").stdout
        assert "its attempt: alive, its owner gone (aipm recover adopts it)" in why, why
        assert project.json("why", "TO")["attempt_state"] == "unowned"
    finally:
        runner.signal_group(pgid, signal.SIGKILL)


def test_a_live_owners_timeout_is_the_only_sigterm_its_command_gets(project):
    """At the limit the owner SIGTERMs the group and gives it 5 s to end. The wrapper, which kept the limit only
    2 s after it, sent a second SIGTERM in the middle of the command's save: its trap ran twice and the save was cut
    short. Now the wrapper keeps it past that grace (runner.LATE)."""
    assert runner.LATE > KILL_GRACE
    terms = project.root / "terms"
    write_task(project.order(), "TO", timeout=LIMIT, max_attempts=1, target_files=["x"],
               command=f"trap 'echo TERM >> {terms}; sleep 3.5; exit 0' TERM; sleep {SLEEP} & wait")
    proc = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert terms.read_text() == "TERM\n"
    task = yaml.safe_load((project.root / "orders" / "ORD" / "TO.yaml").read_text())
    assert (task["status"], task["reason"]) == ("FAILED", f"timed out after {LIMIT} s"), task


def test_an_exec_run_by_a_worker_of_the_shell_wrapper_is_lent_its_slot(project):
    """Without the compiled wrapper, the shell's watchdog (which keeps the time limit) was a second child of the
    wrapper, so a worker with a limit (every one: the default is 1800 s) lent no slot to the `aipm exec` its
    command waited for: 'worker limit reached', exit 1, under max_workers 1."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\n")
    rc = project.root / "A.rc"
    write_task(project.order(), "L", target_files=["l.txt"], timeout=120,
               command=f"{sys.executable} -m aipm --root {project.root} exec SUB/A; echo $? > {rc}")
    write_task(project.order("SUB"), "A", target_files=["a.txt"], command="echo A > a.txt")
    proc = subprocess.run([sys.executable, "-c", _NO_COMPILED, "--root", str(project.root), "exec", "ORD/L"],
                          cwd=project.root, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, AIPM_ENABLE_MONITORING="false"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert rc.read_text() == "0\n", (project.root / ".aipm" / "logs" / "SUB" / "A.1.log").read_text()
    assert task_statuses(project.root / "orders" / "SUB") == {"A": "DONE"}
    assert no_workers(project.root)


def test_a_list_command_led_by_a_shell_builtin_keeps_its_limit_too(project):
    """`[time, sleep, 120]` runs in the shell wrapper (its first word is the shell's), which was given no limit to
    keep, as for a string of plain builtins that ends at once: with its owner killed it ran on past its timeout."""
    write_task(project.order(), "TO", command=["time", "sleep", str(SLEEP)], timeout=LIMIT, max_attempts=1,
               target_files=["x"])
    pgid = _kill_owner_while_running(project, wrapper.binary() is not None)
    _ends_with_nobody_watching(project, pgid)
    task = _recovered(project)
    assert (task["status"], task["reason"]) == ("FAILED", f"timed out after {LIMIT} s"), task


def test_an_owner_stopped_past_a_limit_its_attempt_ended_within_records_no_timeout(project, gate):
    """`run` stopped (Ctrl-Z, SIGSTOP) while its worker ended in time, and resumed past the limit: it took the
    deadline it found passed for a timeout, and the task that had ended well within it FAILED ("timed out", exit 0).
    The wrapper's end stamp says when the command ended."""
    limit = 5
    write_task(project.order(), "TO", command=f"until [ -e {gate} ]; do sleep 0.05; done", timeout=limit,
               max_attempts=1, target_files=["x"])
    run = _start_run(project, compiled=wrapper.binary() is not None)
    record = state(project.root) / "workers" / "ORD" / "TO.json"
    try:
        rec = wait_for(lambda: record.exists() and (r := json.loads(record.read_text())).get("deadline")
                       and r["pgid"] and _running(r["pgid"], "sleep") and r)
        run.send_signal(signal.SIGSTOP)
        gate.touch()
        wait_for(lambda: not group_alive(rec["pgid"]), GONE_WITHIN)  # it ended, its owner stopped
        exit_file = rec["exit_file"]
        ended = float(open(exit_file).read().split("@")[1])
        assert ended < rec["deadline"], "the command did not end within its limit: the machine is too slow here"
        wait_for(lambda: time.clock_gettime(time.CLOCK_BOOTTIME) > rec["deadline"] + 0.5, limit + 30)
        run.send_signal(signal.SIGCONT)
        assert run.wait(timeout=120) == 0
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    task = yaml.safe_load((project.root / "orders" / "ORD" / "TO.yaml").read_text())
    assert (task["status"], task["exit_code"]) == ("DONE", 0), task
    log = (project.root / ".aipm" / "logs" / "ORD" / "TO.1.log").read_text()
    assert "timeout" not in log, log


def test_an_end_stamp_a_live_worker_forged_does_not_stop_its_owners_timeout(project):
    """A worker that wrote an early end stamp into its exit file while it ran on: its owner trusted the stamp, sent
    no SIGTERM at the limit, and woke in a busy loop until the wrapper's own limit (10 s later) stopped it. The
    stamp is read only once the process has ended."""
    if wrapper.binary() is None:
        pytest.skip("the wrapper cannot be built here (no cc / x86-64)")
    forge = 'f=$(tr "\\0" "\\n" < /proc/$PPID/cmdline | sed -n 2p); echo "0 @1.00" > "$f"; '
    write_task(project.order(), "TO", command=forge + f"sleep {SLEEP}", timeout=LIMIT, max_attempts=1,
               target_files=["x"])
    proc = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    task = yaml.safe_load((project.root / "orders" / "ORD" / "TO.yaml").read_text())
    assert (task["status"], task["reason"]) == ("FAILED", f"timed out after {LIMIT} s"), task
    log = (project.root / ".aipm" / "logs" / "ORD" / "TO.1.log").read_text()
    assert "timeout: sending SIGTERM" in log and "no owner stopping it" not in log, log
