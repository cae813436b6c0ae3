"""The keeper (aipm/keeper.py): `run`'s workers are its children, with real exit codes whoever dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import no_workers, wait_for, write_task
from invariants import check, journal_command, spans
from test_run import start_run

from aipm.keeper import Keeper


def test_workers_of_a_run_are_the_keepers_children_with_real_exit_codes(project):
    order = project.order()
    seen = project.root / "seen"
    write_task(order, "OK", command=f"tr '\\0' ' ' < /proc/$PPID/cmdline > {seen}; echo \" $$\" >> {seen}")
    write_task(order, "THREE", command="exit 3", max_attempts=1)
    write_task(order, "KILLED", command=["sh", "-c", "kill -TERM $$"], max_attempts=1)
    write_task(order, "ARGV", command=["false"], max_attempts=1)
    run = start_run(project, "ORD", "--json")
    out, err = run.communicate(timeout=120)
    assert run.returncode == 1, out + err
    tasks = {t["id"]: t for t in project.json("status", "ORD")["tasks"]}
    assert {k: (t["status"], t["exit_code"]) for k, t in tasks.items()} == {
        "OK": ("DONE", 0), "THREE": ("FAILED", 3), "KILLED": ("FAILED", -signal.SIGTERM), "ARGV": ("FAILED", 1)}
    # No shell wrapper in between: the command's parent was the keeper, and its pid is the one recorded.
    parent, pid = seen.read_text().rsplit(" ", 1)
    assert "keeper.py" in parent, parent
    started = [json.loads(line) for line in out.splitlines() if '"started"' in line]
    assert int(pid) == next(e["pid"] for e in started if e["task"] == "OK")
    assert no_workers(project.root)


def _blocked_order(project, code: int):
    order = project.order()
    journal = project.root / "journal.txt"
    gate = project.root / "gate"
    write_task(order, "A", command=journal_command(journal, f"while [ ! -e {gate} ]; do sleep 0.02; done; (exit {code})"),
               max_attempts=1)
    return order, journal, gate


def _keeper_pid(run_pid: int) -> int:
    """The keeper a run started: its child running keeper.py."""
    children = Path(f"/proc/{run_pid}/task/{run_pid}/children").read_text().split()
    found = [int(c) for c in children if b"keeper.py" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(found) == 1, children
    return found[0]


def test_a_sigkilled_run_leaves_the_real_exit_code_to_the_next_run(project):
    order, journal, gate = _blocked_order(project, 3)
    first = start_run(project, "ORD")
    wait_for(lambda: spans(journal))
    keeper = _keeper_pid(first.pid)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    gate.touch()  # the worker ends after its owner is gone: only the keeper sees its exit code
    wait_for(lambda: not Path(f"/proc/{keeper}").exists())  # the keeper leaves once its last worker has
    second = project.aipm("run", "ORD")
    assert second.returncode == 1, second.stdout + second.stderr
    task = project.json("status", "ORD")["tasks"][0]
    assert (task["status"], task["exit_code"], task["attempts"]) == ("FAILED", 3, 1)
    assert "adopt    A" in second.stdout
    assert check(journal, order, max_workers=5) == []  # ran once
    assert no_workers(project.root)


def test_a_sigkilled_keeper_leaves_its_workers_to_the_run(project):
    order, journal, gate = _blocked_order(project, 4)
    run = start_run(project, "ORD")
    wait_for(lambda: spans(journal))
    os.kill(_keeper_pid(run.pid), signal.SIGKILL)
    gate.touch()
    assert run.wait(timeout=60) == 1
    task = project.json("status", "ORD")["tasks"][0]
    assert (task["status"], task["exit_code"]) == ("FAILED", 4)  # the run reaped it itself
    assert check(journal, order, max_workers=5) == []
    assert no_workers(project.root)


def test_a_worker_never_gets_its_go_when_the_run_dies_first(tmp_path):
    """A process holding the keeper's socket is SIGKILLed after the spawn, before the go: nothing runs."""
    journal = tmp_path / "ran"
    script = (
        "import sys, os; from aipm.keeper import Keeper; k = Keeper(); "
        f"pid = k.spawn(['sh', '-c', 'echo ran > {journal}'], dict(os.environ), {str(tmp_path)!r}, "
        f"{str(tmp_path / 'log')!r}, None, {str(tmp_path / 'exit')!r}, []); "
        "print(pid, k.pid, flush=True); sys.stdin.read()"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    worker, keeper = (int(x) for x in owner.stdout.readline().split())
    owner.send_signal(signal.SIGKILL)
    owner.wait(timeout=30)
    wait_for(lambda: not Path(f"/proc/{keeper}").exists())
    assert not Path(f"/proc/{worker}").exists()
    assert not journal.exists()  # the command never began
    assert not (tmp_path / "exit").exists()  # and no exit code claims it did


def test_go_and_exit_through_the_keeper(tmp_path):
    keeper = Keeper()
    try:
        pid = keeper.spawn(["sh", "-c", "echo $PPID; exit 7"], dict(os.environ), str(tmp_path), str(tmp_path / "log"),
                           None, str(tmp_path / "exit"), [])
        assert pid in keeper.children
        keeper.go(pid, True)
        ended = []
        wait_for(lambda: ended.extend(keeper.exits()) or ended)
        assert ended == [(pid, 7)]
        assert (tmp_path / "exit").read_text() == "7\n"  # written before the worker was reaped
        assert int((tmp_path / "log").read_text()) == keeper.pid
        assert pid not in keeper.children
    finally:
        keeper.close()
