"""workerstate.lost on real records and processes: an attempt is said lost only while its record outlives both
its worker and its owner."""

from __future__ import annotations

import subprocess

from aipm import workerstate
from aipm.liveness import process_ctime
from aipm.record import Record
from aipm.runtime import Runtime


def _record(tmp_path, pid: int, ctime: float) -> Record:
    order = tmp_path / "orders" / "ORD"
    order.mkdir(parents=True, exist_ok=True)
    return Record(order="ORD", order_dir=str(order), task="A", task_file=str(order / "A.yaml"), targets=[],
                  log=str(tmp_path / "A.1.log"), exit_file=str(tmp_path / "A.1"), attempt=1, number=1, started_at="",
                  pid=pid, ctime=ctime, owner_pid=pid, owner_ctime=ctime)


def test_an_attempt_is_lost_only_while_its_record_outlives_its_worker_and_owner(tmp_path):
    rt = Runtime(tmp_path)
    with subprocess.Popen(["sleep", "30"]) as proc:
        try:
            live = _record(tmp_path, proc.pid, process_ctime(proc.pid))
            rt.write_record(live)
            assert not workerstate.lost(live, rt)  # both running
        finally:
            proc.kill()  # (and reaped as the block ends)
    assert workerstate.lost(live, rt)  # gone, its record still there: no aipm looks after it
    # An owner drops the record of an attempt whose outcome it wrote, then exits: a record read before that drop,
    # its processes seen gone after it, is no lost attempt.
    rt.remove_record("ORD", "A")
    assert not workerstate.lost(live, rt)
    # Nor is an earlier attempt's record, once the task's next attempt has a record of its own.
    rt.write_record(Record(**{**vars(live), "attempt": 2, "number": 2}))
    assert not workerstate.lost(live, rt)
