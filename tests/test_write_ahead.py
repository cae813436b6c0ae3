"""Status writes made ahead of their moment (writer.prepare) and logs placed on empty files made earlier
(Runtime.stock_logs): what the hot path of a hand-over no longer waits for, and never a byte written that the
write it stands for would not have written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from aipm import runner, spares, writer
from aipm.starting import start_updates
from aipm.model import Status
from aipm.runtime import Runtime
from aipm.writer import update_task
from conftest import write_task


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(spares, "_pools", {})  # each test its own pools and prepared versions (per process)
    monkeypatch.setattr(writer, "_ahead", {})


def _queued(project, name: str = "T1") -> Path:
    return write_task(project.order(), name, command="true", status="QUEUED")


def _start_updates(path: Path, root: Path) -> dict:
    from aipm.store import load_task
    return start_updates(load_task(path, root), STAMP)


STAMP = "2026-12-03T04:00:00+00:00"


def _pool_inodes(root: Path) -> dict[int, bytes]:
    pool = root / ".aipm" / "spare"
    return {p.stat().st_ino: p.read_bytes() for p in pool.iterdir() if p.name != ".gitignore"}


def test_a_prepared_version_is_what_the_write_installs(project):
    path = _queued(project)
    before = path.read_bytes()
    writer.prepare(path, lambda task: start_updates(task, STAMP), Status.QUEUED, project.root)
    assert path.read_bytes() == before  # nothing visible changes until the write is asked for
    ready = _pool_inodes(project.root)
    assert list(writer._ahead) == [str(path)]
    task = update_task(path, _start_updates(path, project.root), expect=Status.QUEUED, root=project.root)
    assert path.stat().st_ino in ready  # the file written ahead, moved into place: no new write
    assert ready[path.stat().st_ino] == path.read_bytes()
    assert yaml.safe_load(path.read_text()) == {"id": "T1", "command": "true", "status": "IN_PROGRESS",
                                                "attempts": 1, "started_at": STAMP, "finished_at": None,
                                                "exit_code": None}
    assert task.status == Status.IN_PROGRESS and task.attempts == 1
    assert not writer._ahead  # used once
    assert sorted(p.name for p in path.parent.iterdir()) == ["T1.yaml"]  # no temp file left beside it


def test_a_prepared_version_whose_fsync_failed_is_never_put_in_place(project, monkeypatch):
    """A version written ahead is fsynced off the run's thread; the write that uses it waits for that fsync, and one
    that failed (EIO: the disk) is dropped and the write made as usual, its own fsync and all: the file put in place
    is never one whose bytes may not be on disk."""
    from aipm.offthread import Pending

    path = _queued(project)
    writer.prepare(path, lambda task: start_updates(task, STAMP), Status.QUEUED, project.root)
    ahead = writer._ahead[str(path)]
    assert ahead.on_disk()  # its own fsync, done off this thread

    def failed():
        raise OSError(5, "Input/output error")

    ahead.synced = Pending(failed).run()
    written = []
    real = writer.atomic_write
    monkeypatch.setattr(writer, "atomic_write", lambda *args, **kw: written.append(args[0]) or real(*args, **kw))
    update_task(path, _start_updates(path, project.root), expect=Status.QUEUED, root=project.root)
    assert not os.path.exists(ahead.name)  # dropped, not kept as a spare either
    assert written == [path]  # written anew (file, fsync, rename), not the version written ahead
    assert yaml.safe_load(path.read_text())["status"] == "IN_PROGRESS" and writer._ahead == {}


def test_an_edit_after_the_version_was_prepared_is_kept(project):
    path = _queued(project)
    writer.prepare(path, lambda task: start_updates(task, STAMP), Status.QUEUED, project.root)
    with open(path, "a") as handle:
        handle.write("# a note someone saved meanwhile\npriority: P0\n")
    update_task(path, _start_updates(path, project.root), expect=Status.QUEUED, root=project.root)
    text = path.read_text()
    assert "# a note someone saved meanwhile" in text
    assert yaml.safe_load(text)["priority"] == "P0" and yaml.safe_load(text)["status"] == "IN_PROGRESS"


def test_other_changes_than_those_prepared_are_written_as_asked(project):
    path = _queued(project)
    writer.prepare(path, lambda task: start_updates(task, STAMP), Status.QUEUED, project.root)
    later = dict(_start_updates(path, project.root), started_at="2026-12-03T04:00:01+00:00")  # a second later
    update_task(path, later, expect=Status.QUEUED, root=project.root)
    assert yaml.safe_load(path.read_text())["started_at"] == "2026-12-03T04:00:01+00:00"


def test_a_prepared_file_changed_where_it_waits_is_not_installed(project):
    """A worker writing anywhere may write into `.aipm/spare` too: what it wrote never becomes the task file."""
    path = _queued(project)
    writer.prepare(path, lambda task: start_updates(task, STAMP), Status.QUEUED, project.root)
    (waiting,) = [p for p in (project.root / ".aipm" / "spare").iterdir() if b"IN_PROGRESS" in p.read_bytes()]
    with open(waiting, "r+b") as handle:  # the same inode, other bytes
        handle.write(b"id: T9\nstatus: DONE\n" + b" " * 40)
    update_task(path, _start_updates(path, project.root), expect=Status.QUEUED, root=project.root)
    data = yaml.safe_load(path.read_text())
    assert data["id"] == "T1" and data["status"] == "IN_PROGRESS"


def test_a_file_put_in_the_pools_place_in_the_instant_before_the_exchange_is_taken_back(project, monkeypatch):
    """The version written ahead is exchanged into place straight from the pool: another file renamed under its
    name after it was checked (a worker writing into `.aipm/spare` at that instant) is swapped back out, and the
    status is written anew; the task file never keeps bytes aipm did not write."""
    path = _queued(project)
    writer.prepare(path, lambda task: start_updates(task, STAMP), Status.QUEUED, project.root)
    checked = spares.Pool.unchanged

    def then_planted(pool, name, version):
        ok = checked(pool, name, version)
        planted = Path(name).with_name("planted")
        planted.write_text("id: T9\nstatus: DONE\n")
        os.rename(planted, name)  # after the check, before the exchange
        return ok

    monkeypatch.setattr(spares.Pool, "unchanged", then_planted)
    update_task(path, _start_updates(path, project.root), expect=Status.QUEUED, root=project.root)
    data = yaml.safe_load(path.read_text())
    assert data["id"] == "T1" and data["status"] == "IN_PROGRESS"
    assert not any(b"T9" in p.read_bytes() for p in (project.root / ".aipm" / "spare").iterdir())


def test_a_chmod_after_the_version_was_prepared_is_kept(project):
    path = _queued(project)
    writer.prepare(path, lambda task: start_updates(task, STAMP), Status.QUEUED, project.root)
    os.chmod(path, 0o600)
    update_task(path, _start_updates(path, project.root), expect=Status.QUEUED, root=project.root)
    assert path.stat().st_mode & 0o777 == 0o600 and yaml.safe_load(path.read_text())["status"] == "IN_PROGRESS"


def test_an_edit_of_the_same_size_with_its_mtime_put_back_is_kept(project):
    """`rsync --inplace -t` or `touch -r`: inode, size and mtime as prepared; only the ctime tells."""
    path = write_task(project.order(), "T1", command="true", status="QUEUED", priority="P2")
    writer.prepare(path, lambda task: start_updates(task, STAMP), Status.QUEUED, project.root)
    before = path.stat()
    with open(path, "r+") as handle:
        text = handle.read()
        handle.seek(0)
        handle.write(text.replace("P2", "P0"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    update_task(path, _start_updates(path, project.root), expect=Status.QUEUED, root=project.root)
    assert yaml.safe_load(path.read_text())["priority"] == "P0"


def test_a_prepared_file_that_cannot_be_used_is_removed_from_the_pool(project):
    path = _queued(project)
    for attempt in range(5):
        writer.prepare(path, lambda task: start_updates(task, STAMP), Status.QUEUED, project.root)
        (waiting,) = [p for p in (project.root / ".aipm" / "spare").iterdir() if b"IN_PROGRESS" in p.read_bytes()]
        os.chmod(waiting, 0o640)  # its ctime moves: not what was written
        update_task(path, _start_updates(path, project.root), expect=Status.QUEUED, root=project.root)
        update_task(path, {"status": Status.QUEUED}, root=project.root)
    left = [p for p in (project.root / ".aipm" / "spare").iterdir() if p.name != ".gitignore"]
    assert len(left) <= spares.KEEP and not any(p.stat().st_mode & 0o777 == 0o640 for p in left)


def test_prepared_versions_are_bounded_and_those_not_wanted_are_let_go(project, monkeypatch):
    monkeypatch.setattr(writer, "AHEAD_MAX", 2)
    paths = [_queued(project, f"T{i}") for i in range(4)]
    for path in paths[:3]:
        writer.prepare(path, lambda task: start_updates(task, STAMP), Status.QUEUED, project.root)
    assert sorted(writer._ahead) == sorted(map(str, paths[1:3]))  # the oldest made room
    writer.keep_prepared({str(paths[2])})
    assert list(writer._ahead) == [str(paths[2])]
    writer.prepare(paths[3], lambda task: start_updates(task, STAMP), Status.QUEUED, project.root)
    assert list(writer._ahead) == [str(paths[2]), str(paths[3])]
    assert len(_pool_inodes(project.root)) <= spares.KEEP + 2


def test_a_version_prepared_from_a_file_that_moved_on_is_made_again(project):
    path = _queued(project)
    writer.prepare(path, lambda task: start_updates(task, STAMP), Status.QUEUED, project.root)
    path.write_text(path.read_text().replace("command: 'true'", "command: echo hi").replace(
        "command: true", "command: echo hi"))
    writer.prepare(path, lambda task: start_updates(task, STAMP), Status.QUEUED, project.root)
    ready = _pool_inodes(project.root)
    update_task(path, _start_updates(path, project.root), expect=Status.QUEUED, root=project.root)
    assert path.stat().st_ino in ready and yaml.safe_load(path.read_text())["command"] == "echo hi"


def test_nothing_is_prepared_for_a_status_the_file_no_longer_has(project):
    path = write_task(project.order(), "T1", command="true", status="DONE")
    writer.prepare(path, lambda task: start_updates(task, STAMP), Status.QUEUED, project.root)
    assert not writer._ahead
    assert not (project.root / ".aipm" / "spare").exists() or not _pool_inodes(project.root)


def test_the_prepared_versions_of_a_killed_process_are_swept(project):
    path = _queued(project)
    other = _queued(project, "T2")
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from aipm import writer
        from aipm.starting import start_updates
        from aipm.model import Status
        writer.prepare(Path({str(path)!r}), lambda t: start_updates(t, {STAMP!r}), Status.QUEUED, Path({str(project.root)!r}))
        print(len(writer._ahead), flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "1\n"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert any(name.startswith(f"{child.pid}-") for name in os.listdir(project.root / ".aipm" / "spare"))
    writer.prepare(other, lambda task: start_updates(task, STAMP), Status.QUEUED, project.root)  # its pool's first use
    assert not any(name.startswith(f"{child.pid}-") for name in os.listdir(project.root / ".aipm" / "spare"))
    assert sorted(p.name for p in path.parent.iterdir()) == ["T1.yaml", "T2.yaml"]


def test_a_log_is_placed_on_an_empty_file_made_earlier(project):
    rt = Runtime(project.root)
    rt.stock_logs(2)
    blanks = {p.stat().st_ino for p in (project.root / ".aipm" / "spare").iterdir() if p.name != ".gitignore"}
    assert len(blanks) == 2
    log = str(rt.log_path("ORD", "T1", 1))
    rt.place_log(log)
    assert os.stat(log).st_ino in blanks and os.path.getsize(log) == 0
    Path(log).write_text("attempt output\n")
    rt.place_log(log)  # never over a log that exists
    assert Path(log).read_text() == "attempt output\n"


def test_something_planted_in_place_of_an_empty_file_is_not_placed(project):
    rt = Runtime(project.root)
    rt.stock_logs(1)
    (blank,) = [p for p in (project.root / ".aipm" / "spare").iterdir() if p.name != ".gitignore"]
    blank.unlink()
    secret = project.root / "secret.txt"
    secret.write_text("keep me\n")
    blank.symlink_to(secret)
    log = str(rt.log_path("ORD", "T1", 1))
    rt.place_log(log)
    assert not os.path.lexists(log)  # the opener creates a plain file there
    assert secret.read_text() == "keep me\n"


def test_a_failed_spawn_leaves_no_log(project):
    """A log placed for a worker that never started would take its attempt's number."""
    rt = Runtime(project.root)
    rt.stock_logs(1)
    log = str(rt.log_path("ORD", "T1", 1))
    spawning = runner.begin(["true"], exit_file=str(project.root / "exit"), env=dict(os.environ),
                            cwd=str(project.root), log=log, stdin=str(project.root / "no-such-input"),
                            place_log=rt.place_log, background=False)
    with pytest.raises(runner.SpawnError):
        spawning.finish()
    assert not os.path.lexists(log)
    assert not [p for p in (project.root / ".aipm" / "spare").iterdir() if p.name != ".gitignore"]  # it was used
    assert rt.next_number("ORD", "T1", 1) == 1


def test_no_log_is_placed_where_the_directory_gives_new_files_its_group(project):
    rt = Runtime(project.root)
    rt.stock_logs(1)
    log = str(rt.log_path("ORD", "T1", 1))
    os.chmod(os.path.dirname(log), 0o2755)
    assert not rt.place_log(log) and not os.path.lexists(log)


WATCHER = """\
import json, pathlib, sys, time
import yaml
pool = pathlib.Path(sys.argv[1]) / ".aipm" / "spare"
want = {("T1", "DONE"), ("T2", "IN_PROGRESS")}
deadline = time.time() + 20
while time.time() < deadline:
    seen = {}
    for p in pool.iterdir():
        try:
            data = yaml.safe_load(p.read_text())
            seen[(data["id"], data["status"])] = p.stat().st_ino
        except Exception:
            continue
    if want <= seen.keys():
        pathlib.Path(sys.argv[2]).write_text(json.dumps({f"{k[0]} {k[1]}": seen[k] for k in want}))
        sys.exit(0)
    time.sleep(0.02)
sys.exit(3)
"""
# T0 ends just after a second begins: what the run prepares while T1 runs is stamped with the second T1 ends in.
ALIGN = "import time; time.sleep(1.05 - time.time() % 1)"


def test_a_run_hands_over_through_the_statuses_it_wrote_while_the_worker_ran(project, tmp_path):
    """While T1 runs, its DONE and its dependant's IN_PROGRESS wait on disk (T1's command finds them and notes
    their inodes); then those very files become T1's and T2's task files."""
    script, seen, inode = tmp_path / "watch.py", tmp_path / "seen.json", tmp_path / "t2-inode"
    script.write_text(WATCHER)
    order = project.order()
    write_task(order, "T0", command=[sys.executable, "-c", ALIGN], status="QUEUED")
    write_task(order, "T1", command=[sys.executable, str(script), str(project.root), str(seen)], status="QUEUED",
               depends_on=["T0"])
    write_task(order, "T2", command=[sys.executable, "-c", f"import os; open({str(inode)!r}, 'w').write("
                                     f"str(os.stat({str(order / 'T2.yaml')!r}).st_ino))"],
               status="QUEUED", depends_on=["T1"])
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {t: yaml.safe_load((order / f"{t}.yaml").read_text())["status"] for t in ("T0", "T1", "T2")} == {
        "T0": "DONE", "T1": "DONE", "T2": "DONE"}
    prepared = json.loads(seen.read_text())
    assert (order / "T1.yaml").stat().st_ino == prepared["T1 DONE"]
    assert int(inode.read_text()) == prepared["T2 IN_PROGRESS"]
    assert sorted(p.name for p in order.iterdir()) == ["T0.yaml", "T1.yaml", "T2.yaml"]


def test_the_next_start_is_written_ahead_even_when_a_worker_has_ended_meanwhile(project):
    """Workers that end faster than they are handed over (B1's `true`s) leave something to handle by the time the
    loop would prepare: the rest waits, but the IN_PROGRESS of the next ready task is written ahead all the same
    (the next round starts it either way, and would otherwise wait for that version's fsync)."""
    from aipm import handover
    from aipm.launcher import Launcher
    from aipm.project import Project
    from aipm.settings import load_settings
    from aipm.supervisor import Supervisor
    from aipm.view import OrderView

    order = project.order()
    for name, priority in (("A", "P0"), ("B", "P1"), ("C", "P2")):
        write_task(order, name, command="true", status="QUEUED", priority=priority)
    settings = load_settings(project.root, {"enable_monitoring": False, "max_workers": 2})
    launcher = Launcher(Project(project.root, settings.orders_dir), settings)
    sup = Supervisor(launcher)
    view = OrderView(order, project.root, watch=False)
    try:
        report = launcher.launch(view, owner=sup, only={"A"}, explain=False)
        assert [item["id"] for item in report.launched] == ["A"]
        assert runner.wait_gone(sup.owned["ORD/A"].pid, 10)
        deadline = time.monotonic() + 10
        while not sup.pending() and time.monotonic() < deadline:  # its end reaches the watch a moment later
            time.sleep(0.01)
        assert sup.pending()
        handover.prepare_next(sup, launcher, view, set(), set())
        prepared = writer._ahead.get(os.fspath(order / "B.yaml"))
        assert prepared is not None and prepared.changes["status"] == Status.IN_PROGRESS
        assert os.fspath(order / "C.yaml") not in writer._ahead  # as many as run now: one
        assert os.fspath(order / "A.yaml") not in writer._ahead  # its outcome waits for the round that handles it
    finally:
        writer.drop_prepared()
        sup.close()
