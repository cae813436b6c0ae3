import os, random, signal, subprocess, time
import pytest
from pathlib import Path
from conftest import task_statuses
from invariants import RecordWatch, check, end_state, journal_pids, random_order, task_texts, worker_records
from test_chaos import Proc, Trial, run_args, finish_order


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_kill_detached_owners(project, seed):
    root = project.root
    order = root / "orders" / "ORD"
    journal = root / "journal.txt"
    random_order(order, journal, n=12, seed=seed, work="sleep 0.3")
    before = task_texts(order)
    rng = random.Random(seed)
    trial = Trial("kill owners", seed, 12)
    watch = RecordWatch(root)
    try:
        for _ in range(6):
            p = Proc(root, "launch", "ORD", "--max-workers", "4", "--no-resource-monitoring")
            p.wait()
            time.sleep(rng.uniform(0, 0.4))
            recs = worker_records(root)
            for rec in rng.sample(recs, k=min(len(recs), 2)):
                if rec.get("owner_pid"):
                    try: os.kill(rec["owner_pid"], 9)
                    except OSError: pass
            if rng.random() < 0.5:
                Proc(root, "recover", "ORD").wait()
        time.sleep(1)
        rc = finish_order(root, trial, 4)
        trial.log.append(f"finish -> {rc}")
    finally:
        pgids = watch.stop()
    pgids |= journal_pids(journal)
    statuses = task_statuses(order)
    trial.add("lost", [f"{t} is {s} at the end" for t, s in sorted(statuses.items()) if s != "DONE"])
    trial.add_check(check(journal, order, max_workers=None, root=root))
    trial.add_end(end_state(root, order, before, pgids))
    assert trial.problems == {}, str(trial)
