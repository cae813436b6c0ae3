"""The pure planner, over literal orders."""

from hypothesis import given, settings, strategies as st

from aipm.model import Order, Priority, Status, Task
from aipm.paths import normalize
from aipm.overlap import any_clear
from aipm.plan import (
    BUDGET, FILE_BUSY, FILE_CHOSEN, LIMIT, NEVER, NOT_QUEUED, STALE, WAITING, WORKER_RUNNING, Busy, plan,
)
from aipm.deadends import never_run_notes, never_runs, will_not_start
from aipm.reasons import all_reasons
from aipm.ranking import chain_lengths, ranked


def task(tid, status="QUEUED", pri="P1", deps=(), files=()):
    return Task(id=tid, path=f"{tid}.yaml", status=Status(status), priority=Priority(pri), depends_on=tuple(deps),
                target_files=tuple(files), targets=tuple(normalize(f) for f in files))


def order(*tasks):
    return Order("O", "O", {t.id: t for t in tasks})


def ids(result):
    return [t.id for t in result.launchable]


def test_priority_then_chain_then_natural_id():
    o = order(task("T10", pri="P2"), task("T9", pri="P2"), task("T3", pri="P3"), task("T2", pri="P0"),
              task("CHAIN", pri="P2"), task("AFTER", deps=["CHAIN"], pri="P2", status="QUEUED"))
    result = plan(o, slots=10)
    assert ids(result) == ["T2", "CHAIN", "T9", "T10", "T3"]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="aZ09_.-", min_size=1, max_size=12))
def test_natural_key_reads_each_run_of_digits_as_a_number(text):
    import re

    from aipm.model import natural_key

    parts = re.split(r"(\d+)", text)
    assert natural_key(text) == tuple(int(p) if p.isdigit() else p for p in parts)
    assert natural_key("T9") < natural_key("T10") < natural_key("T10a") < natural_key("U1")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["T1", "T01", "T001", "T2", "T10", "A", "A0", "B9"]),
                          st.sampled_from(["P0", "P1", "P3"]), st.sampled_from(["QUEUED", "DONE"]),
                          st.lists(st.integers(0, 7), max_size=2)), max_size=8, unique_by=lambda x: x[0]))
def test_ranked_is_the_stable_sort_by_priority_chain_and_natural_id(specs):
    """Ties (`T1`, `T01` and `T001` are one natural key) keep the order's own order, as a stable sort keeps it."""
    from aipm.model import natural_key

    names = [name for name, *_ in specs]
    tasks = [task(name, status, pri, deps={names[d] for d in deps if d < i}) for i, (name, pri, status, deps)
             in enumerate(specs)]
    o = order(*tasks)
    chains = chain_lengths(o.tasks)
    expected = sorted(tasks, key=lambda t: (t.priority.rank, -chains.get(t.id, 1), natural_key(t.id)))
    assert [t.id for t in ranked(o)] == [t.id for t in expected]


def test_chain_lengths_count_dependants():
    o = order(task("A"), task("B", deps=["A"]), task("C", deps=["B"]), task("D", deps=["A"]))
    assert chain_lengths(o.tasks) == {"A": 3, "B": 2, "C": 1, "D": 1}
    assert [t.id for t in ranked(o)][0] == "A"


def test_a_chain_counts_only_the_tasks_still_to_run():
    """A retried task whose dependants are done (or failed) unblocks nothing more by finishing: it outranked a
    task whose two-task chain is still to run."""
    o = order(task("A"), task("B", "DONE", deps=["A"]), task("C", "COMPLETED", deps=["B"]),
              task("F", "FAILED", deps=["A"]), task("G", deps=["F"]), task("X"), task("Y", deps=["X"]))
    assert chain_lengths(o.tasks) == {"A": 1, "B": 0, "C": 0, "F": 0, "G": 1, "X": 2, "Y": 1}
    assert ids(plan(o, slots=1)) == ["X"]


def test_waiting_on_dependencies_names_them():
    o = order(task("A", status="IN_PROGRESS"), task("B", deps=["A"]), task("C", status="DONE"),
              task("D", deps=["C"]), task("E", status="COMPLETED"), task("F", deps=["E", "C"]))
    result = plan(o, live={"A"}, slots=5)
    assert ids(result) == ["D", "F"]
    assert result.blocked["B"].reason == WAITING
    assert result.blocked["B"].tasks == ("A",)
    assert "A (IN_PROGRESS)" in result.blocked["B"].detail


def test_dead_dependency_is_named_through_a_chain():
    o = order(task("A", status="FAILED"), task("B", deps=["A"]), task("C", deps=["B"]),
              task("X", status="CANCELLED"), task("Y", deps=["X"]), task("R", status="REJECTED"), task("S", deps=["R"]))
    result = plan(o, slots=5)
    assert result.blocked["B"].reason == NEVER and result.blocked["B"].tasks == ("A",)
    assert result.blocked["C"].reason == NEVER and result.blocked["C"].tasks == ("A",)
    assert "FAILED" in result.blocked["C"].detail
    assert result.blocked["Y"].tasks == ("X",) and result.blocked["S"].tasks == ("R",)


def test_a_dependency_past_its_own_budget_is_a_dead_end_and_a_held_budget_is_none():
    """A QUEUED task whose own max_cost_usd is reached starts only once a person raises it, as a FAILED one only once
    they retry it: what waits on it is named (`status`, `run`'s last words, `logs -f`'s end) as behind a FAILED one.
    A budget the running attempts hold is no such stop: they end, and it is shared again."""
    from dataclasses import replace

    from aipm.budget import Budget

    spent = replace(task("A", pri="P0"), max_cost_usd=0.1, cost_usd=0.1)
    o = order(spent, task("B", deps=["A"]), task("C", deps=["B"]), task("D"), task("E", status="FAILED"),
              task("F", deps=["E"]))
    assert never_runs(o) == {("E",): ["F"], ("A",): ["B", "C"]}
    result = plan(o, slots=5)
    assert result.blocked["C"].reason == NEVER and result.blocked["C"].tasks == ("A",)
    assert result.blocked["C"].detail.startswith("will not start until A does: budget reached: the task's attempts")
    assert any(note.startswith("B, C will not start until A does") for note in never_run_notes(o)), never_run_notes(o)
    assert set(will_not_start(o, None)) == {"A", "B", "C", "F"}
    held = Budget(limit=1.0, spent=0.5, source="order.yaml", held=0.5)
    assert plan(o, slots=5, budget=held).blocked["D"].reason == BUDGET  # held back, for now
    assert "D" not in will_not_start(o, held)
    reached = Budget(limit=1.0, spent=1.0, source="order.yaml")
    assert will_not_start(o, reached)["D"].startswith("will not start: budget reached: the order's attempts cost")


def test_another_owners_work_is_not_waited_for_by_tasks_that_wait_for_a_person():
    """A run of an order whose every queued task is past its own budget, or behind one that is, waited for another
    order's worker to end, though nothing it could free would start them."""
    from dataclasses import replace

    from aipm.foreign import others_matter

    spent = replace(task("A"), max_cost_usd=0.1, cost_usd=0.1)
    assert not others_matter(order(spent, task("B", deps=["A"])), {"OTH/S"})
    assert others_matter(order(spent, task("B", deps=["A"])), {"O/X"})  # a task of this order is among it
    assert others_matter(order(task("A"), task("B", deps=["A"])), {"OTH/S"})  # A may start once S frees its files


def test_another_owners_attempts_are_said_as_they_start_and_end():
    """What a run says of its order's tasks that other owners run (foreign.Said): not the first attempt of each (the
    watch line names it), then each new attempt's start and the end its file came to, as last read (before this
    run's own writes: its start of the next attempt); not an end it did not see before its owner's next attempt.
    Ends come before starts: an end may be what allowed them."""
    from types import SimpleNamespace

    from aipm.foreign import Said

    def rec(task_id, serial):
        return SimpleNamespace(task=task_id, serial=serial, pid=100 + serial)

    def read(*tasks):
        return {t.id: t for t in tasks}.get

    watcher = Said()

    class said:  # a run's round: the ends said first, then the starts (runloop)
        @staticmethod
        def said(read, records, watched):
            return watcher.ended(read, {r.task for r in records}) + watcher.started(records, watched)

    running = read(task("A", status="IN_PROGRESS"), task("B", status="IN_PROGRESS"))
    assert said.said(running, [rec("A", 1), rec("B", 1)], set()) == []
    events = said.said(running, [rec("A", 2), rec("B", 1)], {"A", "B"})  # A's retry, by its owner
    assert [(e["event"], e["task"], e["attempt"]) for e in events] == [("started", "A", 2)]
    events = said.said(read(task("A", status="FAILED"), task("B", status="IN_PROGRESS")), [rec("B", 1)], {"A", "B"})
    assert [(e["event"], e["task"], e["attempt"], e["status"]) for e in events] == [("finished", "A", 2, "FAILED")]
    assert said.said(read(task("A", status="FAILED"), task("B", status="QUEUED")), [], {"A", "B"})[0]["status"] == \
        "QUEUED"  # (as read: this run's start of B's next attempt since is its own write)
    assert said.said(read(task("A", status="FAILED"), task("B", status="DONE")), [], {"A", "B"}) == []



def test_every_dead_end_in_a_tasks_way_is_named_at_once():
    """X waits on B (FAILED) and C (CANCELLED): `status` and `run` named B alone, and once B was retried and done,
    the next run named C: a round per dead end. Each is named, with the retry of each; a dead end behind another
    is named itself (it is the one to retry first), not what stops it."""
    o = order(task("B", status="FAILED"), task("C", status="CANCELLED"), task("X", deps=["B", "C"]),
              task("Y", deps=["X", "D"]), task("D", status="REJECTED", deps=["B"]))
    assert never_runs(o) == {("B", "C"): ["X"], ("B", "C", "D"): ["Y"]}
    result = plan(o, slots=5)
    assert result.blocked["X"].tasks == ("B", "C")
    assert result.blocked["X"].detail == "can never run: B is FAILED, C is CANCELLED"
    assert never_run_notes(o)[0] == ("X can never run: B is FAILED, C is CANCELLED; fix what stopped B, then `aipm "
                                     "retry B`; fix what stopped C, then `aipm retry C`")
    many = order(*(task(f"F{i}", status="FAILED") for i in range(12)), task("Z", deps=[f"F{i}" for i in range(12)]))
    detail = plan(many, slots=5).blocked["Z"].detail
    assert detail.startswith("can never run: F0 is FAILED, ") and "F9 is FAILED; and more" in detail, detail
    assert "F10" not in detail and len(plan(many, slots=5).blocked["Z"].tasks) == 10


def test_the_budget_is_shared_in_rank_order_alike_with_and_without_reasons():
    """$0.15 gives one least share: A takes it, B waits, and so does C though its own budget ($0.03) would fit
    what is left: the hot path stopped at B, and `detect` (with reasons) went on to start C: they disagreed."""
    from dataclasses import replace

    from aipm.budget import Budget

    o = order(task("A", pri="P0"), task("B", pri="P1"), replace(task("C", pri="P2"), max_cost_usd=0.03))
    spend = Budget(limit=0.15, spent=0.0, source="order.yaml")
    for explain in (True, False):
        result = plan(o, slots=5, budget=spend, explain=explain)
        assert ids(result) == ["A"], explain
        assert [b.id for b in result.held] == ["B", "C"], explain
    assert plan(o, slots=5, budget=spend).blocked["C"].reason == BUDGET
    # One that waits on a dependency is no turn in this round: the hot path, which sees ready tasks alone, started
    # B, and `detect` said B was held.
    waits = order(task("W", pri="P0", deps=["X"]), task("X", status="IN_PROGRESS"),
                  replace(task("B", pri="P1"), max_cost_usd=0.04))
    held = Budget(limit=0.55, spent=0.0, source="order.yaml", held=0.5)
    assert ids(plan(waits, live={"X"}, slots=5, budget=held)) == ["B"]
    assert ids(plan(waits, live={"X"}, slots=5, budget=held, explain=False, ordering=["B"])) == ["B"]


def test_not_queued_and_stale():
    o = order(task("A", status="IN_PROGRESS", files=["a.py"]), task("B", status="IN_PROGRESS"),
              task("C", status="DONE"), task("D", files=["a.py"]))
    result = plan(o, live={"B"}, slots=5)
    assert result.stale == ["A"]
    assert result.blocked["A"].reason == STALE
    assert result.blocked["B"].reason == NOT_QUEUED
    assert result.blocked["C"].reason == NOT_QUEUED
    # A stale task keeps its files busy until it is recovered.
    assert result.blocked["D"].reason == FILE_BUSY and result.blocked["D"].tasks == ("A",)


def test_overlap_with_running_task_in_another_order():
    o = order(task("A", files=["src/"]), task("B", files=["docs/x.md"]))
    elsewhere = [Busy("OTHER", "Z", (normalize("src/mod/a.py"),))]
    result = plan(o, elsewhere, slots=5)
    assert ids(result) == ["B"]
    blocked = result.blocked["A"]
    assert blocked.reason == FILE_BUSY and blocked.tasks == ("OTHER/Z",)
    assert "src/" in blocked.path and "src/mod/a.py" in blocked.path


def test_overlap_within_the_round_goes_to_the_higher_ranked():
    o = order(task("LOW", pri="P2", files=["tests/**/*.py"]), task("HIGH", pri="P0", files=["tests/unit/test_x.py"]),
              task("FREE", pri="P3", files=["README.md"]))
    result = plan(o, slots=5)
    assert ids(result) == ["HIGH", "FREE"]
    assert result.blocked["LOW"].reason == FILE_CHOSEN and result.blocked["LOW"].tasks == ("HIGH",)
    # chosen, not yet running: it said "overlaps running task HIGH, which starts first this round"
    assert result.blocked["LOW"].detail == "tests/**/*.py ↔ tests/unit/test_x.py overlaps task HIGH, which starts " \
        "first this round", result.blocked["LOW"].detail


def test_normalised_paths_conflict():
    o = order(task("A", pri="P0", files=["./src/a.py"]), task("B", files=["src/../src/a.py"]))
    assert ids(plan(o, slots=5)) == ["A"]


def test_worker_limit():
    o = order(*(task(f"T{i}") for i in range(1, 6)))
    result = plan(o, slots=2)
    assert ids(result) == ["T1", "T2"]
    assert {result.blocked[f"T{i}"].reason for i in (3, 4, 5)} == {LIMIT}
    assert plan(o, slots=0).launchable == []


def test_no_target_files_conflicts_with_nothing():
    o = order(task("A", status="IN_PROGRESS", files=["x"]), task("B"), task("C"))
    assert ids(plan(o, live={"A"}, slots=5)) == ["B", "C"]


def test_summary_counts():
    o = order(task("A", status="IN_PROGRESS", files=["f"]), task("B", files=["f"]), task("C", deps=["A"]), task("D"))
    s = plan(o, slots=5).summary(o)
    assert s["queued"] == 3 and s["launchable"] == 1 and s["blocked_by_files"] == 1
    assert s["blocked_by_dependencies"] == 1 and s["stale"] == 1


def test_quiet_mode_chooses_the_same_tasks():
    o = order(*(task(f"T{i}", pri=f"P{i % 4}", files=[f"f{i % 3}"]) for i in range(20)))
    assert ids(plan(o, slots=3, explain=False)) == ids(plan(o, slots=3))


def test_a_task_with_a_live_worker_runs_whatever_its_file_says():
    """Issue 11.1: a file reset under its worker (QUEUED, or a committed DONE) is neither launched again, nor lets
    its dependants start, nor frees its files; explain=False (the supervisor's path) agrees."""
    o = order(task("A", files=["a.py"]), task("B", deps=["A"]), task("C", status="DONE", files=["c.py"]),
              task("D", deps=["C"]), task("E", files=["a.py"]), task("F", files=["c.py"]), task("G"))
    for explain in (True, False):
        result = plan(o, live={"A": 41, "C": 42}, slots=5, explain=explain)
        assert ids(result) == ["G"]
    assert result.stale == []
    result = plan(o, live={"A": 41, "C": 42}, slots=5)
    assert result.blocked["A"].reason == WORKER_RUNNING
    assert result.blocked["A"].detail == "its file says QUEUED, but its worker pid 41 is still running"
    assert result.blocked["C"].detail == "its file says DONE, but its worker pid 42 is still running"
    assert {tid: result.blocked[tid].reason for tid in "BDEF"} == {
        "B": WAITING, "D": WAITING, "E": FILE_BUSY, "F": FILE_BUSY}
    assert [r.reason for r in all_reasons(o, result, "A")] == [WORKER_RUNNING]


def test_worker_limit_detail_does_not_contradict_itself():
    o = order(*(task(f"T{i}") for i in range(1, 4)))
    detail = plan(o, slots=2).blocked["T3"].detail
    assert detail == "worker limit reached: the 2 free slot(s) go to tasks ranked before it"
    assert plan(o, slots=0).blocked["T1"].detail == "worker limit reached: no free worker slot"


def test_a_finished_task_names_why_it_ended():
    o = order(Task(id="R", path="R.yaml", status=Status.REJECTED, reason="review rejected: E501 line too long"))
    assert plan(o).blocked["R"].detail == "status is REJECTED (review rejected: E501 line too long)"


# Issue 17: planning a big order looks up holders' lock nodes instead of comparing every pair of targets.
raw_targets = st.lists(st.sampled_from(["a", "a/b", "a/b/c.py", "a/", "a/b/", "b.py", "x/y/z", "*.py", "a/*.py",
                                        "a/**/t.py", "x/", ".", "a/bc", "ab/c"]), max_size=3)


@settings(max_examples=300, deadline=None)
@given(mine=raw_targets, holders=st.lists(raw_targets, max_size=4))
def test_the_lock_index_agrees_with_comparing_every_pair(mine, holders):
    from aipm.paths import lock_overlap, normalize
    from aipm.overlap import LockIndex

    ours = tuple(normalize(raw) for raw in mine)
    theirs = [tuple(normalize(raw) for raw in group) for group in holders]
    pairwise = any(lock_overlap(a, b) for group in theirs for a in ours for b in group)
    assert LockIndex(theirs).near(ours) == pairwise


def reference_choice(o, elsewhere, live, slots, outside):
    """The plan's choice as first written: every ready task compared with every holder, pair by pair."""
    from aipm.model import FINISHED_OK, RUNNING
    from aipm.paths import lock_overlap

    def meets(mine, theirs):
        return any(lock_overlap(a, b) for a in mine for b in theirs)

    held = {tid for tid in live if tid in o.tasks and o.tasks[tid].status not in RUNNING}
    busy = [b.targets for b in elsewhere] + [t.targets for t in o.tasks.values() if t.status in RUNNING]
    busy += [o.tasks[tid].targets for tid in held]
    chosen, waiting = [], []
    for t in ranked(o):
        if t.id in held or t.status != Status.QUEUED:
            continue
        if any(d in o.tasks and (o.tasks[d].status not in FINISHED_OK or d in held) for d in t.depends_on):
            continue
        if any(meets(t.targets, theirs) for theirs in busy):
            continue
        if any(lock.conflict(t.targets) for lock in outside):
            waiting.append(t.id)
            continue
        if any(meets(t.targets, c.targets) for c in chosen):
            continue
        if len(chosen) >= slots:
            break
        chosen.append(t)
    return [t.id for t in chosen], waiting


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(st.tuples(st.sampled_from(["QUEUED"] * 4 + ["DONE", "IN_PROGRESS", "FAILED"]),
                            st.sampled_from(["P0", "P1", "P2"]), st.lists(st.integers(0, 11), max_size=2),
                            raw_targets), min_size=1, max_size=12),
    live=st.lists(st.integers(0, 11), max_size=3), others=st.lists(raw_targets, max_size=2),
    held=st.lists(st.sampled_from(["a", "a/b", "x", "b.py", ""]), max_size=2), slots=st.integers(0, 4),
)
def test_the_choice_without_reasons_is_the_choice_with_them_and_the_pairwise_one(rows, live, others, held, slots):
    """Issue 17 (B4): without reasons (the supervisor's path) the lock indexes alone reject a ready task; the tasks
    chosen, and those reported held outside aipm, are still those of comparing every pair, with or without reasons."""
    from aipm.plan import ForeignLock

    tasks = [task(f"T{i}", status, pri, [f"T{d}" for d in deps if d < i], raw)
             for i, (status, pri, deps, raw) in enumerate(rows)]
    o = order(*tasks)
    alive = {f"T{i}" for i in live if i < len(tasks)}
    elsewhere = [Busy("OTHER", f"X{i}", tuple(normalize(r) for r in raw)) for i, raw in enumerate(others)]
    outside = [ForeignLock((99,), tuple((node, True) for node in held))] if held else []
    expected = reference_choice(o, elsewhere, alive, slots, outside)
    for explain in (False, True):
        result = plan(o, elsewhere, alive, slots, explain=explain, outside=outside)
        assert ids(result) == expected[0]
        if not explain:
            assert [b.id for b in result.waiting] == expected[1]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 30), max_size=4), st.sampled_from(list(Status))), max_size=30))
def test_chain_lengths_are_the_longest_paths_of_dependants(deps):
    """Against the definition: 0 for a task that is over (finished or at a dead end), else 1 + the longest chain
    of any task that depends on it (repeated and unknown dependencies allowed)."""
    o = order(*(task(f"T{i}", status.value, deps=[f"T{d}" for d in ds if d < i] + ["ELSEWHERE"] * (i % 5 == 4))
                for i, (ds, status) in enumerate(deps)))
    over = {Status.DONE, Status.COMPLETED, Status.FAILED, Status.REJECTED, Status.CANCELLED}
    longest = {}
    for i in reversed(range(len(deps))):
        dependants = [j for j in range(i + 1, len(deps)) if f"T{i}" in o.tasks[f"T{j}"].depends_on]
        longest[f"T{i}"] = 0 if deps[i][1] in over else 1 + max((longest[f"T{j}"] for j in dependants), default=0)
    assert chain_lengths(o.tasks) == longest


def test_any_clear_is_false_only_when_every_task_would_wait_for_the_held_files():
    """The run loop's quick test before an early start: conservative, never False for a task that could start."""
    held = [(normalize("shared/one.txt"),), (normalize("docs/"),)]
    assert not any_clear([task("A", files=["shared/one.txt"]), task("B", files=["docs/guide.md"]),
                          task("C", files=["shared/"]), task("D", files=["shared/*.txt"])], held)
    assert any_clear([task("G", files=["*.txt"])], held)  # a glob that can match neither
    assert any_clear([task("A", files=["shared/one.txt"]), task("E", files=["shared/two.txt"])], held)
    assert not any_clear([], held)
    assert any_clear([task("F", files=["src/a.py"])], [])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "a/b", "a/b/c.txt", "a/*.py", "b", "b/**/x", "c.txt", "*.txt"]),
                min_size=1, max_size=3),
       st.lists(st.lists(st.sampled_from(["a", "a/b", "a/b/c.txt", "a/x.py", "b/y/x", "c.txt", "d.md"]),
                         min_size=1, max_size=2), min_size=1, max_size=4))
def test_any_clear_never_says_wait_for_a_task_whose_targets_overlap_nothing_held(held_paths, candidates):
    from aipm.paths import lock_overlap

    held = [tuple(normalize(p) for p in held_paths)]
    tasks = [task(f"T{i}", files=files) for i, files in enumerate(candidates)]
    free = [t for t in tasks if not any(lock_overlap(a, b) for a in t.targets for b in held[0])]
    if free:
        assert any_clear(tasks, held)


def test_a_released_running_task_holds_no_file_and_is_not_stale():
    """A running task whose worker ended with no reviewer to follow (`released`) keeps nothing busy: the next
    task on its file may start; its dependants still wait for its outcome."""
    o = order(task("A", status="IN_PROGRESS", files=["s.txt"]), task("B", files=["s.txt"]),
              task("C", deps=["A"], files=["c.txt"]))
    held = plan(o, slots=2, explain=False, running={"A"})
    assert ids(held) == [] and held.stale == ["A"]
    free = plan(o, slots=2, explain=False, running={"A"}, released={"A"})
    assert ids(free) == ["B"] and free.stale == []


def test_a_budget_its_running_attempts_hold_whole_stops_no_order_but_starts_nothing():
    from aipm.budget import Budget
    from aipm.plan import BUDGET

    o = order(task("A", status="IN_PROGRESS"), task("B"))
    # (0.55: the $0.05 left is less than a least share, MIN_SHARE, while an attempt holds one: B waits for it too)
    for held, launchable in ((0.6, []), (0.55, []), (0.5, ["B"])):
        budget = Budget(limit=1.0, spent=0.4, source="order.yaml", held=held)
        result = plan(o, slots=5, budget=budget)
        assert ids(result) == launchable and result.budget_stop is None
        if not launchable:
            assert result.blocked["B"].reason == BUDGET and "budget held" in result.blocked["B"].detail
            assert ids(plan(o, slots=5, budget=budget, explain=False)) == []
    # Whole micro-dollars, never rounded up: the last gets the one left over, and all of them add up to $1 at most.
    assert Budget(1.0, 0.0, "order.yaml").split([None] * 3) == [0.333333, 0.333333, 0.333334]
    # Never less than MIN_SHARE ($0.10) while more could start: fewer start; less only when nothing is held.
    assert Budget(1.0, 0.4, "order.yaml", 0.5).split([None] * 3) == [0.1, 0, 0]
    assert Budget(1.0, 0.75, "order.yaml").split([None] * 3) == [0.125, 0.125, 0]
    assert Budget(1.0, 0.95, "order.yaml").split([None] * 3) == [0.05, 0, 0]
    # Nor below a task's own budget where that is less: four tasks of $0.02 each under $0.12 all start (MIN_SHARE
    # counted for each had them start one at a time), and one needing less leaves the rest to the others.
    assert Budget(0.12, 0.0, "order.yaml").split([0.02] * 4) == [0.02] * 4
    assert Budget(0.12, 0.0, "order.yaml").split([None, 0.02, None]) == [0.1, 0.02, 0]
    assert Budget(1.0, 0.0, "order.yaml").split([0.1, None]) == [0.1, 0.9]


def test_a_task_held_back_by_the_budget_or_past_its_own_is_listed_even_when_not_explaining():
    """The hot path's plan dropped a task the running attempts held back without a word, so `exec` of it exited 1
    where it should wait; and a task whose own max_cost_usd was spent was taken as held back (it waits for no
    running attempt): its `budget` line never came, and, listed as held, a run would wait on it for ever."""
    from dataclasses import replace

    from aipm.budget import Budget

    budget = Budget(limit=1.0, spent=0.4, source="order.yaml", held=0.6)
    o = order(task("A", status="IN_PROGRESS"), task("B"))
    result = plan(o, slots=5, budget=budget, explain=False)
    assert [b.id for b in result.held] == ["B"] and "budget held" in result.held[0].detail and not result.spent
    spent = order(task("A", status="IN_PROGRESS"), replace(task("B"), max_cost_usd=0.3, cost_usd=0.3))
    result = plan(spent, slots=5, budget=budget, explain=False)
    assert not result.held and [b.id for b in result.spent] == ["B"]
    assert plan(spent, slots=5, budget=budget).blocked["B"].detail == result.spent[0].detail


def test_a_budget_held_whole_keeps_no_task_that_costs_nothing_against_it_waiting():
    """An end-to-end session: two claude attempts held all of a $5 budget, and a lint command, a build command and
    a codex task (none of which spends a cent of it) waited for them to end."""
    from aipm.budget import Budget
    from aipm.plan import BUDGET

    o = order(task("A", status="IN_PROGRESS"), task("AGENT", pri="P0"), task("LINT", pri="P2"))
    for costless in (frozenset({"LINT"}), frozenset()):
        budget = Budget(limit=1.0, spent=0.4, source="order.yaml", held=0.6, costless=costless)
        for explain in (True, False):
            assert ids(plan(o, slots=5, budget=budget, explain=explain)) == (["LINT"] if costless else [])
        assert plan(o, slots=5, budget=budget).blocked["AGENT"].reason == BUDGET
    reached = Budget(limit=1.0, spent=1.0, source="order.yaml", costless=frozenset({"LINT"}))
    assert ids(plan(o, slots=5, budget=reached)) == []  # a stop is a stop: no new attempt once it is reached
