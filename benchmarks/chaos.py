#!/usr/bin/env python3
"""Chaos figures: the long variants of tests/test_chaos.py, run as seeded trials and tallied into one table.

    python benchmarks/chaos.py                 # every scenario, default trials (about 10 minutes on 2 cores)
    python benchmarks/chaos.py --scale 0.4     # fewer trials of each
    python benchmarks/chaos.py --only kill-run --trials 5

Columns (summed over the trials of a row):
  kills          SIGKILLs that landed on `aipm run` (kill-run), on workers (kill-workers), SIGSTOPs (sigstop)
  lost           tasks not DONE at the end, attempts missing from the journal, DONE without a finished run,
                 statuses that disagree with attempts and exit codes, counter updates lost
  double-run     tasks that ran more often than their attempts (or once too often), counter updates made twice
  overlaps       pairs of tasks with overlapping target files alive at the same time (from the journal)
  dep/limit      tasks started before a dependency finished; more workers alive at once than the limit
  corrupt files  task files that no longer load or changed outside the managed lines
  temp files     `.TASK.yaml.*.tmp` left in the order directory by a write cut short
  stale locks    worker records or held target-file locks left at the end (and rows `aipm locks` lists), plus
                 records of finished tasks left by a kill that blocked the order mid-way: the harness deletes
                 those (the user's repair) so that the order can finish and every other column stays measured
  orphans        worker process groups (or detached owners) still alive at the end; daemons outliving their attempt
  hung runs      `aipm run`/`exec` still running 8 s after the order finished with nothing left to run (killed)

Each trial runs in a fresh temporary project; trials with findings keep theirs (the path is printed).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import _common as C  # noqa: E402
from conftest import Project  # noqa: E402
import test_chaos as chaos  # noqa: E402

# name → (what it does, trials, seed base, trial function)
SCENARIOS = {
    "kill-run": ("SIGKILL `aipm run` at random moments, re-run until finished (40 tasks, 10 kills/trial)", 10, 1000,
                 lambda root, seed: chaos.kill_run_trial(root, seed, n_tasks=40, kills=10, work="sleep 0.3")),
    "kill-workers": ("SIGKILL random workers (group or leader), max_attempts 2 (30 tasks)", 8, 2000,
                     lambda root, seed: chaos.kill_workers_trial(root, seed, n_tasks=30)),
    "sigstop": ("SIGSTOP first attempts, SIGCONT before or after the 1 s timeout (20 tasks)", 5, 3000,
                lambda root, seed: chaos.stop_workers_trial(root, seed, n_tasks=20)),
    "race": ("launch + run + exec --parallel + run at once on one order (40 tasks)", 20, 4000,
             lambda root, seed: chaos.racing_trial(root, seed, n_tasks=40)),
    "counters": ("lost-update probe: 30 read-sleep-write tasks over 3 counters, 5 workers", 5, 5000,
                 lambda root, seed: chaos.counter_trial(root, seed)),
    "counters-kill": ("lost-update probe (0.2 s nap) while SIGKILLing `aipm run` (6 kills/trial)", 8, 6000,
                      lambda root, seed: chaos.counter_trial(root, seed, kills=6, nap="0.2")),
    "reset": ("every worker resets its own task file (sed or git checkout), half without targets, 3 racing "
              "launches, owned by run or launch (20 tasks, max 3 workers)", 6, 7000,
              lambda root, seed: chaos.reset_trial(root, seed, n_tasks=20, how=("sed", "git")[seed % 2],
                                                   owner=("run", "launch")[seed // 2 % 2])),
    "hostile": ("workers that `rm -rf .aipm` or leave a setsid daemon, under run + launch at once (30 tasks)", 5,
                8000, lambda root, seed: chaos.hostile_trial(root, seed, n_tasks=30)),
}

HEADER = ("scenario", "trials", "tasks", "kills", "lost", "double-run", "overlaps", "dep/limit", "corrupt files",
          "temp files", "stale locks", "orphans", "hung runs")
FIELDS = ("lost", "double_run", "overlaps", "order", "corrupt", "temp_files", "stale_locks", "orphans", "hung")



def run_scenario(name: str, trials: int, seed_base: int, fn, keep: bool, out) -> dict:
    row = {"scenario": name, "trials": 0, "tasks": 0, "kills": 0, **{f: 0 for f in FIELDS}, "seconds": 0.0}
    findings = []
    for i in range(trials):
        seed = seed_base + i
        root = Path(tempfile.mkdtemp(prefix=f"aipm-chaos-{name}-{seed}-"))
        Project(root)
        started = time.monotonic()
        try:
            trial = fn(root, seed)
        except Exception as exc:  # noqa: BLE001 - a crash of the harness is a finding too, not a lost row
            print(f"  {name} seed {seed}: harness error {exc!r} (kept {root})", file=out, flush=True)
            findings.append((seed, root, {"harness": [repr(exc)]}))
            continue
        took = time.monotonic() - started
        row["seconds"] += took
        row["trials"] += 1
        row["tasks"] += trial.tasks
        row["kills"] += trial.kills
        for f in FIELDS:
            row[f] += len(trial.findings[f])
        row["stale_locks"] += len(trial.findings["stale_records"])
        problems = trial.problems
        status = "ok" if not problems else f"FINDINGS {problems}"
        print(f"  {name} seed {seed}: {trial.tasks} tasks, {trial.kills} kills, {took:.1f}s: {status}"
              + (f" (kept {root})" if problems else ""), file=out, flush=True)
        if problems:
            findings.append((seed, root, problems))
        elif not keep:
            C.remove_project(root)
    row["findings"] = findings
    return row


def table(rows: list[dict]) -> str:
    total = {"scenario": "**total**", **{k: sum(r[k] for r in rows) for k in ("trials", "tasks", "kills", *FIELDS)}}
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in [*rows, total]:
        lines.append("| " + " | ".join(str(r[k]) for k in ("scenario", "trials", "tasks", "kills", *FIELDS)) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="run only these scenarios")
    parser.add_argument("--trials", type=int, help="trials per scenario (default: each scenario's own)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply each scenario's default trials")
    parser.add_argument("--keep", action="store_true", help="keep every trial's project, not only those with findings")
    args = parser.parse_args()
    names = args.only or list(SCENARIOS)
    print(f"aipm chaos: {platform.node()} · {platform.system()} · Python {platform.python_version()} · "
          f"{__import__('os').cpu_count()} CPUs", flush=True)
    started = time.monotonic()
    rows = []
    for name in names:
        what, trials, seed_base, fn = SCENARIOS[name]
        n = args.trials or max(1, round(trials * args.scale))
        print(f"{name}: {what}; {n} trial(s), seeds {seed_base}..{seed_base + n - 1}", flush=True)
        rows.append(run_scenario(name, n, seed_base, fn, args.keep, sys.stdout))
    elapsed = time.monotonic() - started
    print()
    print(table(rows))
    print()
    print(f"wall time {elapsed:.0f}s; per scenario: "
          + ", ".join(f"{r['scenario']} {r['seconds']:.0f}s" for r in rows))
    found = [(r["scenario"], seed, root, p) for r in rows for seed, root, p in r["findings"]]
    for scenario, seed, root, problems in found:
        print(f"- {scenario} seed {seed} ({root}):")
        for column, items in problems.items():
            for item in items:
                print(f"    {column}: {item}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
