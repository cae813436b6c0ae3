"""restore.py on real task files: what a reset under a running attempt loses is written back, nothing else."""

from __future__ import annotations

import yaml

from aipm.restore import counters, disowned, restore
from aipm.record import Record
from aipm.runtime import Runtime
from aipm.store import load_task


def _running(tmp_path, text: str, **fields) -> tuple:
    """A task file as aipm wrote it for a running attempt, and that attempt's record."""
    order = tmp_path / "orders" / "ORD"
    order.mkdir(parents=True)
    path = order / "A.yaml"
    path.write_text(text)
    rec = Record(order="ORD", order_dir=str(order), task="A", task_file=str(path), targets=[], log="x.log",
                 exit_file="x.exit", counters=counters(load_task(path, tmp_path)), **fields)
    return path, rec


def test_a_reset_file_gets_back_status_attempts_and_every_counter_and_keeps_the_humans_edit(tmp_path):
    path, rec = _running(tmp_path, "id: A\ncommand: 'true'\nstatus: IN_PROGRESS\nattempts: 3\nreworks: 1\n"
                         "preemptions: 1\ncost_usd: 2.5\nstarted_at: '2026-01-01T00:00:00+00:00'\n", attempt=3,
                         started_at="2026-01-01T00:00:00+00:00")
    assert not disowned(load_task(path, tmp_path), rec, Runtime(tmp_path))
    # What `git checkout` of the committed file does, plus an edit of the human's own.
    path.write_text("id: A\ncommand: 'true'  # edited\npriority: P1\n")
    reset = load_task(path, tmp_path)
    assert disowned(reset, rec, Runtime(tmp_path))
    restored = restore(reset, rec, tmp_path)
    data = yaml.safe_load(path.read_text())
    assert {k: data.get(k) for k in ("status", "attempts", "reworks", "preemptions", "cost_usd", "priority")} == {
        "status": "IN_PROGRESS", "attempts": 3, "reworks": 1, "preemptions": 1, "cost_usd": 2.5, "priority": "P1"}
    assert "# edited" in path.read_text()
    assert not disowned(restored, rec, Runtime(tmp_path))


def test_only_a_lost_counter_is_enough_to_disown(tmp_path):
    path, rec = _running(tmp_path, "id: A\ncommand: 'true'\nstatus: IN_PROGRESS\nattempts: 1\ncost_usd: 4.0\n",
                         attempt=1, started_at="")
    path.write_text("id: A\ncommand: 'true'\nstatus: IN_PROGRESS\nattempts: 1\n")  # the cost line lost
    assert disowned(load_task(path, tmp_path), rec, Runtime(tmp_path))
    assert yaml.safe_load(path.read_text()).get("cost_usd") is None
    restore(load_task(path, tmp_path), rec, tmp_path)
    assert yaml.safe_load(path.read_text())["cost_usd"] == 4.0


def test_a_cancelled_file_is_the_users_word_only_when_aipm_cancel_marked_that_attempt(tmp_path):
    path, rec = _running(tmp_path, "id: A\ncommand: 'true'\nstatus: IN_PROGRESS\nattempts: 2\n", attempt=2,
                         started_at="2026-01-01T00:00:00+00:00", number=2)
    path.write_text("id: A\ncommand: 'true'\nstatus: CANCELLED\nattempts: 2\n")  # the worker's own write
    rt = Runtime(tmp_path)
    assert disowned(load_task(path, tmp_path), rec, rt)
    earlier = Record(**{**vars(rec), "number": 1, "attempt": 1})
    rt.mark_cancelled(earlier)  # a cancel of another attempt is no cancel of this one
    assert disowned(load_task(path, tmp_path), rec, rt)
    rt.mark_cancelled(rec)
    assert not disowned(load_task(path, tmp_path), rec, rt)
    rt.unmark_cancelled(rec)
    assert disowned(load_task(path, tmp_path), rec, rt)


def test_the_end_of_a_run_removes_the_cancel_marks_of_tasks_with_no_record(tmp_path):
    """A mark names its attempt, so one left behind (its record removed by a retry or a prune, a cancel cut short)
    never counts for another; the run's end tidies them away with the spent exit files."""
    path, rec = _running(tmp_path, "id: A\ncommand: 'true'\nstatus: IN_PROGRESS\nattempts: 1\n", attempt=1,
                         started_at="2026-01-01T00:00:00+00:00", number=1)
    rt = Runtime(tmp_path)
    rt.write_record(rec)
    gone = Record(**{**vars(rec), "task": "B", "task_file": str(path.with_name("B.yaml"))})
    rt.mark_cancelled(rec)
    rt.mark_cancelled(gone)  # B has no record
    rt.remove_spent_exit_files(rec.order)
    assert rt.cancelled(rec) and not rt.cancelled(gone)
