"""Chaos: aipm keeps its promises when its processes are killed, stopped, raced, or a write fails midway.

Every scenario is seeded (which tasks, which moments, which victims) and checked against the journal that the
test workers write (tests/invariants.py) and against the end state: every task file loads and kept every byte
outside the managed lines, no lock or worker record is left, no process of any worker group is left.

The short variants run in CI; the long ones are marked `slow` (`pytest -m slow`), and benchmarks/chaos.py runs
them to print the reliability table. A bug a scenario finds gets a test that reproduces it on its own (a strict
xfail while it is open); the bugs found so far are fixed, and their tests say where.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import state, task_statuses, wait_for, write_task
from invariants import (
    RecordWatch, check, classify, cli_locks, corrupt_files, end_state, group_alive, journal_command, journal_pids,
    pid_alive, random_order, spans, task_texts, temp_files, user_bytes, worker_records,
)

COLUMNS = ("lost", "double_run", "overlaps", "order", "corrupt", "stale_locks", "orphans", "temp_files",
           "stale_records", "hung")
FINAL = ("DONE", "COMPLETED", "FAILED", "REJECTED", "CANCELLED")


def aipm_argv(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "aipm", "--root", str(root), *args]


class Proc:
    """An aipm command in the background. Threads drain its output, so it never blocks on a full pipe."""

    def __init__(self, root: Path, *args: str, **popen):
        self.args = args
        self.p = subprocess.Popen(aipm_argv(root, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=root, **popen)
        self.lines: list[str] = []
        self.err: list[str] = []
        self._cv = threading.Condition()
        self._threads = [threading.Thread(target=self._pump, args=(self.p.stdout, self.lines), daemon=True),
                         threading.Thread(target=self._pump, args=(self.p.stderr, self.err), daemon=True)]
        for t in self._threads:
            t.start()

    def _pump(self, stream, into: list[str]) -> None:
        for line in stream:
            with self._cv:
                into.append(line)
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def wait_lines(self, n: int, timeout: float = 60) -> None:
        """Until n lines were printed, the command ended, or the timeout passed (a moment to act, not a check)."""
        with self._cv:
            self._cv.wait_for(lambda: len(self.lines) >= n or self.p.poll() is not None, timeout)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()

    def wait(self, timeout: float = 300) -> int:
        rc = self.p.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=30)
        return rc

    @property
    def output(self) -> str:
        return "".join(self.lines) + "".join(self.err)

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.lines if line.startswith("{")]


@dataclass
class Trial:
    """One seeded run of a scenario and what it found, by column of the chaos table."""

    scenario: str
    seed: int
    tasks: int
    kills: int = 0
    findings: dict[str, list[str]] = field(default_factory=lambda: {c: [] for c in COLUMNS})
    log: list[str] = field(default_factory=list)

    def add(self, column: str, items) -> None:
        self.findings[column].extend(items)

    def add_check(self, problems: list[str]) -> None:
        for column, items in classify(problems).items():
            self.add(column, items)

    def add_end(self, state: dict[str, list[str]]) -> None:
        for column, items in state.items():
            self.add(column, items)

    @property
    def problems(self) -> dict[str, list[str]]:
        return {c: v for c, v in self.findings.items() if v}

    def __str__(self) -> str:
        return f"{self.scenario} seed {self.seed}: {self.problems}\n" + "\n".join(self.log[-12:])


def run_args(workers: int, *extra: str) -> tuple[str, ...]:
    return ("run", "ORD", "--no-resource-monitoring", "--max-workers", str(workers), *extra)


def finish_order(root: Path, trial: Trial, workers: int, rounds: int = 3) -> int:
    """`aipm run` until it exits 0 (a run may end early, e.g. when an orphan still holds a file); last exit code."""
    rc = None
    for _ in range(rounds):
        proc = Proc(root, *run_args(workers))
        rc = proc.wait()
        trial.log.append(f"run → {rc}: {proc.output.strip()[-400:]}")
        if rc == 0:
            break
        repair_stale_records(root, trial)
    return rc


def repair_stale_records(root: Path, trial: Trial) -> None:
    """The user's repair for a bug fixed in dcd83a2: delete worker records of tasks no longer running whose
    processes are gone (a kill between a task's final write and its record's removal left one, holding the task's
    files forever; test_record_left_by_a_kill_after_the_final_write_does_not_hold_files). Should one appear again,
    it is counted (stale_records) and removed, so the order still finishes and every other column is measured."""
    for rec in worker_records(root):
        path = Path(rec["task_file"])
        status = (yaml.safe_load(path.read_text()) or {}).get("status", "QUEUED") if path.exists() else None
        if status in ("IN_PROGRESS", "IN_REVIEW") or any(group_alive(g) for g in (rec["pgid"], rec["owner_pid"]) if g):
            continue
        trial.add("stale_records", [f"{rec['order']}/{rec['task']} is {status} but its record was left"])
        (state(root) / "workers" / rec["order"] / f"{rec['task']}.json").unlink(missing_ok=True)


# ---- 1. SIGKILL of `aipm run` at random moments ------------------------------------------------------------


def kill_run_trial(root: Path, seed: int, n_tasks: int, kills: int, workers: int = 4, work: str = "sleep 0.2",
                   order_maker=None) -> Trial:
    """Start `aipm run`, SIGKILL it at a seeded moment, start it again ... `kills` times, then let one finish."""
    order = root / "orders" / "ORD"
    journal = root / "journal.txt"
    (order_maker or random_order)(order, journal, n=n_tasks, seed=seed, work=work)
    before = task_texts(order)
    rng = random.Random(seed)
    trial = Trial("kill aipm run", seed, n_tasks)
    watch = RecordWatch(root)
    try:
        attempts, rc = 0, None
        while trial.kills < kills and attempts < kills * 3:
            attempts += 1
            proc = Proc(root, *run_args(workers, "--json"))
            if rng.random() < 0.3:
                # A moment in wall-clock time: start-up, recovery, launching, waiting, finishing.
                try:
                    proc.p.wait(timeout=rng.uniform(0.1, 1.2))
                except subprocess.TimeoutExpired:
                    pass
            else:
                # A moment just after the k-th event (a start, an adoption, a finish) plus a few ms.
                proc.wait_lines(rng.randint(1, 2 * workers))
                time.sleep(rng.uniform(0, 0.03))
            proc.kill()
            rc = proc.wait()
            if rc == -signal.SIGKILL:
                trial.kills += 1
            trial.log.append(f"run → {rc} after {len(proc.lines)} events")
            if rc == 0:
                break
            if rc != -signal.SIGKILL:
                repair_stale_records(root, trial)
        if rc != 0:
            rc = finish_order(root, trial, workers)
    finally:
        pgids = watch.stop()
    pgids |= journal_pids(journal)
    statuses = task_statuses(order)
    trial.add("lost", [f"{t} is {s} at the end" for t, s in sorted(statuses.items()) if s != "DONE"])
    if rc != 0:
        trial.add("lost", [f"the last run exited {rc}"])
    trial.add_check(check(journal, order, max_workers=workers, root=root))
    trial.add_end(end_state(root, order, before, pgids))
    return trial


# Symptoms of known bugs, each also reproduced on its own by a test: the random scenarios set them apart while
# the bug is open (and benchmarks/chaos.py counts them). None is open now.
KNOWN: tuple[str, ...] = ()


def unexpected(trial: Trial) -> dict[str, list[str]]:
    return {c: v for c, v in trial.problems.items() if c not in KNOWN}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_of_run_at_random_moments_loses_nothing(project, seed):
    trial = kill_run_trial(project.root, seed, n_tasks=12, kills=3, work="sleep 0.3")
    assert unexpected(trial) == {}, str(trial)
    assert trial.kills >= 1, str(trial)  # the scenario happened: runs died by SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 105))
def test_long_sigkill_of_run(tmp_path, seed):
    from conftest import Project

    trial = kill_run_trial(Project(tmp_path).root, seed, n_tasks=40, kills=10, work="sleep 0.3")
    assert unexpected(trial) == {}, str(trial)


def _full_pipe() -> tuple[int, int]:
    """A pipe whose buffer is already full: a process writing to it blocks at its first write."""
    r, w = os.pipe()
    fcntl.fcntl(w, 1031, 4096)  # F_SETPIPE_SZ: one page
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"x" * 512)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    return r, w


@pytest.mark.parametrize("targets", [[], ["a.txt"]], ids=["no-targets", "with-targets"])
def test_sigkill_right_after_a_worker_spawned_neither_reruns_nor_drops_it(project, targets):
    """Found by the random kills (a double run, or a result dropped as 'locked by another worker'); fixed in
    de8c400 (the command waits for a go sent once its record is on disk). This pins the moment down."""
    order = project.order()
    journal = project.root / "journal.txt"
    gate = project.root / "gate"
    write_task(order, "A", command=journal_command(journal, f"while [ ! -e {gate} ]; do sleep 0.02; done"),
               target_files=targets)
    # The supervisor's first event ("started") blocks on a full stdout pipe, as behind a stalled
    # `aipm run --json | consumer`: the kill lands with the worker just spawned. Before de8c400 the worker's record
    # did not name it yet at that point (and "started" was written before the record).
    r, w = _full_pipe()
    first = subprocess.Popen(aipm_argv(project.root, *run_args(5, "--json")), stdout=w, stderr=subprocess.DEVNULL)
    os.close(w)
    try:
        wait_for(lambda: spans(journal), timeout=60)
        first.kill()
        first.wait()
    finally:
        os.close(r)
    # The first worker lives on (it waits for the gate) while a second run decides what to do with task A.
    second = Proc(project.root, *run_args(5, "--json"))
    wait_for(lambda: second.p.poll() is not None or any(
        e.get("task") == "A" and e["event"] in ("adopted", "started", "launch_failed") for e in second.events()),
        timeout=120)
    gate.touch()
    rc = second.wait()
    wait_for(lambda: all(not group_alive(pid) for pid in journal_pids(journal)), timeout=30)
    assert (rc, task_statuses(order)) == (0, {"A": "DONE"}), second.output
    assert check(journal, order) == []  # A ran once: the orphan was adopted, not started again


def test_a_stalled_reader_of_run_output_does_not_block_the_project(project):
    """Found by this suite: `run` wrote its events while holding the project's launch lock, so a stalled reader of
    its output (a paused pager, Ctrl-S in a terminal) blocked every command that takes the lock. Fixed in dcd83a2."""
    order = project.order()
    journal = project.root / "journal.txt"
    gate = project.root / "gate"
    write_task(order, "A", command=journal_command(journal, f"while [ ! -e {gate} ]; do sleep 0.02; done"),
               target_files=["a.txt"])
    r, w = _full_pipe()  # nobody reads: the run's first event ("started") blocks
    run = subprocess.Popen(aipm_argv(project.root, *run_args(5, "--json")), stdout=w, stderr=subprocess.DEVNULL)
    os.close(w)
    try:
        wait_for(lambda: spans(journal), timeout=60)
        proc = project.aipm("locks", "--json", timeout=6)  # raises TimeoutExpired while the lock is held
        assert proc.returncode == 0
    finally:
        run.kill()
        run.wait()
        os.close(r)
        gate.touch()
        wait_for(lambda: all(not group_alive(pid) for pid in journal_pids(journal)), timeout=30)


@pytest.mark.parametrize("left_at", ["DONE", "QUEUED"])
def test_record_left_by_a_kill_after_the_final_write_does_not_hold_files(project, left_at):
    """Found by the random kills: a record left by a SIGKILL after the task's final status write (before the record
    was removed) held the task's files forever; recovery only looked at running tasks. Fixed in dcd83a2."""
    order = project.order()
    journal = project.root / "journal.txt"
    # DONE: killed in Supervisor._apply between update_task(DONE) and _drop(); QUEUED: killed in
    # recovery.interrupt between update_task(QUEUED) and remove_record(). The state is what such a kill leaves.
    a = write_task(order, "A", command=journal_command(journal), target_files=["x.txt"])
    a.write_text(a.read_text() + f"status: {left_at}\nattempts: {1 if left_at == 'DONE' else 0}\n")
    write_task(order, "B", command=journal_command(journal), target_files=["x.txt"])
    records = state(project.root, make=True) / "workers" / "ORD"
    records.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that existed and is gone
    (records / "A.json").write_text(json.dumps({
        "order": "ORD", "order_dir": str(order), "task": "A", "task_file": str(a), "attempt": 1,
        "targets": ["x.txt"], "log": str(project.root / "A.log"), "exit_file": str(project.root / "A.exit"),
        "started_at": "2025-01-01T00:00:00+00:00", "owner_pid": dead.pid, "owner_ctime": 1.0, "pid": dead.pid,
        "ctime": 1.0, "pgid": dead.pid}))
    proc = project.aipm(*run_args(5), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(task_statuses(order).values()) == {"DONE"}
    assert worker_records(project.root) == [] and cli_locks(project.root) == []


@pytest.mark.parametrize("early", ["0\n", ""])
def test_an_exit_code_left_in_the_early_exit_file_is_recorded_not_run_again(project, early):
    """The compiled wrapper writes its command's code into `<exit file>.w` and then names it; one SIGKILLed between
    the two (with its owner gone too) left the code only there, and recovery took the task for never finished and
    ran it again (found by review). The code there is the outcome: recorded, not run again. An empty `.w` says
    only that the wrapper started: that attempt is interrupted and the task runs again, as before."""
    order = project.order()
    journal = project.root / "journal.txt"
    a = write_task(order, "A", command=journal_command(journal), target_files=["x.txt"])
    a.write_text(a.read_text() + "status: IN_PROGRESS\nattempts: 1\n")
    exit_file = state(project.root, make=True) / "exit" / "ORD" / "A.1"
    exit_file.parent.mkdir(parents=True)
    Path(f"{exit_file}.w").write_text(early)
    records = state(project.root) / "workers" / "ORD"
    records.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that existed and is gone: the wrapper and its owner
    (records / "A.json").write_text(json.dumps({
        "order": "ORD", "order_dir": str(order), "task": "A", "task_file": str(a), "attempt": 1,
        "targets": ["x.txt"], "log": str(project.root / "A.log"), "exit_file": str(exit_file),
        "started_at": "2025-01-01T00:00:00+00:00", "owner_pid": dead.pid, "owner_ctime": 1.0, "pid": dead.pid,
        "ctime": 1.0, "pgid": dead.pid, "number": 1}))
    proc = project.aipm(*run_args(5), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = yaml.safe_load(a.read_text())
    assert done["status"] == "DONE" and done["exit_code"] == 0
    ran = spans(journal) if journal.exists() else []
    assert (len(ran), done["attempts"]) == (0 if early else 1, 1)  # an interrupted attempt is given back
    assert not any(exit_file.parent.iterdir())  # spent, early file included


def test_temp_file_of_a_killed_write_is_cleaned_up(project):
    """Found by the random kills: a SIGKILL inside a task-file write left `.TASK.yaml.XXXX.tmp` in the order
    directory, and nothing removed it. Fixed in dcd83a2 (recovery removes them under the launch lock)."""
    order = project.order()
    write_task(order, "A", command="true")
    # What a writer killed inside writer.atomic_write leaves: the new text in a temp file beside the task file.
    (order / ".A.yaml.k1ll3d.tmp").write_text((order / "A.yaml").read_text() + "status: IN_PROGRESS\n")
    assert project.aipm(*run_args(5)).returncode == 0
    project.aipm("recover")
    assert temp_files(order) == []


# ---- 2. SIGKILL of random workers --------------------------------------------------------------------------


def with_attempts(order_dir: Path, max_attempts: int) -> None:
    for path in order_dir.glob("*.yaml"):
        path.write_text(path.read_text() + f"max_attempts: {max_attempts}\n")


def kill_workers_trial(root: Path, seed: int, n_tasks: int, ratio: float = 0.4, workers: int = 4,
                       work: str = "sleep 0.8") -> Trial:
    """Run an order while SIGKILLing a seeded share of the attempts (the whole group, or only its leader)."""
    order = root / "orders" / "ORD"
    journal = root / "journal.txt"
    random_order(order, journal, n=n_tasks, seed=seed, work=work)
    with_attempts(order, 2)
    before = task_texts(order)
    rng = random.Random(seed)
    trial = Trial("kill workers", seed, n_tasks)
    watch = RecordWatch(root)
    proc = Proc(root, *run_args(workers, "--json"))
    decided: set[int] = set()
    killed: dict[str, set[int]] = {}  # task → attempts that got a SIGKILL
    try:
        while proc.p.poll() is None:
            for span_pid, task in _open_spans(journal):
                if span_pid in decided:
                    continue
                decided.add(span_pid)
                if rng.random() >= ratio:
                    continue
                attempt = sum(s.task == task for s in spans(journal))
                time.sleep(rng.uniform(0, 0.3))  # somewhere in the attempt
                how = rng.choice(["group", "leader"])
                try:
                    (os.killpg if how == "group" else os.kill)(span_pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                trial.kills += 1
                killed.setdefault(task, set()).add(attempt)
                trial.log.append(f"killed {task} attempt {attempt} ({how} {span_pid})")
            time.sleep(0.02)
        rc = proc.wait()
        trial.log.append(f"run → {rc}: {proc.output[-600:]}")
    finally:
        pgids = watch.stop()
    pgids |= journal_pids(journal)
    trial.add_check(check(journal, order, max_workers=workers, once=False, root=root))
    consistent_outcomes(trial, order, journal, rc, max_attempts=2, killed=killed)
    trial.add_end(end_state(root, order, before, pgids))
    return trial


def _open_spans(journal: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(pid, task) of the journal's starts with no end yet; `text`: the journal as already read."""
    started: dict[int, str] = {}
    if text is None:
        text = journal.read_text() if journal.exists() else ""
    if text:
        for line in text.splitlines():
            kind, task, _, pid = line.split()
            if kind == "start":
                started[int(pid)] = task
            else:
                started.pop(int(pid), None)
    return sorted(started.items())


def consistent_outcomes(trial: Trial, order: Path, journal: Path, rc: int, max_attempts: int,
                        killed: dict[str, set[int]]) -> None:
    """Each task's status agrees with its attempts and the journal: every attempt ran once; DONE after a run
    that finished, with exit 0; FAILED only when every allowed attempt was killed (`killed`: task → attempts);
    QUEUED only behind a FAILED dependency; the run's exit code says whether all are DONE."""
    tasks = {p.stem: yaml.safe_load(p.read_text()) for p in order.glob("*.yaml")}
    runs: dict[str, list] = {}
    for span in spans(journal):
        runs.setdefault(span.task, []).append(span)

    def doomed(tid: str) -> bool:
        return any(tasks[d].get("status") == "FAILED" or doomed(d) for d in tasks[tid].get("depends_on") or [])

    for tid, data in sorted(tasks.items()):
        mine, status, attempts = runs.get(tid, []), data.get("status", "QUEUED"), data.get("attempts", 0)
        if len(mine) > attempts:
            trial.add("double_run", [f"{tid}: {len(mine)} runs in {attempts} attempt(s)"])
        elif len(mine) < attempts:
            trial.add("lost", [f"{tid}: {attempts} attempt(s) but {len(mine)} run(s) in the journal"])
        if status == "DONE":
            ok = data.get("exit_code") == 0 and mine and mine[-1].end is not None
        elif status == "FAILED":
            ok = attempts == max_attempts and data.get("exit_code") not in (0, None) and killed.get(tid, set()) >= set(
                range(1, max_attempts + 1))
        elif status == "QUEUED":
            ok = attempts == 0 and doomed(tid)
        else:
            ok = False
        if not ok:
            trial.add("lost", [f"{tid}: {status} after {attempts} attempt(s), exit {data.get('exit_code')}, "
                               f"runs {[(s.end is not None) for s in mine]}"])
    expected_rc = 0 if all(d.get("status") == "DONE" for d in tasks.values()) else 1
    if rc != expected_rc:
        trial.add("lost", [f"run exited {rc}, expected {expected_rc}"])


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_of_random_workers_retries_and_ends_consistent(project, seed):
    trial = kill_workers_trial(project.root, seed, n_tasks=10)
    assert trial.problems == {}, str(trial)
    assert trial.kills >= 2, str(trial)  # the scenario happened


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(200, 205))
def test_long_sigkill_of_random_workers(tmp_path, seed):
    from conftest import Project

    trial = kill_workers_trial(Project(tmp_path).root, seed, n_tasks=30)
    assert trial.problems == {}, str(trial)


# ---- 3. SIGSTOP of a worker past its timeout ---------------------------------------------------------------


@pytest.mark.parametrize("max_attempts,term", [(1, "default"), (2, "default"), (1, "ignored")])
def test_sigstop_past_timeout_is_killed_by_the_timeout(project, max_attempts, term):
    order = project.order()
    journal = project.root / "journal.txt"
    trap = "trap '' TERM; " if term == "ignored" else ""  # the group ignores SIGTERM: only SIGKILL ends it
    # The first attempt hangs; a retry finishes at once.
    work = f'{trap}if [ "$AIPM_ATTEMPT" = 1 ]; then sleep 60; sleep 60; fi'
    write_task(order, "STOP", command=journal_command(journal, work), timeout=1, max_attempts=max_attempts,
               target_files=["s.txt"])
    write_task(order, "NEXT", command=journal_command(journal), target_files=["s.txt"], depends_on=[],
               priority="P3")
    before = task_texts(order)
    proc = Proc(project.root, *run_args(5, "--json"))
    pgid = wait_for(lambda: next((pid for pid, task in _open_spans(journal) if task == "STOP"), None), timeout=60)
    os.killpg(pgid, signal.SIGSTOP)
    # Keep it stopped until aipm acts on the timeout (the attempt is over), then send SIGCONT as a user would.
    wait_for(lambda: proc.p.poll() is not None or "timed out" in _log(project.root, "STOP", 1), timeout=60)
    try:
        os.killpg(pgid, signal.SIGCONT)
    except ProcessLookupError:
        pass
    rc = proc.wait()
    expected = "DONE" if max_attempts == 2 else "FAILED"
    assert task_statuses(order) == {"STOP": expected, "NEXT": "DONE"}, proc.output
    assert rc == (0 if expected == "DONE" else 1), proc.output
    log = _log(project.root, "STOP", 1)
    assert "attempt 1 ended: timed out after 1 s; process group killed" in log, log
    if term == "default":
        # SIGTERM reached the stopped group: it was sent with SIGCONT (else only the SIGKILL 5 s later would). The
        # wrapper outlives it and writes the command's end: 128 + SIGTERM.
        assert "(exit 143)" in log, log
    first = [s for s in spans(journal) if s.task == "STOP"][0]
    assert first.end is None  # the stopped attempt never got to finish its work
    assert check(journal, order, once=False) == []
    state = end_state(project.root, order, before, journal_pids(journal) | {pgid})
    assert state == {"corrupt": [], "stale_locks": [], "orphans": [], "temp_files": []}


def stop_workers_trial(root: Path, seed: int, n_tasks: int, ratio: float = 0.4, workers: int = 4,
                       work: str = "sleep 0.3") -> Trial:
    """SIGSTOP a seeded share of first attempts (timeout 1 s) and SIGCONT each at a seeded moment, before or
    after its deadline: every task must end DONE (a timed-out attempt is retried), nothing may be left."""
    order = root / "orders" / "ORD"
    journal = root / "journal.txt"
    random_order(order, journal, n=n_tasks, seed=seed, work=work)
    for path in order.glob("*.yaml"):
        path.write_text(path.read_text() + "timeout: 1\nmax_attempts: 2\n")
    before = task_texts(order)
    rng = random.Random(seed)
    trial = Trial("SIGSTOP/SIGCONT vs timeout", seed, n_tasks)
    watch = RecordWatch(root)
    proc = Proc(root, *run_args(workers, "--json"))
    decided: set[int] = set()
    stopped: dict[int, tuple[str, float]] = {}  # pgid → (task, when to continue it)
    hit: dict[str, set[int]] = {}  # task → attempts stopped (only first attempts)
    try:
        while proc.p.poll() is None:
            # One read for both: counted from an earlier read, a second attempt that started in between passed
            # for a first one and was stopped too (seed 3003 lost a task that way).
            text = journal.read_text() if journal.exists() else ""
            starts = collections.Counter(line.split()[1] for line in text.splitlines() if line.startswith("start "))
            for pgid, task in _open_spans(journal, text):
                if pgid in decided:
                    continue
                decided.add(pgid)
                if starts[task] == 1 and rng.random() < ratio:
                    try:
                        os.killpg(pgid, signal.SIGSTOP)
                    except ProcessLookupError:
                        continue
                    stopped[pgid] = (task, time.monotonic() + rng.uniform(0.2, 3.0))
                    hit.setdefault(task, set()).add(1)
                    trial.kills += 1
            for pgid, (task, at) in list(stopped.items()):
                if time.monotonic() >= at:
                    del stopped[pgid]
                    try:
                        os.killpg(pgid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
            time.sleep(0.02)
        rc = proc.wait()
        trial.log.append(f"run → {rc}: {proc.output[-600:]}")
    finally:
        for pgid in stopped:
            try:
                os.killpg(pgid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        pgids = watch.stop()
    pgids |= journal_pids(journal)
    trial.add_check(check(journal, order, max_workers=workers, once=False, root=root))
    consistent_outcomes(trial, order, journal, rc, max_attempts=2, killed=hit)
    trial.add("lost", [f"{t} is {s}" for t, s in sorted(task_statuses(order).items()) if s != "DONE"])
    for span in spans(journal):
        if span.end is None and "timed out" not in _log(root, span.task, 1):
            trial.add("lost", [f"{span.task}: attempt 1 ended unfinished without a timeout"])
    trial.add_end(end_state(root, order, before, pgids))
    return trial


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(500, 503))
def test_long_sigstop_and_sigcont_around_timeouts(tmp_path, seed):
    from conftest import Project

    trial = stop_workers_trial(Project(tmp_path).root, seed, n_tasks=20)
    assert unexpected(trial) == {}, str(trial)
    assert trial.kills >= 1, str(trial)


def _log(root: Path, task: str, attempt: int) -> str:
    path = root / ".aipm" / "logs" / "ORD" / f"{task}.{attempt}.log"
    return path.read_text() if path.exists() else ""


# ---- 4. four launchers racing on one order -----------------------------------------------------------------


def racing_trial(root: Path, seed: int, n_tasks: int, work: str = "sleep 0.05", workers: int = 5) -> Trial:
    order = root / "orders" / "ORD"
    journal = root / "journal.txt"
    random_order(order, journal, n=n_tasks, seed=seed, work=work)
    before = task_texts(order)
    trial = Trial("4 racing launchers", seed, n_tasks)
    watch = RecordWatch(root)
    flags = ("--no-resource-monitoring", "--max-workers", str(workers))
    commands = [("launch", "ORD", *flags), ("run", "ORD", *flags), ("exec", "ORD/T000", "--parallel", *flags),
                ("run", "ORD", *flags)]
    random.Random(seed).shuffle(commands)
    procs = [Proc(root, *args) for args in commands]
    try:
        # Detached workers and the supervisors finish the order (or leave nothing running that could).
        wait_for(lambda: all(p.p.poll() is not None for p in procs) or (
            set(task_statuses(order).values()) <= set(FINAL) and not worker_records(root)), timeout=240)
        for proc in procs:
            try:
                rc = proc.p.wait(timeout=8)  # nothing is left to run: a live supervisor now waits for nothing
            except subprocess.TimeoutExpired:
                trial.add("hung", [f"{' '.join(proc.args[:2])} still running with the order finished"])
                proc.kill()
            rc = proc.wait()
            trial.log.append(f"{' '.join(proc.args[:2])} → {rc}: {proc.output.strip()[-300:]}")
            if rc not in (0, 1, -signal.SIGKILL):
                trial.add("lost", [f"{' '.join(proc.args[:2])} exited {rc}"])
        wait_for(lambda: not worker_records(root), timeout=120)
        if set(task_statuses(order).values()) != {"DONE"}:
            finish_order(root, trial, workers)  # a run at the end starts whatever nobody was left to start
    finally:
        for proc in procs:
            proc.kill()
        pgids = watch.stop()
    return tally(trial, root, order, journal, before, pgids, workers)


def tally(trial: Trial, root: Path, order: Path, journal: Path, before: dict[str, str], pgids: set[int],
          workers: int) -> Trial:
    """The findings of a trial that must end with every task DONE, each run once."""
    pgids |= journal_pids(journal)
    trial.add("lost", [f"{t} is {s} at the end" for t, s in sorted(task_statuses(order).items()) if s != "DONE"])
    trial.add_check(check(journal, order, max_workers=workers, root=root))
    trial.add_end(end_state(root, order, before, pgids))
    return trial


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_four_racing_launchers_on_one_order(project, seed):
    trial = racing_trial(project.root, seed, n_tasks=20)
    assert unexpected(trial) == {}, str(trial)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(300, 310))
def test_long_four_racing_launchers(tmp_path, seed):
    from conftest import Project

    trial = racing_trial(Project(tmp_path).root, seed, n_tasks=40)
    assert unexpected(trial) == {}, str(trial)


def test_two_runs_that_owned_workers_at_once_both_exit_when_the_order_is_done(project):
    """Found by the racing launchers: two runs that each owned a worker while the other lived watched each other's
    pid and, once the order was finished, waited for each other forever. Fixed in dcd83a2."""
    order = project.order()
    journal = project.root / "journal.txt"
    # S1 lasts until S2 has started; S2 lasts until S1 is DONE, and a little longer.
    write_task(order, "S1", command=journal_command(journal, "while [ ! -e s2.started ]; do sleep 0.02; done"),
               target_files=["x"])
    write_task(order, "S2", command=journal_command(
        journal, "touch s2.started; until grep -q 'status: DONE' orders/ORD/S1.yaml; do sleep 0.02; done; sleep 1"),
        target_files=["y"])
    # A (one worker slot) starts S1; B (two slots) starts S2 while S1 runs. A finishes S1 while B's S2 runs, so
    # A watches B, and B has watched A since it saw S1's record.
    a = Proc(project.root, *run_args(1, "--json"))
    wait_for(lambda: any(s.task == "S1" for s in spans(journal)), timeout=60)
    b = Proc(project.root, *run_args(2, "--json"))
    wait_for(lambda: task_statuses(order) == {"S1": "DONE", "S2": "DONE"} and not worker_records(project.root),
             timeout=60)
    try:
        # The order is finished and nothing runs: both supervisors have nothing left to wait for.
        wait_for(lambda: a.p.poll() is not None and b.p.poll() is not None, timeout=6)
    finally:
        a.kill()
        b.kill()
        a.wait()
        b.wait()
    assert (a.p.returncode, b.p.returncode) == (0, 0), a.output + b.output
    assert check(journal, order) == []


# ---- 5. the lost-update probe ------------------------------------------------------------------------------


def counter_order(counters: int = 3, per_counter: int = 10, nap: str = "0.05"):
    """Tasks that read a counter, sleep, and write it back +1, each naming its counter in target_files in one of
    the spellings aipm must see as the same file (or the whole directory). Returns an order maker."""

    def make(order_dir: Path, journal: Path, n: int, seed: int, work: str = "") -> None:
        rng = random.Random(seed)
        root = order_dir.parents[1]
        order_dir.mkdir(parents=True, exist_ok=True)
        (root / "counters").mkdir(exist_ok=True)
        for c in range(counters):
            (root / "counters" / f"c{c}.txt").write_text("0\n")
        ids = list(range(counters * per_counter))
        rng.shuffle(ids)
        for i, k in enumerate(ids):
            c = k % counters
            spelling = rng.choice([f"counters/c{c}.txt", f"./counters/c{c}.txt", f"counters/x/../c{c}.txt",
                                   f"counters/c{c}.*", f"counters/c[{c}].txt", "counters", "counters/"])
            work = f'v=$(cat counters/c{c}.txt); sleep {nap}; echo $((v+1)) > counters/c{c}.txt'
            body = {"id": f"T{i:03d}", "priority": f"P{rng.randint(0, 3)}", "target_files": [spelling],
                    "command": journal_command(journal, work, argv=i % 2 == 1)}
            (order_dir / f"T{i:03d}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))

    make.counters = counters
    make.per_counter = per_counter
    return make


def counts_are_exact(trial: Trial, root: Path, maker) -> None:
    for c in range(maker.counters):
        got = int((root / "counters" / f"c{c}.txt").read_text())
        if got < maker.per_counter:
            trial.add("lost", [f"counter c{c} is {got}, expected {maker.per_counter}: an update was lost"])
        elif got > maker.per_counter:
            trial.add("double_run", [f"counter c{c} is {got}, expected {maker.per_counter}: an update ran twice"])


def counter_trial(root: Path, seed: int, kills: int = 0, workers: int = 5, nap: str = "0.05") -> Trial:
    maker = counter_order(nap=nap)
    n = maker.counters * maker.per_counter
    if kills:
        trial = kill_run_trial(root, seed, n, kills, workers=workers, order_maker=maker)
        trial.scenario = "lost-update probe + kill run"
    else:
        order = root / "orders" / "ORD"
        journal = root / "journal.txt"
        maker(order, journal, n, seed)
        before = task_texts(order)
        trial = Trial("lost-update probe", seed, n)
        watch = RecordWatch(root)
        try:
            proc = Proc(root, *run_args(workers))
            rc = proc.wait()
        finally:
            pgids = watch.stop()
        if rc != 0:
            trial.add("lost", [f"run exited {rc}: {proc.output[-400:]}"])
        trial.add("lost", [f"{t} is {s}" for t, s in sorted(task_statuses(order).items()) if s != "DONE"])
        trial.add_check(check(journal, order, max_workers=workers, root=root))
        trial.add_end(end_state(root, order, before, pgids | journal_pids(journal)))
    counts_are_exact(trial, root, maker)
    return trial


@pytest.mark.parametrize("seed", [1, 2])
def test_lost_update_probe_counts_are_exact(project, seed):
    trial = counter_trial(project.root, seed)
    assert trial.problems == {}, str(trial)


def test_lost_update_probe_survives_sigkill_of_run(project):
    trial = counter_trial(project.root, seed=5, kills=2, nap="0.1")
    assert unexpected(trial) == {}, str(trial)
    assert trial.kills >= 1, str(trial)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(400, 405))
def test_long_lost_update_probe_with_kills(tmp_path, seed):
    from conftest import Project

    trial = counter_trial(Project(tmp_path).root, seed, kills=6, nap="0.2")
    assert unexpected(trial) == {}, str(trial)


# ---- 6. a write that fails midway (RLIMIT_FSIZE) -----------------------------------------------------------


def _big_task(order: Path, journal: Path) -> Path:
    """A task file of a few KiB: a long comment (bytes aipm must keep) above the fields."""
    pad = "".join(f"# note {i:04d}: {'lorem ipsum ' * 5}\n" for i in range(50))
    path = order / "BIG.yaml"
    path.write_text(f"# a big task file\n{pad}id: BIG\ncommand: {json.dumps(journal_command(journal))}\n"
                    "target_files: [big.txt]\n")
    return path


def _sizes(text: str) -> tuple[int, int]:
    """Bytes of the task file after the IN_PROGRESS write, and after the DONE write."""
    from aipm.model import Status
    from aipm.rewriting import rewrite
    from aipm.writer import now

    started = rewrite(text, {"status": Status.IN_PROGRESS, "attempts": 1, "started_at": now(),
                             "finished_at": None, "exit_code": None})
    done = rewrite(started, {"status": Status.DONE, "exit_code": 0, "finished_at": now()})
    return len(started.encode()), len(done.encode())


def _run_limited(root: Path, limit: int) -> subprocess.CompletedProcess:
    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(aipm_argv(root, *run_args(5)), capture_output=True, text=True, timeout=120,
                          cwd=root, preexec_fn=limit_files)


def test_write_failing_at_launch_leaves_the_file_intact_and_reports(project):
    order = project.order()
    journal = project.root / "journal.txt"
    path = _big_task(order, journal)
    original = path.read_bytes()
    proc = _run_limited(project.root, limit=len(original) - 1)  # even the IN_PROGRESS write cannot fit
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "File too large" in proc.stdout + proc.stderr
    assert path.read_bytes() == original  # not a byte changed
    assert corrupt_files(order, {path.name: original.decode()}, project.root) == []
    assert not journal.exists()  # the worker never started
    assert worker_records(project.root) == [] and cli_locks(project.root) == []
    # Without the limit the same order runs.
    assert project.aipm(*run_args(5)).returncode == 0
    assert task_statuses(order) == {"BIG": "DONE"}


def _fail_the_finishing_write(project):
    order = project.order()
    journal = project.root / "journal.txt"
    path = _big_task(order, journal)
    original = path.read_text()
    started, done = _sizes(original)
    assert started < done
    proc = _run_limited(project.root, limit=started)  # IN_PROGRESS fits, DONE (13 bytes longer) does not
    return order, journal, path, original, proc


def test_write_failing_when_a_task_finishes_leaves_the_file_intact_and_recoverable(project):
    order, journal, path, original, proc = _fail_the_finishing_write(project)
    assert proc.returncode != 0
    assert "File too large" in proc.stderr
    # The task file holds the last complete write (IN_PROGRESS), every other byte as it was, no temp file.
    assert corrupt_files(order, {path.name: original}, project.root) == []
    assert task_statuses(order) == {"BIG": "IN_PROGRESS"}
    # The next run (no limit) adopts the finished worker's exit code: DONE, and the task ran once.
    wait_for(lambda: all(not group_alive(pid) for pid in journal_pids(journal)), timeout=30)
    again = project.aipm(*run_args(5))
    assert again.returncode == 0, again.stdout + again.stderr
    assert task_statuses(order) == {"BIG": "DONE"}
    assert check(journal, order) == []
    assert user_bytes(path.read_text()) == user_bytes(original)
    assert worker_records(project.root) == [] and cli_locks(project.root) == []


def test_write_failing_when_a_task_finishes_is_reported_in_one_line(project):
    """Found by this suite: the failed write crashed the supervisor with a Python traceback naming neither the file
    nor the task. Fixed in dcd83a2."""
    order, _, path, _, proc = _fail_the_finishing_write(project)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "aipm: error:" in proc.stderr and str(path) in proc.stderr, proc.stderr


# ---- 7. workers that reset, delete or break their own task file (issue 11.1, 11.6) ---------------------------


RESETS = {
    # What an agent's `git checkout -- .` / `git stash` / a careless edit does to the file of the task it works on.
    "sed": "sed -i 's/^status: IN_PROGRESS/status: QUEUED/' \"orders/ORD/$AIPM_TASK_ID.yaml\"",
    "git": "git checkout -q -- \"orders/ORD/$AIPM_TASK_ID.yaml\" 2>/dev/null || true",
}


def _git_commit_all(root: Path) -> None:
    git = ["git", "-C", str(root), "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (root / ".gitignore").write_text("journal.txt\n")  # the test's journal is no worker's output (scope audit)
    subprocess.run([*git, "add", "orders", ".gitignore"], check=True)
    subprocess.run([*git, "commit", "-qm", "tasks"], check=True)


def reset_trial(root: Path, seed: int, n_tasks: int, how: str = "sed", owner: str = "run", workers: int = 3,
                work: str = "sleep 0.3") -> Trial:
    """Every worker resets its own task file to what it was before aipm wrote IN_PROGRESS (half of the tasks have
    no target files, so no kernel lock stops a second copy), while extra `aipm launch` calls race the owner.
    Each task must run exactly once, never more than `workers` at a time, and end DONE."""
    order = root / "orders" / "ORD"
    journal = root / "journal.txt"
    (root / "aipm.yaml").write_text(f"max_workers: {workers}\n")
    random_order(order, journal, n=n_tasks, seed=seed, work=f"{RESETS[how]}; {work}")
    rng = random.Random(seed)
    for path in sorted(order.glob("*.yaml")):
        if rng.random() < 0.5:
            header, body = path.read_text().split("\n", 1)
            data = yaml.safe_load(body)
            data.pop("target_files")
            path.write_text(header + "\n" + yaml.safe_dump(data, sort_keys=False))
    if how == "git":
        _git_commit_all(root)
    before = task_texts(order)
    trial = Trial(f"reset by its worker ({how}, {owner})", seed, n_tasks)
    watch = RecordWatch(root)
    flags = ("--no-resource-monitoring", "--max-workers", str(workers))
    main = Proc(root, *(run_args(workers, "--json") if owner == "run" else ("launch", "ORD", *flags)))
    racers: list[Proc] = []

    def settled() -> bool:
        if len(spans(journal)) > n_tasks:
            return True  # a runaway: tasks started again while their first copy ran or after it ended
        if owner == "run":
            return main.p.poll() is not None
        return set(task_statuses(order).values()) == {"DONE"} and not worker_records(root)

    try:
        for _ in range(3):  # racing launchers while the first workers run and reset their files
            wait_for(lambda: spans(journal) or main.p.poll() is not None, timeout=120)
            racers.append(Proc(root, "launch", "ORD", *flags))
            racers[-1].wait()
        try:
            wait_for(settled, timeout=240)
        except AssertionError:
            trial.add("hung", ["the order did not finish within 240 s"])
        if owner == "run":
            try:
                rc = main.p.wait(timeout=8)
            except subprocess.TimeoutExpired:
                rc = None
                trial.add("hung", ["run still running"])
            trial.log.append(f"run → {rc}: {main.output.strip()[-400:]}")
        wait_for(lambda: not any(r["pid"] and group_alive(r["pgid"]) for r in worker_records(root)), timeout=120)
    finally:
        main.kill()
        main.wait()
        pgids = watch.stop()
    return tally(trial, root, order, journal, before, pgids, workers)


@pytest.mark.parametrize("how,owner", [("sed", "run"), ("sed", "launch"), ("git", "run")])
def test_a_worker_that_resets_its_own_task_file_runs_once(project, how, owner):
    """Issue 11.1: a file reset to QUEUED under its live worker was launched again and again (368 copies in 30 s
    under max_workers 3); the outcome of the first copy was dropped as 'moved on by someone else'."""
    if how == "git" and not shutil.which("git"):
        pytest.skip("git is not installed")
    trial = reset_trial(project.root, seed=7, n_tasks=8, how=how, owner=owner)
    assert trial.problems == {}, str(trial)


def test_why_and_detect_name_the_live_worker_of_a_reset_task(project):
    order = project.order()
    gate = project.root / "gate"
    write_task(order, "A", command=f"{RESETS['sed']}; while [ ! -e {gate} ]; do sleep 0.02; done")
    write_task(order, "B", command="true", depends_on=["A"])
    (project.root / "aipm.yaml").write_text("max_workers: 3\n")
    try:
        assert project.aipm("launch", "ORD").returncode == 0
        wait_for(lambda: task_statuses(order).get("A") == "QUEUED" and worker_records(project.root), timeout=60)
        pid = worker_records(project.root)[0]["pid"]
        why = project.json("why", "A")
        assert not why["launchable"] and why["reasons"][0]["reason"] == "worker_running", why
        assert f"its worker pid {pid} is still running" in why["reasons"][0]["detail"]
        detect = project.json("detect", "ORD")
        assert detect["launchable"] == [] and detect["free_slots"] == 2, detect
        assert {b["id"]: b["reason"] for b in detect["blocked"]} == {"A": "worker_running",
                                                                      "B": "waiting_on_dependencies"}
        again = project.aipm("launch", "ORD")  # and launch agrees
        assert "nothing to launch" in again.stdout and f"its worker pid {pid} is still running" in again.stdout, \
            again.stdout + again.stderr
    finally:
        gate.touch()
    wait_for(lambda: task_statuses(order) == {"A": "DONE", "B": "DONE"} and not worker_records(project.root),
             timeout=120)


def _damage_order(project, damage: str) -> tuple[Path, Path]:
    """A damages its own file and ends; B runs until A's command has ended (so it outlives A's finish); C
    depends on B. A second, unrelated problem must not stop the owner from supervising B and starting C."""
    order = project.order()
    journal = project.root / "journal.txt"
    act = {"delete": 'rm "orders/ORD/A.yaml"', "break": "echo 'oops: [' >> orders/ORD/A.yaml"}[damage]
    # A goes on (until the test opens its gate) after the damage, so its owner supervises it meanwhile.
    write_task(order, "A", command=journal_command(journal, f"{act}; while [ ! -e gate ]; do sleep 0.02; done; "
                                                               "touch a.ended"), target_files=["a.txt", "a.ended"])
    write_task(order, "B", command=journal_command(journal, "until [ -e a.ended ]; do sleep 0.02; done"),
               target_files=["b.txt"])
    write_task(order, "C", command=journal_command(journal), depends_on=["B"], target_files=["c.txt"])
    return order, journal


@pytest.mark.parametrize("damage", ["delete", "break"])
def test_a_task_file_deleted_or_broken_mid_run_does_not_abort_run(project, damage):
    """Issue 11.6: `run` exited 2 when a running task's file was deleted or broken, leaving B unsupervised."""
    order, journal = _damage_order(project, damage)
    original = (order / "A.yaml").read_text()  # what a `git checkout` of it would put back
    proc = Proc(project.root, *run_args(5, "--json"))
    try:
        # Reported as soon as the run sees it, while A still runs (the last valid version is kept).
        wait_for(lambda: any(e["event"] == "invalid_file" for e in proc.events()) or proc.p.poll() is not None,
                 timeout=120)
    finally:
        (project.root / "gate").touch()
    if damage == "break":  # A's outcome waits for its file's fix, and the run with it: B and C go on meanwhile
        wait_for(lambda: any(e["event"] == "waiting" and e["task"] == "A" for e in proc.events())
                 or proc.p.poll() is not None, timeout=120)
        wait_for(lambda: {k: task_statuses(order)[k] for k in ("B", "C")} == {"B": "DONE", "C": "DONE"}
                 or proc.p.poll() is not None, timeout=120)
        assert proc.p.poll() is None, proc.output
        _fix_and_recover(project, order, original, recover=False)
    rc = proc.wait(timeout=240)
    events = proc.events()
    assert [e["error"].endswith({"delete": "deleted while its task runs", "break": "did not find expected node "
                                 "content"}[damage]) for e in events if e["event"] == "invalid_file"] == [True], events
    statuses = task_statuses(order)
    assert {k: statuses[k] for k in ("B", "C")} == {"B": "DONE", "C": "DONE"}, proc.output
    # A's outcome is held, said once (the deleted file named), until the file is back (a deleted file's run exited
    # 0 and dropped the outcome, its log only, so A ran again once its file was put back) or fixed (the run waits).
    assert rc == {"delete": 1, "break": 0}[damage], proc.output
    errors = [e["error"] for e in events if e.get("task") == "A" and e["event"] == "error"]
    assert len(errors) == 1, proc.output
    if damage == "delete":
        assert f"{order / 'A.yaml'}: deleted or moved while it ran" in errors[0], errors
        _fix_and_recover(project, order, original)
    assert "Traceback" not in proc.output
    assert check(journal, order, root=project.root) == []  # A ran once


def _fix_and_recover(project, order: Path, original: str, recover: bool = True) -> None:
    """The user repairs A's file (or puts it back as it was): `aipm recover` (or the run that waits for the fix)
    records A's real outcome from its kept exit code."""
    path = order / "A.yaml"
    path.write_text("".join(line for line in path.read_text().splitlines(True) if not line.startswith("oops"))
                    if path.exists() else original)
    if recover:
        recovered = project.aipm("recover", "--json")
        assert recovered.returncode == 0, recovered.stderr
    wait_for(lambda: task_statuses(order).get("A") == "DONE" and not worker_records(project.root), timeout=120)


@pytest.mark.parametrize("damage", ["delete", "break"])
def test_a_task_file_deleted_or_broken_under_a_detached_owner(project, damage):
    """Issue 11.6: the detached owner (python -m aipm.work) died with a traceback."""
    order, journal = _damage_order(project, damage)
    original = (order / "A.yaml").read_text()
    (project.root / "gate").touch()  # nobody watches for the damage here: A ends right after it
    watch = RecordWatch(project.root)
    try:
        assert project.aipm("launch", "ORD").returncode == 0
        wait_for(lambda: task_statuses(order).get("B") == "DONE", timeout=240)
    finally:
        # Every owner and worker seen has ended (the owners start successors after dropping their record).
        groups = watch.stop()
        wait_for(lambda: not any(group_alive(g) for g in groups), timeout=240)
    logs = project.root / ".aipm" / "logs" / "ORD"
    text = "".join(p.read_text() for p in sorted(logs.glob("*.log")))
    assert "Traceback" not in text, text
    a_log = (logs / "A.1.log").read_text()
    assert "cannot record the outcome of A (exit 0)" in a_log, a_log
    if damage == "delete":  # held (its log said 'deleted meanwhile' and dropped it) until the file is back
        assert "A.yaml: deleted or moved while it ran" in a_log, a_log
        wait_for(lambda: task_statuses(order) == {"B": "DONE", "C": "DONE"}, timeout=120)
    else:
        # With A's file broken the order cannot load, so B's owner says so (in B's log) instead of starting C.
        assert "cannot start the successors of B" in (logs / "B.1.log").read_text()
    _fix_and_recover(project, order, original)
    assert project.aipm(*run_args(5)).returncode == 0
    assert check(journal, order, root=project.root) == []  # every task ran once


# ---- 8. a full disk (a tiny tmpfs) -------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs as the project root (root only): a worker can fill it for real."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# The worker fills the disk, leaving no spare file to write the outcome into (spares.py: the old version of a status
# write, reused, gives back the room the outcome needs), so the outcome's write needs room the disk does not have.
# Nor a status written ahead (writer.prepare: `run` writes A's clean exit while A runs, keeps it open, and a version
# not used is a spare): made after the worker's `rm -rf .aipm/spare` and before its fill, or removed while open (its
# room is freed only at its close, at A's end), it held the room in which A's FAILED was written (once in CI, at
# load 12). So the pool's files are emptied (truncated: the room of an open one too) and the disk filled again until
# none of them holds any. Exit 1, head's.
FILL_LEAVING_NO_SPARE = (
    'fill() { find .aipm/spare -type f -size +0 -exec truncate -s 0 {} + 2>/dev/null; '
    'head -c 1048576 /dev/zero >> fill.bin 2>/dev/null; filled=$?; }; '
    'fill; while [ -n "$(find .aipm/spare -type f -size +0 2>/dev/null)" ]; do fill; done; [ $filled = 0 ]')


@pytest.mark.parametrize("owner", ["run", "launch"])
def test_a_full_disk_neither_hangs_nor_reruns_the_task(tiny_disk, tmp_path, owner):
    """Issue 11.3: with the disk full when A ended, `run` printed that the exit code 'is kept', then waited forever
    for the owner its record named (itself); the exit file was empty, so the next run started A again."""
    from conftest import Project

    project = Project(tiny_disk)
    order = project.order()
    journal = tmp_path / "journal.txt"  # outside the full disk
    write_task(order, "A", command=journal_command(journal, FILL_LEAVING_NO_SPARE), target_files=["fill.bin"])
    if owner == "run":
        proc = Proc(project.root, *run_args(5))
        try:
            rc = proc.wait(timeout=120)  # a hang fails here
        finally:
            proc.kill()
        out = proc.output
        assert rc == 1, out
        assert out.count("cannot record the outcome of A") == 1, out  # each error printed once
        assert "Traceback" not in out
    else:
        assert project.aipm("launch", "ORD").returncode == 0
        wait_for(lambda: spans(journal) and spans(journal)[0].end, timeout=120)
        wait_for(lambda: not any(group_alive(r["owner_pid"]) for r in worker_records(project.root)
                                 if r["owner_pid"]), timeout=120)  # the owner ended: no hang
    leftovers = [str(p) for p in project.root.rglob(".*.tmp")]
    assert leftovers == []
    assert task_statuses(order) == {"A": "IN_PROGRESS"}  # the last write that fitted
    (project.root / "fill.bin").unlink()
    # A's exit code is kept in the state directory, which is not on the full disk (issue 11.5 moved it out of the
    # tree): the next run records A's real outcome and does not run it again. (An exit file left empty, when that
    # disk is full too, leaves the task INTERRUPTED instead: `unrecorded.py`.)
    again = project.aipm(*run_args(5), timeout=120)
    assert again.returncode == 1, again.stdout + again.stderr
    assert task_statuses(order) == {"A": "FAILED"}
    assert len(spans(journal)) == 1
    assert worker_records(project.root) == []
    # The person checks and decides: retry runs it again, as a new attempt.
    assert project.aipm("retry", "A").returncode == 0
    assert project.aipm(*run_args(5), timeout=120).returncode == 1  # it fills the disk again: same story
    assert len(spans(journal)) == 2


def test_a_full_disk_still_takes_the_outcome_into_a_spare(tiny_disk, tmp_path):
    """The status write that started A left A's old version as a spare: the outcome is written into it, in the room
    it held, so a worker that fills the disk cannot keep its own outcome from being recorded."""
    from conftest import Project

    project = Project(tiny_disk)
    order = project.order()
    journal = tmp_path / "journal.txt"
    write_task(order, "A", command=journal_command(journal, "head -c 1048576 /dev/zero > fill.bin 2>/dev/null"),
               target_files=["fill.bin"])
    proc = project.aipm(*run_args(5), timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "finish   A → FAILED (exit 1)" in proc.stdout and "cannot record" not in proc.stdout + proc.stderr
    assert task_statuses(order) == {"A": "FAILED"}
    assert len(spans(journal)) == 1 and worker_records(project.root) == []
    assert [str(p) for p in project.root.rglob(".*.tmp")] == []


# ---- 9. hostile workers: a cleaned tree, daemons left behind ------------------------------------------------


def hostile_trial(root: Path, seed: int, n_tasks: int, workers: int = 4) -> Trial:
    """A random order where some workers delete `.aipm/` and some leave a `setsid` daemon holding their locks,
    under a `run` and a `launch` racing. Daemons must die with their attempt; nothing may overlap or crash."""
    order = root / "orders" / "ORD"
    journal, daemons = root / "journal.txt", root / "daemons.txt"
    random_order(order, journal, n=n_tasks, seed=seed)
    rng = random.Random(seed)
    for i, path in enumerate(sorted(order.glob("*.yaml"))):
        data = yaml.safe_load(path.read_text())
        work = rng.choice(["sleep 0.05", "rm -rf .aipm; sleep 0.05",
                           f"setsid sh -c 'echo $$ >> \"{daemons}\"; exec sleep 300' </dev/null >/dev/null 2>&1 & "
                           "sleep 0.1"])
        data["command"] = journal_command(journal, work, argv=i % 2 == 1)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    before = task_texts(order)
    trial = Trial("hostile workers", seed, n_tasks)
    watch = RecordWatch(root)
    procs = [Proc(root, *run_args(workers)),
             Proc(root, "launch", "ORD", "--no-resource-monitoring", "--max-workers", str(workers))]
    try:
        for proc in procs:
            rc = proc.wait()
            trial.log.append(f"{' '.join(proc.args[:2])} → {rc}: {proc.output.strip()[-300:]}")
            if "Traceback" in proc.output:
                trial.add("lost", [f"{' '.join(proc.args[:2])} crashed: {proc.output.strip()[-300:]}"])
        wait_for(lambda: not worker_records(root), timeout=120)
        if set(task_statuses(order).values()) != {"DONE"}:
            finish_order(root, trial, workers)
    finally:
        for proc in procs:
            proc.kill()
        pgids = watch.stop()
    tally(trial, root, order, journal, before, pgids, workers)
    pids = [int(p) for p in daemons.read_text().split()] if daemons.exists() else []
    trial.add("orphans", [f"daemon {pid} outlived its attempt" for pid in pids if pid_alive(pid)])
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    return trial


@pytest.mark.parametrize("seed", [1, 2])
def test_hostile_workers_clean_the_tree_and_leave_daemons(project, seed):
    trial = hostile_trial(project.root, seed, n_tasks=12)
    assert unexpected(trial) == {}, str(trial)


# ---- the checker catches what it claims ------------------------------------------------------------------


def test_the_chaos_checks_see_each_kind_of_violation(tmp_path):
    """So that an empty finding list means something: each column is filled by the failure it names."""
    order = tmp_path / "orders" / "ORD"
    order.mkdir(parents=True)
    journal = tmp_path / "journal.txt"
    write_task(order, "A", command="x", target_files=["f"])
    write_task(order, "B", command="x", target_files=["f"], depends_on=["A"])
    write_task(order, "C", command="x", target_files=["g"])
    before = task_texts(order)
    for tid in "ABC":
        p = order / f"{tid}.yaml"
        p.write_text(p.read_text() + "status: DONE\n")
    journal.write_text("start A 10 1\nstart B 20 2\nend A 30 1\nend B 40 2\nstart C 50 3\nend C 60 3\n"
                       "start C 70 4\nend C 80 4\n")
    found = classify(check(journal, order, max_workers=1))
    assert found["overlaps"] and found["order"] and found["double_run"]
    (order / "C.yaml").write_text((order / "C.yaml").read_text().replace("command: x", "command: y"))
    (order / ".A.yaml.123.tmp").write_text("")
    assert corrupt_files(order, before) == ["C.yaml: bytes outside the managed lines changed"]
    assert temp_files(order) == [".A.yaml.123.tmp left in the order directory"]
    lock = state(tmp_path, make=True) / "locks" / "f.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    sleeper = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        found = end_state(tmp_path, order, before, {sleeper.pid}, settle=0.2)
        # The kernel lock, and `aipm locks` naming its holder (this process: no aipm worker).
        assert found["stale_locks"][0] == "lock file held: f.lock" and len(found["stale_locks"]) == 2
        assert f"pid {os.getpid()}, not an aipm worker" in found["stale_locks"][1]
        assert found["orphans"] == [f"process group {sleeper.pid} still alive"]
    finally:
        os.close(fd)
        sleeper.kill()
        sleeper.wait()


def test_an_owner_that_dies_before_its_worker_starts_is_recovered_by_a_watching_run(project):
    """A detached owner (aipm.work) was seen by `run` with no worker yet ("finishing": run polls it), then died
    before starting its worker. `run` stopped polling, never looked for dead owners again, and exited 1 with the
    task left IN_PROGRESS. The task must be re-queued and run, once."""
    order = project.order()
    journal = project.root / "journal.txt"
    write_task(order, "C", command=journal_command(journal), target_files=["c.txt"])
    # D is run's own task: once it has started, run's first round (the one that recovers) is over.
    write_task(order, "D", command=journal_command(journal, "touch d.started; until [ -e gate ]; do sleep 0.02; done"),
               target_files=["d.txt"], status="CANCELLED")  # not `launch`ed with C; queued for the run below
    owner = None
    for _ in range(10):  # stop C's owner before it starts the worker (it needs an interpreter start-up for that)
        assert project.aipm("launch", "ORD").returncode == 0
        recs = wait_for(lambda: [r for r in worker_records(project.root) if r.get("owner_pid")], timeout=60)
        os.kill(recs[0]["owner_pid"], signal.SIGSTOP)
        if not worker_records(project.root)[0].get("pid"):
            owner = recs[0]["owner_pid"]
            break
        os.kill(recs[0]["owner_pid"], signal.SIGCONT)
        wait_for(lambda: task_statuses(order).get("C") == "DONE" and not worker_records(project.root), timeout=60)
        write_task(order, "C", command=journal_command(journal), target_files=["c.txt"])
        journal.unlink()
    if owner is None:
        pytest.skip("the owner started its worker before it could be stopped, ten times")
    write_task(order, "D", command=journal_command(journal, "touch d.started; until [ -e gate ]; do sleep 0.02; done"),
               target_files=["d.txt"])
    proc = Proc(project.root, *run_args(5, "--json"))
    try:
        wait_for(lambda: (project.root / "d.started").exists() or proc.p.poll() is not None, timeout=120)
        os.kill(owner, signal.SIGKILL)
        wait_for(lambda: not group_alive(owner), timeout=60)
        (project.root / "gate").touch()
        rc = proc.wait(timeout=240)
    finally:
        proc.kill()
    assert rc == 0, proc.output
    assert task_statuses(order) == {"C": "DONE", "D": "DONE"}
    assert check(journal, order, root=project.root) == []  # each ran once


@pytest.mark.parametrize("owner", ["run", "launch"])
def test_a_reset_under_a_reworked_task_keeps_its_rework_count(project, owner):
    """Issue 11.1: a worker's `git checkout` put back the committed file (no `reworks:`) under attempt 2 of a
    task its review had sent back once; the owner restored status and attempts but not reworks, so the limit
    (max_rework 1) never bit: the task was reworked again instead of REJECTED."""
    if not shutil.which("git"):
        pytest.skip("git is not installed")
    order = project.order()
    (project.root / "aipm.yaml").write_text("max_workers: 2\nmax_rework: 1\nmax_attempts: 6\nscope_audit: false\n")
    write_task(order, "A", command=RESETS["git"], review="exit 1", target_files=["a.txt"])
    _git_commit_all(project.root)
    if owner == "run":
        assert project.aipm(*run_args(2)).returncode == 1
    else:
        assert project.aipm("launch", "ORD").returncode == 0
        wait_for(lambda: task_statuses(order).get("A") in FINAL and not worker_records(project.root), timeout=120)
    data = yaml.safe_load((order / "A.yaml").read_text())
    assert (data["status"], data["attempts"], data["reworks"]) == ("REJECTED", 2, 1), data


# ---- reviews take places too --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [11, 12])
def test_reviewers_count_against_the_worker_limit(project, seed):
    """A random order whose every task has a review (journalled as `review-<task>`): at no moment may commands and
    reviewers together exceed --max-workers, whatever starts early in a place a task left (its reviewer takes it)."""
    order = project.order()
    journal = project.root / "journal.txt"
    random_order(order, journal, n=16, seed=seed, work="sleep 0.03")
    review = journal_command(journal, "sleep 0.05").replace("$AIPM_TASK_ID", "review-$AIPM_TASK_ID")
    for path in order.glob("*.yaml"):
        path.write_text(path.read_text() + yaml.safe_dump({"review": review}))
    proc = project.aipm(*run_args(2), timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert set(task_statuses(order).values()) == {"COMPLETED"}
    assert len([s for s in spans(journal) if s.task.startswith("review-")]) == 16
    assert check(journal, order, max_workers=2, root=project.root) == []
