"""The standby owner (standby.py) with real processes: its end, its children, its waits, its death."""

import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import time

import psutil

from conftest import no_workers, state, task_statuses, wait_for, write_task
from invariants import check, journal_command, pid_alive


def _gated(project, order, name, gates, **fields):
    gates[name] = project.root / f"gate-{name}"
    write_task(project.order(order), name, command=f"while [ ! -e {gates[name]} ]; do sleep 0.05; done",
               target_files=[name], **fields)


def _lock_free(project) -> bool:
    """Whether no process (this one included, by another descriptor) holds the launch lock now."""
    with open(state(project.root) / "launch.lock") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True  # (released as it closes)


def test_a_task_held_while_the_standby_decides_to_go_gets_a_standby(project, monkeypatch):
    """The standby's last look (it started B1, nothing left waiting) and the removal of its claim were two holds of
    the launch lock: a launch of a new B2 between them found B2 waiting for a slot and the standby still named, and
    started none; the standby then went away and B2 stayed QUEUED beside the slot P2's end freed. The launch is
    forced into that moment: the standby runs here (work.py --standby), and right after its look that left nothing
    waiting the launch runs to its end, when the launch lock is free then."""
    from aipm import standby, work
    from aipm.launcher import Launcher
    from aipm.runtime import Runtime

    (project.root / "aipm.yaml").write_text("max_workers: 2\n")
    gates = {}
    for name in ("P1", "P2"):
        _gated(project, "P", name, gates)
    _gated(project, "B", "B1", gates)
    actor = []
    real = Launcher.launch

    def launch(self, view, *args, **kwargs):
        report = real(self, view, *args, **kwargs)
        if view.order.id == "B" and not standby.held(report) and not actor:
            write_task(project.order("B"), "B2", command="true", target_files=["B2"])
            actor.append(subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "launch", "B",
                                           "--json", "--no-resource-monitoring"], stdout=subprocess.PIPE, text=True))
            if _lock_free(project):
                actor[0].wait(timeout=60)
        return report

    try:
        assert project.aipm("launch", "P", "--no-resource-monitoring").returncode == 0
        runtime = Runtime(project.root)
        with runtime.launch_lock():  # as `aipm launch B` names the standby it starts
            standby.claim(runtime, "B", os.getpid(), ["B1"], [])
        gates["P1"].touch()
        wait_for(lambda: not (state(project.root) / "workers" / "P" / "P1.json").exists())
        monkeypatch.setattr(Launcher, "launch", launch)
        assert work.main([str(project.root), str(project.order("B")), "--standby", "--order-id", "B",
                          "--max-workers", "2", "--no-resource-monitoring"]) == 0
        out, _ = actor[0].communicate(timeout=60)
        assert json.loads(out)["standby"]["tasks"] == ["B2"]
        assert task_statuses(project.order("B")) == {"B1": "IN_PROGRESS", "B2": "QUEUED"}
        gates["P2"].touch()
        # B1 still runs: only a standby can start B2 in P2's slot
        wait_for(lambda: task_statuses(project.order("B"))["B2"] == "DONE", timeout=30)
        assert task_statuses(project.order("B"))["B1"] == "IN_PROGRESS"
    finally:
        for gate in gates.values():
            gate.touch()
    wait_for(lambda: task_statuses(project.order("B")) == {"B1": "DONE", "B2": "DONE"}, timeout=30)
    wait_for(lambda: not project.json("ps")["standby"] and no_workers(project.root))


def test_the_standby_reaps_the_owners_it_started(project):
    """The standby started B0's owner as its child and never waited for it: it stayed a zombie for as long as the
    standby waited for a slot for B2 (one more for every task it started)."""
    (project.root / "aipm.yaml").write_text("max_workers: 2\n")
    gates = {}
    for name in ("P1", "P2"):
        _gated(project, "P", name, gates)
    write_task(project.order("B"), "B0", command="true", target_files=["B0"], priority="P0")
    for name in ("B1", "B2"):
        _gated(project, "B", name, gates)
    try:
        assert project.aipm("launch", "P", "--no-resource-monitoring").returncode == 0
        assert project.aipm("launch", "B", "--no-resource-monitoring").returncode == 0
        pid = project.json("ps")["standby"][0]["pid"]
        gates["P1"].touch()
        # B0 ran in P1's slot, and its owner started B1 in B0's at its end: B2 waits, and the standby with it
        wait_for(lambda: task_statuses(project.order("B")) == {"B0": "DONE", "B1": "IN_PROGRESS", "B2": "QUEUED"},
                 timeout=30)
        assert [s["tasks"] for s in project.json("ps")["standby"]] == [["B2"]]
        wait_for(lambda: not any(c.status() == psutil.STATUS_ZOMBIE for c in psutil.Process(pid).children()),
                 timeout=20)
        assert pid_alive(pid)
    finally:
        for gate in gates.values():
            gate.touch()
    wait_for(lambda: set(task_statuses(project.order("B")).values()) == {"DONE"}, timeout=30)
    wait_for(lambda: not project.json("ps")["standby"] and no_workers(project.root))


def test_the_standby_does_not_poll_an_owner_stopped_with_its_outcome(project):
    """P1's worker ended and its owner was stopped (Ctrl-Z) before recording it: the standby looked again every
    0.2 s (FINISHING_RECHECK) for as long as it stayed stopped, a whole launch round each time (its claim, written
    each round, tells the rounds). It waits for that owner's end instead, and starts B1 once it went on."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\n")
    gates = {}
    _gated(project, "P", "P1", gates)
    _gated(project, "B", "B1", gates)
    owner = None
    try:
        assert project.aipm("launch", "P", "--no-resource-monitoring").returncode == 0
        assert project.aipm("launch", "B", "--no-resource-monitoring").returncode == 0
        rec = json.loads((state(project.root) / "workers" / "P" / "P1.json").read_text())
        owner = rec["owner_pid"]
        os.kill(owner, signal.SIGSTOP)
        gates["P1"].touch()
        wait_for(lambda: not pid_alive(rec["pid"]))
        claim = state(project.root) / "standby" / "B.json"
        seen, deadline = set(), time.monotonic() + 3
        while time.monotonic() < deadline:
            seen.add(json.loads(claim.read_text())["since"])
            time.sleep(0.02)
        assert len(seen) <= 2, f"{len(seen)} rounds in 3 s"
        assert task_statuses(project.order("B")) == {"B1": "QUEUED"}
        os.kill(owner, signal.SIGCONT)
        wait_for(lambda: task_statuses(project.order("B"))["B1"] == "IN_PROGRESS", timeout=30)
    finally:
        if owner is not None:
            os.kill(owner, signal.SIGCONT)
        for gate in gates.values():
            gate.touch()
    wait_for(lambda: task_statuses(project.order("B")) == {"B1": "DONE"}, timeout=30)
    wait_for(lambda: not project.json("ps")["standby"] and no_workers(project.root))


def test_sigkill_of_the_standby_while_it_starts_tasks_leaves_each_task_to_run_once(project):
    """The standby killed at a seeded moment while P's quick tasks free slots for B's: whatever it had half done (a
    status written, its owner spawned, no record yet), a later `run` of each order ends every task DONE, each run
    once, never more than the worker limit at a time."""
    (project.root / "aipm.yaml").write_text("max_workers: 2\n")
    rng = random.Random(6)
    for trial in range(3):
        journal = project.root / f"journal{trial}.txt"
        orders = {name: project.order(f"{name}{trial}") for name in ("P", "B")}
        for name, order in orders.items():
            for i in range(8):
                write_task(order, f"{name}{i}", command=journal_command(journal, "sleep 0.1"),
                           target_files=[f"{name}{trial}-{i}"])
        assert project.aipm("launch", orders["P"].name, "--no-resource-monitoring").returncode == 0
        assert project.aipm("launch", orders["B"].name, "--no-resource-monitoring").returncode == 0
        found = [s for s in project.json("ps")["standby"] if s["order"] == orders["B"].name]
        assert found, f"trial {trial}: B waits for a slot P holds, with a standby"
        time.sleep(rng.uniform(0.2, 1.5))
        os.kill(found[0]["pid"], signal.SIGKILL)
        for order in orders.values():
            run = project.aipm("run", order.name, "--no-resource-monitoring", timeout=120)
            assert run.returncode == 0, run.stdout + run.stderr
        wait_for(lambda: no_workers(project.root), timeout=30)
        for order in orders.values():
            assert set(task_statuses(order).values()) == {"DONE"}
        for order in orders.values():
            assert check(journal, order, max_workers=2) == [], f"trial {trial}"


def test_a_launch_given_other_settings_replaces_the_standby_it_would_have_named(project):
    """max_workers 2, both slots held by P. `launch B` on a busy machine (monitoring on, a load that allows one
    worker) leaves a standby that reads the load; `launch B --no-resource-monitoring` then said that standby would
    start B1 and B2, and it did, one at a time by the load it still read: B1 and B2, each waiting for the other to
    have started, never ran together. Now the second launch names a standby of its own settings, the first one
    leaves, and B1 and B2 start together once P's slots free."""
    (project.root / "aipm.yaml").write_text("max_workers: 2\n")
    gates = {}
    for name in ("P1", "P2"):
        _gated(project, "P", name, gates)
    both = " && ".join(f"[ -e {project.root}/started-{n} ]" for n in ("B1", "B2"))
    for name in ("B1", "B2"):  # each waits (20 s at most) for the other to have started, then exits 0, else 1
        write_task(project.order("B"), name, target_files=[name], command=(
            f"touch {project.root}/started-{name}; i=0; until {both}; do i=$((i+1)); "
            f"[ $i -gt 400 ] && exit 1; sleep 0.05; done"))
    try:
        assert project.aipm("launch", "P", "--no-resource-monitoring").returncode == 0
        busy = {"AIPM_ENABLE_MONITORING": "true", "AIPM_FAKE_LOAD": "100,10"}
        first = project.json("launch", "B", env=busy)["standby"]
        second = project.json("launch", "B", "--no-resource-monitoring")["standby"]
        assert first["tasks"] == second["tasks"] == ["B1", "B2"] and first["pid"] != second["pid"], (first, second)
        assert project.json("ps")["standby"] == [{"order": "B", "pid": second["pid"], "tasks": ["B1", "B2"]}]
        wait_for(lambda: not pid_alive(first["pid"]), timeout=30)  # (it leaves at its next look)
        for gate in gates.values():
            gate.touch()
        wait_for(lambda: set(task_statuses(project.order("B")).values()) <= {"DONE", "FAILED"}, timeout=60)
        assert task_statuses(project.order("B")) == {"B1": "DONE", "B2": "DONE"}
        third = project.json("launch", "B", "--no-resource-monitoring")
        assert third["standby"] is None and third["launched"] == [], third
    finally:
        for gate in gates.values():
            gate.touch()
    wait_for(lambda: not project.json("ps")["standby"] and no_workers(project.root), timeout=30)


def test_a_launch_failure_the_standby_or_an_owner_meets_is_said_and_ends_logs_follow(project):
    """V1 (its program missing) waited for V2's slot; the owners that met its failure later said nothing: the
    standby.log empty, `logs ORD` only V2's lines, `logs ORD -f` followed for ever, no notify, while `run` says
    `failed V1: …` and ends (exit 1)."""
    notes = project.root / "notes.txt"
    (project.root / "aipm.yaml").write_text(f"notify: 'echo \"$AIPM_EVENT $AIPM_STATUS\" >> {notes}'\n")
    order = project.order()
    write_task(order, "V1", priority="P3", target_files=["o1.txt"], command=["nonexistent-prog-xyz", "a"])
    write_task(order, "V2", priority="P0", target_files=["o2.txt"], command="sleep 1")
    project.aipm("launch", "ORD", "--max-workers", "1", "--no-resource-monitoring", check=True)
    early = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "logs", "ORD", "-f"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # following as V1 fails
    claim = state(project.root) / "standby" / "ORD.json"
    wait_for(lambda: task_statuses(order)["V2"] == "DONE" and no_workers(project.root) and not claim.exists())
    missing = "failed V1: program 'nonexistent-prog-xyz' not found on PATH"
    assert missing in (project.root / ".aipm" / "logs" / "ORD" / "standby.log").read_text()
    said = project.aipm("logs", "ORD", check=True)
    why = "aipm: ORD: V1 will not start by itself: its last launch failed: program 'nonexistent-prog-xyz' not found"
    assert why in said.stderr, said.stdout + said.stderr
    followed = project.aipm("logs", "ORD", "-f", timeout=30)  # (it followed for ever)
    assert followed.returncode == 0 and why in followed.stderr, followed.stdout + followed.stderr
    try:
        out, err = early.communicate(timeout=30)
    finally:
        early.kill()
    assert early.returncode == 0 and why in err, out + err
    wait_for(lambda: notes.exists() and "order_finished INCOMPLETE" in notes.read_text())
    assert task_statuses(order)["V1"] == "QUEUED"
