"""Where the state directory lives: on /dev/shm where that is a shared tmpfs (records, exit files and lock files are
new files on every start and end, dear on disk), else /tmp; the compiled wrapper stays on /tmp (a tmpfs is often
noexec). An aipm from before keeps its state in /tmp: while a worker it recorded there lives, this one refuses to
run the project beside it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from aipm import statedir
from aipm.liveness import process_ctime
from aipm.record import Record
from aipm.runtime import Runtime
from conftest import write_task


@pytest.fixture
def fresh_choice(monkeypatch):
    """The base chosen again in this test (the process remembers its choice)."""
    monkeypatch.setattr(statedir, "_chosen", [])


def test_a_shared_tmpfs_takes_the_state_and_anything_else_leaves_it_on_tmp(tmp_path, monkeypatch, fresh_choice):
    shm = "/dev/shm"
    info = os.stat(shm) if os.path.isdir(shm) else None
    if info is None or info.st_uid != 0 or info.st_mode & 0o7777 != 0o1777 or not statedir._tmpfs(shm):
        pytest.skip("no shared tmpfs at /dev/shm here")
    assert statedir._base() == shm
    assert str(statedir.state_dir(tmp_path)).startswith(f"{shm}/aipm-{os.getuid()}/")
    assert statedir.in_memory(statedir.state_dir(tmp_path))
    assert str(statedir.program_dir()) == f"/tmp/aipm-{os.getuid()}/bin"

    plain = tmp_path / "shm"  # a directory anyone may write, but on disk
    plain.mkdir()
    plain.chmod(0o1777)
    for place in (str(plain), str(tmp_path / "missing")):
        monkeypatch.setattr(statedir, "MEMORY_BASE", place)
        monkeypatch.setattr(statedir, "_chosen", [])
        assert statedir._base() == statedir.STATE_BASE
        assert not statedir.in_memory(statedir.state_dir(tmp_path))


def test_a_tmpfs_only_root_may_write_is_not_taken(tmp_path, monkeypatch, fresh_choice):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    place = tmp_path / "shm"
    place.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(place)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        monkeypatch.setattr(statedir, "MEMORY_BASE", str(place))
        assert statedir._base() == statedir.STATE_BASE
        os.chmod(place, 0o1777)
        monkeypatch.setattr(statedir, "_chosen", [])
        assert statedir._base() == str(place)
    finally:
        subprocess.run(["umount", "-l", str(place)], check=False)


def test_records_on_the_tmpfs_are_plain_files_with_no_pool_of_spares(tmp_path):
    rt = Runtime(tmp_path)
    if not statedir.in_memory(rt.state):
        pytest.skip("the state is on disk here")
    rec = Record(order="O", order_dir="", task="A", task_file="", attempt=1, targets=[], log="", exit_file="",
                 started_at="", pid=1)
    rt.write_record(rec)
    assert rt.read_record("O", "A").pid == 1
    rt.remove_record("O", "A")
    assert rt.read_record("O", "A") is None
    assert not (rt.state / "spare").exists()
    assert not os.listdir(rt.record_path("O", "A").parent)  # no temp file, no kept spare


def _older_record(root: Path, pid: int, ctime: float) -> Path:
    """A record as an aipm from before wrote it, in /tmp."""
    state = statedir.state_dir(root)
    older = Path(statedir.STATE_BASE) / f"aipm-{os.getuid()}" / state.name / "workers" / "ORD"
    older.mkdir(parents=True)
    path = older / "T.json"
    path.write_text(json.dumps({"order": "ORD", "task": "T", "pid": pid, "ctime": ctime}))
    return path


@pytest.fixture
def older_state(project):
    yield
    import shutil

    shutil.rmtree(Path(statedir.STATE_BASE) / f"aipm-{os.getuid()}" / statedir.state_dir(project.root).name,
                  ignore_errors=True)


def test_an_older_aipms_live_worker_in_tmp_stops_this_one_with_one_line_and_nothing_changed(project, older_state):
    if not statedir.in_memory(statedir.state_dir(project.root)):
        pytest.skip("the state is on disk here: the same place as before")
    task = write_task(project.order(), "T", command="true")
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        record = _older_record(project.root, sleeper.pid, process_ctime(sleeper.pid))
        before = task.read_bytes()
        proc = project.aipm("run", "ORD")
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and str(record) in lines[0] and f"pid {sleeper.pid}" in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr
        assert task.read_bytes() == before
    finally:
        sleeper.kill()
        sleeper.wait()
    proc = project.aipm("run", "ORD")  # that worker gone: the record is a dead one's, and the run goes on
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(task.read_text())["status"] == "DONE"


@pytest.mark.parametrize("uid, sessions, settings, kept", [
    (0, True, ["RemoveIPC=yes"], True),  # root: logind never removes its files
    (999, True, [], True),  # a system user: neither
    (1000, True, [], False),  # a user, logind running, the default (yes)
    (1000, True, ["[Login]\n#RemoveIPC=no"], False),  # commented out
    (1000, True, ["[Login]\nRemoveIPC=no"], True),
    (1000, True, ["RemoveIPC=no", "RemoveIPC=yes"], False),  # a drop-in, read after the file, says yes again
    (1000, True, ["RemoveIPC=yes", "RemoveIPC = off"], True),
    (1000, False, ["RemoveIPC=yes"], True),  # no logind here
])
def test_the_state_goes_to_memory_only_where_no_logout_empties_it(tmp_path, monkeypatch, uid, sessions, settings,
                                                                  kept):
    """systemd-logind's RemoveIPC= (default yes) removes a user's files in /dev/shm at their last logout: an `aipm
    run` left in tmux over ssh would lose its records and locks there."""
    if sessions:
        (tmp_path / "sessions").mkdir()
    conf, drop_ins = tmp_path / "logind.conf", tmp_path / "logind.conf.d"
    drop_ins.mkdir()
    for i, text in enumerate(settings):
        (conf if i == 0 else drop_ins / f"{i:02}-aipm.conf").write_text(text + "\n")
    monkeypatch.setattr(statedir, "LOGIND_SESSIONS", str(tmp_path / "sessions"))
    monkeypatch.setattr(statedir, "LOGIND_CONFIG", [str(tmp_path / "none.conf"), str(conf)])
    monkeypatch.setattr(statedir, "LOGIND_DROP_INS", [str(tmp_path / "none.d"), str(drop_ins)])
    assert statedir._kept_at_logout(uid) is kept


@pytest.mark.parametrize("place", ["usual", "disk"])
def test_a_record_removed_by_its_owner_is_no_deletion_in_the_watched_directory(tmp_path, request, place):
    """A run sleeps on a watch of its records' directory for deletions (someone else's `rm`, see
    Supervisor.watch_records): its own removal of a record must not wake it (a round of nothing per task)."""
    from aipm.inotify import DirWatch
    from aipm.supervisor import _RECORDS_GONE

    if place == "disk":
        request.getfixturevalue("state_on_disk")
    rt = Runtime(tmp_path)
    rec = Record(order="O", order_dir="", task="A", task_file="", attempt=1, targets=[], log="", exit_file="",
                 started_at="", pid=1)
    rt.write_record(rec)
    watch = DirWatch.open(None)
    try:
        watch.add(str(rt.record_path("O", "A").parent), _RECORDS_GONE)
        rt.remove_record("O", "A")
        assert rt.read_record("O", "A") is None
        assert list(watch.events()) == []
        (rt.record_path("O", "A").parent / "other.json").write_text("{}")
        os.unlink(rt.record_path("O", "A").parent / "other.json")  # someone else's deletion is seen
        assert list(watch.events()) != []
    finally:
        os.close(watch.fd)
