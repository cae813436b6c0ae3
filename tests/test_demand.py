"""Priority across orders: two `aipm run`s share the project's worker limit, and a slot a worker frees goes to
the more urgent task another run waits to start (demand.py), not to the freeing run's own less urgent one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from conftest import no_workers, task_statuses, wait_for, write_task

from aipm.runtime import state_dir


def gated(journal: Path, gates: Path) -> str:
    """A command that journals its start, then waits for its gate file."""
    return (f'echo "start $AIPM_ORDER_ID/$AIPM_TASK_ID" >> {journal}; '
            f'while [ ! -e {gates}/$AIPM_TASK_ID ]; do sleep 0.02; done')


def run(project, order: str, max_workers: int = 2) -> subprocess.Popen:
    env = dict(os.environ, AIPM_ENABLE_MONITORING="false")
    return subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", order,
                             "--max-workers", str(max_workers)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=project.root)


def lines(proc: subprocess.Popen) -> list[str]:
    """The lines `proc` prints, gathered as they come."""
    told: list[str] = []
    threading.Thread(target=lambda: told.extend(proc.stdout), daemon=True).start()
    return told


def started(journal: Path) -> list[str]:
    return journal.read_text().split("start ")[1:] if journal.exists() else []


def demands(root: Path) -> list[str]:
    """The orders whose runs say a task waits for a slot."""
    where = Path(state_dir(root)) / "demand"
    return sorted(p.read_text().split()[-1] for p in where.glob("*.demand")) if where.is_dir() else []


def two_orders(project, lows: int) -> tuple[Path, Path]:
    """LOW: `lows` gated P3 tasks; HIGH: one gated P0 task (journal, gates directory)."""
    journal, gates = project.root / "journal", project.root / "gates"
    gates.mkdir()
    for n in range(1, lows + 1):
        write_task(project.order("LOW"), f"L{n}", command=gated(journal, gates), priority="P3")
    write_task(project.order("HIGH"), "H1", command=gated(journal, gates), priority="P0")
    return journal, gates


def open_all(project, gates: Path, names, procs) -> None:
    """Let every gated task end, stop the runs left, and wait until no worker is left."""
    for name in names:
        (gates / name).touch()
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_for(lambda: no_workers(project.root))


def test_a_freed_slot_goes_to_the_more_urgent_order(project):
    journal, gates = two_orders(project, 4)
    low = run(project, "LOW")
    high = None
    try:
        wait_for(lambda: len(started(journal)) == 2)
        high = run(project, "HIGH")
        wait_for(lambda: "HIGH" in demands(project.root))  # its P0 waits for a slot, and says so
        (gates / "L1").touch()
        wait_for(lambda: len(started(journal)) == 3)
        assert [s.strip() for s in started(journal)][2] == "HIGH/H1", started(journal)
        for name in ("L2", "L3", "L4", "H1"):
            (gates / name).touch()
        assert high.wait(timeout=60) == 0 and low.wait(timeout=60) == 0
        assert demands(project.root) == []  # withdrawn as each run ended
        assert sorted(s.strip() for s in started(journal)) == ["HIGH/H1", "LOW/L1", "LOW/L2", "LOW/L3", "LOW/L4"]
    finally:
        open_all(project, gates, ("L1", "L2", "L3", "L4", "H1"), (low, high))


def test_a_dead_runs_demand_keeps_no_slot(project):
    """A run killed while its task waited for a slot leaves its demand file: ignored (its process is gone)."""
    journal, gates = two_orders(project, 3)
    low = run(project, "LOW")
    try:
        wait_for(lambda: len(started(journal)) == 2)
        high = run(project, "HIGH")
        wait_for(lambda: "HIGH" in demands(project.root))
        high.kill()
        high.wait()
        (gates / "L1").touch()
        wait_for(lambda: len(started(journal)) == 3)
        assert started(journal)[2].strip() == "LOW/L3"
        for name in ("L2", "L3"):
            (gates / name).touch()
        assert low.wait(timeout=60) == 0
    finally:
        open_all(project, gates, ("L1", "L2", "L3", "H1"), (low,))


def test_a_demand_removed_under_its_run_is_said_again(tmp_path):
    """A worker may remove the state directory: the next plan's word puts the demand back (it was said once and
    remembered, so the run's P0 went unseen); an unwritable state directory costs the plan nothing but the word."""
    import shutil

    from aipm.demand import Demands
    from aipm.model import Priority

    state = tmp_path / "state"
    mine, theirs = Demands(state), Demands(state)
    mine.publish("HIGH", Priority.P0, 5)
    assert theirs.ahead_of("LOW", Priority.P3, 4) == [("HIGH", Priority.P0)]
    assert theirs.ahead_of("LOW", Priority.P3, 5) == []  # its run's own limit is reached: it cannot take a slot
    shutil.rmtree(state)
    mine.publish("HIGH", Priority.P0, 5)
    assert theirs.ahead_of("LOW", Priority.P3, 0) == [("HIGH", Priority.P0)]
    assert theirs.ahead_of("LOW", Priority.P0, 0) == [] and mine.ahead_of("HIGH", Priority.P3, 0) == []
    shutil.rmtree(state)
    state.mkdir()
    (state / "demand").write_text("a file where the directory goes")
    mine.publish("HIGH", Priority.P1, 5)  # no error: a courtesy
    assert theirs.ahead_of("LOW", Priority.P3, 0) == []
    (state / "demand").unlink()
    mine.publish("HIGH", Priority.P1, 5)
    mine.withdraw()
    assert theirs.ahead_of("LOW", Priority.P3, 0) == []


def test_a_demand_file_a_worker_replaced_is_no_demand_and_no_hang(tmp_path):
    """A FIFO among the demands hung every launch (holding the launch lock, deaf to SIGTERM), and a link to
    /dev/zero was read without end: any worker can write the state directory."""
    from aipm.demand import Demands, _name
    from aipm.model import Priority

    state = tmp_path / "state"
    (state / "demand").mkdir(parents=True)
    os.mkfifo(state / "demand" / "fifo.demand")
    (state / "demand" / "zero.demand").symlink_to("/dev/zero")
    planted = state / "demand" / f".{_name('HIGH')}.{os.getpid()}.tmp"  # where the next word is written first
    os.mkfifo(planted)
    mine = Demands(state)
    mine.publish("HIGH", Priority.P0, 5)  # not hung: the temp file is made new (what was planted there goes)
    assert not planted.exists()
    assert Demands(state).ahead_of("LOW", Priority.P3, 0) == [("HIGH", Priority.P0)]  # the FIFO, /dev/zero: none


def test_a_run_whose_own_limit_is_reached_keeps_no_slot_elsewhere(project):
    """HIGH runs with --max-workers 1, LOW with 2: HIGH's waiting P0 can never take LOW's second slot (its own
    limit counts every live worker), and LOW kept it free for HIGH's whole run."""
    journal, gates = two_orders(project, 1)
    write_task(project.order("HIGH"), "H2", command=gated(journal, gates), priority="P0")
    env = dict(os.environ, AIPM_ENABLE_MONITORING="false")
    high = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "HIGH",
                             "--max-workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    low = None
    try:
        wait_for(lambda: len(started(journal)) == 1)
        wait_for(lambda: "HIGH" in demands(project.root))  # H2 waits for a slot of HIGH's own
        low = run(project, "LOW")
        wait_for(lambda: "LOW/L1" in [s.strip() for s in started(journal)])  # beside H1, with no gate opened
        for name in ("L1", "H1", "H2"):
            (gates / name).touch()
        assert low.wait(timeout=60) == 0 and high.wait(timeout=60) == 0
    finally:
        open_all(project, gates, ("L1", "H1", "H2"), (low, high))


def test_under_load_the_one_start_allowed_goes_to_the_more_urgent_order(project):
    """Auto-scaling allowed one worker (cpu 45 % against a 20 % threshold) of max_workers 4: the P0 run's task,
    held back by the load and not by the worker limit, said no demand, and the LOW run, its worker ended, started
    its next P3 every time: the P0 waited for every P3 of the other order (found by a review)."""
    journal, gates = two_orders(project, 3)
    # Over the 20 % threshold by 25 points: a quarter of the workers, one; under 50 %, so no ramp-up either.
    env = dict(os.environ, AIPM_FAKE_LOAD="45,10", AIPM_ENABLE_MONITORING="true", AIPM_MAX_CPU_PERCENT="20",
               AIPM_MAX_MEMORY_PERCENT="20")

    def loaded_run(order: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", order,
                                 "--max-workers", "4"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, cwd=project.root)

    procs = [loaded_run("LOW")]
    try:
        wait_for(lambda: len(started(journal)) == 1)
        procs.append(loaded_run("HIGH"))
        told = lines(procs[1])
        wait_for(lambda: any(line.startswith("defer") and "H1" in line for line in told))  # held back by the load
        (gates / "L1").touch()
        wait_for(lambda: len(started(journal)) == 2)
        assert [s.strip() for s in started(journal)] == ["LOW/L1", "HIGH/H1"], started(journal)
        for name in ("L2", "L3", "H1"):
            (gates / name).touch()
        assert procs[1].wait(timeout=60) == 0 and procs[0].wait(timeout=60) == 0
        assert sorted(s.strip() for s in started(journal)) == ["HIGH/H1", "LOW/L1", "LOW/L2", "LOW/L3"]
    finally:
        open_all(project, gates, ("L1", "L2", "L3", "H1"), procs)


def test_a_task_more_urgent_than_the_demand_said_is_said_while_every_slot_is_taken(project):
    """HIGH's run said a P3 waits; a P0 added to HIGH while LOW held every slot was never said (a run plans
    nothing while the project is full, and said its demand only when it had said none), so each slot LOW's
    workers freed went to LOW's next P3 and the P0 waited for all of them (found by a review)."""
    journal, gates = two_orders(project, 4)
    (project.order("HIGH") / "H1.yaml").unlink()
    write_task(project.order("HIGH"), "H0", command=gated(journal, gates), priority="P3")
    low = run(project, "LOW")
    high = None
    try:
        wait_for(lambda: len(started(journal)) == 2)
        high = run(project, "HIGH")
        told = lines(high)
        wait_for(lambda: "HIGH" in demands(project.root))  # its P3 waits for a slot
        write_task(project.order("HIGH"), "H1", command=gated(journal, gates), priority="P0")
        for mark in ("M1", "M2"):  # a whole round of HIGH's run went by since it saw H1
            (project.order("HIGH") / f"{mark}.yaml").write_text("priority: P9\n")
            wait_for(lambda: any(f"{mark}.yaml" in line for line in told))
            (project.order("HIGH") / f"{mark}.yaml").unlink()
        (gates / "L1").touch()
        wait_for(lambda: len(started(journal)) == 3)
        assert [s.strip() for s in started(journal)][2] == "HIGH/H1", started(journal)
        for name in ("L2", "L3", "L4", "H0", "H1"):
            (gates / name).touch()
        assert high.wait(timeout=60) == 0 and low.wait(timeout=60) == 0
    finally:
        open_all(project, gates, ("L1", "L2", "L3", "L4", "H0", "H1"), (low, high))


def test_a_demand_names_only_a_task_that_a_slot_would_start(project):
    """HIGH's P0 waited for a file (held by another order's worker), not for a slot; yet HIGH's run, planning
    nothing while every slot was taken, said a P0 waits, and LOW's run left the slot its worker freed to it: the
    slot sat idle until HIGH's next plan withdrew the word and LOW looked again a second later (for as long as
    HIGH's run was stopped, for ever). Said now: only what a free slot would start (HIGH's P2)."""
    journal, gates = project.root / "journal", project.root / "gates"
    gates.mkdir()
    write_task(project.order("HOLD"), "C1", command=gated(journal, gates), target_files=["x.py"])
    write_task(project.order("HIGH"), "URG", command=gated(journal, gates), priority="P0", target_files=["x.py"])
    write_task(project.order("HIGH"), "H2", command=gated(journal, gates), priority="P2")
    for name in ("L1", "L2"):
        write_task(project.order("LOW"), name, command=gated(journal, gates), priority="P2")
    project.aipm("launch", "HOLD", check=True)
    low = run(project, "LOW")
    high = None
    try:
        wait_for(lambda: len(started(journal)) == 2)  # C1 and L1: every slot is taken
        high = run(project, "HIGH")
        wait_for(lambda: "HIGH" in demands(project.root))
        high.send_signal(signal.SIGSTOP)  # its word stands as it is: nothing of HIGH's takes it back
        (gates / "L1").touch()
        wait_for(lambda: "LOW/L2" in [s.strip() for s in started(journal)])
        high.send_signal(signal.SIGCONT)
        for name in ("C1", "URG", "H2", "L2"):
            (gates / name).touch()
        assert low.wait(timeout=60) == 0 and high.wait(timeout=60) == 0
    finally:
        if high is not None:
            high.send_signal(signal.SIGCONT)
        open_all(project, gates, ("C1", "URG", "H2", "L1", "L2"), (low, high))


def test_cpus_a_more_urgent_run_waits_for_are_kept_from_another_runs_less_urgent_tasks(project):
    """HIGH's P0 needs every CPU; LOW's P3s need half each. Each half LOW's workers freed went to LOW's next P3,
    and the P0 waited for every one of them (fit() kept CPUs for a waiting task only within one plan). Now HIGH
    says what it waits for, and LOW keeps it free (`defer ... kept for a more urgent task of another order`)."""
    from aipm.resources import get_system_info

    journal, gates = project.root / "journal", project.root / "gates"
    gates.mkdir()
    half = get_system_info()["usable_cpus"] / 2
    for name in ("L1", "L2", "L3"):
        write_task(project.order("LOW"), name, command=gated(journal, gates), priority="P3", resources={"cpus": half})
    write_task(project.order("HIGH"), "H1", command=gated(journal, gates), priority="P0",
               resources={"cpus": half * 2})
    low = run(project, "LOW", max_workers=4)  # slots to spare: only CPUs are waited for
    told = lines(low)
    high = None
    try:
        wait_for(lambda: len(started(journal)) == 2)
        high = run(project, "HIGH", max_workers=4)
        said = lines(high)
        wait_for(lambda: any(line.startswith("defer") and "H1" in line for line in said))  # waits for CPUs
        (gates / "L1").touch()
        wait_for(lambda: task_statuses(project.order("LOW"))["L1"] == "DONE")
        mark = project.order("LOW") / "M1.yaml"  # a whole round of LOW's run went by since L1 ended
        mark.write_text("priority: P9\n")
        wait_for(lambda: any("M1.yaml" in line for line in told))
        mark.unlink()
        assert len(started(journal)) == 2, started(journal)  # the half L1 freed is kept for H1
        (gates / "L2").touch()
        wait_for(lambda: len(started(journal)) == 3)
        assert [s.strip() for s in started(journal)][2] == "HIGH/H1", started(journal)
        for name in ("L3", "H1"):
            (gates / name).touch()
        assert high.wait(timeout=60) == 0 and low.wait(timeout=60) == 0
    finally:
        open_all(project, gates, ("L1", "L2", "L3", "H1"), (low, high))
