"""`aipm launch` and detached workers, with real processes, locks and files."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import no_workers, snapshot, state, task_statuses, wait_for, write_task
from invariants import check, journal_command, pid_alive, random_order, spans


def all_final(order_dir, final=("DONE", "COMPLETED", "FAILED", "REJECTED", "CANCELLED")):
    statuses = task_statuses(order_dir)
    return statuses and all(s in final for s in statuses.values())


def test_four_racing_launchers_never_double_start_or_overlap(project):
    # Ten short orders rather than twenty long ones: the launchers race at each start, and a hand-over in a
    # detached chain costs a Python start (~0.25 s here), so 20 × 30 tasks took 2-3 minutes of the suite.
    for rep in range(10):
        order = project.order(f"RACE{rep}")
        journal = project.root / f"journal{rep}.txt"
        random_order(order, journal, n=15, seed=rep, work="sleep 0.01")
        procs = [
            subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "launch", order.name,
                              "--no-resource-monitoring"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(4)
        ]
        for p in procs:
            assert p.wait(timeout=60) in (0, 1)
        wait_for(lambda: all_final(order), timeout=120)
        wait_for(lambda: no_workers(project.root), timeout=30)
        assert set(task_statuses(order).values()) == {"DONE"}
        problems = check(journal, order, max_workers=5)
        assert problems == [], f"repetition {rep}: {problems}"


def test_chain_completes_after_one_launch(project):
    order = project.order()
    journal = project.root / "j.txt"
    write_task(order, "A", command=journal_command(journal), target_files=["a"])
    write_task(order, "B", command=journal_command(journal), depends_on=["A"], target_files=["a"])
    write_task(order, "C", command=journal_command(journal), depends_on=["B"])
    project.aipm("launch", "ORD", check=True)
    wait_for(lambda: task_statuses(order) == {"A": "DONE", "B": "DONE", "C": "DONE"})
    wait_for(lambda: no_workers(project.root))
    assert check(journal, order) == []


def test_dry_run_changes_no_byte(project):
    order = project.order()
    for i in range(3):
        write_task(order, f"T{i}", command="touch should-not-exist")
    before = snapshot(project.root)
    out = project.json("launch", "ORD", "--dry-run")
    assert [t["id"] for t in out["launched"]] == ["T0", "T1", "T2"]
    assert snapshot(project.root) == before
    assert not (project.root / ".aipm").exists()


def test_missing_program_is_rolled_back_while_siblings_run(project):
    order = project.order()
    write_task(order, "BAD", command=["no-such-program-aipm-test", "--x"])
    write_task(order, "GOOD1", command="true")
    write_task(order, "GOOD2", command=["true"])
    proc = project.aipm("launch", "ORD", "--json")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert [f["id"] for f in out["failed"]] == ["BAD"]
    assert "no-such-program-aipm-test" in out["failed"][0]["error"]
    wait_for(lambda: task_statuses(order).get("GOOD1") == "DONE" and task_statuses(order).get("GOOD2") == "DONE")
    wait_for(lambda: no_workers(project.root))
    bad = project.json("status", "ORD")["tasks"][0]
    assert bad["id"] == "BAD" and bad["status"] == "QUEUED" and bad["attempts"] == 0


@pytest.mark.parametrize("command", ["launch", "run"])
def test_a_task_whose_start_failed_keeps_no_file_from_the_tasks_ranked_after_it(project, command):
    """A P0 whose program is missing was chosen first, failed at its start and kept its file "first this round"
    from a P3 sharing it: `launch` started nothing, and `run` ended with both QUEUED (found by a review)."""
    order = project.order()
    write_task(order, "BAD", priority="P0", target_files=["a.py"], command=["no-such-program-aipm-test"])
    write_task(order, "LOW", priority="P3", target_files=["a.py"], command="true")
    proc = project.aipm(command, "ORD")
    assert proc.returncode == 1 and "no-such-program-aipm-test" in proc.stdout + proc.stderr
    wait_for(lambda: task_statuses(order) == {"BAD": "QUEUED", "LOW": "DONE"})
    wait_for(lambda: no_workers(project.root))


def _worker(project, task):
    def find():
        for w in project.json("ps")["workers"]:
            if w["task"] == task and w["pgid"] and w["alive"]:
                return w
    return wait_for(find)


@pytest.mark.parametrize("max_attempts", [1, 2])
def test_sigkill_of_a_worker_frees_its_locks_and_retries_or_fails(project, max_attempts):
    order = project.order()
    write_task(order, "SLOW", command="sleep 60", target_files=["shared.txt"], max_attempts=max_attempts)
    write_task(order, "NEXT", command="true", target_files=["shared.txt"], priority="P3")
    project.aipm("launch", "ORD", check=True)
    for attempt in range(1, max_attempts + 1):
        worker = wait_for(lambda: (w := _worker(project, "SLOW")) and w["attempt"] == attempt and w)
        os.kill(worker["pgid"], signal.SIGKILL)  # the worker's own process, not its group
    wait_for(lambda: task_statuses(order)["SLOW"] == "FAILED")
    # Its files are free: NEXT, which shares them, ran to the end.
    wait_for(lambda: task_statuses(order)["NEXT"] == "DONE")
    wait_for(lambda: no_workers(project.root))
    assert project.json("status", "ORD")["tasks"][1]["attempts"] == max_attempts
    assert project.json("locks")["locks"] == []
    log = (project.root / ".aipm" / "logs" / "ORD" / f"SLOW.{max_attempts}.log").read_text()
    assert "killed by SIGKILL" in log


def test_record_with_reused_pid_counts_as_dead(project):
    order = project.order()
    write_task(order, "A", command="true", target_files=["x"])
    path = order / "A.yaml"
    path.write_text(path.read_text() + "status: IN_PROGRESS\nattempts: 1\n")
    record_dir = state(project.root, make=True) / "workers" / "ORD"
    record_dir.mkdir(parents=True)
    # A live pid (this test process) with the wrong start time: a reused pid, not our worker.
    record = {"order": "ORD", "order_dir": str(order), "task": "A", "task_file": str(path), "attempt": 1,
              "targets": ["x"], "log": str(project.root / "a.log"), "exit_file": str(project.root / "nope"),
              "started_at": "x", "owner_pid": os.getpid(), "owner_ctime": 1.0, "pid": os.getpid(), "ctime": 1.0,
              "pgid": os.getpid()}
    (record_dir / "A.json").write_text(json.dumps(record))
    detect = project.json("detect", "ORD")
    assert detect["stale"] == ["A"]
    out = project.json("recover", "ORD")
    assert out["recovered"] == [{"order": "ORD", "id": "A", "action": "requeued"}]
    assert task_statuses(order)["A"] == "QUEUED"
    assert not (record_dir / "A.json").exists()


def test_a_released_worker_whose_file_was_reset_is_neither_planned_again_nor_stops_holding_it(project):
    """The wake-up that hands an ended attempt's files on (`released`) must still count its worker as this
    owner's: when its file was reset to QUEUED under it (an agent's `git checkout`), it is not a task to start
    again, and its files stay held by it (B, wanting the same file, waits for its outcome)."""
    from aipm.launcher import Launcher, Options
    from aipm.liveness import process_ctime
    from aipm.project import Project
    from aipm.record import Record
    from aipm.settings import load_settings
    from aipm.view import OrderView

    order = project.order()
    a = write_task(order, "A", command="true", target_files=["s.txt"], priority="P0", attempts=1)  # reset: QUEUED
    write_task(order, "B", command="true", target_files=["s.txt"], priority="P2")
    settings = load_settings(project.root, {"enable_monitoring": False})
    launcher = Launcher(Project(project.root, settings.orders_dir), settings, Options(dry_run=True))
    rt = launcher.runtime
    rt.ensure()
    rt.write_record(Record(order="ORD", order_dir=str(order), task="A", task_file=str(a), attempt=1,
                           targets=["s.txt"], log=str(rt.log_path("ORD", "A", 1)),
                           exit_file=str(rt.exit_path("ORD", "A", 1)), started_at="2026-12-02T00:00:00+00:00",
                           owner_pid=os.getpid(), owner_ctime=process_ctime(os.getpid())))  # its worker ended
    report = launcher.launch(OrderView(order, project.root, watch=False), explain=False, recover=False,
                             ending=["ORD/A"], released=["ORD/A"], ranked_before=[])
    assert report.launched == [] and report.failed == []


def test_a_running_task_whose_target_is_the_whole_project_is_read_back_by_the_next_launch(project):
    """The root target was recorded as "" in its worker record, which the next launcher could not read back:
    every `launch` while it ran ended in a traceback."""
    order = project.order()
    write_task(order, "ROOT", command="sleep 30", target_files=["."], priority="P0")
    write_task(order, "B", command="true", target_files=["b.txt"])
    first = project.aipm("launch", "ORD", "--json")
    assert first.returncode == 0 and [t["id"] for t in json.loads(first.stdout)["launched"]] == ["ROOT"], first.stderr
    again = project.aipm("launch", "ORD", "--json")
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    assert json.loads(again.stdout)["launched"] == []  # B overlaps the whole project, which ROOT holds
    assert project.aipm("cancel", "ORD/ROOT").returncode == 0
    wait_for(lambda: no_workers(project.root))


def test_launchs_deferred_lines_are_printed_as_they_are(capsys):
    """A deferral's detail may name a lock node, a real path that may hold brackets (a target reached through a
    symlink into `d[x]/`): `launch` printed it through rich markup, so `[bold]` vanished and `[/x]` ended the
    command in a MarkupError traceback, the workers it had started left unsaid."""
    from aipm.cli.cmd_launch import say_launched
    from aipm.launcher import LaunchReport
    from aipm.plan import Plan

    details = ["d[/x]/f.txt is locked by another worker", "d[bold]y/g.txt is held by pid 7, not an aipm worker"]
    report = LaunchReport(launched=[{"id": "S", "pid": 5}], plan=Plan(),
                          deferred=[{"id": f"T{i}", "reason": "file_busy", "detail": d} for i, d in enumerate(details)])
    say_launched(report, [], "ORD", dry_run=False)
    assert capsys.readouterr().out.splitlines() == ["started S (pid 5)", f"deferred T0: {details[0]}",
                                                    f"deferred T1: {details[1]}"]


def test_a_launch_that_starts_nothing_says_why_each_queued_task_waits(project, gate):
    """It said only `nothing to launch (see aipm detect)` while B waited for A's file and C for A to end, which
    read as aipm ignoring them (A's owner starts them at A's end). Now it says why, as detect does (--json:
    `blocked`), and once nothing is QUEUED it says that."""
    order = project.order()
    write_task(order, "A", command=f"while [ ! -e {gate} ]; do sleep 0.05; done", target_files=["f.txt"])
    write_task(order, "B", command="true", target_files=["f.txt"])
    write_task(order, "C", command="true", target_files=["g.txt"], depends_on=["A"])
    assert project.aipm("launch", "ORD", "--no-resource-monitoring").returncode == 0
    launch = project.aipm("launch", "ORD", "--no-resource-monitoring")
    assert (launch.returncode, launch.stdout) == (0, "nothing to launch in ORD now:\n"
                                                  "  B: f.txt is held by running task A (IN_PROGRESS)\n"
                                                  "  C: waiting on A (IN_PROGRESS)\n"), launch.stdout + launch.stderr
    said = project.json("launch", "ORD", "--no-resource-monitoring")
    assert [(b["id"], b["reason"]) for b in said["blocked"]] == [("B", "file_busy"), ("C", "waiting_on_dependencies")], said
    gate.touch()
    wait_for(lambda: set(task_statuses(order).values()) == {"DONE"} and no_workers(project.root), timeout=30)
    assert project.aipm("launch", "ORD").stdout == "nothing to launch in ORD now: no task of ORD is QUEUED\n"


def test_launch_json_says_the_tasks_it_started_are_running_in_its_blocked_details(project, gate):
    """The plan's details were made before its starts: `blocked` said b was `waiting on a (QUEUED)` beside
    `launched: [a]`, where `detect` said IN_PROGRESS right after."""
    order = project.order()
    write_task(order, "a", command=f"while [ ! -e {gate} ]; do sleep 0.05; done", target_files=["a.txt"])
    write_task(order, "b", command="true", target_files=["b.txt"], depends_on=["a"])
    said = project.json("launch", "ORD", "--no-resource-monitoring")
    assert [t["id"] for t in said["launched"]] == ["a"], said
    assert [(b["id"], b["detail"]) for b in said["blocked"]] == [("b", "waiting on a (IN_PROGRESS)")], said
    gate.touch()
    wait_for(lambda: set(task_statuses(order).values()) == {"DONE"} and no_workers(project.root), timeout=30)


@pytest.mark.parametrize("watcher", [False, True])
def test_an_order_run_by_launch_alone_tells_its_end_once_whoever_finds_it(project, gate, watcher):
    """Only `run` sent `order_finished`, so an order run by `aipm launch` alone never told its end. Now the owner
    that leaves it settled tells it, once: four detached owners end at the same moment (one gate), and with
    `watcher` an `aipm run` watching them finds the same end; aipm notes each event it sends in notify.log before
    starting the command, so once every owner and the run have exited, that log says how many were sent."""
    notes = project.root / "notes.txt"
    (project.root / "aipm.yaml").write_text(
        f"max_workers: 5\nnotify: 'echo \"$AIPM_EVENT $AIPM_STATUS\" >> {notes}'\n")
    order = project.order()
    for task in "ABCD":
        write_task(order, task, command=f"while [ ! -e {gate} ]; do sleep 0.01; done", target_files=[task])
    project.aipm("launch", "ORD", "--no-resource-monitoring", check=True)
    workers = state(project.root) / "workers" / "ORD"

    def owners():
        recs = [json.loads(p.read_text()) for p in workers.glob("*.json")]
        return len(recs) == 4 and all(r["pid"] for r in recs) and [r["owner_pid"] for r in recs]

    pids = wait_for(owners)
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD",
                            "--no-resource-monitoring"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True) if watcher else None
    said = run.stdout.readline() if run else ""  # its first line: it watches the owners' tasks
    gate.touch()
    if run:
        said += run.communicate(timeout=60)[0]
        assert run.returncode == 0, said
    wait_for(lambda: not any(pid_alive(pid) for pid in pids) and no_workers(project.root))
    assert task_statuses(order) == dict.fromkeys("ABCD", "DONE")
    told = (project.root / ".aipm" / "notify.log").read_text()
    assert told.count(" order_finished ") == 1, told
    wait_for(lambda: notes.exists() and "order_finished DONE" in notes.read_text())


def test_a_detached_owner_whose_successor_waits_for_a_slot_another_order_holds_stays_to_start_it(project, tmp_path):
    """`launch O --max-workers 1`, then `launch P --max-workers 2` (which counts O's worker): when A ended, P's X held
    the only slot A's owner allowed, so it started nothing and left; X's owner starts P's successors only, and B
    stayed QUEUED for good, with no process of O left and nothing said. A's owner now stays until a slot frees."""
    gates = tmp_path / "gates"
    gates.mkdir()
    wait = 'i=0; while [ ! -e "{}" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done'
    write_task(project.order("O"), "A", command=wait.format(gates / "A"))
    write_task(project.order("O"), "B", command="true", depends_on=["A"])
    write_task(project.order("P"), "X", command=wait.format(gates / "X"))
    assert project.aipm("launch", "O", "--max-workers", "1", "--no-resource-monitoring").returncode == 0
    assert project.aipm("launch", "P", "--max-workers", "2", "--no-resource-monitoring").returncode == 0
    (gates / "A").touch()
    wait_for(lambda: task_statuses(project.root / "orders/O")["A"] == "DONE")
    assert task_statuses(project.root / "orders/O")["B"] == "QUEUED"  # (X holds the slot)
    (gates / "X").touch()
    wait_for(lambda: task_statuses(project.root / "orders/O")["B"] == "DONE")
    wait_for(lambda: no_workers(project.root))


def test_the_standby_owner_starts_each_task_as_a_slot_frees_not_only_the_first(project, tmp_path):
    """The standby started B1 when P1's slot freed and then went away: B2 waited for B1's end (an owner starts only
    its own task's successors, at its end) while P2's slot stood free (a review of the standby owner)."""
    (project.root / "aipm.yaml").write_text("max_workers: 2\n")
    gates = {name: tmp_path / f"gate-{name}" for name in ("P1", "P2", "B1")}
    for name in ("P1", "P2"):
        write_task(project.order("P"), name, command=f"while [ ! -e {gates[name]} ]; do sleep 0.05; done",
                   target_files=[name])
    write_task(project.order("B"), "B1", command=f"while [ ! -e {gates['B1']} ]; do sleep 0.05; done",
               target_files=["B1"])
    write_task(project.order("B"), "B2", command="true", target_files=["B2"])
    assert project.aipm("launch", "P", "--no-resource-monitoring").returncode == 0
    assert project.aipm("launch", "B", "--no-resource-monitoring").returncode == 0
    try:
        gates["P1"].touch()
        wait_for(lambda: task_statuses(project.order("B"))["B1"] == "IN_PROGRESS", timeout=30)
        wait_for(lambda: [s["tasks"] for s in project.json("ps")["standby"]] == [["B2"]])  # B1 started: B2 waits
        gates["P2"].touch()
        _b2_ran_beside_b1(project, gates)  # B1 still runs: only the standby can start B2 in P2's slot
    finally:
        for gate in gates.values():
            gate.touch()


def _b2_ran_beside_b1(project, gates) -> None:
    """B2 ends while B1 still runs (the standby started it in the slot another order freed); then, every gate open,
    both end and nothing of the standby or the workers is left."""
    wait_for(lambda: task_statuses(project.order("B"))["B2"] == "DONE", timeout=30)
    assert task_statuses(project.order("B"))["B1"] == "IN_PROGRESS"
    for gate in gates.values():
        gate.touch()
    wait_for(lambda: task_statuses(project.order("B")) == {"B1": "DONE", "B2": "DONE"}, timeout=30)
    wait_for(lambda: not project.json("ps")["standby"] and no_workers(project.root))


def test_a_launch_says_why_each_task_its_standby_owner_holds_waits(project, gate):
    """B1 waits for A's file and B3 for a slot: the line gave the first one's reason for both (`B1, B3 wait for room
    (f.txt is held by ...)`), and B3 waited for no file."""
    (project.root / "aipm.yaml").write_text("max_workers: 2\n")
    write_task(project.order("A"), "A1", command=f"while [ ! -e {gate} ]; do sleep 0.05; done", target_files=["f.txt"])
    write_task(project.order("B"), "B1", command="true", target_files=["f.txt"], priority="P0")
    write_task(project.order("B"), "B2", command=f"while [ ! -e {gate} ]; do sleep 0.05; done", target_files=["b2"],
               priority="P1")
    write_task(project.order("B"), "B3", command="true", target_files=["b3"], priority="P2")
    try:
        assert project.aipm("launch", "A", "--no-resource-monitoring").returncode == 0
        launch = project.aipm("launch", "B", "--no-resource-monitoring")
        assert launch.returncode == 0, launch.stdout + launch.stderr
        pid = project.json("ps")["standby"][0]["pid"]
        lines = launch.stdout.splitlines()
        assert lines[0].startswith("started B2"), lines
        assert lines[1].startswith("B1 waits for room (f.txt is held by ") and "A1" in lines[1], lines
        slot = "worker limit reached: the 1 free slot(s) go to tasks ranked before it"
        assert lines[2:] == [f"B3 waits for room ({slot})",
                             f"its standby owner (pid {pid}) starts them once they can (`aipm ps` shows it)"], lines
    finally:
        gate.touch()
    wait_for(lambda: task_statuses(project.order("B")) == {"B1": "DONE", "B2": "DONE", "B3": "DONE"}, timeout=60)
    wait_for(lambda: not project.json("ps")["standby"] and no_workers(project.root))


def test_a_launch_that_starts_nothing_for_want_of_a_slot_leaves_a_standby_owner(project, gate):
    """max_workers 2 held by A's two workers: `launch B` said `nothing to launch`, exit 0, and B stayed QUEUED for
    good with no process left to start it. It leaves a standby owner, says so, `ps` shows it, and it starts B once a
    slot frees; a second launch meanwhile starts no second one; once B has started the standby is gone."""
    (project.root / "aipm.yaml").write_text("max_workers: 2\n")
    for name in ("A1", "A2"):
        write_task(project.order("A"), name, command=f"while [ ! -e {gate} ]; do sleep 0.05; done",
                   target_files=[name])
    for name in ("B1", "B2"):
        write_task(project.order("B"), name, command="true", target_files=[name])
    assert project.aipm("launch", "A", "--no-resource-monitoring").returncode == 0
    launch = project.aipm("launch", "B", "--no-resource-monitoring")
    assert launch.returncode == 0 and "nothing to launch" not in launch.stdout, launch.stdout + launch.stderr
    pid = project.json("ps")["standby"][0]["pid"]
    assert launch.stdout == (f"B1, B2 wait for capacity (worker limit reached: no free worker slot); its standby "
                             f"owner (pid {pid}) starts them once there is (`aipm ps` shows it)\n"), launch.stdout
    again = project.json("launch", "B", "--no-resource-monitoring")
    slot = "worker limit reached: no free worker slot"
    assert again["standby"] == {"tasks": ["B1", "B2"], "detail": slot, "details": {"B1": slot, "B2": slot},
                                "pid": pid, "capacity": True}, again
    assert project.json("ps")["standby"] == [{"order": "B", "pid": pid, "tasks": ["B1", "B2"]}]
    assert f"standby B (pid {pid}): waits for room to start B1, B2" in project.aipm("ps").stdout
    assert task_statuses(project.order("B")) == {"B1": "QUEUED", "B2": "QUEUED"}
    gate.touch()
    wait_for(lambda: task_statuses(project.order("B")) == {"B1": "DONE", "B2": "DONE"}, timeout=30)
    wait_for(lambda: not project.json("ps")["standby"] and not pid_alive(pid))
    wait_for(lambda: no_workers(project.root))


def test_a_launch_that_starts_some_and_leaves_others_waiting_for_a_slot_leaves_a_standby_owner(project, tmp_path):
    """`launch B` started B1 in the last slot and left B2 waiting for one with no standby (the standby's first plan
    had counted B1's attempt as holding nothing of the budget, see test_agents' racing launches): when P1's worker
    ended, its owner started only P's successors and B2 waited for B1's end beside the free slot."""
    (project.root / "aipm.yaml").write_text("max_workers: 2\n")
    gates = {name: tmp_path / f"gate-{name}" for name in ("P1", "B1")}
    write_task(project.order("P"), "P1", command=f"while [ ! -e {gates['P1']} ]; do sleep 0.05; done",
               target_files=["P1"])
    write_task(project.order("B"), "B1", command=f"while [ ! -e {gates['B1']} ]; do sleep 0.05; done",
               target_files=["B1"])
    write_task(project.order("B"), "B2", command="true", target_files=["B2"])
    assert project.aipm("launch", "P", "--no-resource-monitoring").returncode == 0
    try:
        launch = project.json("launch", "B", "--no-resource-monitoring")
        assert [t["id"] for t in launch["launched"]] == ["B1"] and launch["standby"]["tasks"] == ["B2"], launch
        gates["P1"].touch()
        _b2_ran_beside_b1(project, gates)
    finally:
        for gate in gates.values():
            gate.touch()


def test_a_task_waiting_for_a_file_another_orders_task_holds_gets_a_standby_owner(project, gate):
    """`launch A` ran A1 on f.txt; `launch B`, whose B1 writes f.txt too, started nothing and left no process: A1's
    owner started only A's tasks at its end, and B1 stayed QUEUED for good beside the freed file. It gets the
    order's standby owner, which starts it once A1 has ended; never beside A1 (the journal's invariant)."""
    journal = project.root / "journal.txt"
    write_task(project.order("A"), "A1", target_files=["f.txt"],
               command=journal_command(journal, f"while [ ! -e {gate} ]; do sleep 0.05; done"))
    write_task(project.order("B"), "B1", target_files=["f.txt"], command=journal_command(journal, "true"))
    assert project.aipm("launch", "A", "--no-resource-monitoring").returncode == 0
    launch = project.aipm("launch", "B", "--no-resource-monitoring")
    assert launch.returncode == 0, launch.stdout + launch.stderr
    (listed,) = project.json("ps")["standby"]
    assert launch.stdout == (f"B1 waits for room (f.txt is held by running task A/A1 (IN_PROGRESS)); its standby owner "
                             f"(pid {listed['pid']}) starts it once it can (`aipm ps` shows it)\n"), launch.stdout
    assert listed["tasks"] == ["B1"] and task_statuses(project.order("B")) == {"B1": "QUEUED"}
    gate.touch()
    wait_for(lambda: task_statuses(project.order("B")) == {"B1": "DONE"}, timeout=30)
    wait_for(lambda: not project.json("ps")["standby"] and no_workers(project.root))
    (a1,), (b1,) = ([s for s in spans(journal) if s.task == task] for task in ("A1", "B1"))
    assert a1.end is not None and a1.end <= b1.start, (a1, b1)  # one at a time on f.txt


def test_a_detached_owner_starts_its_tasks_next_attempt_in_the_round_that_records_the_failed_one(project, tmp_path):
    """LONG (max_attempts 2) failed its first attempt under `aipm launch`: its owner recorded QUEUED and let go of the
    launch lock and of LONG's files, then took the lock again to start the second attempt. A round of another order
    in between (`aipm run O2`, whose B waits for LONG's f.txt) found f.txt free, started B, and the owner found it
    taken and left: LONG stayed QUEUED for good, attempt 1 of 2 (test_scope's LONG/B flaked so under load). The
    outcome and the next start are one round, as in `run`: the first round after LONG's record goes sees attempt 2."""
    import fcntl
    import threading

    import yaml

    from aipm.runtime import Runtime

    gates = {name: tmp_path / name for name in ("first", "second")}
    long_file = write_task(project.order("ORD"), "LONG", target_files=["f.txt"], max_attempts=2, command=(
        f"if [ ! -e {gates['first']}.done ]; then until [ -e {gates['first']} ]; do sleep 0.02; done; "
        f"touch {gates['first']}.done; exit 1; fi; until [ -e {gates['second']} ]; do sleep 0.02; done; echo l > f.txt"))
    for n in range(300):  # finished tasks: the owner's reading of its order between two rounds took a while
        write_task(project.order("ORD"), f"D{n:03}", command="true", status="DONE", attempts=1)
    assert project.aipm("launch", "ORD", "--no-resource-monitoring").returncode == 0
    record = Runtime(project.root).record_path("ORD", "LONG")
    wait_for(lambda: record.exists() and json.loads(record.read_text()).get("pid"))
    seen: dict = {}

    def next_round() -> None:
        """Another aipm's rounds, one after another: each waits in the kernel for the lock while a holder has it, so
        the first one after the round that removes the first attempt's record is queued for it already."""
        deadline = time.monotonic() + 60
        with open(state(project.root) / "launch.lock") as lock:
            while time.monotonic() < deadline:
                fcntl.flock(lock, fcntl.LOCK_EX)
                attempt = json.loads(record.read_text())["attempt"] if record.exists() else None
                if attempt != 1:
                    task = yaml.safe_load(long_file.read_text())
                    seen.update(status=task["status"], attempts=task["attempts"], record=attempt)
                    return
                fcntl.flock(lock, fcntl.LOCK_UN)
                time.sleep(0.0005)  # (the owner's turn)

    competitor = threading.Thread(target=next_round)
    competitor.start()
    try:
        gates["first"].touch()
        competitor.join(timeout=90)
        assert seen == {"status": "IN_PROGRESS", "attempts": 2, "record": 2}, seen
    finally:
        for gate in gates.values():
            gate.touch()
        competitor.join(timeout=90)
    wait_for(lambda: task_statuses(project.order("ORD"))["LONG"] == "DONE", timeout=60)
    assert yaml.safe_load(long_file.read_text())["attempts"] == 2
    wait_for(lambda: no_workers(project.root))


def test_ps_and_cancel_say_a_detached_owners_worker_is_yet_to_start_not_ended(project):
    """A detached owner's record is written before its worker exists (no pid). `ps` said of it `ended: its owner
    records that end`, and `cancel` `its worker has ended`, where its log said `cancelled by the user before its
    worker started`. Its owner here is a real process of ours, as the record names it, first running, then stopped."""
    from aipm.liveness import process_ctime

    order = project.order()
    write_task(order, "A", command="true", target_files=["x"])
    path = order / "A.yaml"
    path.write_text(path.read_text() + "status: IN_PROGRESS\nattempts: 1\n")
    owner = subprocess.Popen(["sleep", "60"])
    try:
        record_dir = state(project.root, make=True) / "workers" / "ORD"
        record_dir.mkdir(parents=True)
        record = {"order": "ORD", "order_dir": str(order), "task": "A", "task_file": str(path), "attempt": 1,
                  "targets": ["x"], "log": str(project.root / "a.log"), "exit_file": str(project.root / "nope"),
                  "started_at": "x", "owner_pid": owner.pid, "owner_ctime": process_ctime(owner.pid)}
        (record_dir / "A.json").write_text(json.dumps(record))
        (worker,) = project.json("ps")["workers"]
        assert (worker["pid"], worker["state"]) == (None, "starting"), worker
        table = project.aipm("ps", env={"COLUMNS": "200"}, check=True).stdout
        assert "starting: its owner is about to start its worker" in table, table
        owner.send_signal(signal.SIGSTOP)
        wait_for(lambda: project.json("ps")["workers"][0]["state"] == "starting_held")
        table = project.aipm("ps", env={"COLUMNS": "200"}, check=True).stdout
        assert "starting: its owner is stopped and starts its worker once it goes on" in table, table
        done = project.aipm("cancel", "ORD/A", check=True)
        assert f"its worker had not started; its owner records the cancel and starts none (aipm pid {owner.pid})" \
            in done.stderr and "has ended" not in done.stderr, done.stderr
        assert task_statuses(order)["A"] == "CANCELLED"
    finally:
        owner.kill()
        owner.wait()
