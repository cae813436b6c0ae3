"""`run` and `launch` hold back launches while the machine is overloaded, and start them when it recovers.

The load is driven through the AIPM_FAKE_LOAD test seam (a file re-read at every reading), not by loading the
machine.
"""

import json
import os
import subprocess
import sys

from aipm.resources import get_system_info
from conftest import no_workers, task_statuses, wait_for, write_task
from invariants import check, journal_command, spans


def loaded(readings: str) -> dict:
    """Environment for an aipm process that sees these (cpu, memory) readings; conftest turns monitoring off."""
    return {"AIPM_FAKE_LOAD": readings, "AIPM_ENABLE_MONITORING": "true"}


def live_workers(project):
    return [w for w in project.json("ps")["workers"] if w["alive"]]


def test_run_defers_under_load_and_resumes_when_it_falls(project):
    order = project.order()
    journal = project.root / "journal.txt"
    gate = project.root / "gate"
    load = project.root / "load"
    load.write_text("99,20")  # ≥ T+10: 25 % of 4 workers → 1
    for i in range(4):
        write_task(order, f"T{i}", command=journal_command(journal, f"while [ ! -e {gate} ]; do sleep 0.05; done"))
    env = {"AIPM_FAKE_LOAD": str(load)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD", "--max-workers", "4", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
    )
    wait_for(lambda: len(spans(journal)) == 1)
    # Held back: deferred tasks stay QUEUED and hold no lock.
    wait_for(lambda: len(live_workers(project)) == 1)
    statuses = task_statuses(order)
    assert sorted(statuses.values()) == ["IN_PROGRESS", "QUEUED", "QUEUED", "QUEUED"]
    assert len(live_workers(project)) == 1
    tmp = load.with_suffix(".tmp")
    tmp.write_text("10,20")
    tmp.replace(load)  # atomically: the monitor re-reads this file at every reading
    wait_for(lambda: len(spans(journal)) == 4, timeout=30)
    gate.touch()
    assert proc.wait(timeout=60) == 0
    events = [json.loads(line) for line in proc.stdout.read().splitlines()]
    deferred = [e for e in events if e["event"] == "deferred"]
    assert len(deferred[0]["tasks"]) == 3 and "busy" in deferred[0]["detail"]
    assert [e["event"] for e in events].count("started") == 4
    assert set(task_statuses(order).values()) == {"DONE"}
    assert check(journal, order, max_workers=4) == []
    assert no_workers(project.root)


def test_launch_lists_deferred_tasks_and_leaves_them_queued(project):
    order = project.order()
    gate = project.root / "gate"
    for i in range(3):
        write_task(order, f"T{i}", command=f"while [ ! -e {gate} ]; do sleep 0.05; done")
    proc = project.aipm("launch", "ORD", "--max-workers", "4", "--json", env=loaded("97,10"))
    out = json.loads(proc.stdout)
    assert len(out["launched"]) == 1 and [d["id"] for d in out["deferred"]] == ["T1", "T2"]
    assert all(d["reason"] == "resources" for d in out["deferred"])
    statuses = task_statuses(order)
    assert statuses["T1"] == "QUEUED" and statuses["T2"] == "QUEUED"
    gate.touch()
    wait_for(lambda: set(task_statuses(order).values()) == {"DONE"})  # each worker starts the next one
    wait_for(lambda: no_workers(project.root))


def test_no_auto_scaling_keeps_the_maximum(project):
    order = project.order()
    for i in range(3):
        write_task(order, f"T{i}", command="true")
    out = project.json("launch", "ORD", "--dry-run", "--no-auto-scaling", env=loaded("99,99"))
    assert len(out["launched"]) == 3 and out["deferred"] == []
    out = project.json("launch", "ORD", "--dry-run", "--max-cpu", "99.5", "--max-memory", "99.5",
                       env=loaded("99,99"))
    assert len(out["launched"]) == 3


def test_a_half_busy_machine_starts_one_worker_per_fresh_reading(project, monkeypatch):
    """Readings that change between starts: each start waits for a reading that shows what the last one did."""
    from aipm import launcher as launcher_module
    from aipm import resources
    from aipm.launcher import RAMP, Launcher
    from aipm.project import Project
    from aipm.settings import load_settings
    from aipm.view import OrderView

    order = project.order()
    gate = project.root / "gate"
    for i in range(5):
        write_task(order, f"T{i}", command=f"while [ ! -e {gate} ]; do sleep 0.05; done")
    # The workers' own processes (they start successors) see a quiet machine; this process reads the script.
    monkeypatch.setenv("AIPM_FAKE_LOAD", "10,10")
    script = iter([(60.0, 10.0), (70.0, 10.0), (96.0, 10.0)])
    readings = []
    monkeypatch.setattr(resources, "_fake_load", lambda: readings.append(next(script)) or readings[-1])
    monkeypatch.setattr(launcher_module, "RAMP_DELAY", 0)
    settings = load_settings(project.root, {"max_workers": 5, "enable_monitoring": True})
    launcher = Launcher(Project(project.root, settings.orders_dir), settings)
    view = OrderView(order, project.root, watch=False)
    try:
        first = launcher.launch(view)
        # 60 % is under the 85 % threshold, so all five could run; but the machine is half busy: one start only.
        assert [t["id"] for t in first.launched] == ["T0"]
        assert [(d["id"], d["reason"]) for d in first.deferred] == [(f"T{i}", RAMP) for i in range(1, 5)]
        report = launcher.launch_ramped(view)
        # 70 %: one more; 96 % (≥ T+10: a quarter of 5 → 1 worker, 2 alive): the rest wait for the load to fall.
        assert [t["id"] for t in report.launched] == ["T1"]
        assert [d["reason"] for d in report.deferred] == ["resources"] * 3
        assert readings == [(60.0, 10.0), (70.0, 10.0), (96.0, 10.0)]
    finally:
        gate.touch()
    wait_for(lambda: set(task_statuses(order).values()) == {"DONE"})  # the workers start the rest themselves
    wait_for(lambda: no_workers(project.root))


def test_a_ramp_up_starts_one_worker_per_delay_however_often_run_plans(project, monkeypatch):
    """`run` plans again at once when a worker starts or ends: on the reading the last start was allowed on, the
    ramp-up let one more start at each such plan, and with one slot left no ramp held at all (a `run` at 60 %
    started T4 and T5 within 10 ms when T1 ended). Now one start per RAMP_DELAY, whatever the plans in between."""
    from aipm import launcher as launcher_module
    from aipm.launcher import RAMP, Launcher
    from aipm.project import Project
    from aipm.settings import load_settings
    from aipm.view import OrderView

    order = project.order()
    gate = project.root / "gate"
    for i in range(3):
        write_task(order, f"T{i}", command=f"while [ ! -e {gate} ]; do sleep 0.05; done")
    monkeypatch.setenv("AIPM_FAKE_LOAD", "60,10")  # under the 85 % threshold, but half busy: a ramp
    clock = [1000.0]
    monkeypatch.setattr(launcher_module, "_now", lambda: clock[0], raising=False)
    settings = load_settings(project.root, {"max_workers": 2, "enable_monitoring": True})
    launcher = Launcher(Project(project.root, settings.orders_dir), settings)
    view = OrderView(order, project.root, watch=False)
    try:
        assert [t["id"] for t in launcher.launch(view).launched] == ["T0"]
        again = launcher.launch(view, recover=False)  # at once: one slot left, the same reading
        assert again.launched == [] and [(d["id"], d["reason"]) for d in again.deferred] == [("T1", RAMP)]
        clock[0] += launcher_module.RAMP_DELAY
        assert [t["id"] for t in launcher.launch(view, recover=False).launched] == ["T1"]
    finally:
        gate.touch()
    wait_for(lambda: no_workers(project.root))


def test_a_task_whose_launch_fails_does_not_take_the_ramps_start_from_the_tasks_after_it(project):
    """On a half-busy machine (a ramp: one start per fresh reading), T, ranked first, fails to launch every round
    (its program is missing) and took the ramp's one start each time: U, which could run, never started and the
    run waited for ever. A start made spends the ramp, not a start tried."""
    order = project.order()
    write_task(order, "T", target_files=["t.txt"], command=["no-such-program-of-aipm-tests", "x"])
    write_task(order, "U", target_files=["u.txt"], command="echo U > u.txt")
    proc = project.aipm("run", "ORD", "--json", env=loaded("60,10"), timeout=30)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert any(e["event"] == "launch_failed" and e["task"] == "T" for e in events), proc.stdout
    assert task_statuses(order) == {"T": "QUEUED", "U": "DONE"}, proc.stdout + proc.stderr
    assert proc.returncode == 1  # T can never start as it is: the run ends, saying so
    assert no_workers(project.root)


def test_an_exec_a_worker_runs_on_a_busy_machine_takes_its_workers_slot(project):
    """`aipm exec B` run by A's command, at 99 % cpu (≥ T+10: 25 % of 5 workers → the floor of 1), counted A as
    the one live worker: B was deferred ('machine busy') and the exec ended at once, exit 1, B QUEUED; waiting
    could not help while A waits for B. A waits for B, so B takes A's slot, as it would outside a worker."""
    order = project.order()
    inner = project.root / "inner.rc"
    write_task(order, "A", target_files=["inner.rc"], timeout=90, command=(
        f"{sys.executable} -m aipm --root {project.root} exec ORD/B; echo $? > {inner}"))
    write_task(order, "B", target_files=["b.txt"], command="echo B > b.txt")
    proc = project.aipm("exec", "ORD/A", env=loaded("99,20"))  # the worker inherits the readings
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert inner.read_text() == "0\n", (project.root / ".aipm" / "logs" / "ORD" / "A.1.log").read_text()
    assert task_statuses(order) == {"A": "DONE", "B": "DONE"}
    assert no_workers(project.root)


def test_exec_waits_while_the_machine_is_too_busy_for_its_task(project):
    """exec ended at once, exit 1, its task QUEUED, when the load deferred it (another worker live); run waits.
    Now it waits for a reading that lets its task start."""
    order = project.order()
    gate = project.root / "gate"
    load = project.root / "load"
    load.write_text("99,20")  # ≥ T+10: 1 worker, and A is it
    write_task(order, "A", target_files=["a.txt"], command=f"while [ ! -e {gate} ]; do sleep 0.05; done")
    write_task(order, "B", target_files=["b.txt"], command="echo B > b.txt")
    try:
        project.aipm("launch", "ORD", "--max-workers", "1", check=True)
        out = project.root / "exec.out"
        with open(out, "w") as handle:
            proc = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "exec", "ORD/B"],
                                    stdout=handle, stderr=subprocess.STDOUT, text=True,
                                    env={**os.environ, **loaded(str(load))})
        wait_for(lambda: "defer    B: machine busy" in out.read_text() or proc.poll() is not None)
        tmp = load.with_suffix(".tmp")
        tmp.write_text("10,20")
        tmp.replace(load)  # atomically: the monitor re-reads this file at every reading
        assert proc.wait(timeout=60) == 0, out.read_text()
        assert task_statuses(order)["B"] == "DONE"
    finally:
        gate.touch()
    wait_for(lambda: no_workers(project.root))


def test_each_deferral_line_names_its_own_reason(project):
    """A run deferring tasks for different reasons said one line, the first task's reason, for all of them:
    'defer C, N1, N2: waiting for 1 CPU(s) and 0 MB (0 CPU(s) ... free)' of N1 and N2, which declare no
    resources and were held back by the load. Each reason now has its own line, naming its tasks only."""
    cpus = get_system_info()["usable_cpus"]
    order = project.order()
    write_task(order, "BIG", priority="P0", resources={"cpus": cpus}, command="sleep 0.3")
    write_task(order, "C", resources={"cpus": 1}, command="true")
    write_task(order, "N1", command="true")
    write_task(order, "N2", command="true")
    # ≥ T+10: 25 % of 4 workers → 1, and BIG takes every CPU.
    proc = project.aipm("run", "ORD", "--max-workers", "4", "--json", env=loaded("99,20"))
    assert proc.returncode == 0, proc.stderr
    deferred = [e for e in map(json.loads, proc.stdout.splitlines()) if e["event"] == "deferred"]
    assert deferred
    for event in deferred:  # C waits for CPUs, or for the load once BIG is done; N1 and N2 only for the load
        assert "waiting for" not in event["detail"] or event["tasks"] == ["C"], event


def test_exec_parallel_on_a_half_busy_machine_starts_the_others_one_per_reading(project):
    """At 60 % cpu (under the 85 % threshold: every worker allowed, but a ramp-up, one start per fresh reading)
    `exec T0 --parallel` started T0 and then none of the others: they were launched once, at the reading T0's
    start had used, and never again, nor said to wait (found by a review)."""
    order = project.order()
    journal = project.root / "journal.txt"
    gate = project.root / "gate"
    for i in range(3):
        write_task(order, f"T{i}", command=journal_command(journal, f"while [ ! -e {gate} ]; do sleep 0.05; done"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "aipm", "--root", str(project.root), "exec", "T0", "--parallel", "--max-workers", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **loaded("60,10")},
    )
    try:
        # T0 waits for the gate, so its exec runs on: the others start while it does.
        wait_for(lambda: sorted(s.task for s in spans(journal)) == ["T0", "T1", "T2"] or proc.poll() is not None)
        assert sorted(s.task for s in spans(journal)) == ["T0", "T1", "T2"], proc.poll()
    finally:
        gate.touch()
    assert proc.wait(timeout=60) == 0
    wait_for(lambda: set(task_statuses(order).values()) == {"DONE"})  # the detached ones finish by themselves
    assert check(journal, order, max_workers=4) == []
    wait_for(lambda: no_workers(project.root))
