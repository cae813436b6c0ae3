"""Preemption: the planner's pure decision over literals, and `run --preempt` checked on a journal."""

import json
import os
import subprocess
import sys
import threading

import pytest

from conftest import no_workers, state, task_statuses, wait_for, write_task
from test_locks import hold, release
from test_plan import task

from aipm.paths import normalize
from aipm.urgency import PREEMPT_LIMIT, Holder, Preemption, preemptions


def holder(key, pri, files, stoppable=True, alive=True):
    return Holder(key, tuple(normalize(f) for f in files), int(pri[1]), stoppable, alive)


def test_an_urgent_task_stops_the_lower_priority_holder_of_its_file():
    urgent = task("U", pri="P0", files=["x"])
    got = preemptions([urgent], [holder("O/LOW", "P3", ["x"]), holder("O/OTHER", "P3", ["y"])], slots=3)
    assert got == [Preemption("O/LOW", "U")]


def test_every_holder_must_be_stoppable_or_nothing_is_stopped():
    urgent = task("U", pri="P1", files=["x", "y"])
    same = [holder("O/LOW", "P3", ["x"]), holder("O/PEER", "P1", ["y"])]  # equal priority is never stopped
    assert preemptions([urgent], same, slots=3) == []
    review = [holder("O/LOW", "P3", ["x"]), holder("O/REV", "P3", ["y"], stoppable=False)]  # in review, or not ours
    assert preemptions([urgent], review, slots=3) == []
    stale = [holder("O/LOW", "P3", ["x"]), holder("O/DEAD", "P3", ["y"], alive=False)]
    assert preemptions([urgent], stale, slots=3) == []
    both = [holder("O/LOW", "P3", ["x"]), holder("O/MID", "P2", ["y"])]
    assert preemptions([urgent], both, slots=0) == [Preemption("O/LOW", "U"), Preemption("O/MID", "U")]


def test_only_p0_and_p1_preempt():
    assert preemptions([task("U", pri="P2", files=["x"])], [holder("O/LOW", "P3", ["x"])], slots=3) == []


def test_the_worker_limit_stops_the_least_urgent_stoppable_task():
    urgent = task("U", pri="P0", files=["z"])
    running = [holder("O/A", "P2", ["a"]), holder("O/B", "P3", ["b"]), holder("O/C", "P0", ["c"])]
    assert preemptions([urgent], running, slots=0) == [Preemption("O/B", "U")]
    assert preemptions([urgent], running, slots=1) == []  # a free slot: nothing to stop (load, not the limit)


def test_a_holder_the_glob_s_lock_meets_is_the_one_stopped():
    """The lock test decides the victim: `src/*` meets HOLD's `src/data.json` only through its glob. A finer test
    than the locks' found no conflict once, and the worker limit's victim, an unrelated task, was stopped (three
    times, to its limit) while the urgent task stayed blocked (found by a review)."""
    urgent = task("U", pri="P0", files=["src/*"])
    running = [holder("O/AOTHER", "P3", ["other.txt"]), holder("O/HOLD", "P3", ["src/data.json"])]
    assert preemptions([urgent], running, slots=0) == [Preemption("O/HOLD", "U")]


def test_one_victim_is_not_stopped_twice_and_urgent_tasks_do_not_collide():
    first, second = task("U1", pri="P0", files=["x"]), task("U2", pri="P0", files=["x"])
    got = preemptions([first, second], [holder("O/LOW", "P3", ["x"])], slots=0)
    assert got == [Preemption("O/LOW", "U1")]


def test_a_task_preempted_limit_times_is_not_stoppable(project):
    """The bound lives in the task file (`preemptions`), so it survives a restarted run."""
    from aipm.store import load_task

    order = project.order()
    path = write_task(order, "LOW", command="true", priority="P3", preemptions=PREEMPT_LIMIT)
    assert load_task(path).preemptions == PREEMPT_LIMIT
    assert project.json("status", "ORD")["tasks"][0]["preemptions"] == PREEMPT_LIMIT


def test_run_preempt_stops_the_p3_task_for_a_p0_and_reruns_it_later(project, gate):
    order = project.order()
    journal = project.root / "journal"
    write_task(order, "LOW", priority="P3", target_files=["shared.py"], command=(
        f'echo "start LOW $$" >> {journal}; while [ ! -e {gate} ]; do echo "tick LOW $$" >> {journal}; '
        f'sleep 0.05; done; echo "end LOW $$" >> {journal}'))
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD", "--preempt",
                            "--no-resource-monitoring", "--json"], stdout=subprocess.PIPE, text=True)
    wait_for(lambda: journal.exists() and "tick LOW" in journal.read_text())
    with open(journal, "a") as handle:
        handle.write("queued URGENT 0\n")
    # URGENT opens the gate LOW waits on: without preemption the order could never finish.
    write_task(order, "URGENT", priority="P0", target_files=["shared.py"], command=(
        f'echo "start URGENT $$" >> {journal}; sleep 0.3; echo "end URGENT $$" >> {journal}; touch {gate}'))
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 0, out
    lines = [line.split() for line in journal.read_text().splitlines()]
    at = {f"{kind} {tid}": i for i, (kind, tid, _) in reversed(list(enumerate(lines)))}  # first occurrence
    first_low = lines[at["start LOW"]][2]
    # The P0 started while the P3 was still running (no end of LOW before it): it was not waited for.
    assert at["queued URGENT"] < at["start URGENT"] < at["end URGENT"]
    assert "end LOW" not in {f"{k} {t}" for k, t, _ in lines[:at["start URGENT"]]}
    # The two never overlap: the first LOW process writes nothing once URGENT starts, and no LOW line at all
    # falls inside URGENT's run.
    assert not [line for line in lines[at["start URGENT"]:] if line[2] == first_low]
    assert not [line for line in lines[at["start URGENT"]:at["end URGENT"]] if line[1] == "LOW"]
    # The P3 ran again, later, and finished.
    restarts = [i for i, (kind, tid, pid) in enumerate(lines) if kind == "start" and tid == "LOW" and pid != first_low]
    assert len(restarts) == 1 and restarts[0] > at["end URGENT"] and lines[-1][:2] == ["end", "LOW"]
    tasks = {t["id"]: t for t in project.json("status", "ORD")["tasks"]}
    assert tasks["LOW"]["status"] == "DONE" and tasks["URGENT"]["status"] == "DONE"
    assert tasks["LOW"]["attempts"] == 1 and tasks["LOW"]["preemptions"] == 1  # the stopped attempt is not counted
    assert tasks["URGENT"]["attempts"] == 1
    events = [json.loads(line) for line in out.splitlines()]
    assert [e for e in events if e["event"] == "preempted"] == [
        {"event": "preempted", "order": "ORD", "task": "LOW", "for": "URGENT", "attempt": 1,
         "time": next(e["time"] for e in events if e["event"] == "preempted")}]
    assert no_workers(project.root)


def _preempting_run(project) -> tuple[subprocess.Popen, list[dict], threading.Thread]:
    """`aipm run ORD --preempt --json` in the background, its events put in the list as they come."""
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD", "--preempt",
                            "--no-resource-monitoring", "--json"], stdout=subprocess.PIPE, text=True)
    events: list[dict] = []
    reader = threading.Thread(target=lambda: events.extend(json.loads(line) for line in run.stdout), daemon=True)
    reader.start()
    return run, events, reader


def _ended_without_preempting(project, run, reader, events) -> dict[str, dict]:
    """The run ended (exit 1: a task left queued) having stopped nothing, LOW done; the tasks as status gives them."""
    assert run.wait(timeout=120) == 1
    reader.join(timeout=60)
    assert not [e for e in events if e["event"] == "preempted"], events
    tasks = {t["id"]: t for t in project.json("status", "ORD")["tasks"]}
    assert tasks["LOW"]["status"] == "DONE" and tasks["LOW"]["preemptions"] == 0
    return tasks


def _marked(order, run, events, name):
    """Write an invalid task file and wait until the run says so (a run round that began after this call), or
    until it ended."""
    (order / f"{name}.yaml").write_text(f"id: {name}\npriority: P9\n")
    wait_for(lambda: any(e["event"] == "invalid_file" and f"{name}.yaml" in e["error"] for e in events)
             or run.poll() is not None)
    (order / f"{name}.yaml").unlink()


def test_run_preempt_stops_nothing_while_the_order_s_budget_is_reached(project, gate):
    """With the budget reached no attempt starts, the urgent one neither: `run --preempt` stopped the P3 all the
    same (`preempt LOW for URGENT`), its work thrown away, and then started nothing (found by a review)."""
    order = project.order()
    (order / "order.yaml").write_text("max_cost_usd: 1\n")
    write_task(order, "LOW", priority="P3", target_files=["shared.py"],
               command=f"while [ ! -e {gate} ]; do sleep 0.05; done")
    run, events, reader = _preempting_run(project)
    try:
        wait_for(lambda: any(e["event"] == "started" and e["task"] == "LOW" for e in events))
        write_task(order, "SPENT", priority="P3", status="DONE", cost_usd=5, command="true", target_files=["s.py"])
        _marked(order, run, events, "SEEN1")  # the run knows the budget is spent
        write_task(order, "URGENT", priority="P0", target_files=["shared.py"], command="true")
        _marked(order, run, events, "SEEN2")
        _marked(order, run, events, "SEEN3")  # a whole round went by since the run saw URGENT
    finally:
        gate.touch()
    tasks = _ended_without_preempting(project, run, reader, events)
    assert tasks["URGENT"]["status"] == "QUEUED"
    assert no_workers(project.root)


def test_run_preempt_stops_nothing_for_a_task_this_machine_can_never_run(project, gate):
    """A P0 that asks for more CPUs than the machine has is refused at its launch: `run --preempt` stopped the P3
    holding its file for it all the same, and the P3, ranked after it and kept out of that file, never ran again
    (the run ended with both QUEUED; found by a review)."""
    order = project.order()
    write_task(order, "LOW", priority="P3", target_files=["shared.py"],
               command=f"while [ ! -e {gate} ]; do sleep 0.05; done")
    run, events, reader = _preempting_run(project)
    try:
        wait_for(lambda: any(e["event"] == "started" and e["task"] == "LOW" for e in events))
        write_task(order, "URGENT", priority="P0", target_files=["shared.py"], command="true",
                   resources={"cpus": 100000})
        _marked(order, run, events, "SEEN1")
        _marked(order, run, events, "SEEN2")  # a whole round went by since the run saw URGENT
    finally:
        gate.touch()
    tasks = _ended_without_preempting(project, run, reader, events)
    assert [e["task"] for e in events if e["event"] == "launch_failed"] == ["URGENT"]  # refused once LOW ended
    assert no_workers(project.root)


def test_run_preempt_ends_what_the_stopped_attempt_left_outside_its_group(project, gate):
    """A P3 whose command left a process in a session of its own (`setsid cmd &`): that process kept the P3's
    file locks, and the preemption, unlike every other end of an attempt, did not end it: the P0 it was stopped
    for waited for it (`wait URGENT: shared.py is held by pids ...`) for as long as it ran (found by a review)."""
    order = project.order()
    stray = project.root / "stray.pid"
    write_task(order, "LOW", priority="P3", target_files=["shared.py"], command=(
        f"setsid sleep 1000 & echo $! >> {stray}; while [ ! -e {gate} ]; do sleep 0.05; done"))
    run, events, reader = _preempting_run(project)
    try:
        wait_for(lambda: stray.exists() and stray.read_text().strip())
        first = int(stray.read_text().split()[0])
        write_task(order, "URGENT", priority="P0", target_files=["shared.py"], command="true")
        wait_for(lambda: any(e.get("task") == "URGENT" and e["event"] in ("started", "waiting") for e in events))
        assert not [e for e in events if e["event"] == "waiting"], events
        assert not os.path.exists(f"/proc/{first}") or "zombie" in open(f"/proc/{first}/status").read().lower()
        gate.touch()
        assert run.wait(timeout=120) == 0
    finally:
        gate.touch()
        if run.poll() is None:
            run.terminate()  # (its end ends the strays below it)
            run.wait(timeout=60)
    reader.join(timeout=60)
    tasks = {t["id"]: t for t in project.json("status", "ORD")["tasks"]}
    assert tasks["LOW"]["status"] == "DONE" and tasks["URGENT"]["status"] == "DONE"
    assert no_workers(project.root)


def test_a_preemption_cut_short_by_sigkill_of_its_run_is_counted_once_the_task_is_recovered(project, gate):
    """`kill -9` of the run while the P3 it preempted was still in its grace (its command ignores SIGTERM): the
    record said the worker was being stopped, so `aipm recover` re-queued it without counting the attempt, but the
    preemption itself was never counted (`preemptions: 0`): a task could be stopped without bound by runs that
    died mid-preemption. Counted now with the re-queue's first write, wherever that write happens."""
    order = project.order()
    journal = project.root / "journal"
    write_task(order, "LOW", priority="P3", target_files=["shared.py"], command=(
        f'trap "echo term >> {journal}" TERM; echo start >> {journal}; '
        f"while [ ! -e {gate} ]; do sleep 0.05; done"))
    run, events, reader = _preempting_run(project)
    try:
        wait_for(lambda: journal.exists() and "start" in journal.read_text())
        write_task(order, "URGENT", priority="P0", target_files=["shared.py"], command="true")
        wait_for(lambda: "term" in journal.read_text())  # the stop is under way: the run waits out the grace
        run.kill()
        run.wait()
    finally:
        gate.touch()
        if run.poll() is None:
            run.kill()
    reader.join(timeout=60)
    wait_for(lambda: project.aipm("recover", "ORD").returncode == 0 and task_statuses(order)["LOW"] == "QUEUED")
    tasks = {t["id"]: t for t in project.json("status", "ORD")["tasks"]}
    assert (tasks["LOW"]["attempts"], tasks["LOW"]["preemptions"]) == (0, 1)  # not charged, but counted
    assert project.aipm("run", "ORD", "--preempt").returncode == 0
    tasks = {t["id"]: t for t in project.json("status", "ORD")["tasks"]}
    assert (tasks["LOW"]["status"], tasks["LOW"]["attempts"], tasks["LOW"]["preemptions"]) == ("DONE", 1, 1)
    assert tasks["URGENT"]["status"] == "DONE" and no_workers(project.root)


def test_a_preempted_task_s_nested_exec_leaves_its_task_re_queued_at_once(project, gate):
    """LOW's command runs `aipm exec OTHER/SUB`: the preemption's SIGTERM reached the exec with LOW's group, and
    the group was SIGKILLed as soon as LOW's wrapper went, the exec half-way through stopping SUB: SUB stayed
    IN_PROGRESS with its owner dead until someone ran `aipm recover OTHER` (this run recovers only ORD). In 1 run
    in 3 the exec had not signalled SUB's worker yet: the recovery adopted it, and SUB stayed IN_PROGRESS."""
    order, other = project.order(), project.order("OTHER")
    urgent_gate = project.root / "urgent_gate"
    write_task(other, "SUB", priority="P3", target_files=["sub.py"],
               command=f"while [ ! -e {gate} ]; do sleep 0.05; done")
    write_task(order, "LOW", priority="P3", target_files=["shared.py"], command=(
        f"AIPM_ENABLE_MONITORING=false {sys.executable} -m aipm --root {project.root} exec OTHER/SUB"))
    run, events, reader = _preempting_run(project)
    try:
        wait_for(lambda: task_statuses(other)["SUB"] == "IN_PROGRESS")
        # URGENT holds shared.py until its gate opens: LOW (and its exec of SUB) cannot start again meanwhile.
        write_task(order, "URGENT", priority="P0", target_files=["shared.py"],
                   command=f"while [ ! -e {urgent_gate} ]; do sleep 0.05; done")
        wait_for(lambda: any(e["event"] == "preempted" for e in events))
        record = state(project.root) / "workers" / "OTHER" / "SUB.json"
        wait_for(lambda: task_statuses(other)["SUB"] == "QUEUED" and not record.exists())
        urgent_gate.touch()
        gate.touch()
        assert run.wait(timeout=120) == 0
    finally:
        urgent_gate.touch()
        gate.touch()
        if run.poll() is None:
            run.terminate()
            run.wait(timeout=60)
    reader.join(timeout=60)
    assert task_statuses(other) == {"SUB": "DONE"}
    tasks = {t["id"]: t for t in project.json("status", "ORD")["tasks"]}
    assert (tasks["LOW"]["status"], tasks["LOW"]["attempts"], tasks["LOW"]["preemptions"]) == ("DONE", 1, 1)
    assert no_workers(project.root)


@pytest.mark.parametrize("holder", ["stale task of another order", "lock held outside aipm"])
def test_run_preempt_stops_nothing_for_a_task_whose_file_no_stop_can_free(project, gate, holder):
    """URGENT's file is held by something no record names (another order's task marked IN_PROGRESS with no
    worker, or a process outside aipm holding its lock), and the only slot by LOW: preemption saw only the worker
    limit, stopped LOW for URGENT, which could not start, and stopped it again when it restarted (twice, its
    work thrown away each time; found by a review)."""
    (project.root / "aipm.yaml").write_text("max_workers: 1\n")
    order = project.order()
    outside = None
    if holder.startswith("stale"):
        write_task(project.order("OTHER"), "X", status="IN_PROGRESS", target_files=["x.py"], command="true")
    else:
        outside = hold(project.root, "x.py")
    write_task(order, "LOW", priority="P3", target_files=["l.py"],
               command=f"while [ ! -e {gate} ]; do sleep 0.05; done")
    run, events, reader = _preempting_run(project)
    try:
        wait_for(lambda: any(e["event"] == "started" and e["task"] == "LOW" for e in events))
        write_task(order, "URGENT", priority="P0", target_files=["x.py"], command="true")
        _marked(order, run, events, "SEEN1")
        _marked(order, run, events, "SEEN2")  # a whole round went by since the run saw URGENT
        gate.touch()
        if outside is not None:  # (the run waits for it to be released, as for any lock held outside)
            wait_for(lambda: task_statuses(order)["LOW"] == "DONE")
            release(outside)
    finally:
        gate.touch()
        if outside is not None and outside.poll() is None:
            release(outside)
    if outside is None:
        tasks = _ended_without_preempting(project, run, reader, events)
        assert tasks["URGENT"]["status"] == "QUEUED"
    else:
        assert run.wait(timeout=120) == 0
        reader.join(timeout=60)
        assert not [e for e in events if e["event"] == "preempted"], events
    assert no_workers(project.root)


def test_run_preempt_stops_nothing_for_a_task_that_waits_for_cpus_the_stop_does_not_free(project, gate):
    """Every CPU held by A (P2, declares them all), the other slot by B (P3, declares none): a P0 asking for one
    CPU had B stopped for it by the worker limit, and then waited for A's CPUs all the same (found by a review)."""
    from aipm.resources import get_system_info

    (project.root / "aipm.yaml").write_text("max_workers: 2\n")
    order = project.order()
    wait = f"while [ ! -e {gate} ]; do sleep 0.05; done"
    write_task(order, "A", priority="P2", target_files=["a.py"], command=wait,
               resources={"cpus": get_system_info()["usable_cpus"]})
    write_task(order, "B", priority="P3", target_files=["b.py"], command=wait)
    run, events, reader = _preempting_run(project)
    try:
        wait_for(lambda: {e["task"] for e in events if e["event"] == "started"} == {"A", "B"})
        write_task(order, "URGENT", priority="P0", target_files=["u.py"], command="true", resources={"cpus": 1})
        _marked(order, run, events, "SEEN1")
        _marked(order, run, events, "SEEN2")  # a whole round went by since the run saw URGENT
    finally:
        gate.touch()
    assert run.wait(timeout=120) == 0
    reader.join(timeout=60)
    assert not [e for e in events if e["event"] == "preempted"], events
    assert task_statuses(order) == {"A": "DONE", "B": "DONE", "URGENT": "DONE"}
