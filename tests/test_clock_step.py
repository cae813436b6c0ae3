"""The wall clock stepped while workers run (an NTP step, a VM or laptop resumed, `date -s`): a process's start
time, as aipm tells a live worker from a reused pid, must not move with it, or every command started after the
step takes the live workers and their owners for dead."""

import os
from pathlib import Path

import pytest

from conftest import task_statuses, wait_for, write_task
from test_hostile_workers import _record, _started

HOOK = Path(__file__).parent / "hooks" / "clock_step"


@pytest.mark.parametrize("step", [3600, -3600])
def test_a_clock_step_leaves_a_running_worker_alive_for_later_commands(project, gate, step):
    """`aipm recover` after the clock was stepped an hour took T's live worker and its live `run` for dead: it
    ended the worker's command and re-queued T, which then ran a second time."""
    order = project.order()
    journal = project.root.parent / f"{project.root.name}.journal"
    write_task(order, "T", target_files=["a.txt"],
               command=f"echo began >> {journal}; while [ ! -e {gate} ]; do sleep 0.05; done")
    run, out = _started(project, "run", "ORD")
    try:
        wait_for(lambda: _record(project, "T") and journal.exists())
        stepped = {"AIPM_CLOCK_STEP": str(step), "PYTHONPATH": f"{HOOK}:{os.environ.get('PYTHONPATH', '')}"}
        recover = project.aipm("recover", "ORD", env=stepped)
        status = project.json("status", "ORD", env=stepped)
        ps = project.json("ps", env=stepped)
    finally:
        gate.touch()
    assert run.wait(timeout=120) == 0, out.read_text()
    assert recover.stdout == "nothing to recover\n", recover.stdout + recover.stderr
    assert [task["status"] for task in status["tasks"]] == ["IN_PROGRESS"], status
    assert [worker["state"] for worker in ps["workers"]] == ["alive"], ps
    assert journal.read_text() == "began\n" and task_statuses(order) == {"T": "DONE"}


def test_a_start_time_recorded_before_the_boot_id_base_still_names_its_live_process():
    """Records of a run begun under an aipm that counted start times from /proc/stat's btime (psutil's
    create_time) keep their live workers alive for the aipm that replaced it, and a pid reused stays told apart."""
    import subprocess

    import psutil

    from aipm.liveness import led_by_another, process_alive, process_ctime

    child = subprocess.Popen(["sleep", "30"])
    try:
        before = psutil.Process(child.pid).create_time()
        assert process_alive(child.pid, before) and not led_by_another(child.pid, before)
        assert not process_alive(child.pid, before + 1) and led_by_another(child.pid, before - 1)
        assert process_alive(child.pid, process_ctime(child.pid))
    finally:
        child.kill()
        child.wait()


def test_a_clock_step_during_an_attempt_does_not_time_it_out(project, gate):
    """A run whose clock was stepped forward an hour while T (timeout 1800 s) ran a few seconds killed it at its
    next wake-up and recorded 'timed out after 1800 s': the deadline was a wall-clock time."""
    order = project.order()
    step = project.root.parent / f"{project.root.name}.stepped"
    write_task(order, "T", target_files=["a.txt"], timeout=1800,
               command=f"while [ ! -e {gate} ]; do sleep 0.05; done")
    env = {**os.environ, "AIPM_CLOCK_STEP": "3600", "AIPM_CLOCK_STEP_AT": str(step),
           "PYTHONPATH": f"{HOOK}:{os.environ.get('PYTHONPATH', '')}"}
    run, out = _started(project, "run", "ORD", env=env)
    try:
        wait_for(lambda: _record(project, "T"))
        step.touch()
    finally:
        gate.touch()
    assert run.wait(timeout=120) == 0, out.read_text()
    assert task_statuses(order) == {"T": "DONE"}


def test_a_start_time_is_the_same_seen_from_a_time_namespace_with_its_boot_clock_shifted(tmp_path):
    """A process in a time namespace (`unshare --boottime`, a CRIU restore) reads every start time shifted by its
    boot clock's offset; counted from the boot_id alone, its start times disagreed with everyone else's, and it
    took the project's live workers for dead."""
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a time namespace")
    child = subprocess.Popen(["sleep", "30"])
    try:
        read = [sys.executable, "-c", f"from aipm.liveness import process_ctime; print(process_ctime({child.pid}))"]
        outside = subprocess.run(read, capture_output=True, text=True, check=True).stdout
        inside = subprocess.run(["unshare", "--time", "--boottime", "100000", "--fork", *read], capture_output=True,
                                text=True)
        if inside.returncode != 0:
            pytest.skip(f"no time namespace here: {inside.stderr.strip()}")
        assert inside.stdout == outside
    finally:
        child.kill()
        child.wait()
