"""The runtime's per-round memory: worker records read once per launch-lock hold, liveness looked up once."""

import os
import shutil
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

from aipm import liveness, runner
from aipm.record import Record
from aipm.runtime import Runtime
from aipm.worker import environment


def _record(root, task: str, pid: int = 0, ctime: float = 0.0) -> Record:
    return Record(order="O", order_dir=str(root), task=task, task_file=str(root / f"{task}.yaml"), attempt=1,
                  targets=["a.txt"], log=str(root / f"{task}.log"), exit_file=str(root / f"{task}.exit"),
                  started_at="now", pid=pid, ctime=ctime)


def test_records_read_in_a_round_follow_the_rounds_own_writes_and_hand_out_copies(tmp_path):
    rt = Runtime(tmp_path)
    rt.write_record(_record(tmp_path, "A"))
    with rt.launch_lock():
        first = rt.records()
        assert [r.task for r in first] == ["A"]
        first[0].task = "changed by the caller"
        rt.write_record(_record(tmp_path, "B"))
        rt.remove_record("O", "A")
        assert sorted(r.task for r in rt.records()) == ["B"]
        # Another process's write outside the lock (none may happen under it) is not seen until the next round.
        (rt.record_path("O", "C")).write_text((rt.record_path("O", "B")).read_text().replace('"B"', '"C"'))
        assert sorted(r.task for r in rt.records()) == ["B"]
    assert sorted(r.task for r in rt.records()) == ["B", "C"]  # outside a round: read from disk every time
    with rt.launch_lock():
        assert sorted(r.task for r in rt.records()) == ["B", "C"]


def test_a_process_found_dead_in_a_round_is_not_looked_up_again_and_the_next_round_looks_afresh(tmp_path,
                                                                                              monkeypatch):
    rt = Runtime(tmp_path)
    proc = subprocess.Popen(["sleep", "30"])
    ctime = liveness.process_ctime(proc.pid)
    lookups = []
    real = liveness._process_alive
    monkeypatch.setattr(liveness, "_process_alive", lambda pid, c: lookups.append(pid) or real(pid, c))
    try:
        with rt.launch_lock():
            assert liveness.process_alive(proc.pid, ctime) and liveness.process_alive(proc.pid, ctime)
            assert lookups == [proc.pid]
        proc.kill()
        proc.wait()
        with rt.launch_lock():
            assert not liveness.process_alive(proc.pid, ctime) and not liveness.process_alive(proc.pid, ctime)
        assert lookups == [proc.pid, proc.pid]
        assert not liveness.process_alive(proc.pid, ctime) and lookups == [proc.pid] * 3  # no round: no memory
    finally:
        if proc.poll() is None:
            proc.kill()


def test_reading_the_records_while_a_worker_removes_their_directories_never_fails(tmp_path):
    """A worker's `rm -rf` of the records while an owner or `ps` reads them: an order's directory listed and gone
    before it is read is an order without records, not an error (an owner that raised here died, and its worker
    went unlisted and unrecorded). A real process removes and makes the directory again as fast as it can."""
    rt = Runtime(tmp_path)
    rt.write_record(_record(tmp_path, "A"))
    order_dir = rt.record_path("O", "A").parent
    (tmp_path / "A.json").write_bytes(rt.record_path("O", "A").read_bytes())
    churn = subprocess.Popen(["sh", "-c", f'while :; do rm -rf "{order_dir}"; mkdir -p "{order_dir}"; '
                              f'cp "{tmp_path}/A.json" "{order_dir}/A.json"; done'], stderr=subprocess.DEVNULL)
    try:
        seen = set()
        for _ in range(20000):
            seen.add(tuple(r.task for r in rt.records()))
    finally:
        churn.kill()
        churn.wait()
    assert seen <= {(), ("A",)} and ("A",) in seen


def test_taking_the_launch_lock_while_a_worker_removes_the_state_directory_never_fails(tmp_path):
    """A worker's `rm -rf` of the whole state directory between the lock's `mkdir` and its `open`: the lock is
    taken on the directory made again, never an error (a detached owner that raised here died in its loop, and
    its worker went unlisted: CI saw it once in ~1000 runs). A real process removes the directory and makes it
    again as fast as it can; each round also writes a record, as an owner's keep_records() does."""
    rt = Runtime(tmp_path)
    # One process (not a shell's `rm` children): once it is killed and reaped, nothing removes anything.
    churn = subprocess.Popen([sys.executable, "-c", "import os, shutil, sys\nwhile True:\n"
                              " shutil.rmtree(sys.argv[1], ignore_errors=True); os.makedirs(sys.argv[1], exist_ok=True)",
                              str(rt.state)])
    try:
        for _ in range(500):
            # A write may fail (the directory went again): keep_records() retries next round. The lock may not.
            with rt.launch_lock(), suppress(OSError):
                rt.write_record(_record(tmp_path, "A"))
    finally:
        churn.kill()
        churn.wait()
    with rt.launch_lock():
        rt.write_record(_record(tmp_path, "A"))
        assert [r.task for r in rt.records()] == ["A"]


def test_making_a_log_directory_while_a_worker_removes_it_never_fails(tmp_path):
    """A worker's `git clean -fdx` of `.aipm/` between made_dir's mkdir (the directory is there) and its lstat
    (it is gone): a run crashed there, its workers unrecorded (the chaos suite's hostile workers, seed 1). A real
    process removes the directory and makes it again as fast as it can."""
    from aipm.workerfiles import made_dir

    top = tmp_path / ".aipm"
    made_dir(top, top / "logs" / "x")
    churn = subprocess.Popen([sys.executable, "-c", "import os, sys\nwhile True:\n"
                              " try: os.rmdir(sys.argv[1])\n except OSError: pass\n"
                              " try: os.mkdir(sys.argv[1])\n except OSError: pass", str(top / "logs" / "ORD")])
    try:
        made = 0
        for _ in range(3000):
            made_dir(top, top / "logs" / "ORD" / "T.1.log")  # the log's directory: made again, never an error
            made += (top / "logs" / "ORD").is_dir()
    finally:
        churn.kill()
        churn.wait()
    assert made and (top / ".gitignore").is_file()
    assert made_dir(top, top / "logs" / "ORD" / "T.1.log").parent.is_dir()


def test_the_users_state_base_removed_between_its_mkdir_and_its_check_is_made_again(tmp_path):
    """`/tmp/aipm-<uid>` removed by a worker's `rm -rf` between user_base's mkdir (there) and its lstat: a
    FileNotFoundError out of every aipm command that took a lock then (about 1 call in 700 under this churn)."""
    from aipm.statedir import user_base

    base = tmp_path / "aipm-base"
    churn = subprocess.Popen([sys.executable, "-c", "import os, sys\nwhile True:\n"
                              " try: os.rmdir(sys.argv[1])\n except OSError: pass\n"
                              " try: os.mkdir(sys.argv[1], 0o700)\n except OSError: pass", str(base)])
    try:
        for _ in range(10000):
            assert user_base(base) == base
    finally:
        churn.kill()
        churn.wait()


def test_each_worker_gets_the_environment_as_it_is_at_its_start(tmp_path, monkeypatch):
    # The copy of os.environ is kept between starts (decoding it all was a tenth of a short start); a variable
    # set, changed or removed in between must still reach the next worker as it is then, and a worker's own
    # copy must not reach the next one.
    rt = Runtime(tmp_path)
    rec = Record(order="O", order_dir=str(tmp_path / "orders" / "O"), task="T", task_file=str(tmp_path / "T.yaml"),
                 attempt=1, targets=["a.py"], log=str(tmp_path / "T.1.log"), exit_file=str(tmp_path / "T.1"),
                 started_at="2026-12-04T00:00:00+00:00", number=1)
    monkeypatch.setenv("AIPM_TEST_VAR", "one")
    first = environment(rt, rec, "m")
    assert first["AIPM_TEST_VAR"] == "one" and first["AIPM_TASK_ID"] == "T"
    first["AIPM_TEST_OTHER"] = "leaked"
    monkeypatch.setenv("AIPM_TEST_VAR", "two")
    second = environment(rt, rec, "m")
    assert second["AIPM_TEST_VAR"] == "two" and "AIPM_TEST_OTHER" not in second
    monkeypatch.delenv("AIPM_TEST_VAR")
    assert "AIPM_TEST_VAR" not in environment(rt, rec, "m")


def test_an_exit_file_whose_directory_was_removed_since_it_was_made_is_written_by_the_next_worker(tmp_path):
    """The wrapper writes the exit file, not aipm: a directory remembered as made but removed since (`rm -rf
    /tmp/aipm-*` between two starts of one long-lived process) would leave the next worker's exit code nowhere,
    and an owner that died meanwhile would adopt it without its code."""
    rt = Runtime(tmp_path)
    first = rt.exit_path("O", "A", 1)
    assert first.parent.is_dir()
    shutil.rmtree(rt.state)
    exit_file = str(rt.exit_path("O", "B", 1))
    pid = runner.spawn(["sh", "-c", "exit 7"], exit_file=exit_file, env=dict(os.environ), cwd=str(tmp_path),
                       log=str(tmp_path / "B.log"))
    assert runner.reap(pid) == 7
    assert Path(exit_file).read_text() == "7\n"


def test_an_orders_directories_of_one_kind_under_two_bases_are_two(tmp_path):
    rt = Runtime(tmp_path)
    assert rt._in(rt.state, "exit", "O") == rt.state / "exit" / "O"
    assert rt._in(rt.dir, "exit", "O") == rt.dir / "exit" / "O"


def test_a_link_or_hard_link_at_a_records_temp_name_is_never_written_through(tmp_path):
    """A worker (it can write the state directory unless confined) that left a symlink or a hard link to a file of
    the user's under the temp name of its record's next write: the open truncated that file and wrote the record
    into it."""
    root = tmp_path / "p"
    root.mkdir()
    rt = Runtime(root)
    rt.write_record(_record(root, "A"))
    path = rt.record_path("O", "A")
    for link, name in ((os.symlink, "symlinked.txt"), (os.link, "hardlinked.txt")):
        victim = tmp_path / name
        victim.write_text("the user's\n")
        link(victim, path.with_name(f".{path.name}.{os.getpid()}.tmp"))
        rt._spares._ready.clear()  # (a spare would be renamed over the name: the write without one is tried)
        rt.write_record(_record(root, "A", pid=7))
        assert victim.read_text() == "the user's\n"
        assert rt.read_record("O", "A").pid == 7


def test_what_a_worker_leaves_at_a_record_or_an_exit_file_is_never_read_for_ever(tmp_path):
    """The state directory is any unconfined worker's to write: a record that was a link to /dev/zero or a sparse
    file of gigabytes had every command of the project (`aipm ps`, each round of a run) read until memory ran out;
    a FIFO at an exit file held whoever read it."""
    from aipm.runtime import read_exit_file

    root = tmp_path / "p"
    root.mkdir()
    rt = Runtime(root)
    rt.write_record(_record(root, "A"))
    records = rt.record_path("O", "A").parent
    (records / "Z.json").symlink_to("/dev/zero")
    with open(records / "S.json", "wb") as handle:
        handle.truncate(3 << 30)
    os.mkfifo(records / "F.json")
    fifo = tmp_path / "exit"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-c", f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from aipm.runtime import Runtime, read_exit_file
print(sorted(r.task for r in Runtime({str(root)!r}).records()), read_exit_file({str(fifo)!r}))
"""], capture_output=True, text=True, timeout=60)
    assert proc.stdout == "['A'] None\n", proc.stderr


def test_an_exit_code_kept_where_a_worker_left_a_fifo_replaces_it(tmp_path):
    """keep_exit_code (an outcome that could not be written to its task file) opened the exit file to write it:
    a FIFO a worker left there held the owner for ever."""
    fifo = tmp_path / "T.1"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-c", f"""
from types import SimpleNamespace
from aipm.unrecorded import keep_exit_code
print(keep_exit_code(SimpleNamespace(exit_file={str(fifo)!r}), 3))
"""], capture_output=True, text=True, timeout=30)
    assert proc.stdout == "True\n", proc.stderr
    assert fifo.read_text() == "3\n"


def test_the_runtime_directorys_gitignore_is_never_written_through_a_link(tmp_path):
    """A worker's `.aipm/.gitignore -> ~/somewhere` (nothing there yet): making a directory of `.aipm/` again
    created that file outside the project, and git saw no ignore file of aipm's."""
    root = tmp_path / "p"
    (root / ".aipm").mkdir(parents=True)
    victim = tmp_path / "outside.txt"
    (root / ".aipm" / ".gitignore").symlink_to(victim)
    Runtime(root).log_path("ORD", "T", 1)
    assert not os.path.lexists(victim)
    assert (root / ".aipm" / ".gitignore").read_text().endswith("*\n")
    assert not (root / ".aipm" / ".gitignore").is_symlink()


def test_the_end_of_a_log_a_worker_made_a_link_to_dev_zero_is_not_read_for_ever(tmp_path):
    """exit_code_in_log (an adopted worker without an exit file) reads a log's end: a worker's `ln -sf /dev/zero
    "$AIPM_LOG"` had it read until memory ran out. Nor is a link at a reason's place (confine.failure) read."""
    log = tmp_path / "T.1.log"
    log.symlink_to("/dev/zero")
    (tmp_path / "T.1.why").symlink_to("/dev/zero")
    proc = subprocess.run([sys.executable, "-c", f"""
import resource
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from aipm import confine
from aipm.workerfiles import exit_code_in_log
print(exit_code_in_log({str(log)!r}), confine.failure({str(tmp_path / "T.1")!r}, True))
"""], capture_output=True, text=True, timeout=60)
    assert proc.stdout == "None None\n", proc.stderr


def test_a_cancel_mark_of_bytes_that_are_no_text_is_no_mark(tmp_path):
    """`cancelled` read the mark as UTF-8 and let its error out, where `kept_cancel` beside it reads such bytes as
    no mark: a damaged mark must not end the recovery that asks."""
    rt, rec = Runtime(tmp_path), _record(tmp_path, "A")
    rt.mark_cancelled(rec)
    assert rt.cancelled(rec)
    rt._cancel_path(rec).write_bytes(b"\xff\xfe")
    assert not rt.cancelled(rec)


def test_a_record_read_in_a_launch_lock_hold_is_the_holds_own_and_a_copy(tmp_path):
    """read_record() under the launch lock answers from the records the hold has read (with its own writes and
    removals since), as records() does: a start's check for a live worker costs no file read. Outside a hold, and
    in a hold that has not read them, the file is read."""
    root = tmp_path / "p"
    root.mkdir()
    rt = Runtime(root)
    rt.write_record(_record(root, "A", pid=5))
    with rt.launch_lock():
        assert rt.read_record("O", "A").pid == 5  # nothing read yet in this hold: from the file
        rt.records()
        rt.record_path("O", "A").unlink()  # a worker's `rm`: this hold goes by what it read
        assert rt.read_record("O", "A").pid == 5
        rt.read_record("O", "A").pid = 9  # a copy: the hold's record is not changed through it
        assert rt.read_record("O", "A").pid == 5
        rt.write_record(_record(root, "B", pid=6))
        assert rt.read_record("O", "B").pid == 6
        rt.remove_record("O", "A")
        assert rt.read_record("O", "A") is None
        assert rt.read_record("O", "C") is None
    assert rt.read_record("O", "A") is None and rt.read_record("O", "B").pid == 6  # the files again
