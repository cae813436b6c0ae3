import os, random, signal, subprocess, time
import pytest
from pathlib import Path
from conftest import task_statuses
from invariants import RecordWatch, check, end_state, journal_pids, random_order, task_texts, worker_records
from test_chaos import Proc, Trial, run_args, finish_order


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_kill_everything(project, seed):
    root = project.root
    order = root / "orders" / "ORD"
    journal = root / "journal.txt"
    random_order(order, journal, n=12, seed=seed, work="sleep 0.3")
    before = task_texts(order)
    rng = random.Random(seed)
    trial = Trial("kill all", seed, 12)
    watch = RecordWatch(root)
    try:
        rc = None
        for _ in range(4):
            proc = Proc(root, *run_args(4, "--json"))
            proc.wait_lines(rng.randint(1, 8))
            time.sleep(rng.uniform(0, 0.05))
            proc.kill()
            for rec in worker_records(root):
                for g in (rec.get("pgid"),):
                    if g:
                        try: os.killpg(g, 9)
                        except OSError: pass
                for p in (rec.get("owner_pid"),):
                    if p:
                        try: os.kill(p, 9)
                        except OSError: pass
            rc = proc.wait()
            trial.log.append(f"run -> {rc}")
            if rc == 0:
                break
        if rc != 0:
            rc = finish_order(root, trial, 4)
    finally:
        pgids = watch.stop()
    pgids |= journal_pids(journal)
    statuses = task_statuses(order)
    trial.add("lost", [f"{t} is {s} at the end" for t, s in sorted(statuses.items()) if s != "DONE"])
    trial.add_check(check(journal, order, max_workers=4, root=root, once=False))
    trial.add_end(end_state(root, order, before, pgids))
    assert trial.problems == {}, str(trial)
