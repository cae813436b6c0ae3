"""A worker's command that removes aipm's state directory (`rm -rf /tmp/aipm-*`, a test suite cleaning /tmp), or
only its `locks/` or worker records, while other workers hold their target locks and more tasks are queued: no
second aipm may start a task on files a worker still holds, and every outcome is recorded once, with its real
exit code, also when the supervisor is killed afterwards. Real processes, real locks, an invariant over what the
workers wrote to a journal."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import Project, state, task_statuses, wait_for, write_task
from invariants import check, journal_command, spans
from test_chaos import Proc


def remover(root: Path, removed: str, tmp: Path):
    """Order ONE: A (x.py) removes `removed` when told, then waits and exits 3; C (y.py) holds its lock meanwhile;
    A2 (x.py) waits behind A. Order TWO: B (x.py) and E (y.py), wanted by a second aipm while A and C run."""
    project = Project(root)
    journal, go, removed_mark, done = (tmp / n for n in ("journal.txt", "go", "removed", "done"))
    one, two = project.order("ONE"), project.order("TWO")
    until_done = f'until [ -e "{done}" ]; do sleep 0.01; done'
    target = state(root) / removed if removed else state(root)
    write_task(one, "A", target_files=["x.py"], command=journal_command(
        journal, f'until [ -e "{go}" ]; do sleep 0.01; done; rm -rf "{target}"; touch "{removed_mark}"; '
                 f'{until_done}; (exit 3)'))
    write_task(one, "C", target_files=["y.py"], command=journal_command(journal, until_done))
    write_task(one, "A2", target_files=["x.py"], command=journal_command(journal))
    write_task(two, "B", target_files=["x.py"], command=journal_command(journal))
    write_task(two, "E", target_files=["y.py"], command=journal_command(journal))
    return project, journal, go, removed_mark, done


def all_tasks(tmp: Path, *orders: Path) -> Path:
    both = tmp / "all"
    both.mkdir()
    for order in orders:
        for path in order.glob("*.yaml"):
            shutil.copy(path, both / path.name)
    return both


@pytest.mark.parametrize("removed", ["", "workers"], ids=["state-dir", "records"])
def test_running_workers_whose_owner_died_and_records_were_removed_are_not_recovered_as_lost(tmp_path, removed):
    """No record and no owner: only the workers' own processes say that they still run and hold their files."""
    root = tmp_path / "proj"
    root.mkdir()
    project, journal, go, removed_mark, done = remover(root, removed, tmp_path)
    one, two = root / "orders" / "ONE", root / "orders" / "TWO"
    run = Proc(root, "run", "ONE", "--max-workers", "2", "--no-resource-monitoring")
    try:
        wait_for(lambda: {"A", "C"} <= {s.task for s in spans(journal)}, timeout=120)
        run.p.kill()
        run.wait(timeout=60)
        go.touch()
        wait_for(removed_mark.exists, timeout=60)
        running = {"A": "IN_PROGRESS", "C": "IN_PROGRESS", "A2": "QUEUED"}
        assert {t["id"]: t["status"] for t in project.json("status", "ONE")["tasks"]} == running
        recovered = project.json("recover", "ONE")["recovered"]
        assert sorted(r["id"] for r in recovered if r["action"].startswith("left running")) == ["A", "C"], recovered
        assert project.json("launch", "TWO", "--no-resource-monitoring")["launched"] == []
        assert task_statuses(one) == running and task_statuses(two) == {"B": "QUEUED", "E": "QUEUED"}
        done.touch()
        wait_for(lambda: all(s.end is not None for s in spans(journal)), timeout=60)
    finally:
        done.touch()
        run.kill()
    # Their outcomes went with their owner and records: once they ended they are re-queued and run again.
    project.aipm("run", "ONE", "--no-resource-monitoring")
    project.aipm("run", "TWO", "--no-resource-monitoring", check=True)
    assert task_statuses(one) == {"A": "FAILED", "C": "DONE", "A2": "DONE"}
    assert check(journal, all_tasks(tmp_path, one, two), root=root, once=False) == []
