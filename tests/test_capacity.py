"""`resources:` on this machine: declared CPUs and memory are shared out, impossible requests are refused."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from aipm.capacity import Capacity, Refusals, fit
from aipm.model import Resources, Task
from aipm.resources import get_system_info
from conftest import task_statuses, wait_for, write_task
from invariants import check, journal_command, spans


def _task(tid: str, **need) -> Task:
    return Task(id=tid, path=f"{tid}.yaml", resources=Resources(**need) if need else None)


def test_fit_packs_in_order_and_says_why():
    tasks = [_task("A", cpus=1), _task("B", cpus=1, memory_mb=100), _task("C"), _task("D", cpus=3),
             _task("E", gpus=1), _task("F", memory_mb=50)]
    start, waiting, refused = fit(tasks, Capacity(cpus=2, memory_mb=120), used_cpus=0.5, used_memory_mb=0)
    assert [t.id for t in start] == ["A", "C"]  # B no longer fits beside A; C declares nothing
    # F would fit, but in the memory B waits for: what is free is kept for the task ranked first
    assert set(waiting) == {"B", "F"} and "0.5 CPU(s)" in waiting["B"]
    assert set(refused) == {"D", "E"}
    assert "--runner ray" in refused["D"] and "GPU" in refused["E"]


def test_refusals_are_fits_third_part_found_task_by_task_and_the_machine_read_only_when_one_declares_some():
    """The plan asks task by task as it reaches them; every ready task was checked at each plan before (a run of
    1000 ready tasks: 251,001 checks)."""
    class Looked(dict):
        def __getitem__(self, tid):
            looked.append(tid)
            return super().__getitem__(tid)

    looked, reads = [], []
    tasks = Looked({t.id: t for t in [_task("A"), _task("D", cpus=3), _task("E", gpus=1), _task("F", memory_mb=50)]})
    machine = Capacity(cpus=2, memory_mb=120)
    refused = Refusals(tasks, lambda: reads.append(1) or machine)
    assert "A" not in refused and "nope" not in refused
    assert looked == ["A"] and reads == []  # one task looked at; it declares nothing, so no machine is read
    assert refused["D"] == fit(list(tasks.values()), machine, 0.0, 0)[2]["D"] and looked == ["A", "D"]
    assert "F" not in refused and "E" in refused and reads == [1]  # read once, at the first that declares some
    assert dict(refused) == fit(list(tasks.values()), machine, 0.0, 0)[2] == {"D": refused["D"], "E": refused["E"]}


def test_a_task_waiting_for_capacity_is_not_passed_by_smaller_ones_ranked_after_it():
    """A P0 needing both CPUs waited behind every P3 needing one: each CPU that freed went to the next of them
    (found by a review)."""
    tasks = [_task("BIG", cpus=2), _task("S1", cpus=1), _task("S2", cpus=1)]
    start, waiting, _ = fit(tasks, Capacity(cpus=2, memory_mb=1000), used_cpus=1, used_memory_mb=0)
    assert start == [] and set(waiting) == {"BIG", "S1", "S2"}
    start, _, _ = fit(tasks, Capacity(cpus=2, memory_mb=1000), used_cpus=0, used_memory_mb=0)
    assert [t.id for t in start] == ["BIG"]


def test_memory_that_cannot_be_read_counts_only_cpus():
    """psutil unreadable: a task declaring memory is not refused for a machine of '0 MB'."""
    tasks = [_task(t, cpus=1, memory_mb=500) for t in ("A", "B", "C")]
    start, waiting, refused = fit(tasks, Capacity(cpus=2, memory_mb=None), used_cpus=0, used_memory_mb=0)
    assert [t.id for t in start] == ["A", "B"] and not refused
    assert waiting == {"C": "waiting for 1 CPU(s) and 500 MB (0 CPU(s) free)"}
    _, _, refused = fit([_task("D", cpus=3)], Capacity(cpus=2, memory_mb=None), used_cpus=0, used_memory_mb=0)
    assert refused["D"].startswith("needs 3 CPU(s) and 0 MB; this machine has 2 CPU(s) and memory it cannot read")


def test_tasks_that_fill_the_machine_run_one_at_a_time(project, tmp_path):
    cpus = get_system_info()["usable_cpus"]
    order = project.order()
    journal = tmp_path / "journal"
    for tid in ("A", "B", "C"):
        write_task(order, tid, resources={"cpus": cpus}, command=journal_command(journal, "sleep 0.2"))
    result = project.aipm("run", "ORD", "--max-workers", "5")
    assert result.returncode == 0, result.stderr
    assert check(journal, order, max_workers=1) == []  # never two at once, though five were allowed
    assert len(spans(journal)) == 3


def test_a_request_bigger_than_the_machine_is_refused_with_the_reason(project):
    write_task(project.order(), "BIG", resources={"cpus": 100000}, command="true")
    write_task(project.order(), "GPU", resources={"gpus": 1}, command="true")
    result = project.aipm("launch", "ORD")
    assert result.returncode == 1
    assert "BIG: needs 100000 CPU(s)" in result.stderr and "GPU: needs 1 GPU(s)" in result.stderr
    assert task_statuses(project.order()) == {"BIG": "QUEUED", "GPU": "QUEUED"}


def test_zero_of_a_resource_means_none_of_it(project):
    """`gpus: 0` (or cpus/memory_mb 0) was refused as 'must be a positive number'; 0 asks for none of it, so the
    task runs on this machine (no GPU), as one without the key does. A negative amount is still an error."""
    write_task(project.order(), "Z", resources={"cpus": 0, "memory_mb": 0, "gpus": 0}, command="true")
    result = project.aipm("run", "ORD")
    assert result.returncode == 0, result.stderr
    assert task_statuses(project.order()) == {"Z": "DONE"}
    write_task(project.order(), "N", resources={"gpus": -1}, command="true")
    result = project.aipm("validate", "ORD")
    assert result.returncode == 2 and "resources.gpus: must be a number ≥ 0, not -1" in result.stderr


def test_a_task_that_can_never_fit_keeps_no_file_from_the_tasks_ranked_after_it(project):
    """A P0 asking for more CPUs than the machine has was chosen first every round, failed at its start, and kept
    its file "first this round" from a P3 sharing it: the run ended with both QUEUED (found by a review)."""
    order = project.order()
    write_task(order, "BIG", priority="P0", resources={"cpus": 100000}, target_files=["a.py"], command="true")
    write_task(order, "LOW", priority="P3", target_files=["a.py"], command="true")
    detect = project.json("detect", "ORD")
    assert [t["id"] for t in detect["launchable"]] == ["LOW"]
    assert [(b["id"], b["reason"]) for b in detect["blocked"]] == [("BIG", "cannot_start_here")]
    result = project.aipm("run", "ORD")
    assert result.returncode == 1  # BIG stays behind: not every task is DONE
    assert "BIG: needs 100000 CPU(s)" in result.stdout + result.stderr
    assert task_statuses(order) == {"BIG": "QUEUED", "LOW": "DONE"}


def test_a_task_waiting_for_cpus_keeps_no_worker_slot_from_a_task_that_declares_none(project, gate):
    """A (P2) holds every CPU; URGENT (P0) waits for one. B (P3, declaring nothing) took no slot: the plan gave
    URGENT the free slot and B none, so B waited for A to end with a slot idle though it asked for no CPU."""
    order = project.order()
    (project.root / "aipm.yaml").write_text("max_workers: 2\n")
    write_task(order, "A", priority="P2", resources={"cpus": get_system_info()["usable_cpus"]},
               command=f"while [ ! -e {gate} ]; do sleep 0.05; done")
    env = dict(os.environ, AIPM_ENABLE_MONITORING="false")
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    told: list[str] = []
    reader = threading.Thread(target=lambda: told.extend(run.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: task_statuses(order)["A"] == "IN_PROGRESS")
        write_task(order, "URGENT", priority="P0", resources={"cpus": 1}, command="true")
        wait_for(lambda: any(line.startswith("defer") and "URGENT" in line for line in told))
        write_task(order, "B", priority="P3", command="true")
        wait_for(lambda: task_statuses(order)["B"] == "DONE")  # beside A, before URGENT
        assert task_statuses(order)["URGENT"] == "QUEUED"
    finally:
        gate.touch()
    assert run.wait(timeout=120) == 0
    assert task_statuses(order) == {"A": "DONE", "URGENT": "DONE", "B": "DONE"}
