"""The order view's indexes kept up to date task by task agree with recomputing them from scratch."""

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from aipm.model import FINISHED_OK, Status
from aipm.ranking import ranked
from aipm.view import OrderView

from conftest import write_task

STATUSES = [Status.QUEUED, Status.IN_PROGRESS, Status.DONE, Status.FAILED, Status.COMPLETED]


def _ready_from_scratch(order) -> list[str]:
    tasks = order.tasks
    return [t.id for t in ranked(order) if t.status == Status.QUEUED
            and all(d in tasks and tasks[d].status in FINISHED_OK for d in t.depends_on)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), size=st.integers(min_value=1, max_value=12))
def test_the_ready_tasks_stay_in_launch_order_as_statuses_change(tmp_path_factory, data, size):
    root = tmp_path_factory.mktemp("view")
    order_dir = root / "orders" / "ORD"
    order_dir.mkdir(parents=True)
    for i in range(size):
        deps = data.draw(st.lists(st.sampled_from(range(i)), unique=True, max_size=3)) if i else []
        write_task(order_dir, f"T{i:02d}", command="true", priority=data.draw(st.sampled_from(["P0", "P1", "P2"])),
                   depends_on=[f"T{d:02d}" for d in deps])
    view = OrderView(order_dir, root, watch=False)
    assert view.ready_ordering() == _ready_from_scratch(view.order)
    for _ in range(data.draw(st.integers(min_value=1, max_value=25))):
        tid = data.draw(st.sampled_from(sorted(view.order.tasks)))
        task = dataclasses.replace(view.order.tasks[tid], status=data.draw(st.sampled_from(STATUSES)))
        view.note(task)  # as after a write of our own
        assert view.ready_ordering() == _ready_from_scratch(view.order)
        below = data.draw(st.integers(min_value=0, max_value=len(view.order.tasks)))
        assert view.ready_ordering(below) == [t for t in _ready_from_scratch(view.order) if view.rank(t) < below]
        assert view.running == {t.id for t in view.order.tasks.values() if t.status in (Status.IN_PROGRESS,)}


def _order(root, name="ORD"):
    order_dir = root / "orders" / name
    write_task(order_dir, "A", command="true")
    write_task(order_dir, "B", command="true", depends_on=["A"])
    return order_dir


@pytest.mark.parametrize("removed", ["orders/ORD", "orders"])
def test_an_order_directory_made_again_is_watched_again(tmp_path, removed):
    """`rm -rf` and `git checkout`, or `git stash -u` and `pop`, put back a directory with a new inode: the view
    sees its files (found by a hostile-worker review: `run` ended with a ready task never started)."""
    import shutil

    order_dir = _order(tmp_path)
    view = OrderView(order_dir, tmp_path)
    assert view.watch is not None
    shutil.rmtree(tmp_path / removed)
    view.refresh()
    assert view.order.tasks == {} and view.changed
    _order(tmp_path)
    write_task(order_dir, "C", command="true")
    view.refresh()
    assert sorted(view.order.tasks) == ["A", "B", "C"] and view.ready_ordering() == ["A", "C"]
    write_task(order_dir, "A", command="true", status="DONE")  # a change inside the new directory is an event
    view.refresh()
    assert view.order.tasks["A"].status == Status.DONE and view.ready_ordering() == ["B", "C"]


def test_a_file_read_mid_write_is_read_again_when_the_write_ends(tmp_path, monkeypatch):
    """The view read a file while another program was writing it (empty, so invalid), and the write ended before
    the view took the file's stat: that stat matched the finished file, and its change event was then ignored."""
    from aipm import view as view_module
    from aipm.errors import ValidationError

    order_dir = _order(tmp_path)
    view = OrderView(order_dir, tmp_path)
    real = view_module.load_task

    def read_mid_write(path, root):
        if path.name == "A.yaml":  # what the reader saw: the file truncated, not yet written
            write_task(order_dir, "A", command="true", status="DONE")  # ...and the write ends right after
            raise ValidationError(str(path), None, "file is empty")
        return real(path, root)

    path = order_dir / "A.yaml"
    path.write_text("")
    monkeypatch.setattr(view_module, "load_task", read_mid_write)
    view.refresh()
    assert view.problems and view.order.tasks["A"].status == Status.QUEUED  # the last good version, kept
    monkeypatch.setattr(view_module, "load_task", real)
    view.refresh()  # the write's own event
    assert view.order.tasks["A"].status == Status.DONE


def test_events_dropped_by_a_full_queue_are_made_up_by_reading_the_order_again(tmp_path):
    """The view also watches the directories above the order (for its return), so a burst of files made at the
    project root can fill the inotify queue: its overflow event said nothing, and a change to a task was lost."""
    order_dir = _order(tmp_path)
    view = OrderView(order_dir, tmp_path)
    with open("/proc/sys/fs/inotify/max_queued_events") as handle:
        limit = int(handle.read())
    for i in range(limit + 10):  # a worker's output files at the project root
        (tmp_path / f"out{i}").touch()
    write_task(order_dir, "A", command="true", status="CANCELLED")
    view.refresh()
    assert view.order.tasks["A"].status == Status.CANCELLED and view.changed


@pytest.mark.parametrize("watch", [True, False])
def test_a_same_size_file_copied_over_with_its_mtime_kept_is_read_again(tmp_path, watch):
    """`cp -p` writes into the task file's own inode and puts the mtime back: inode, size and mtime all stay, only
    the ctime tells the versions apart (found by review: the view kept QUEUED where the file said FAILED)."""
    import os
    import subprocess
    import time

    order_dir = _order(tmp_path)
    path = write_task(order_dir, "A", command="true", status="QUEUED")
    twin = tmp_path / "A.copy"
    twin.write_text(path.read_text().replace("QUEUED", "FAILED"))
    os.utime(twin, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
    view = OrderView(order_dir, tmp_path, watch=watch)
    before = path.stat()
    time.sleep(0.02)  # past the file system's timestamp tick: the copy's ctime is a later one
    subprocess.run(["cp", "-p", str(twin), str(path)], check=True)
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    view.refresh()
    assert view.order.tasks["A"].status == Status.FAILED and view.changed


def test_a_file_kept_out_for_a_cycle_its_edit_makes_is_the_one_named(tmp_path):
    """Two files edited mid-run into a cycle (B on C, then C on B): B's new version is taken (no cycle yet), C's
    kept out. The cycle is named from its first task, so `run` said `ignored .../B.yaml (keeping the last valid
    version)`: the user was told B's edit was ignored while C's was, and C then ran before B, which its file
    says it depends on."""
    order_dir = tmp_path / "orders" / "ORD"
    write_task(order_dir, "A", command="true")
    write_task(order_dir, "B", command="true", depends_on=["A"])
    write_task(order_dir, "C", command="true", depends_on=["A"])
    view = OrderView(order_dir, tmp_path, watch=False)
    write_task(order_dir, "B", command="true", depends_on=["A", "C"])
    view.refresh()
    write_task(order_dir, "C", command="true", depends_on=["A", "B"])
    order = view.refresh()
    assert list(order.tasks["B"].depends_on) == ["A", "C"] and list(order.tasks["C"].depends_on) == ["A"]
    assert len(view.problems) == 1 and view.problems[0].startswith(f"{order_dir / 'C.yaml'}: depends_on: "), \
        view.problems


@pytest.mark.parametrize("watch", [True, False])
def test_a_write_between_the_first_read_and_the_watch_is_seen(tmp_path, monkeypatch, watch):
    """Two `run`s of one order started at once: the second read the order (A running, owned by the first), the
    first recorded A DONE, and only then did the second start watching the directory. It never saw A end: it
    'recovered' A as lost with its supervisor at every round (the write refused, A being DONE), never started
    A's dependants itself, and exited 1 with `ORD: DONE 7, IN_PROGRESS 1` though every task was DONE."""
    import aipm.view

    order_dir = _order(tmp_path)
    write_task(order_dir, "A", command="true", status="IN_PROGRESS", attempts=1)
    real = aipm.view.load_order

    def read_then_the_other_run_records_a(*args):
        order = real(*args)
        write_task(order_dir, "A", command="true", status="DONE", attempts=1)
        return order

    monkeypatch.setattr(aipm.view, "load_order", read_then_the_other_run_records_a)
    view = OrderView(order_dir, tmp_path, watch=watch)
    monkeypatch.undo()
    assert view.refresh().tasks["A"].status == Status.DONE
    assert view.ready_ordering() == ["B"]


def test_the_boards_workers_are_numbered_as_ps_numbers_them(tmp_path):
    """After a cancel and a retry the task's second attempt runs as its first again (attempts reset) with log
    `R.2.log`: `ps` said attempt 2, the dashboard 1."""
    from aipm.board import workers
    from aipm.launcher import Launcher, Options
    from aipm.project import Project
    from aipm.record import Record
    from aipm.runtime import Runtime
    from aipm.settings import load_settings

    rt = Runtime(tmp_path)
    rt.write_record(Record(order="O", order_dir=str(tmp_path / "orders" / "O"), task="R",
                           task_file=str(tmp_path / "orders" / "O" / "R.yaml"), attempt=1, targets=["a.py"],
                           log=str(tmp_path / "R.2.log"), exit_file=str(tmp_path / "R.2"), started_at="", number=2))
    launcher = Launcher(Project(tmp_path), load_settings(tmp_path), Options(dry_run=True), monitor=None)
    assert [(w["task"], w["attempt"]) for w in workers(launcher)] == [("R", 2)]
