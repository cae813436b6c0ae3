"""`aipm exec` run by a worker's command: the worker lends its slot to one exec it waits for, and to no other.

Every test worker journals `start`/`end` around its command, and `block`/`unblock` around each wait for execs
it started: an exec in the foreground, or the `wait` for ones it put in the background. invariants.unblocked_peak()
counts the commands running at each instant, not counting a caller between its `block` and `unblock` (it runs
nothing then: it waits). The worker limit holds when that count never exceeds max_workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from aipm.resources import machine_capacity
from conftest import no_workers, task_statuses, wait_for, write_task
from invariants import unblocked_peak, worker_records


def journaled(journal: Path, body: str) -> str:
    """A shell command that journals its start and end, with `j block`/`j unblock` at hand for its body."""
    return (f'j() {{ echo "$1 $AIPM_TASK_ID $(date +%s%N) $$" >> "{journal}"; }}; '
            f'j start; {body}; j end')


def execs(project) -> str:
    return f"{sys.executable} -m aipm --root {project.root} exec"


def runs(project) -> str:
    return f"{sys.executable} -m aipm --root {project.root} run"


def foreground(project, task: str, rc: Path) -> str:
    """Run `aipm exec task` in the foreground, blocked meanwhile; its exit code into `rc`."""
    return f"j block; {execs(project)} {task}; r=$?; j unblock; echo $r > {rc}"


def background(project, *tasks: str) -> str:
    """Start `aipm exec` of each task in the background and keep running until every one has ended or its task
    has started (it touches `<id>.started`); then wait for them, blocked meanwhile."""
    starts = "".join(f"{execs(project)} SUB/{tid} & e{n}=$!; " for n, tid in enumerate(tasks))
    pending = " || ".join(f"pending $e{n} {project.root / tid}.started" for n, tid in enumerate(tasks))
    return (f"pending() {{ kill -0 $1 2>/dev/null && [ ! -e $2 ]; }}; {starts}"
            f"while {pending}; do sleep 0.02; done; j block; wait; j unblock")


def test_a_caller_that_runs_on_is_never_seen_waiting_for_its_exec_alone(tmp_path):
    """The look read a process's state, then its children: a shell looping on `sleep 0.001` beside its background
    exec was seen asleep in wait() with the exec as its one child (that sleep ended meanwhile, or the next one not
    yet started) a few times in a thousand looks, and so lent its slot while it ran on. Now it must sleep on, unchanged,
    across the whole look. The probe plays the exec: the shell's child, looking at the shell."""
    out = tmp_path / "seen"
    probe = ("import os; from aipm.slots import _waits_for_us_alone as alone; "
             "print(sum(alone(os.getppid()) for _ in range(3000)))")
    script = f'{sys.executable} -c "{probe}" > {out} & e=$!; while kill -0 $e 2>/dev/null; do sleep 0.001; done'
    subprocess.run(["sh", "-c", script], timeout=300, check=True)
    assert out.read_text() == "0\n"


def test_a_background_exec_takes_no_slot_while_its_caller_goes_on(project):
    """max_workers 1. L's command starts `aipm exec SUB/A &` and keeps running until A has started (or the exec
    ended). A borrowed L's slot: A ran beside L's still running command, two commands at once. Now a worker lends
    its slot only to an exec it waits for alone: this one finds no slot, says why and exits 1, A stays QUEUED."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\n")
    order, sub = project.order(), project.order("SUB")
    journal, started, rc = project.root / "journal", project.root / "A.started", project.root / "A.rc"
    write_task(order, "L", target_files=["l.txt"], timeout=120, command=journaled(journal, (
        f"{execs(project)} SUB/A & e=$!; while kill -0 $e 2>/dev/null && [ ! -e {started} ]; do sleep 0.02; done; "
        f"wait $e; echo $? > {rc}")))
    write_task(sub, "A", target_files=["a.txt"], command=journaled(journal, f"touch {started}"))
    proc = project.aipm("exec", "ORD/L")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (project.root / ".aipm" / "logs" / "ORD" / "L.1.log").read_text()
    assert unblocked_peak(journal) == 1, journal.read_text()
    assert rc.read_text() == "1\n", log
    assert "worker limit reached" in log and "lends its slot only to one exec or run at a time" in log, log
    assert task_statuses(sub) == {"A": "QUEUED"}
    assert no_workers(project.root)


def test_nested_foreground_execs_each_take_their_callers_slot(project):
    """max_workers 1. L runs `aipm exec SUB/A` in the foreground, A runs `aipm exec SUB/B` in the foreground. B's
    exec did not count A (its lender) but did count L, which had lent its slot to A: 'worker limit reached', B
    QUEUED, exit 1, though L and A both only waited. A slot lent on is lent with the slot it came from."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\n")
    order, sub = project.order(), project.order("SUB")
    journal, a_rc, b_rc = project.root / "journal", project.root / "A.rc", project.root / "B.rc"
    write_task(order, "L", target_files=["l.txt"], timeout=120,
               command=journaled(journal, foreground(project, "SUB/A", a_rc)))
    write_task(sub, "A", target_files=["a.txt"], timeout=120,
               command=journaled(journal, foreground(project, "SUB/B", b_rc)))
    write_task(sub, "B", target_files=["b.txt"], command=journaled(journal, "echo B > b.txt"))
    proc = project.aipm("exec", "ORD/L")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (a_rc.read_text(), b_rc.read_text()) == ("0\n", "0\n"), \
        (project.root / ".aipm" / "logs" / "SUB" / "A.1.log").read_text()
    assert task_statuses(sub) == {"A": "DONE", "B": "DONE"}
    assert unblocked_peak(journal) == 1, journal.read_text()
    assert no_workers(project.root)


@pytest.mark.parametrize("load", [None, "95,40"])
def test_a_nested_run_takes_its_callers_slot_for_one_start_after_another(project, load):
    """max_workers 1 (or 2 under a load that allows one worker). L's command runs `aipm run SUB` in the foreground:
    the inner run counted L, its caller, as a worker holding the only slot, started nothing and exited 1 (under the
    load it waited for the load to fall, L's slot idle, until L's time limit). Now it runs SUB's three tasks in L's
    slot, one after another: never more than one command runs that is not blocked on an aipm it started."""
    (project.root / "aipm.yaml").write_text(f"max_workers: {2 if load else 1}\n")
    order, sub = project.order(), project.order("SUB")
    journal, rc = project.root / "journal", project.root / "SUB.rc"
    write_task(order, "L", target_files=["l.txt"], timeout=120,
               command=journaled(journal, f"j block; {runs(project)} SUB; r=$?; j unblock; echo $r > {rc}"))
    for tid in ("A", "B", "C"):
        write_task(sub, tid, target_files=[f"{tid}.txt"], command=journaled(journal, "sleep 0.2"))
    env = {"AIPM_FAKE_LOAD": load, "AIPM_ENABLE_MONITORING": "true"} if load else None
    proc = project.aipm("run", "ORD", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (project.root / ".aipm" / "logs" / "ORD" / "L.1.log").read_text()
    assert rc.read_text() == "0\n", log
    assert "skip" not in log, log  # (ORD/L is no task of SUB's: it said 'skip ORD/L: ... cannot wait for it')
    assert task_statuses(sub) == {"A": "DONE", "B": "DONE", "C": "DONE"}
    assert unblocked_peak(journal) == 1, journal.read_text()
    assert no_workers(project.root)


def test_a_background_nested_run_takes_no_slot_and_says_why(project):
    """max_workers 1. L's command runs `aipm run SUB &` and goes on: the inner run finds no slot (L runs beside
    it), and says why it starts nothing instead of only `SUB: QUEUED 1` and exit 1."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\n")
    order, sub = project.order(), project.order("SUB")
    journal, rc = project.root / "journal", project.root / "SUB.rc"
    write_task(order, "L", target_files=["l.txt"], timeout=120, command=journaled(journal, (
        f"{runs(project)} SUB & e=$!; while kill -0 $e 2>/dev/null; do sleep 0.02; done; wait $e; echo $? > {rc}")))
    write_task(sub, "A", target_files=["a.txt"], command=journaled(journal, "true"))
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (project.root / ".aipm" / "logs" / "ORD" / "L.1.log").read_text()
    assert rc.read_text() == "1\n", log
    assert "defer    A: every worker slot is taken; this aipm runs inside the worker ORD/L" in log, log
    assert task_statuses(sub) == {"A": "QUEUED"}
    assert unblocked_peak(journal) == 1, journal.read_text()


def test_a_nested_run_kept_out_by_its_callers_file_is_not_told_its_slot_was_withheld(project):
    """max_workers 1. L's command runs `aipm run SUB` in the foreground, and SUB's one task writes L's file: the
    inner run has L's slot, but A waits for L's file. It said `every worker slot is taken; ... lends its slot only
    to one exec or run at a time ... (not ... `aipm run SUB &`)`, which the command never did; then only `SUB:
    QUEUED 1`. It says the file its caller holds."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\n")
    order, sub = project.order(), project.order("SUB")
    journal, rc = project.root / "journal", project.root / "SUB.rc"
    write_task(order, "L", target_files=["shared.txt"], timeout=120,
               command=journaled(journal, f"j block; {runs(project)} SUB; r=$?; j unblock; echo $r > {rc}"))
    write_task(sub, "A", target_files=["shared.txt"], command=journaled(journal, "true"))
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (project.root / ".aipm" / "logs" / "ORD" / "L.1.log").read_text()
    assert rc.read_text() == "1\n", log
    assert "every worker slot is taken" not in log, log
    assert ("defer    A: shared.txt is held by the worker ORD/L, which this aipm runs inside: it cannot start before "
            "that worker ends") in log, log
    assert task_statuses(sub) == {"A": "QUEUED"}
    assert no_workers(project.root)


def _caller_adds_an_urgent_task(project, tmp_path, nested: str, workers: int, urgent: dict, own: dict) -> Path:
    """max_workers `workers`. L (P3) copies a P0 task Q (`urgent`: its fields) into its own order, then runs `aipm
    run SUB` (`nested` "run") or `aipm exec SUB/A` in the foreground; L and A (P3) have the fields `own`. The run of
    ORD must end with L, Q and A DONE and the inner aipm's exit 0. Returns the journal."""
    (project.root / "aipm.yaml").write_text(f"max_workers: {workers}\n")
    order, sub = project.order(), project.order("SUB")
    journal, rc = project.root / "journal", project.root / "SUB.rc"
    staged = tmp_path / "staged"
    write_task(staged, "Q", priority="P0", target_files=["q.txt"], command=journaled(journal, "true"), **urgent)
    inner = f"{runs(project)} SUB" if nested == "run" else f"{execs(project)} SUB/A"
    write_task(order, "L", priority="P3", target_files=["l.txt"], timeout=30, **own, command=journaled(
        journal, f"cp {staged / 'Q.yaml'} {order}/Q.yaml; sleep 1; j block; {inner}; r=$?; j unblock; echo $r > {rc}"))
    write_task(sub, "A", priority="P3", target_files=["a.txt"], command=journaled(journal, "true"), **own)
    proc = project.aipm("run", "ORD")
    log = (project.root / ".aipm" / "logs" / "ORD" / "L.1.log").read_text()
    assert rc.exists() and rc.read_text() == "0\n", log
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert task_statuses(sub) == {"A": "DONE"}
    assert task_statuses(order) == {"L": "DONE", "Q": "DONE"}
    assert no_workers(project.root)
    return journal


@pytest.mark.parametrize("nested", ["run", "exec"])
def test_a_nested_run_does_not_leave_its_lent_slot_to_another_runs_demand(project, tmp_path, nested):
    """max_workers 1. L (P3) adds a P0 task Q to its own order, then runs `aipm run SUB` in the foreground. The
    outer run, every slot taken by L, says Q waits for a slot (demand.py); the inner run left its one start, in
    L's slot, to that demand, which no other run could take (they all count L): it waited until L's time limit.
    So did a foreground `aipm exec SUB/A`."""
    journal = _caller_adds_an_urgent_task(project, tmp_path, nested, 1, {}, {})
    assert unblocked_peak(journal) == 1, journal.read_text()


@pytest.mark.parametrize("nested", ["run", "exec"])
def test_a_borrower_does_not_keep_cpus_for_a_need_that_waits_for_its_lender(project, tmp_path, nested):
    """max_workers 2. L (P3, 1 CPU) adds a P0 task Q asking for every CPU of the machine to its own order, then runs
    `aipm run SUB` (or `aipm exec SUB/A`) in the foreground, A asking for 1 CPU. Q waits for CPUs (L holds one) and
    says so (demand.py); the borrower kept every CPU free for Q, A waited, and so did L, until its time limit: Q
    can start only once L has ended, and L only once A has."""
    cpus = machine_capacity().cpus
    if cpus < 2:
        pytest.skip("a machine of one CPU: L's and Q's together are more than it has")
    _caller_adds_an_urgent_task(project, tmp_path, nested, 2, {"resources": {"cpus": cpus}},
                                {"resources": {"cpus": 1}})


def test_execs_inside_workers_never_run_more_commands_than_max_workers(project):
    """A run of 2 workers over tasks whose commands start execs every way: in the foreground, nested, in the
    background while the command goes on, two side by side. Invariant (invariants.unblocked_peak): at no instant
    do more than max_workers commands run that are not blocked waiting on execs they started (a foreground exec,
    or the shell's `wait` for background ones, journalled from `block` to `unblock`).
    An exec that found no slot exits 1 and leaves its task QUEUED; that is allowed, exceeding the limit is not."""
    (project.root / "aipm.yaml").write_text("max_workers: 2\n")
    order, sub = project.order(), project.order("SUB")
    journal = project.root / "journal"
    work = "sleep 0.3"
    commands = {
        "F1": foreground(project, "SUB/A1", project.root / "A1.rc"),
        "F2": foreground(project, "SUB/B1", project.root / "B1.rc"),
        "G1": background(project, "C1"),
        "G2": background(project, "D1", "D2"),
        "P1": work,
        "P2": work,
    }
    for tid, body in commands.items():
        write_task(order, tid, target_files=[f"{tid}.txt"], timeout=120, command=journaled(journal, body))
    write_task(sub, "B1", target_files=["B1.txt"], timeout=120,
               command=journaled(journal, foreground(project, "SUB/B2", project.root / "B2.rc")))
    for tid in ("A1", "B2", "C1", "D1", "D2"):
        write_task(sub, tid, target_files=[f"{tid}.txt"],
                   command=journaled(journal, f"touch {project.root / tid}.started; {work}"))
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait_for(lambda: no_workers(project.root))
    assert unblocked_peak(journal) <= 2, journal.read_text()
    assert set(task_statuses(sub).values()) <= {"DONE", "QUEUED"}, task_statuses(sub)


def test_a_borrower_killed_gives_its_slot_back_and_its_adopted_worker_keeps_one(project):
    """max_workers 2. L's foreground exec of SUB/A is SIGKILLed while A runs: A's worker lives on and is adopted
    (as any worker whose owner died), and L goes on, so A now counts as a worker of its own. L's next foreground
    exec SUB/C takes L's slot again and starts beside A: two commands, never three; A's outcome is recorded.
    C's exec adopted A itself and, done with C, exited: A ended IN_PROGRESS with no owner (stale until a
    recovery). An exec now adopts only its own task; the others get a detached owner, which clears A's mark of
    L's slot (left, it made the slot look lent still: C counted L and A, and found no slot)."""
    (project.root / "aipm.yaml").write_text("max_workers: 2\n")
    order, sub = project.order(), project.order("SUB")
    journal, gate = project.root / "journal", project.root / "gate"
    a_rc, c_rc, started = project.root / "A.rc", project.root / "C.rc", project.root / "A.started"
    write_task(order, "L", target_files=["l.txt"], timeout=120, command=journaled(
        journal, f"{foreground(project, 'SUB/A', a_rc)}; {foreground(project, 'SUB/C', c_rc)}"))
    write_task(sub, "A", target_files=["a.txt"], timeout=120, command=journaled(
        journal, f"touch {started}; while [ ! -e {gate} ]; do sleep 0.02; done"))
    write_task(sub, "C", target_files=["c.txt"], command=journaled(journal, "echo C > c.txt"))
    env = {**os.environ, "AIPM_ENABLE_MONITORING": "false"}
    with open(project.root / "exec.out", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "exec", "ORD/L"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(started.exists)
        owner = next(rec["owner_pid"] for rec in worker_records(project.root) if rec["task"] == "A")
        os.kill(owner, signal.SIGKILL)
        wait_for(c_rc.exists)
    finally:
        gate.touch()
    assert proc.wait(timeout=120) == 0, (project.root / "exec.out").read_text()
    log = (project.root / ".aipm" / "logs" / "ORD" / "L.1.log").read_text()
    assert (a_rc.read_text(), c_rc.read_text()) == ("137\n", "0\n"), log
    wait_for(lambda: no_workers(project.root))
    assert task_statuses(sub) == {"A": "DONE", "C": "DONE"}, log
    assert unblocked_peak(journal) <= 2, journal.read_text()


def test_an_exec_a_worker_of_another_project_runs_borrows_no_slot_there(project, tmp_path, gate):
    """P1's worker ORD/L runs `aipm --root P2 exec ORD/A`, while P2 (max_workers 1) runs its own ORD/L: the same
    key, but P1's worker holds no slot of P2. The exec counts P2's L, finds no slot and exits 1, A QUEUED; its
    note about lending named P1's worker as if it were P2's, and is no longer said."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\n")
    order = project.order()
    write_task(order, "L", priority="P0", target_files=["l.txt"], command=f"while [ ! -e {gate} ]; do sleep 0.02; done")
    write_task(order, "A", priority="P3", target_files=["a.txt"], command="echo A > a.txt")
    project.aipm("launch", "ORD", check=True)
    other = tmp_path / "p1"
    (other / "orders").mkdir(parents=True)
    (other / "aipm.yaml").write_text("max_workers: 1\n")
    rc = tmp_path / "A.rc"
    write_task(other / "orders" / "ORD", "L", target_files=["l.txt"], command=f"{execs(project)} ORD/A; echo $? > {rc}")
    proc = subprocess.run([sys.executable, "-m", "aipm", "--root", str(other), "exec", "ORD/L"], capture_output=True,
                          text=True, env={**os.environ, "AIPM_ENABLE_MONITORING": "false"}, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (other / ".aipm" / "logs" / "ORD" / "L.1.log").read_text()
    assert rc.read_text() == "1\n", log
    assert "worker limit reached" in log and "lends its slot" not in log, log
    assert task_statuses(order) == {"L": "IN_PROGRESS", "A": "QUEUED"}
    gate.touch()
    wait_for(lambda: no_workers(project.root))
