"""The invariant checker: what test workers wrote to a journal must describe a correct parallel run.

Workers append `start|end TASK NANOSECONDS PID` lines (O_APPEND, one write each, so lines never interleave).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from aipm.paths import normalize, overlaps


def journal_command(journal: Path, work: str = "sleep 0.02", argv: bool = False) -> str | list[str]:
    """A shell command that brackets `work` with start/end journal lines; with `argv`, the same as the argv
    `/bin/sh -c ...`: a program, which the compiled wrapper runs (a string too, where it can be built)."""
    j = str(journal)
    me = "$PPID"  # the worker's process group leader: its wrapper, the parent of the shell (docs/workers.md)
    script = (f'echo "start $AIPM_TASK_ID $(date +%s%N) {me}" >> "{j}"; {work}; s=$?; '
              f'echo "end $AIPM_TASK_ID $(date +%s%N) {me}" >> "{j}"; exit $s')
    return ["/bin/sh", "-c", script] if argv else script


# A shell-string command's SIGKILL of its owner (the supervisor): its wrapper's parent ($PPID is the wrapper).
KILL_OWNER = "kill -9 $(awk '/^PPid:/ {print $2}' /proc/$PPID/status)"


@dataclass
class Span:
    task: str
    start: int
    end: int | None


def spans(journal: Path) -> list[Span]:
    open_: dict[tuple[str, str], Span] = {}
    out: list[Span] = []
    if not journal.exists():
        return out
    for line in journal.read_text().splitlines():
        kind, task, ns, pid = line.split()
        if kind == "start":
            span = Span(task, int(ns), None)
            open_[(task, pid)] = span
            out.append(span)
        else:
            open_.pop((task, pid)).end = int(ns)
    return out


def check(journal: Path, order_dir: Path, max_workers: int | None = None, once: bool = True,
          root: Path | None = None) -> list[str]:
    """Violations of: dependencies first, no overlapping pair alive together, worker limit, each task once.

    With `root`, target paths are normalised as aipm does (an existing directory counts as a directory).
    """
    tasks = {}
    for path in order_dir.glob("*.yaml"):
        if path.name != "order.yaml":
            data = yaml.safe_load(path.read_text())  # every task file still parses
            tasks[path.stem] = data
    runs = spans(journal)
    problems = []
    by_task: dict[str, list[Span]] = {}
    for span in runs:
        by_task.setdefault(span.task, []).append(span)
    for tid, data in tasks.items():
        mine = by_task.get(tid, [])
        if data.get("status") in ("DONE", "COMPLETED"):
            if not mine or mine[-1].end is None:
                problems.append(f"{tid} is {data['status']} but its last run did not finish")
            if once and len(mine) != 1:
                problems.append(f"{tid} ran {len(mine)} times")
        for dep in data.get("depends_on") or []:
            dep_ends = [s.end for s in by_task.get(dep, []) if s.end is not None]
            for span in mine:
                if not dep_ends or span.start < max(dep_ends):
                    problems.append(f"{tid} started before its dependency {dep} finished")
    base = str(root) if root is not None else None
    targets = {tid: [normalize(t, base) for t in (d.get("target_files") or [])] for tid, d in tasks.items()}
    closed = [s for s in runs if s.end is not None]
    for i, a in enumerate(closed):
        for b in closed[i + 1:]:
            if a.task == b.task or a.end <= b.start or b.end <= a.start:
                continue
            if any(overlaps(x, y) for x in targets.get(a.task, []) for y in targets.get(b.task, [])):
                problems.append(f"{a.task} and {b.task} share files and ran at the same time")
    if max_workers is not None:
        events = sorted([(s.start, 1) for s in closed] + [(s.end, -1) for s in closed])
        alive = peak = 0
        for _, delta in events:
            alive += delta
            peak = max(peak, alive)
        if peak > max_workers:
            problems.append(f"{peak} workers alive at once, limit {max_workers}")
    return problems


def unblocked_peak(journal: Path) -> int:
    """The most commands running at one instant that were not blocked waiting on an `aipm exec` they started in
    the foreground. Workers append `start|end|block|unblock TASK NANOSECONDS PID` lines; a command counts from its
    `start` to its `end`, except from a `block` (written just before a foreground exec) to its `unblock` (just
    after it returned). At equal instants an end or a block is taken before a start or an unblock."""
    delta = {"start": 1, "end": -1, "block": -1, "unblock": 1}
    events = sorted((int(ns), delta[kind]) for kind, _, ns, _ in
                    (line.split() for line in journal.read_text().splitlines()))
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


def random_order(order_dir: Path, journal: Path, n: int, seed: int, files: int = 8, work: str = "sleep 0.02") -> None:
    """A random DAG of n tasks over a small pool of files, directories and globs, so many pairs overlap. Every
    other task's command is an argv, so both worker wrappers are in every trial."""
    rng = random.Random(seed)
    pool = [f"src/f{i}.py" for i in range(files)] + ["src/", "docs/", "src/*.py", "docs/**/*.md", "docs/a.md"]
    order_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        tid = f"T{i:03d}"
        deps = sorted({f"T{j:03d}" for j in rng.sample(range(i), k=min(i, rng.randint(0, 2)))})
        body = {
            "id": tid, "priority": f"P{rng.randint(0, 3)}", "depends_on": deps,
            "target_files": rng.sample(pool, k=rng.randint(1, 2)), "command": journal_command(journal, work, argv=i % 2 == 1),
        }
        (order_dir / f"{tid}.yaml").write_text(f"# generated task {i}\n" + yaml.safe_dump(body, sort_keys=False))


# ---- end-state checks (the chaos suite and benchmarks/chaos.py) ------------------------------------------

MANAGED_LINE = re.compile(r"^(?:status|attempts|started_at|finished_at|exit_code|reworks|reason|cost_usd|tokens|session_id|preemptions)[ \t]*:[^\n]*\n?", re.M)


def user_bytes(text: str) -> str:
    """A task file without the lines aipm writes: what no write of aipm may change."""
    return MANAGED_LINE.sub("", text)


def task_texts(order_dir: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(order_dir.glob("*.yaml")) if p.name != "order.yaml"}


def corrupt_files(order_dir: Path, before: dict[str, str], root: Path | None = None) -> list[str]:
    """Task files that no longer load (strictly, as aipm loads them) or changed outside the managed lines."""
    from aipm.store import load_task

    problems = []
    after = task_texts(order_dir)
    for name, text in before.items():
        if name not in after:
            problems.append(f"{name} disappeared")
            continue
        if user_bytes(after[name]) != user_bytes(text):
            problems.append(f"{name}: bytes outside the managed lines changed")
        try:
            load_task(order_dir / name, root)
        except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
            problems.append(f"{name}: does not load: {exc}")
    problems += [f"{name}: appeared" for name in sorted(after.keys() - before.keys())]
    return problems


def temp_files(order_dir: Path) -> list[str]:
    """Temp files of an interrupted atomic write left in the order directory (aipm ignores them; git does not)."""
    return [f"{p.name} left in the order directory" for p in sorted(order_dir.glob(".*.tmp"))]


def held_lock_files(root: Path) -> list[str]:
    """Lock files (and the project node, the state directory itself) that some process still holds, probed with
    a non-blocking flock."""
    from aipm.statedir import state_dir

    state = state_dir(root)
    held = []
    locks = sorted((state / "locks").glob("*.lock"))
    if not locks:
        return held
    # Under the launch lock: a probe must never make a launcher see a busy file.
    guard = os.open(state / "launch.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)
        for path in [state, *locks]:
            fd = os.open(path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                held.append(path.name)
            finally:
                os.close(fd)
    finally:
        os.close(guard)
    return held


def worker_records(root: Path) -> list[dict]:
    from aipm.statedir import state_dir

    out = []
    for path in sorted((state_dir(root) / "workers").glob("*/*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # removed or being replaced right now
    return out


def cli_locks(root: Path) -> list[dict]:
    """`aipm locks --json`: the locks aipm itself reports."""
    proc = subprocess.run([sys.executable, "-m", "aipm", "--root", str(root), "locks", "--json"],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return [{"error": proc.stderr.strip()}]
    return json.loads(proc.stdout)["locks"]


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (zombies hold nothing and await a reaper)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def group_alive(pgid: int) -> bool:
    """A process group has a live (non-zombie) member."""
    import psutil

    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def journal_pids(journal: Path) -> set[int]:
    """Worker pids from the journal: each worker's wrapper, the leader of its process group (journal_command)."""
    if not journal.exists():
        return set()
    return {int(line.split()[3]) for line in journal.read_text().splitlines() if line.strip()}


class RecordWatch:
    """Polls the worker records in the background and remembers every worker group and owner it saw."""

    def __init__(self, root: Path, interval: float = 0.02):
        self.root, self.interval = root, interval
        self.pgids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval)

    def poll(self) -> None:
        for rec in worker_records(self.root):
            # Workers and detached owners are each the leader of their own session (and process group).
            self.pgids.update(x for x in (rec.get("pgid"), rec.get("owner_pid")) if x)

    def stop(self) -> set[int]:
        self._stop.set()
        self._thread.join()
        self.poll()
        return self.pgids


def end_state(root: Path, order_dir: Path, before: dict[str, str], pgids: set[int],
              settle: float = 20.0) -> dict[str, list[str]]:
    """What a finished order must not leave: corrupt task files, held locks or records, live processes.

    Waits up to `settle` seconds for detached owners to exit (they remove their record, then start successors
    and exit), then reports what is still there.
    """
    me = os.getpgid(0)
    pgids = {g for g in pgids if g != me}
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        if not worker_records(root) and not held_lock_files(root) and not any(group_alive(g) for g in pgids):
            break
        time.sleep(0.1)
    records = worker_records(root)
    stale = [f"record left: {r['order']}/{r['task']} attempt {r['attempt']}" for r in records]
    stale += [f"lock file held: {name}" for name in held_lock_files(root)]
    listed = {(r["order"], r["task"]) for r in records}
    stale += [f"aipm locks lists {row}" for row in cli_locks(root) if (row.get("order"), row.get("task")) not in listed]
    return {
        "corrupt": corrupt_files(order_dir, before, root),
        "stale_locks": stale,
        "orphans": [f"process group {g} still alive" for g in sorted(pgids) if group_alive(g)],
        "temp_files": temp_files(order_dir),
    }


def classify(problems: list[str]) -> dict[str, list[str]]:
    """Sort check()'s findings into the chaos table's columns."""
    out: dict[str, list[str]] = {"lost": [], "double_run": [], "overlaps": [], "order": []}
    for p in problems:
        if "did not finish" in p:
            out["lost"].append(p)
        elif re.search(r" ran \d+ times", p):
            out["double_run"].append(p)
        elif "share files" in p:
            out["overlaps"].append(p)
        else:  # dependency order, worker limit
            out["order"].append(p)
    return out
