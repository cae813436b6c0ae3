"""Status writes made ahead of their moment (writer.prepare) and logs placed on empty files made earlier
(Runtime.stock_logs): what the hot path of a hand-over no longer waits for, and never a byte written that the
write it stands for would not have written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from aipm import spares, writer
from aipm.launcher import start_updates
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
    assert writer.is_prepared(path)
    task = update_task(path, _start_updates(path, project.root), expect=Status.QUEUED, root=project.root)
    assert path.stat().st_ino in ready  # the file written ahead, moved into place: no new write
    assert ready[path.stat().st_ino] == path.read_bytes()
    assert yaml.safe_load(path.read_text()) == {"id": "T1", "command": "true", "status": "IN_PROGRESS",
                                                "attempts": 1, "started_at": STAMP, "finished_at": None,
                                                "exit_code": None}
    assert task.status == Status.IN_PROGRESS and task.attempts == 1
    assert not writer.is_prepared(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["T1.yaml"]  # no temp file left beside it


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
    assert not writer.is_prepared(path)
    assert not (project.root / ".aipm" / "spare").exists() or not _pool_inodes(project.root)


def test_the_prepared_versions_of_a_killed_process_are_swept(project):
    path = _queued(project)
    other = _queued(project, "T2")
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from aipm import writer
        from aipm.launcher import start_updates
        from aipm.model import Status
        writer.prepare(Path({str(path)!r}), lambda t: start_updates(t, {STAMP!r}), Status.QUEUED, Path({str(project.root)!r}))
        print(writer.is_prepared(Path({str(path)!r})), flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "True\n"
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


WATCHER = """\
import pathlib, sys, time
import yaml
pool = pathlib.Path(sys.argv[1]) / ".aipm" / "spare"
want = {("T1", "DONE"), ("T2", "IN_PROGRESS")}
deadline = time.time() + 20
while time.time() < deadline:
    seen = set()
    for p in pool.iterdir():
        try:
            data = yaml.safe_load(p.read_text())
        except Exception:
            continue
        if isinstance(data, dict):
            seen.add((data.get("id"), data.get("status")))
    if want <= seen:
        sys.exit(0)
    time.sleep(0.05)
sys.exit(3)
"""


def test_a_run_writes_the_next_statuses_while_the_worker_runs(project, tmp_path):
    """While T1 runs, its DONE and its dependant's IN_PROGRESS wait on disk (T1's command looks for them)."""
    script = tmp_path / "watch.py"
    script.write_text(WATCHER)
    order = project.order()
    write_task(order, "T1", command=f"{sys.executable} {script} {project.root}", status="QUEUED")
    write_task(order, "T2", command="true", status="QUEUED", depends_on=["T1"])
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {t: yaml.safe_load((order / f"{t}.yaml").read_text())["status"] for t in ("T1", "T2")} == {
        "T1": "DONE", "T2": "DONE"}
    assert sorted(p.name for p in order.iterdir()) == ["T1.yaml", "T2.yaml"]
