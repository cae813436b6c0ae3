"""The invariant checker: what test workers wrote to a journal must describe a correct parallel run.

Workers append `start|end TASK NANOSECONDS PID` lines (O_APPEND, one write each, so lines never interleave).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from aipm.paths import normalize, overlaps


def journal_command(journal: Path, work: str = "sleep 0.02") -> str:
    """A shell command that brackets `work` with start/end journal lines."""
    j = str(journal)
    return (f'echo "start $AIPM_TASK_ID $(date +%s%N) $$" >> "{j}"; {work}; s=$?; '
            f'echo "end $AIPM_TASK_ID $(date +%s%N) $$" >> "{j}"; exit $s')


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


def check(journal: Path, order_dir: Path, max_workers: int | None = None, once: bool = True) -> list[str]:
    """Violations of: dependencies first, no overlapping pair alive together, worker limit, each task once."""
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
    targets = {tid: [normalize(t) for t in (d.get("target_files") or [])] for tid, d in tasks.items()}
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


def random_order(order_dir: Path, journal: Path, n: int, seed: int, files: int = 8, work: str = "sleep 0.02") -> None:
    """A random DAG of n tasks over a small pool of files, directories and globs, so many pairs overlap."""
    rng = random.Random(seed)
    pool = [f"src/f{i}.py" for i in range(files)] + ["src/", "docs/", "src/*.py", "docs/**/*.md", "docs/a.md"]
    order_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        tid = f"T{i:03d}"
        deps = sorted({f"T{j:03d}" for j in rng.sample(range(i), k=min(i, rng.randint(0, 2)))})
        body = {
            "id": tid, "priority": f"P{rng.randint(0, 3)}", "depends_on": deps,
            "target_files": rng.sample(pool, k=rng.randint(1, 2)), "command": journal_command(journal, work),
        }
        (order_dir / f"{tid}.yaml").write_text(f"# generated task {i}\n" + yaml.safe_dump(body, sort_keys=False))
