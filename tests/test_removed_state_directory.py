"""A worker's command that removes aipm's state directory (`rm -rf /tmp/aipm-*`, a test suite cleaning /tmp), or
only its `locks/` or worker records, while other workers hold their target locks and more tasks are queued: no
second aipm may start a task on files a worker still holds, and every outcome is recorded once, with its real
exit code, also when the supervisor is killed afterwards. Real processes, real locks, an invariant over what the
workers wrote to a journal."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from contextlib import suppress
from pathlib import Path

import pytest

from conftest import Project, state, task_statuses, wait_for, write_task
from invariants import check, journal_command, spans, worker_records
from test_chaos import Proc
from test_locks import HOLDER, PY, docs_order, release

from aipm.locks import node_file

# What the worker removes, below the state directory ("": all of it).
REMOVED = ["", "locks", "workers"]


def remover(root: Path, removed: str, tmp: Path):
    """Order ONE: A (x.py) removes `removed` when told, then waits and exits 3; C (y.py) holds its lock meanwhile;
    A2 (x.py) waits behind A. Order TWO: B (x.py) and E (y.py), wanted by a second aipm while A and C run."""
    project = Project(root)
    journal, go, removed_mark, done = (tmp / n for n in ("journal.txt", "go", "removed", "done"))
    one, two = project.order("ONE"), project.order("TWO")
    until_done = f'until [ -e "{done}" ]; do sleep 0.01; done'
    target = state(root) / removed if removed else state(root)
    write_task(one, "A", target_files=["x.py"], command=journal_command(
        journal, f'until [ -e "{go}" ]; do sleep 0.01; done; rm -rf "{target}"; touch "{removed_mark}"; '
                 f'{until_done}; (exit 3)'))
    write_task(one, "C", target_files=["y.py"], command=journal_command(journal, until_done))
    write_task(one, "A2", target_files=["x.py"], command=journal_command(journal))
    write_task(two, "B", target_files=["x.py"], command=journal_command(journal))
    write_task(two, "E", target_files=["y.py"], command=journal_command(journal))
    return project, journal, go, removed_mark, done


def start_and_remove(project: Project, journal: Path, go: Path, removed_mark: Path, how: str = "run") -> Proc:
    """Order ONE run by `aipm run`, or by the detached owners of `aipm launch` (the Proc then is the launch)."""
    run = Proc(project.root, how, "ONE", "--max-workers", "2", "--no-resource-monitoring")
    wait_for(lambda: {"A", "C"} <= {s.task for s in spans(journal)}, timeout=120)
    go.touch()
    wait_for(removed_mark.exists, timeout=60)
    return run


def workers_listed(project: Project) -> set[str]:
    return {w["task"] for w in project.json("ps")["workers"] if w["alive"]}


def listed_or_told(project: Project, tasks: set[str]) -> None:
    """Wait until ps lists `tasks` alive; when it never does, fail with what there is to see."""
    try:
        wait_for(lambda: workers_listed(project) == tasks, timeout=60)
    except AssertionError:
        raise AssertionError(f"ps lists {workers_listed(project)}, not {tasks}\n{what_is_seen(project)}") from None


def finished_or_told(project: Project, order: Path) -> None:
    """Wait until every task of `order` is FAILED or DONE; when that never happens, fail with what there is to see."""
    try:
        wait_for(lambda: set(task_statuses(order).values()) <= {"FAILED", "DONE"}, timeout=120)
    except AssertionError:
        raise AssertionError(f"{order.name} is {task_statuses(order)}\n{what_is_seen(project)}") from None


def what_is_seen(project: Project) -> str:
    """aipm ps, the state directory's files and their contents, the logs (a detached owner's stderr goes to its
    task's log) and the processes."""
    def tail(path: Path, n: int) -> str:
        try:
            return path.read_text(errors="replace")[-n:] if path.is_file() else "(not a file)"
        except OSError as exc:  # removed meanwhile: the failure being told must not become this one
            return f"({exc.strerror})"

    root = state(project.root)
    files = {str(p.relative_to(root)): tail(p, 500) for p in root.rglob("*")} if root.exists() else "no state dir"
    logs = {str(p.relative_to(project.root)): tail(p, 2000) for p in project.root.rglob("*.log")}
    ps = subprocess.run(["ps", "-eo", "pid,ppid,pgid,stat,args"], capture_output=True, text=True).stdout
    return f"aipm ps: {project.json('ps')}\nstate: {files}\nlogs: {logs}\nprocesses:\n{ps}"


def outcomes(order_dir: Path) -> dict[str, tuple]:
    import yaml

    return {p.stem: (d["status"], d.get("exit_code"), d.get("attempts"))
            for p in order_dir.glob("*.yaml") for d in [yaml.safe_load(p.read_text())]}


def all_tasks(tmp: Path, *orders: Path) -> Path:
    both = tmp / "all"
    both.mkdir()
    for order in orders:
        for path in order.glob("*.yaml"):
            shutil.copy(path, both / path.name)
    return both


@pytest.mark.parametrize("removed", ["", "workers"], ids=["state-dir", "records"])
def test_running_workers_whose_owner_died_and_records_were_removed_are_not_recovered_as_lost(tmp_path, removed):
    """No record and no owner: only the workers' own processes say that they still run and hold their files,
    and take their slots: with two of two running so, `launch` starts nothing, not even TWO's F on a free file
    (it started F, a third worker, before)."""
    root = tmp_path / "proj"
    root.mkdir()
    project, journal, go, removed_mark, done = remover(root, removed, tmp_path)
    one, two = root / "orders" / "ONE", root / "orders" / "TWO"
    write_task(two, "F", target_files=["z.py"], command=journal_command(journal))
    run = Proc(root, "run", "ONE", "--max-workers", "2", "--no-resource-monitoring")
    try:
        wait_for(lambda: {"A", "C"} <= {s.task for s in spans(journal)}, timeout=120)
        run.p.kill()
        run.wait(timeout=60)
        go.touch()
        wait_for(removed_mark.exists, timeout=60)
        running = {"A": "IN_PROGRESS", "C": "IN_PROGRESS", "A2": "QUEUED"}
        assert {t["id"]: t["status"] for t in project.json("status", "ONE")["tasks"]} == running
        recovered = project.json("recover", "ONE")["recovered"]
        assert sorted(r["id"] for r in recovered if r["action"].startswith("left running")) == ["A", "C"], recovered
        assert project.json("launch", "TWO", "--max-workers", "2", "--no-resource-monitoring")["launched"] == []
        assert task_statuses(one) == running and task_statuses(two) == {"B": "QUEUED", "E": "QUEUED", "F": "QUEUED"}
        done.touch()
        wait_for(lambda: all(s.end is not None for s in spans(journal)), timeout=60)
    finally:
        done.touch()
        run.kill()
    # Their outcomes went with their owner and records: once they ended they are re-queued and run again.
    project.aipm("run", "ONE", "--no-resource-monitoring")
    project.aipm("run", "TWO", "--no-resource-monitoring", check=True)
    assert task_statuses(one) == {"A": "FAILED", "C": "DONE", "A2": "DONE"}
    assert check(journal, all_tasks(tmp_path, one, two), root=root, once=False) == []


@pytest.mark.parametrize("how", ["run", "launch"])
@pytest.mark.parametrize("removed", REMOVED, ids=["state-dir", "locks", "records"])
def test_a_second_aipm_never_starts_on_files_whose_worker_removed_the_state_directory(tmp_path, removed, how):
    root = tmp_path / "proj"
    root.mkdir()
    project, journal, go, removed_mark, done = remover(root, removed, tmp_path)
    one, two = root / "orders" / "ONE", root / "orders" / "TWO"
    run = start_and_remove(project, journal, go, removed_mark, how)
    try:
        # Their owners write their lost records again at once: ps and status see both workers as they are.
        listed_or_told(project, {"A", "C"})
        assert {t["id"]: t["status"] for t in project.json("status", "ONE")["tasks"]} == {
            "A": "IN_PROGRESS", "C": "IN_PROGRESS", "A2": "QUEUED"}
        # Another terminal: neither launch, exec nor recover may start or re-queue anything on x.py or y.py.
        assert project.json("launch", "TWO", "--no-resource-monitoring")["launched"] == []
        ex = project.aipm("exec", "TWO/E", "--no-resource-monitoring")
        assert ex.returncode == 1 and "held by running task ONE/C" in ex.stdout + ex.stderr, ex.stdout + ex.stderr
        recovered = project.json("recover", "ONE")["recovered"]
        assert not [r for r in recovered if r["action"] == "requeued"], recovered
        assert task_statuses(one) == {"A": "IN_PROGRESS", "C": "IN_PROGRESS", "A2": "QUEUED"}
        assert task_statuses(two) == {"B": "QUEUED", "E": "QUEUED"}
        done.touch()
        assert run.wait(timeout=300) == (1 if how == "run" else 0), run.output
        finished_or_told(project, one)
    finally:
        done.touch()
        run.kill()
    assert "Traceback" not in run.output
    assert outcomes(one) == {"A": ("FAILED", 3, 1), "C": ("DONE", 0, 1), "A2": ("DONE", 0, 1)}
    project.aipm("run", "TWO", "--no-resource-monitoring", check=True)
    assert check(journal, all_tasks(tmp_path, one, two), root=root) == []


@pytest.mark.parametrize("removed", ["", "workers"], ids=["state-dir", "records"])
def test_a_supervisor_killed_after_its_records_were_removed_leaves_its_workers_to_be_adopted(tmp_path, removed):
    root = tmp_path / "proj"
    root.mkdir()
    project, journal, go, removed_mark, done = remover(root, removed, tmp_path)
    one = root / "orders" / "ONE"
    run = start_and_remove(project, journal, go, removed_mark)
    try:
        listed_or_told(project, {"A", "C"})
        run.p.kill()
        run.wait(timeout=60)
        recovered = project.json("recover", "ONE")["recovered"]
        assert sorted((r["id"], r["action"]) for r in recovered) == [("A", "adopted"), ("C", "adopted")]
        done.touch()
        finished_or_told(project, one)
    finally:
        done.touch()
        run.kill()
    # Each attempt's real exit code, recorded once: none re-run, none re-queued as lost.
    assert outcomes(one) == {"A": ("FAILED", 3, 1), "C": ("DONE", 0, 1), "A2": ("DONE", 0, 1)}
    assert check(journal, one, root=root) == []


@pytest.mark.parametrize("removed", ["", "locks"], ids=["state-dir", "locks"])
def test_a_lock_held_in_a_removed_state_directory_still_keeps_its_files(project, removed):
    """The lock files are gone, so a new one would be free: the lock its holder still has is noted when the
    directory is made again, and named by `locks`, `why` and `run`, which waits for it as for any holder."""
    order, journal, holder = docs_order(project)
    run = None
    try:
        shutil.rmtree(state(project.root) / removed)
        rows = [r for r in project.json("locks")["locks"] if r["path"] == "docs/conf.py"]
        assert len(rows) == 1 and rows[0]["pids"] == [holder.pid], rows
        assert [r["reason"] for r in project.json("why", "ORD/DIR")["reasons"]] == ["file_held_outside"]
        run = Proc(project.root, "run", "ORD", "--json", "--no-resource-monitoring")
        wait_for(lambda: task_statuses(order).get("OTHER") == "DONE" and any(
            '"waiting"' in line for line in run.lines), timeout=120)
        # A taker that is not aipm's planner meets the kernel's refusal in the lock layer itself.
        probe = subprocess.run([PY, "-c", HOLDER, str(state(project.root)), "docs/"], input="",
                               capture_output=True, text=True, timeout=60)
        assert probe.returncode == 3 and probe.stdout.startswith("busy"), probe.stdout + probe.stderr
        assert run.p.poll() is None, run.output
        assert task_statuses(order)["FILE"] == task_statuses(order)["DIR"] == "QUEUED"
    finally:
        release(holder)
    assert run is not None and run.wait(timeout=300) == 0, run.output
    assert set(task_statuses(order).values()) == {"DONE"}
    assert check(journal, order) == []


@pytest.mark.parametrize("argv", [False, True], ids=["shell wrapper", "compiled wrapper"])
def test_an_adopted_worker_whose_last_act_removes_the_state_directory_keeps_its_exit_code(tmp_path, argv):
    """The owner is SIGKILLed; a new `run` adopts the worker, whose command then removes aipm's state directory and
    exits 0 at once: its wrapper finds no directory for the exit file (unless the adopter made it again first, a
    race) and puts the code at the end of the log, where the adopter reads it, instead of the attempt counting as
    killed and running again. Three rounds each, so that the race cannot hide a failure."""
    for round_ in range(3):
        root = tmp_path / f"p{round_}"
        root.mkdir()
        project = Project(root)
        one = project.order("ONE")
        go, starts = tmp_path / f"go{round_}", tmp_path / f"starts{round_}"
        script = f'echo x >> "{starts}"; until [ -e "{go}" ]; do sleep 0.01; done; rm -rf "{state(root)}"; exit 0'
        write_task(one, "A", target_files=["x.py"], max_attempts=3,
                   command=["/bin/sh", "-c", script] if argv else script)
        first = Proc(root, "run", "ONE", "--no-resource-monitoring")
        adopter = None
        try:
            wait_for(starts.exists, timeout=60)
            first.p.kill()
            first.wait(60)
            adopter = Proc(root, "run", "ONE", "--no-resource-monitoring")
            wait_for(lambda: any(r.get("owner_pid") == adopter.p.pid for r in worker_records(root)), timeout=60)
            go.touch()
            adopter.wait(120)
        finally:
            go.touch()
            first.kill()
            if adopter is not None:
                adopter.kill()
        assert starts.read_text().count("x") == 1, f"round {round_}: A's command ran again"
        assert outcomes(one)["A"][:2] == ("DONE", 0)


# ---- a lock held on a removed lock file, and what tells aipm of it removed too ------------------------------

# A process a finished task left behind, its owner gone (so nothing ended it): it holds x.py's lock and journals
# as task D while it does, until its stdin closes.
LEFT = """
import os, sys, time
from pathlib import Path
from aipm.locks import take
from aipm.paths import normalize
fds = take(Path(sys.argv[1]), [normalize("x.py")])
def line(kind):
    with open(sys.argv[2], "a") as journal:
        journal.write(f"{kind} D {time.time_ns()} {os.getpid()}\\n")
line("start")
print("held", flush=True)
sys.stdin.read()
line("end")
"""


def left_holding(project: Project, journal: Path, tmp: Path):
    """The process left behind holding x.py, and the task file that names its files for the journal's check."""
    left = subprocess.Popen([PY, "-c", LEFT, str(state(project.root, make=True)), str(journal)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert left.stdout.readline().strip() == "held"
    write_task(tmp / "left", "D", target_files=["x.py"])
    return left


def a_worker_runs(project: Project, order: str, command: str) -> None:
    """Order `order`: one task, on a file of its own, whose command is `command`; run to its end."""
    write_task(project.order(order), "W", target_files=[f"{order.lower()}.py"], command=command)
    project.aipm("run", order, "--no-resource-monitoring", check=True)


def x_waits_for_the_left_process(project: Project, left: subprocess.Popen, journal: Path, tmp: Path) -> None:
    """B (x.py) is neither started nor told free while the left process holds x.py; once it ends, B runs."""
    two = project.root / "orders" / "TWO"
    try:
        assert project.json("launch", "TWO", "--no-resource-monitoring")["launched"] == []
        assert task_statuses(two) == {"B": "QUEUED"}
        why = project.json("why", "TWO/B")
        assert [(r["reason"], r["pids"]) for r in why["reasons"]] == [("file_held_outside", [left.pid])], why
    finally:
        release(left)
    project.aipm("run", "TWO", "--no-resource-monitoring", check=True)
    assert task_statuses(two) == {"B": "DONE"}
    assert check(journal, all_tasks(tmp, tmp / "left", two), root=project.root) == []


def after(workers, project: Project, left: subprocess.Popen, journal: Path, tmp: Path) -> None:
    """`workers()` (what misbehaving workers do), then B must wait for the left process (which goes if they fail)."""
    try:
        workers()
    except BaseException:
        release(left)
        raise
    x_waits_for_the_left_process(project, left, journal, tmp)


def b_on_x_and_a_left_holder(tmp_path: Path):
    """A project whose task TWO/B wants x.py, and a process left holding x.py's lock (root, project, journal,
    the holder)."""
    root = tmp_path / "proj"
    root.mkdir()
    project = Project(root)
    journal = tmp_path / "journal.txt"
    write_task(project.order("TWO"), "B", target_files=["x.py"], command=journal_command(journal))
    return root, project, journal, left_holding(project, journal, tmp_path)


def test_a_lock_held_in_a_removed_state_directory_keeps_its_files_when_a_worker_removes_its_note(tmp_path):
    """The note of locks held in a removed state directory is all that keeps x.py from the next task once x.py's
    lock file is made again; a worker that removes the note (`rm -f orphans.json`) made x.py free to the next
    launch (no note, and `locks/` there, read as nothing held) while the left process still held it."""
    root, project, journal, left = b_on_x_and_a_left_holder(tmp_path)

    def workers():
        # (its rm races the run's own writes there and may end "Directory not empty": partial, as workers' may)
        a_worker_runs(project, "RM", f'rm -rf "{state(root)}" 2>/dev/null; true')
        # Refused by the note: x.py's new lock file is made now, and nothing is wrong with it.
        assert project.json("launch", "TWO", "--no-resource-monitoring")["launched"] == []
        a_worker_runs(project, "NOTE", f'rm -f "{state(root) / "orphans.json"}"')

    after(workers, project, left, journal, tmp_path)


@pytest.mark.parametrize("removal", ["lock files", "every file"])
def test_a_lock_held_on_a_removed_lock_file_keeps_its_files_while_locks_stays(tmp_path, removal):
    """A removal that leaves `locks/` in place: the lock files alone (`rm -f locks/*`), or every file but no
    directory (an `rm -rf` that ends with "Directory not empty" while aipm makes lock files in `locks/`). Nothing
    was noted (only a `locks/` made again was looked at), so x.py's new lock file was free to the next launch."""
    root, project, journal, left = b_on_x_and_a_left_holder(tmp_path)
    # (find fails on a file that aipm removed or replaced between its listing and its delete: no matter)
    command = {"lock files": f'rm -f "{state(root)}"/locks/*',
               "every file": f'find "{state(root)}" -type f -delete 2>/dev/null; true'}

    def workers():
        a_worker_runs(project, "RM", command[removal])
        assert (state(root) / "locks").is_dir() and not (state(root) / "locks" / node_file("x.py")).exists()

    after(workers, project, left, journal, tmp_path)


@pytest.mark.parametrize("name", ["orphans.json", "made.txt"])
def test_a_fifo_a_worker_leaves_in_place_of_a_state_file_hangs_nothing(tmp_path, name):
    """The note of held removed locks and the list of lock files were opened as any file: a worker's FIFO there
    (`rm -f $STATE/x; mkfifo $STATE/x`) hung the next launch for ever, under the launch lock."""
    project = Project(tmp_path)
    where = state(tmp_path) / name
    a_worker_runs(project, "PLANT", f'rm -f "{where}"; mkfifo "{where}"; rm -f "{state(tmp_path)}"/locks/*')
    write_task(project.order("NEXT"), "B", target_files=["x.py"], command="true")
    proc = project.aipm("run", "NEXT", "--no-resource-monitoring", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert where.is_file() and not where.is_symlink()  # written again, as a file
    assert project.json("locks")["locks"] == []


def test_a_fifo_a_worker_leaves_in_place_of_a_lock_file_hangs_nothing_and_the_file_still_excludes(tmp_path):
    """A lock file was opened as any file: a worker's FIFO in its place (`rm -f $STATE/locks/F; mkfifo
    $STATE/locks/F`) hung the next launch on its target for ever, under the launch lock. Two runs then race to
    make it a lock file again: both finish, and their workers on x.py never run at the same time."""
    project = Project(tmp_path)
    where = state(tmp_path) / "locks" / node_file("x.py")
    a_worker_runs(project, "PLANT", f'rm -f "{where}"; mkfifo "{where}"')
    two_runs_on_one_file_finish_apart(project, tmp_path / "journal")
    assert where.is_file() and not where.is_symlink()  # a lock file again


@pytest.mark.parametrize("name", ["made.txt", "orphans.json"])
def test_a_huge_sparse_file_a_worker_leaves_in_place_of_a_state_file_is_not_read_whole(tmp_path, name):
    """The list of lock files and the note of held removed locks were read whole: a worker's `truncate -s 1T` of
    either ended every next launch in a MemoryError traceback. They are small: one too big is written again."""
    project = Project(tmp_path)
    where = state(tmp_path) / name
    a_worker_runs(project, "PLANT", f'truncate -s 1T "{where}"')
    two_runs_on_one_file_finish_apart(project, tmp_path / "journal")
    assert where.stat().st_size < 1 << 20  # written again


def two_runs_on_one_file_finish_apart(project: Project, journal: Path) -> None:
    """Two runs, of orders ONE and TWO, each with a task on x.py, race: both finish, their workers one after the
    other, and no lock is left held."""
    for order, task in (("ONE", "A"), ("TWO", "B")):
        write_task(project.order(order), task, target_files=["x.py"], command=journal_command(journal, "sleep 0.3"))
    runs = [Proc(project.root, "run", order, "--no-resource-monitoring") for order in ("ONE", "TWO")]
    try:
        assert [run.wait(timeout=60) for run in runs] == [0, 0], [run.output for run in runs]
    finally:
        for run in runs:
            run.kill()
    first, second = sorted(spans(journal), key=lambda span: span.start)
    assert first.end is not None and second.end is not None and first.end <= second.start
    assert project.json("locks")["locks"] == []


def test_a_project_made_again_at_its_path_does_not_take_the_dead_ones_attempts(tmp_path):
    """A run killed with `kill -9`, its worker ended on its own; then the project removed and made again at the
    same path (`rm -rf p && git clone ... p`). ext4 gives the new root the freed inode back, and the state
    directory, named by device, inode and path, was the dead project's: the next run 'adopted' the attempt that
    ran in the deleted tree and marked the new A DONE without running it. The inode's generation tells them apart."""
    root, journal = tmp_path / "p", tmp_path / "journal"

    def made():
        root.mkdir()
        project = Project(root)
        write_task(project.order(), "A", command=f"echo ran >> {journal}; sleep 0.5")
        return project

    project = made()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, 0x80087601, bytes(8))  # FS_IOC_GETVERSION
    except OSError:
        pytest.skip("the file system keeps no inode generation")
    finally:
        os.close(fd)
    old, inode = state(root), root.stat().st_ino
    try:
        first = Proc(root, "run", "ORD")
        wait_for(journal.exists)
        first.kill()
        wait_for((old / "exit" / "ORD" / "A.1").exists)  # its worker ended on its own, the exit code kept
        shutil.rmtree(root)
        project = made()
        if root.stat().st_ino != inode:
            pytest.skip("the file system gave the new root another inode")
        run = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=60)
        assert run.returncode == 0 and "adopt" not in run.stdout, run.stdout + run.stderr
        assert task_statuses(project.order()) == {"A": "DONE"}
        assert journal.read_text() == "ran\nran\n"  # once in each project
        assert state(root) != old
    finally:
        shutil.rmtree(old, ignore_errors=True)


def test_a_passing_failure_to_read_the_roots_generation_names_no_other_state_directory(tmp_path, monkeypatch):
    """The root's generation is part of the state directory's name, and any failure to read it was taken for a
    file system that keeps none: a process out of descriptors (EMFILE) for that one open named another state
    directory than every other aipm process of the project, with none of its locks and records (a launcher there
    takes its launch lock and target locks alone). Only a lasting answer (not readable, no such ioctl) is "none"."""
    import errno

    from aipm import statedir

    root = tmp_path / "p"
    root.mkdir()
    real_open, real_ioctl = os.open, fcntl.ioctl
    named = statedir.state_dir(root)

    def out_of_descriptors(path, flags, *args):
        if os.fspath(path) == str(root) and flags & os.O_DIRECTORY:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_open(path, flags, *args)

    monkeypatch.setattr(statedir.os, "open", out_of_descriptors)
    with pytest.raises(OSError):
        statedir.state_dir(root)
    monkeypatch.setattr(statedir.os, "open", real_open)

    def no_such_ioctl(fd, request, *args):
        if request == statedir._FS_IOC_GETVERSION:
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
        return real_ioctl(fd, request, *args)

    monkeypatch.setattr(statedir.fcntl, "ioctl", no_such_ioctl)
    assert statedir._generation(str(root)) == b""  # a file system without generations: the name as before
    monkeypatch.undo()
    assert statedir.state_dir(root) == named


def test_a_project_moved_while_its_worker_runs_does_not_start_that_task_beside_it(tmp_path):
    """`mv` of the project while `aipm launch`'s worker ran: the moved root has another state directory (its locks
    and records stay with the old one), and the worker's AIPM_ROOT still names the old place, so the next `run`
    took A for lost and started it again at once: two workers on a.txt together. The worker is now found by its
    working directory too, so A is left running (its files busy) while it lives."""
    journal, old, new = tmp_path / "journal.txt", tmp_path / "old", tmp_path / "new"
    old.mkdir()
    gate = tmp_path / "gate"
    write_task(Project(old).order(), "A", target_files=["a.txt"],
               command=journal_command(journal, f'until [ -e "{gate}" ]; do sleep 0.02; done'))
    old_state = state(old)
    try:
        assert Proc(old, "launch", "ORD", "--no-resource-monitoring").wait() == 0
        wait_for(lambda: spans(journal))
        os.rename(old, new)
        run = Proc(new, "run", "ORD", "--no-resource-monitoring")
        with suppress(subprocess.TimeoutExpired):
            run.p.wait(timeout=60)  # (it ends while A runs; one that started A again waits for the gate)
        gate.touch()
        run.wait()
        wait_for(lambda: all(span.end for span in spans(journal)))
        assert len(spans(journal)) == 1, run.output
        assert "aipm: A: its worker runs on without a record here (the project moved" in run.output, run.output
    finally:
        gate.touch()
        shutil.rmtree(old_state, ignore_errors=True)


@pytest.mark.parametrize("removed", ["locks", ""])
def test_locks_says_held_of_a_lock_held_on_a_removed_lock_file(tmp_path, removed):
    """A worker removed the lock files (its `rm -rf` of locks/, or of the whole state directory) while it held its
    lock: `aipm locks` said "held: no" of x.py, whose lock still keeps every other task off it (orphans)."""
    (tmp_path / "repo").mkdir()
    project = Project(tmp_path / "repo")
    gate = tmp_path / "gate"
    order = project.order()
    write_task(order, "A", target_files=["x.py"], command=f'until [ -e "{gate}" ]; do sleep 0.01; done')
    run = Proc(project.root, "run", "ORD", "--no-resource-monitoring")
    try:
        wait_for(lambda: task_statuses(order)["A"] == "IN_PROGRESS")
        wait_for(lambda: any(row["path"] == "x.py" and row["held"] for row in project.json("locks")["locks"]))
        # (what the run writes again meanwhile, its worker's record, may stay)
        shutil.rmtree(state(project.root) / removed if removed else state(project.root), ignore_errors=True)
        # (the run writes its worker's record again once it sees it gone)
        wait_for(lambda: any(row["path"] == "x.py" for row in project.json("locks")["locks"]), timeout=60)
        rows = [row for row in project.json("locks")["locks"] if row["path"] == "x.py"]
        assert rows and all(row["held"] for row in rows), rows
    finally:
        gate.touch()
        run.wait(timeout=60)
