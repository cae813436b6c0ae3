"""Spare inodes (aipm/spares.py): a replaced task file or a removed record is reused by a later write, and nobody
who can still see the old version sees it change."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from aipm import durable, spares, writer
from aipm.errors import ValidationError
from aipm.inotify import DirWatch
from aipm.model import Status
from aipm.recovery import remove_temp_files
from aipm.record import Record
from aipm.runtime import Runtime
from aipm.writer import update_task
from conftest import race_threads, write_task


@pytest.fixture(autouse=True)
def _fresh_pools(monkeypatch):
    monkeypatch.setattr(spares, "_pools", {})  # each test its own pools (they are per process)
    spares.exported.cache_clear()
    yield
    spares.exported.cache_clear()


def test_a_project_the_nfs_server_exports_gets_no_spares(project, tmp_path, monkeypatch):
    """NFS clients read by file handle: no open descriptor, so no lease could keep a reused inode from them."""
    a, b = _tasks(project, 2)
    exports = tmp_path / "exports"
    exports.write_text(f"# Version 1.1\n/srv/other\t*(rw)\n{project.root.parent}\t*(rw,no_subtree_check)\n")
    monkeypatch.setattr(spares, "_EXPORTS", str(exports))
    for _ in range(3):
        _start(a, project.root)
        update_task(a, {"status": Status.QUEUED}, root=project.root)
    assert not (project.root / ".aipm" / "spare").exists()
    spares.exported.cache_clear()
    exports.write_text("/srv/other\t*(rw)\n/srv/with\\040space\t*(rw)\n")
    _start(a, project.root)
    _start(b, project.root)
    assert (project.root / ".aipm" / "spare").is_dir()  # not exported: spares again
    assert spares.exported("/srv/with space/x") and not spares.exported("/srv/without")


def _tasks(project, n: int) -> list[Path]:
    order = project.order()
    return [write_task(order, f"T{i}", command="true", status="QUEUED") for i in range(n)]


def _start(path: Path, root: Path) -> None:
    update_task(path, {"status": Status.IN_PROGRESS, "attempts": 1}, expect=Status.QUEUED, root=root)


def test_the_file_a_write_replaced_is_reused_by_the_next_write_once_durable(project):
    a, b, c = _tasks(project, 3)
    old = {a.stat().st_ino, b.stat().st_ino}
    with durable.batch():
        _start(a, project.root)
        _start(b, project.root)  # same round: a's old version is not durable away yet, so not reused
        assert b.stat().st_ino not in old
    _start(c, project.root)  # the round's directory fsync is done: now they may be
    assert c.stat().st_ino in old
    assert yaml.safe_load(c.read_text()) == {"id": "T2", "command": "true", "status": "IN_PROGRESS", "attempts": 1}
    assert sorted(p.name for p in a.parent.iterdir()) == ["T0.yaml", "T1.yaml", "T2.yaml"]  # no temp files left


def test_a_write_is_exchanged_in_from_the_pool_with_no_temp_name_in_the_order_directory(project):
    """The next version is written and fsynced in the pool and exchanged into place from there: the order's
    directory (which views and agents watch) sees the task file's name change and nothing else, whether the write
    reuses a spare or makes a new file of the pool."""
    a, b = _tasks(project, 2)
    watch = DirWatch.open(str(a.parent))
    try:
        old = a.stat().st_ino
        _start(a, project.root)  # no spare yet: a new file of the pool
        _start(b, project.root)  # a's old version, reused
        assert b.stat().st_ino == old
        assert {name for _, name in watch.events()} == {"T0.yaml", "T1.yaml"}
    finally:
        os.close(watch.fd)
    assert yaml.safe_load(b.read_text())["status"] == "IN_PROGRESS"


@pytest.mark.parametrize("linked", [".aipm/spare", ".aipm"])
def test_a_pool_directory_replaced_by_a_link_is_not_written_through(project, tmp_path, linked):
    """A worker may replace `.aipm/spare`, or `.aipm` itself, with a symlink: no write goes through it, and every
    write still lands."""
    a, b, c = _tasks(project, 3)
    _start(a, project.root)  # the pool exists and keeps a's old version
    link = project.root / linked
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(link)
    link.symlink_to(elsewhere)
    if linked == ".aipm":
        spares._pools.clear()  # as the next aipm command finds it
    _start(b, project.root)
    _start(c, project.root)
    assert list(elsewhere.iterdir()) == []
    assert [yaml.safe_load(p.read_text())["status"] for p in (b, c)] == ["IN_PROGRESS", "IN_PROGRESS"]
    assert sorted(p.name for p in a.parent.iterdir()) == ["T0.yaml", "T1.yaml", "T2.yaml"]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory another group needs root")
def test_a_task_file_in_a_setgid_directory_keeps_the_directorys_group(project):
    """A file made in the pool would get the pool's group, not the one a setgid order directory gives its files:
    there every version is made beside the task file, written ahead or not."""
    a, b = _tasks(project, 2)
    os.chown(a.parent, -1, 4242)
    os.chmod(a.parent, 0o2775)
    writer.prepare(b, lambda task: {"status": Status.IN_PROGRESS, "attempts": 1}, Status.QUEUED, project.root)
    for path in (a, b):
        _start(path, project.root)
        assert path.stat().st_gid == 4242 and yaml.safe_load(path.read_text())["status"] == "IN_PROGRESS"


def test_a_reader_that_opened_the_old_version_keeps_reading_it(project):
    a, b = _tasks(project, 2)
    before = a.read_text()
    reader = subprocess.Popen([sys.executable, "-c", "import sys, time\nf = open(sys.argv[1])\nprint('open', flush=True)"
                               "\nsys.stdin.readline()\nprint(f.read(), end='')", str(a)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline() == "open\n"
    _start(a, project.root)
    _start(b, project.root)  # would reuse a's old inode, but the reader still has it open
    out, _ = reader.communicate("go\n", timeout=60)
    assert out == before


def test_a_hard_linked_task_file_is_not_recycled(project):
    a, b = _tasks(project, 2)
    elsewhere = project.root / "copy-of-T0.yaml"
    os.link(a, elsewhere)
    before = elsewhere.read_text()
    _start(a, project.root)
    _start(b, project.root)
    assert elsewhere.read_text() == before
    assert a.read_text() != before


def test_a_spare_replaced_by_a_link_or_deleted_is_not_written_through(project, tmp_path):
    a, b, c = _tasks(project, 3)
    _start(a, project.root)
    pool = project.root / ".aipm" / "spare"
    (name,) = [p for p in pool.iterdir() if p.name != ".gitignore"]
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    name.unlink()
    name.symlink_to(victim)  # planted under the spare's name
    _start(b, project.root)
    assert victim.read_text() == "keep me\n"
    assert yaml.safe_load(b.read_text())["status"] == "IN_PROGRESS"
    assert sorted(p.name for p in a.parent.iterdir()) == ["T0.yaml", "T1.yaml", "T2.yaml"]
    _start(c, project.root)
    update_task(c, {"status": Status.QUEUED}, root=project.root)  # c's old version is a spare now
    (name,) = [p for p in pool.iterdir() if p.name != ".gitignore"]
    name.unlink()
    os.mkfifo(name)  # a FIFO no one reads: opening it to write would wait for ever
    _start(c, project.root)
    assert yaml.safe_load(c.read_text())["status"] == "IN_PROGRESS"
    os.system(f"rm -rf {project.root / '.aipm'}")  # a worker's `git clean -fdx`
    update_task(c, {"status": Status.QUEUED}, root=project.root)
    _start(c, project.root)
    assert yaml.safe_load(c.read_text())["status"] == "IN_PROGRESS"


def test_spares_are_ignored_by_git_and_swept_when_their_process_is_gone(project):
    subprocess.run(["git", "init", "-q", str(project.root)], check=True)
    (a,) = _tasks(project, 1)
    _start(a, project.root)
    pool = project.root / ".aipm" / "spare"
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=project.root,
                            capture_output=True, text=True, check=True).stdout
    assert ".aipm" not in status and "orders/ORD/T0.yaml" in status
    dead = subprocess.Popen(["true"])
    dead.wait()
    (pool / f"{dead.pid}-1").write_text("left by a killed aipm\n")
    spares._pools.clear()
    update_task(a, {"status": Status.DONE}, expect=Status.IN_PROGRESS, root=project.root)
    assert not (pool / f"{dead.pid}-1").exists()


def test_records_reuse_the_removed_ones_and_a_record_under_another_name_is_ignored(project):
    rt = Runtime(project.root)
    rt.ensure()

    def record(task: str) -> Record:
        return Record(order="ORD", order_dir=str(project.order()), task=task, task_file="x", attempt=1,
                      targets=[], log="l", exit_file="e", started_at="now", number=1)

    rt.write_record(record("A"))
    old = rt.record_path("ORD", "A").stat().st_ino
    with open(rt.record_path("ORD", "A")) as held:  # someone reading it when it is removed
        rt.remove_record("ORD", "A")
        rt.write_record(record("B"))
        assert rt.record_path("ORD", "B").stat().st_ino != old
        assert '"task": "A"' in held.read()
    old = rt.record_path("ORD", "B").stat().st_ino
    rt.remove_record("ORD", "B")
    rt.write_record(record("B"))  # B's own earlier record is not reused for it (a power cut could bring its bytes back)
    assert rt.record_path("ORD", "B").stat().st_ino != old
    rt.write_record(record("C"))  # but for another record it is
    assert rt.record_path("ORD", "C").stat().st_ino == old
    rt.remove_record("ORD", "B")
    assert [r.task for r in rt.records()] == ["C"]
    # What a power cut can leave: a record file whose bytes are another task's (a reused spare's).
    rt.record_path("ORD", "D").write_text(rt.record_path("ORD", "C").read_text())
    assert [r.task for r in rt.records()] == ["C"]
    assert rt.read_record("ORD", "D") is None and rt.read_record("ORD", "C").task == "C"


def test_a_pipe_that_holds_the_old_versions_pages_still_delivers_the_old_bytes(project):
    """`splice` (uutils' cat, pv) and `sendfile` leave references to the file's cached pages in a pipe or socket
    after the file is closed: a spare written in place would change what they deliver."""
    a, b = _tasks(project, 2)
    before = a.read_bytes()
    r, w = os.pipe()
    with open(a, "rb") as held:
        assert os.splice(held.fileno(), w, len(before)) == len(before)
    _start(a, project.root)
    _start(b, project.root)  # reuses a's old inode (nobody has it open)
    assert os.read(r, 65536) == before
    os.close(r)
    os.close(w)


def test_a_spare_with_extended_attributes_is_not_reused(project):
    a, b = _tasks(project, 2)
    try:
        os.setxattr(a, "user.note", b"T0 only")
    except OSError:
        pytest.skip("no user extended attributes on this file system")
    _start(a, project.root)
    _start(b, project.root)
    assert "user.note" not in os.listxattr(b)


def test_a_directory_or_a_link_put_in_the_pool_is_neither_used_nor_followed(project, tmp_path):
    a, b, c = _tasks(project, 3)
    _start(a, project.root)
    pool = project.root / ".aipm" / "spare"
    (name,) = [p for p in pool.iterdir() if p.name != ".gitignore"]
    name.unlink()
    name.mkdir()  # a directory under the spare's name
    _start(b, project.root)
    assert sorted(p.name for p in a.parent.iterdir()) == ["T0.yaml", "T1.yaml", "T2.yaml"]
    os.mkdir(a.parent / ".T9.yaml.1-1.tmp")  # and one among the temp files: recovery must not crash on it
    remove_temp_files(a.parent)
    # The pool's directory itself replaced by a link to someone's files: never written through, never swept.
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "123456").write_text("a user's file\n")
    shutil.rmtree(pool)
    pool.symlink_to(victim)
    spares._pools.clear()
    _start(c, project.root)
    assert sorted(p.name for p in victim.iterdir()) == ["123456"]
    assert yaml.safe_load(c.read_text())["status"] == "IN_PROGRESS"


def test_a_failed_directory_fsync_drops_the_spare_and_the_pool_keeps_working(project, monkeypatch):
    paths = _tasks(project, 8)
    real = durable.fsync_dir

    def broken(directory):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(durable, "fsync_dir", broken)
    for path in paths[:6]:
        with pytest.raises(OSError):
            _start(path, project.root)
    monkeypatch.setattr(durable, "fsync_dir", real)
    pool = project.root / ".aipm" / "spare"
    assert [p.name for p in pool.iterdir() if p.name != ".gitignore"] == []  # none kept whose replacement may be lost
    kept = paths[6].stat().st_ino
    _start(paths[6], project.root)
    (spare,) = [p for p in pool.iterdir() if p.name != ".gitignore"]  # its old version is kept ...
    replaced = paths[7].stat().st_ino
    _start(paths[7], project.root)
    # ... and reused (exchanged in from the pool, which keeps the version it replaced): the pool still works
    assert paths[7].stat().st_ino == kept and spare.stat().st_ino == replaced


def test_an_order_directory_on_another_file_system_leaves_no_spares_behind(project, tmp_path):
    (a,) = _tasks(project, 1)
    other = project.root / "orders" / "OTHER"
    other.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(other)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        b = write_task(other, "B", command="true", status="QUEUED")
        for _ in range(10):
            _start(a, project.root)  # on the tree's file system: its old versions become spares
            update_task(a, {"status": Status.QUEUED}, root=project.root)
            _start(b, project.root)  # elsewhere: a spare cannot be moved there, nor its old version here
            update_task(b, {"status": Status.QUEUED}, root=project.root)
        pool = project.root / ".aipm" / "spare"
        assert len([p for p in pool.iterdir() if p.name != ".gitignore"]) <= spares.KEEP
        assert sorted(p.name for p in other.iterdir()) == ["B.yaml"]
    finally:
        subprocess.run(["umount", "-l", str(other)], check=False)


READER = r"""
import os, sys, time, yaml
order, stop, holds = sys.argv[1], sys.argv[2], sys.argv[3] == "hold"
seen = 0
while not os.path.exists(stop):
    for name in sorted(os.listdir(order)):
        if not name.endswith(".yaml") or name.startswith("."):
            continue
        try:
            fd = os.open(os.path.join(order, name), os.O_RDONLY)
        except FileNotFoundError:
            continue
        if holds:
            time.sleep(0.002)  # opened the old version; read it after a few more writes
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        os.close(fd)
        task = yaml.safe_load(data)
        if not isinstance(task, dict) or task.get("id") != name[:-5] or "status" not in task:
            print(f"BAD {name}: {data!r}", flush=True)
            sys.exit(1)
        seen += 1
print(f"ok {seen}", flush=True)
"""

WRITER = r"""
import sys
from pathlib import Path
from aipm import durable
from aipm.model import Status
from aipm.writer import update_task
root, paths = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
print("ready", flush=True)
for rounds in range(10**6):
    with durable.batch():
        for i, path in enumerate(paths[rounds % 2::2]):
            status = Status.IN_PROGRESS if rounds % 4 < 2 else Status.QUEUED
            update_task(path, {"status": status, "attempts": rounds}, root=root)
"""


def test_readers_racing_writes_never_see_another_tasks_bytes_and_a_killed_writer_leaves_nothing(project):
    """Readers open and read the task files over and over (some hold a file open a moment before reading)
    while a writer process rewrites them; the writer is then killed with SIGKILL mid-run. Invariant: every read
    is a whole task file of the name it was read under."""
    paths = _tasks(project, 6)
    stop = project.root / "stop"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(paths[0].parent), str(stop), how],
                                stdout=subprocess.PIPE, text=True) for how in ("hold", "hold", "quick")]
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(project.root), *map(str, paths)],
                              stdout=subprocess.PIPE, text=True, env=env)
    assert writer.stdout.readline() == "ready\n"
    time.sleep(3)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    stop.touch()
    outs = [r.communicate(timeout=60)[0] for r in readers]
    assert all(out.startswith("ok ") and int(out.split()[1]) > 50 for out in outs), outs
    pool = project.root / ".aipm" / "spare"
    assert len([p for p in pool.iterdir() if p.name != ".gitignore"]) <= spares.KEEP
    remove_temp_files(paths[0].parent)  # what recovery does with the killed writer's temp file
    assert sorted(p.name for p in paths[0].parent.iterdir()) == [p.name for p in paths]
    for path in paths:
        assert yaml.safe_load(path.read_text())["id"] == path.stem
    update_task(paths[0], {"attempts": 99}, root=project.root)  # a new writer sweeps the dead one's spares
    assert not [p.name for p in pool.iterdir() if p.name.startswith(f"{writer.pid}-")]


# A worker's save at the very instant of aipm's exchange, made to land there: the write's exchange wrapped so that
# the save happens just before it or just after it (a rename, as git checkout and editors save).
def _save_around_the_exchange(monkeypatch, path: Path, text: str, after: bool) -> list:
    real, saved = writer.swap, []

    def swap(a, b):
        if not saved and not after:
            _save(path, text, saved)
        done = real(a, b)
        if not saved and after:
            _save(path, text, saved)
        return done

    monkeypatch.setattr(writer, "swap", swap)
    return saved


def _save(path: Path, text: str, saved: list) -> None:
    new = path.with_name(".save")
    new.write_text(text)
    os.replace(new, path)
    saved.append(path.stat().st_ino)


@pytest.mark.parametrize("after", [False, True], ids=["just before", "just after"])
def test_a_save_at_the_instant_of_the_exchange_is_kept_and_the_status_written_on_it(project, monkeypatch, after):
    """Just before: the exchange took the saved version into the pool (it would have become a spare); just after:
    aipm took the save for a file planted in its pool and put the version it had read back over it."""
    (path,) = _tasks(project, 1)
    text = yaml.safe_dump({"id": "T0", "command": "echo saved by hand", "status": "QUEUED"}, sort_keys=False)
    saved = _save_around_the_exchange(monkeypatch, path, text, after)
    _start(path, project.root)
    assert saved
    data = yaml.safe_load(path.read_text())
    assert (data["command"], data["status"]) == ("echo saved by hand", "IN_PROGRESS")


def test_a_directory_put_at_the_task_files_place_before_the_exchange_stays_there(project, monkeypatch):
    (path,) = _tasks(project, 1)
    real, done = writer.swap, []

    def swap(a, b):
        if not done:
            done.append(b)
            path.unlink()
            path.mkdir()
            (path / "work.txt").write_text("a worker's file\n")
        return real(a, b)

    monkeypatch.setattr(writer, "swap", swap)
    with pytest.raises(ValidationError, match="not a regular file"):  # the task file is a directory now
        _start(path, project.root)
    assert (path / "work.txt").read_text() == "a worker's file\n"
    assert not any(p.is_dir() for p in (project.root / ".aipm" / "spare").iterdir())


@pytest.mark.parametrize("prepared", [False, True])
def test_a_pool_removed_in_the_middle_of_a_write_does_not_fail_it(project, monkeypatch, prepared):
    """`git clean -fdx` takes .aipm/ (the pool and the next version in it) while a status is written."""
    from aipm.starting import start_updates
    from aipm.store import load_task

    a, b = _tasks(project, 2)
    _start(a, project.root)  # the pool exists
    stamp = "2026-12-03T04:00:00+00:00"
    if prepared:
        writer.prepare(b, lambda task: start_updates(task, stamp), Status.QUEUED, project.root)
    real, cleaned = writer._identity, []

    def identity(p):  # the write's last look before its exchange: the pool goes right after it, once
        found = real(p)
        if not cleaned:
            cleaned.append(shutil.rmtree(project.root / ".aipm"))
        return found

    monkeypatch.setattr(writer, "_identity", identity)
    update_task(b, start_updates(load_task(b, project.root), stamp), expect=Status.QUEUED, root=project.root)
    assert yaml.safe_load(b.read_text())["status"] == "IN_PROGRESS"


def test_one_task_files_group_never_passes_to_another(project):
    """`chgrp` of task A, to share it with a group: A's replaced version is no spare for B."""
    if os.geteuid() != 0:
        pytest.skip("giving a file another group than our own needs root")
    a, b = _tasks(project, 2)
    os.chown(a, -1, 4242)
    os.chmod(b, 0o640)
    _start(a, project.root)
    _start(b, project.root)
    assert b.stat().st_gid == os.getegid() and b.stat().st_mode & 0o777 == 0o640


def test_files_made_for_the_next_starts_in_another_thread_never_take_a_name_twice(tmp_path):
    """The run stocks log files in a helper thread while its own thread makes new files of the same pool
    (handover._make_files): two threads asking for a name at once must get two names, or one create fails."""
    import threading

    pool = spares.pool(str(tmp_path / "spare"))
    names: list[list[str]] = [[], []]
    race_threads([threading.Thread(target=lambda out: out.extend(pool._name() for _ in range(50_000)), args=(n,))
                  for n in names])
    made = names[0] + names[1]
    assert len(made) == 100_000
    assert len(set(made)) == len(made)
