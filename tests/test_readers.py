"""Issue 17 (B3): a big order parsed in forked reader processes loads exactly as one parsed file after file."""

import hashlib
import json
import os
import signal
from types import SimpleNamespace

import pytest

from aipm import readers, store
from aipm.errors import ValidationError
from aipm.store import load_order
from test_validation import assert_one_line_error

N = 23


@pytest.fixture
def forked(monkeypatch):
    """Readers allowed from 4 files up, three of them whatever this machine's cores; counts the readers forked."""
    started = []
    real = readers._start

    def start(share, load):
        started.append(len(share))
        return real(share, load)

    monkeypatch.setattr(readers, "_allowed", True)
    monkeypatch.setattr(readers, "PARALLEL_FROM", 4)
    monkeypatch.setattr(readers.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.setattr(readers, "_start", start)
    # Nor whatever threads another test left in this process (a thread draining a command's output while its
    # workers live on): readers fork only while single-threaded, and these tests start no thread.
    monkeypatch.setattr(readers, "threading", SimpleNamespace(active_count=lambda: 1))
    return started


def make_order(root, n=N):
    """Files of both forms (flat lines for the fast reader, block YAML for libyaml), targets, links, a glob."""
    order = root / "orders" / "ORD"
    order.mkdir(parents=True)
    for i in range(n):
        deps = f"[{', '.join(sorted({f'T{i - 1:02d}', f'T{i // 2:02d}'}))}]" if i > 1 else "[]"  # (T2: T01 once)
        if i % 3:
            text = (f'id: T{i:02d}\ncommand: "true"\nstatus: {"DONE" if i < 5 else "QUEUED"}\ndepends_on: {deps}\n'
                    f'target_files: ["src/m{i % 4}.py", "docs/", "tests/**/t{i}*.py"]\npriority: P{i % 3}\n')
        else:
            text = (f"# a comment\nid: T{i:02d}\ncommand: [sh, -c, 'exit 0']\ndepends_on: {deps}\n"
                    f"target_files:\n  - src/m{i % 4}.py\ntokens: {{input: {i}}}\ntimeout: {i + 1}\ntitle: Tâche {i}\n"
                    f"resources: {{cpus: 0.5, memory_mb: {i + 64}}}\nworkspace_copy: ['*.env']\n")
        (order / f"T{i:02d}.yaml").write_text(text)
    (root / "docs").mkdir()
    return order


def test_readers_return_what_one_process_returns(tmp_path, forked, monkeypatch):
    order = make_order(tmp_path)
    parallel = load_order(order, tmp_path)
    assert forked == [7, 7]  # shares of 9, 7 and 7 files: this process parses the first, the bigger (OWN_WEIGHT)
    monkeypatch.setattr(readers, "_allowed", False)
    serial = load_order(order, tmp_path)
    assert len(forked) == 2
    assert list(parallel.tasks) == list(serial.tasks) and parallel.tasks == serial.tasks
    assert parallel.tasks["T03"].tokens == {"input": 3} and parallel.tasks["T03"].command == ("sh", "-c", "exit 0")
    assert parallel.tasks["T04"].targets[1].is_dir  # `docs/` exists: normalised against the tree


def test_every_task_goes_over_the_pipe_as_plain_data(tmp_path):
    """A Task as_row cannot carry is parsed again by the parent: correct, but the readers' work lost."""
    from aipm.parsecache import as_row, task_of

    for task in load_order(make_order(tmp_path), tmp_path).tasks.values():
        assert task_of(as_row(task), task.path, task.targets) == task


@pytest.mark.parametrize("bad", [[2], [12], [20], [12, 20], [2, 20], [9, 8], [22]])
def test_the_first_bad_file_in_name_order_is_the_one_reported(tmp_path, forked, monkeypatch, bad):
    order = make_order(tmp_path)
    for i in bad:
        (order / f"T{i:02d}.yaml").write_text(f"id: T{i:02d}\npriority: Q{i}\n")
    with pytest.raises(ValidationError) as parallel:
        load_order(order, tmp_path)
    assert forked
    monkeypatch.setattr(readers, "_allowed", False)
    with pytest.raises(ValidationError) as serial:
        load_order(order, tmp_path)
    assert str(parallel.value) == str(serial.value)
    assert f"T{min(bad):02d}.yaml: priority: 'Q{min(bad)}' is not one of" in str(parallel.value)


@pytest.mark.parametrize("how", ["killed", "crashed", "truncated"])
def test_a_reader_that_fails_costs_time_not_the_result(tmp_path, forked, monkeypatch, how):
    order = make_order(tmp_path)
    expected = load_order(order, tmp_path).tasks

    def failing(share, load, fd):
        if how == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "crashed":
            raise MemoryError
        os.write(fd, b"\xdb\x02\x00\x00\x00")  # the start of a marshalled tuple, and no more

    monkeypatch.setattr(readers, "_answer", failing)
    parsed, real_load = [], store.load_task
    monkeypatch.setattr(store, "load_task", lambda path, *args: parsed.append(path) or real_load(path, *args))
    assert load_order(order, tmp_path).tasks == expected
    assert len(parsed) == N  # every share parsed here: the first as always, the others after their reader failed


def test_no_process_to_be_had_means_parsing_here(tmp_path, forked, monkeypatch):
    order = make_order(tmp_path)
    expected = load_order(order, tmp_path).tasks
    forks = []

    def fork():
        forks.append(1)
        if len(forks) > 1:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real_fork()

    real_fork = os.fork
    monkeypatch.setattr(readers.os, "fork", fork)
    assert load_order(order, tmp_path).tasks == expected
    assert len(forks) == 2  # one reader forked, the second refused: its share (and the rest) parsed here


def test_a_small_order_forks_nothing(tmp_path, forked, monkeypatch):
    monkeypatch.setattr(readers, "PARALLEL_FROM", N + 1)
    load_order(make_order(tmp_path), tmp_path)
    assert forked == []


def test_only_processes_that_allow_it_fork(tmp_path, forked, monkeypatch):
    monkeypatch.setattr(readers, "_allowed", False)
    load_order(make_order(tmp_path), tmp_path)
    assert forked == []


def full_snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def test_detect_on_a_big_order_reads_in_parallel_writes_nothing_and_names_the_first_bad_file(project):
    order = project.order()
    n = readers.PARALLEL_FROM + 100
    for i in range(n):
        (order / f"T{i:04d}.yaml").write_text(
            f'id: T{i:04d}\ncommand: "true"\ndepends_on: {f"[T{i - 1:04d}]" if i else "[]"}\n'
            f'target_files: ["out/{i % 7}.txt"]\n')
    before = full_snapshot(project.root)
    proc = project.aipm("detect", "ORD", "--json")
    assert proc.returncode == 0, proc.stderr
    assert full_snapshot(project.root) == before
    data = json.loads(proc.stdout)
    assert [t["id"] for t in data["launchable"]] == ["T0000"] and data["summary"]["total"] == n
    assert data["blocked"][-1] == {"id": f"T{n - 1:04d}", "reason": "waiting_on_dependencies",
                                   "detail": f"waiting on T{n - 2:04d} (QUEUED)", "tasks": [f"T{n - 2:04d}"]}
    for i in (n - 10, n - 50):  # both in the second share: a reader's, on two or more cores
        (order / f"T{i:04d}.yaml").write_text(f"id: T{i:04d}\ntimeout: soon\n")
    before = full_snapshot(project.root)
    for args in (("detect", "ORD", "--json"), ("status", "ORD", "--json"), ("detect", "ORD"), ("validate", "ORD")):
        proc = project.aipm(*args)
        assert_one_line_error(proc, f"T{n - 50:04d}.yaml", "timeout")
        assert full_snapshot(project.root) == before and not (project.root / ".aipm").exists()
    # `why` of another task plans with each of them as a task that cannot start, and names both
    proc = project.aipm("why", "ORD/T0001")
    assert proc.returncode == 0 and proc.stdout == "T0001 cannot start:\n  - waiting on T0000 (QUEUED)\n", proc
    assert [line.split(": ")[2].rsplit("/", 1)[-1] for line in proc.stderr.splitlines()] == [
        f"T{n - 50:04d}.yaml", f"T{n - 10:04d}.yaml"], proc.stderr
    assert full_snapshot(project.root) == before and not (project.root / ".aipm").exists()
