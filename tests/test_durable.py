"""One directory fsync per launch-lock round, and no command before it (aipm/durable.py, runner.spawn's go)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from aipm import durable, runner
from aipm.model import Status
from aipm.runtime import Runtime
from aipm.writer import update_task
from conftest import task_statuses, wait_for, write_task
from invariants import check, journal_command, spans

pytestmark = pytest.mark.skipif(not os.access("/proc/self/syscall", os.R_OK), reason="needs /proc/PID/syscall")


def _waiting_for_go(pid: int) -> bool:
    """The wrapper sits in read() on its go pipe (fd 3, or the descriptor the shell copied it to)."""
    try:
        call = Path(f"/proc/{pid}/syscall").read_text().split()
        return call[0] == "0" and os.readlink(f"/proc/{pid}/fd/{int(call[1], 16)}") == os.readlink(f"/proc/{pid}/fd/3")
    except (OSError, IndexError, ValueError):
        return False


def _spawn(root: Path, journal: Path, task: str) -> int:
    return runner.spawn(journal_command(journal, "true"), exit_file=str(root / f"{task}.exit"),
                        env=dict(os.environ, AIPM_TASK_ID=task), cwd=str(root), log=str(root / f"{task}.log"))


def _record_dir_syncs(monkeypatch) -> list[str]:
    """Directories fsynced from now on, in order (the real fsync still runs)."""
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        real_fsync(fd)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_workers_of_a_round_start_only_once_its_writes_are_durable_with_one_directory_fsync(project, monkeypatch):
    order = project.order()
    paths = [write_task(order, tid, command="true") for tid in ("A", "B")]
    journal = project.root / "journal.txt"
    dir_syncs = _record_dir_syncs(monkeypatch)
    with Runtime(project.root).launch_lock():
        pids = []
        for path in paths:
            update_task(path, {"status": Status.IN_PROGRESS, "attempts": 1}, expect=Status.QUEUED)
            pids.append(_spawn(project.root, journal, path.stem))
        for pid in pids:
            wait_for(lambda: _waiting_for_go(pid), timeout=60)
        # Both files are renamed (readers see IN_PROGRESS) but their directory is not fsynced yet: nothing runs.
        assert task_statuses(order) == {"A": "IN_PROGRESS", "B": "IN_PROGRESS"}
        assert dir_syncs == [] and spans(journal) == []
    assert dir_syncs == [str(order)]  # one for the round, however many files were renamed in it
    assert [runner.reap(pid) for pid in pids] == [0, 0]
    assert sorted(s.task for s in spans(journal)) == ["A", "B"]
    assert [(project.root / f"{t}.exit").read_text() for t in "AB"] == ["0\n", "0\n"]


KILLED_MID_ROUND = """
import os, signal, sys
from pathlib import Path
from aipm import runner
from aipm.model import Status
from aipm.runtime import Runtime
from aipm.writer import update_task
root, task_file, journal_cmd = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
with Runtime(root).launch_lock():
    update_task(task_file, {"status": Status.IN_PROGRESS, "attempts": 1}, expect=Status.QUEUED)
    pid = runner.spawn(journal_cmd, exit_file=str(root / "A.exit"), env=dict(os.environ, AIPM_TASK_ID="A"),
                       cwd=str(root), log=str(root / "A.log"))
    print(pid, flush=True)
    sys.stdin.readline()  # the test has seen the worker wait for its go
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_launcher_killed_before_its_round_is_durable_starts_nothing_and_the_task_runs_once_later(project):
    order = project.order()
    journal = project.root / "journal.txt"
    path = write_task(order, "A", command=journal_command(journal, "true"))
    launcher = subprocess.Popen([sys.executable, "-c", KILLED_MID_ROUND, str(project.root), str(path),
                                 journal_command(journal, "true")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
    pid = int(launcher.stdout.readline())
    wait_for(lambda: _waiting_for_go(pid), timeout=60)
    launcher.stdin.write("\n")
    launcher.stdin.flush()
    assert launcher.wait(timeout=60) == -9
    # The go never came: the wrapper read EOF and left without running the command or writing an exit code.
    wait_for(lambda: not runner.group_members(pid), timeout=60)
    assert spans(journal) == [] and not (project.root / "A.exit").exists()
    assert task_statuses(order) == {"A": "IN_PROGRESS"}
    # The next run finds IN_PROGRESS without a worker, re-queues it and runs it: once, to DONE.
    project.aipm("run", "ORD", check=True)
    assert task_statuses(order) == {"A": "DONE"}
    assert check(journal, order) == [] and len(spans(journal)) == 1


def test_a_batch_belongs_to_its_thread(project, monkeypatch):
    """The dashboard runs cancel/retry in a thread pool: a write there must not wait for another thread's batch."""
    import threading

    order = project.order()
    mine, theirs = write_task(order, "A", command="true"), write_task(project.order("OTHER"), "B", command="true")
    dir_syncs = _record_dir_syncs(monkeypatch)
    with Runtime(project.root).launch_lock():
        update_task(mine, {"status": Status.IN_PROGRESS, "attempts": 1}, expect=Status.QUEUED)
        other = threading.Thread(target=update_task, args=(theirs, {"status": Status.CANCELLED}),
                                 kwargs={"expect": Status.QUEUED})
        other.start()
        other.join()
        assert dir_syncs == [str(theirs.parent)]  # synced at once, not deferred into this thread's batch
    assert dir_syncs == [str(theirs.parent), str(order)]
    assert task_statuses(order) == {"A": "IN_PROGRESS"} and task_statuses(theirs.parent) == {"B": "CANCELLED"}


def test_a_directory_removed_before_the_rounds_fsync_leaves_the_others_durable_and_their_workers_let_go(project,
                                                                                                    monkeypatch):
    """A worker's `git checkout` of a branch without order A, between the round's renames and its fsync."""
    a = write_task(project.order("A"), "T1", command="true")
    b = write_task(project.order("B"), "T2", command="true")
    dir_syncs = _record_dir_syncs(monkeypatch)
    outcome = []
    with Runtime(project.root).launch_lock():
        for path in (a, b):
            update_task(path, {"status": Status.IN_PROGRESS, "attempts": 1}, expect=Status.QUEUED,
                        root=project.root)
        durable.once_durable(outcome.append)  # as a worker's go waits
        shutil.rmtree(a.parent)
    assert dir_syncs == [str(b.parent)] and outcome == [True]
    assert task_statuses(b.parent) == {"T2": "IN_PROGRESS"}


def test_a_batch_carried_over_is_made_durable_by_the_next_before_anything_there_goes(project, monkeypatch):
    """carry_over(): the batch's fsync is left to the next, which fsyncs the directory once for both before the go
    it holds; with nothing to start there, the thread's settle_carried() does it."""
    order, other = project.order(), project.order("OTHER")
    a, c = (write_task(order, t, command="true") for t in "AC")
    b = write_task(other, "B", command="true")
    dir_syncs = _record_dir_syncs(monkeypatch)
    rt, went = Runtime(project.root), []
    with rt.launch_lock():
        update_task(a, {"status": Status.IN_PROGRESS, "attempts": 1}, expect=Status.QUEUED, root=project.root)
        durable.carry_over()
    assert dir_syncs == []  # left to the next batch: A is seen IN_PROGRESS, not yet durable
    assert task_statuses(order)["A"] == "IN_PROGRESS"
    with rt.launch_lock():
        update_task(b, {"status": Status.IN_PROGRESS, "attempts": 1}, expect=Status.QUEUED, root=project.root)
        durable.once_durable(went.append)  # as a worker's go waits
        assert went == [] and dir_syncs == []
    assert sorted(dir_syncs) == sorted([str(order), str(other)]) and went == [True]  # both, before the go
    dir_syncs.clear()
    with rt.launch_lock():
        update_task(c, {"status": Status.IN_PROGRESS, "attempts": 1}, expect=Status.QUEUED, root=project.root)
        durable.carry_over()
    assert dir_syncs == []
    durable.settle_carried()
    assert dir_syncs == [str(order)]
    durable.settle_carried()  # nothing left: no second fsync
    assert dir_syncs == [str(order)]


def test_a_go_waiting_in_a_batch_keeps_its_fsync_at_the_batchs_end(project, monkeypatch):
    order = project.order()
    a = write_task(order, "A", command="true")
    dir_syncs = _record_dir_syncs(monkeypatch)
    went = []
    with Runtime(project.root).launch_lock():
        update_task(a, {"status": Status.IN_PROGRESS, "attempts": 1}, expect=Status.QUEUED, root=project.root)
        durable.once_durable(went.append)
        durable.carry_over()
    assert dir_syncs == [str(order)] and went == [True]


# `aipm run` in this process, with every rename of a task file (its directory's sync_dir follows it), every
# directory fsync and every go written to a journal, in order.
JOURNALED_RUN = """
import json, os, sys
from aipm import durable, runner
from aipm.cli import main
root, out = sys.argv[1], sys.argv[2]
events = []
sync_dir, fsync_dir, go = durable.sync_dir, durable.fsync_dir, runner._go
def synced_later(directory):
    events.append(["renamed", str(directory)])
    sync_dir(directory)
def synced(directory):
    fsync_dir(directory)
    events.append(["synced", os.fspath(directory)])
def let_go(fd, ok):
    events.append(["go", ok])
    go(fd, ok)
durable.sync_dir, durable.fsync_dir, runner._go = synced_later, synced, let_go
from aipm.supervisor import Supervisor
wait = Supervisor.wait
def sleep(self, *args, **kwargs):
    events.append(["sleep", not self.pending()])  # (a wait with something to handle returns at once)
    return wait(self, *args, **kwargs)
Supervisor.wait = sleep
leave = os._exit
def _exit(code):
    with open(out, "w") as handle:
        json.dump(events, handle)
    leave(code)
os._exit = _exit
try:
    code = main(["--root", root, "run", "ORD", "--max-workers", "2"])
except SystemExit as exc:
    code = exc.code
_exit(code or 0)
"""


def test_no_worker_goes_before_every_status_written_before_it_is_durable(project, tmp_path):
    """A run of short independent tasks and a chain (its wake-ups follow each other at once, so they carry their
    fsyncs over): at every go, and whenever the run sleeps, every task-file rename made before has had its
    directory's fsync; and at the end every one has."""
    order = project.order()
    for i in range(16):
        write_task(order, f"T{i:02d}", command="true")
    write_task(order, "C1", command="true", depends_on=["T00"])
    write_task(order, "C2", command="true", depends_on=["C1"])
    journal = tmp_path / "events.json"
    env = dict(os.environ, AIPM_ENABLE_MONITORING="false")
    proc = subprocess.run([sys.executable, "-c", JOURNALED_RUN, str(project.root), str(journal)], cwd=project.root,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(task_statuses(order).values()) == {"DONE"}
    events = json.loads(journal.read_text())
    unsynced: set[str] = set()
    gos = 0
    for kind, what in events:
        if kind == "renamed":
            unsynced.add(what)
        elif kind == "synced":
            unsynced.discard(what)
        elif kind == "sleep":
            assert not (what and unsynced), f"the run slept with renames in {unsynced} not yet durable"
        elif what:  # a go
            gos += 1
            assert not unsynced, f"a worker went with renames in {unsynced} not yet durable"
    assert gos == 18 and not unsynced


def _lock_waited_for(path: Path) -> bool:
    """Someone waits in the kernel for the flock on `path` (/proc/locks lists the request blocked behind it)."""
    inode = f":{os.stat(path).st_ino} "
    return any("->" in line and inode in line for line in Path("/proc/locks").read_text().splitlines())


def test_a_thread_that_waits_for_the_launch_lock_first_makes_what_it_carried_over_durable(project, monkeypatch):
    """The next round follows at once, but its lock may be held (another aipm's round, or one stopped by Ctrl-Z):
    the wait has no bound, and what the last round left to it is fsynced before the thread waits, not after."""
    import threading

    from conftest import state, stopped_launch_lock_holder

    order = project.order()
    a = write_task(order, "A", command="true")
    dir_syncs = _record_dir_syncs(monkeypatch)
    rt = Runtime(project.root)
    with rt.launch_lock():
        update_task(a, {"status": Status.IN_PROGRESS, "attempts": 1}, expect=Status.QUEUED, root=project.root)
        durable.carry_over()
    assert dir_syncs == []
    holder = stopped_launch_lock_holder(project)
    while_waiting = []

    def free_the_lock():
        try:
            wait_for(lambda: _lock_waited_for(state(project.root) / "launch.lock"), timeout=60)
            while_waiting.extend(dir_syncs)
        finally:
            holder.kill()

    freer = threading.Thread(target=free_the_lock)
    freer.start()
    with rt.launch_lock():
        pass
    freer.join()
    holder.wait()
    assert while_waiting == [str(order)]
    assert dir_syncs == [str(order)]  # once: nothing left for the round that waited


def test_an_action_outside_a_batch_is_withheld_when_the_carried_fsync_before_it_fails(project, monkeypatch):
    """once_durable() outside a batch first fsyncs what the thread's last batch carried over: when that fails (EIO,
    the disk) the action is told so (a go closed, never sent), as at a batch's end, not dropped (a wrapper waiting
    for a go that neither comes nor closes)."""
    order = project.order()
    a = write_task(order, "A", command="true")
    with Runtime(project.root).launch_lock():
        update_task(a, {"status": Status.IN_PROGRESS, "attempts": 1}, expect=Status.QUEUED, root=project.root)
        durable.carry_over()
    real_fsync = os.fsync

    def failing(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)
    outcome = []
    with pytest.raises(OSError):
        durable.once_durable(outcome.append)
    assert outcome == [False]


@pytest.mark.parametrize("stop", ["preempt", "ctrl-c"])
def test_a_stop_makes_what_the_last_round_carried_over_durable_before_its_grace(project, monkeypatch, stop):
    """A round that carried its fsync over, then a preemption (or a Ctrl-C): the stop must not wait through its
    grace (up to 5 s) with that fsync pending. Its note in the stopped workers' records, under the launch lock,
    is a batch of its own, which makes it durable before the first signal."""
    from aipm.launcher import Launcher
    from aipm.project import Project
    from aipm.settings import load_settings
    from aipm.supervisor import Supervisor
    from aipm.view import OrderView

    order = project.order()
    write_task(order, "A", command="sleep 30", target_files=["a"])
    b = write_task(order, "B", command="true", target_files=["b"])
    settings = load_settings(project.root, {"enable_monitoring": False})
    launcher = Launcher(Project(project.root, settings.orders_dir), settings)
    sup = Supervisor(launcher)
    try:
        assert [i["id"] for i in launcher.launch(OrderView(order, project.root, watch=False), owner=sup, only={"A"},
                                                 explain=False).launched] == ["A"]
        dir_syncs = _record_dir_syncs(monkeypatch)
        seen = []
        for name in ("terminate_group", "ask_to_stop"):
            real = getattr(runner, name)
            monkeypatch.setattr(runner, name, lambda *args, real=real, **kw: (seen.append(list(dir_syncs)),
                                                                              real(*args, **kw))[1])
        with Runtime(project.root).launch_lock():
            update_task(b, {"status": Status.IN_PROGRESS, "attempts": 1}, expect=Status.QUEUED, root=project.root)
            durable.carry_over()
        assert dir_syncs == []
        if stop == "preempt":
            sup.preempt("ORD/A", "URGENT", "preempted by P0 task URGENT")
        else:
            sup.abort("stopped by the user (Ctrl-C)")
        assert seen and seen[0] == [str(order)], seen  # fsynced before the first signal
    finally:
        sup.end_strays()
        sup.close()
