"""Target-file locks with real processes: overlaps excluded in the kernel, lock holders outside aipm named and
waited for, daemons that left their worker ended with it, and locks that survive a worker deleting `.aipm/`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Project, no_workers, state, stopped_launch_lock_holder, task_statuses, wait_for, write_task
from invariants import check, cli_locks, held_lock_files, journal_command, pid_alive, spans
from test_chaos import Proc

from aipm import locks
from aipm.locks import lock_nodes
from aipm.paths import normalize

PY = sys.executable


# ---- the hierarchy, in the kernel --------------------------------------------------------------------------


def test_lock_nodes_take_the_path_exclusive_and_every_directory_above_shared():
    nodes = lock_nodes([normalize("docs/conf.py"), normalize("docs/"), normalize("tests/**/*.py")])
    # A glob: its pattern exclusive, its directory shared (what it could match is take()'s check).
    assert nodes == {"": False, "docs": True, "docs/conf.py": True, "tests": False, "tests/**/*.py": True}
    assert lock_nodes([normalize("*.py")]) == {"": False, "*.py": True}


HOLDER = """
import sys
from pathlib import Path
from aipm.locks import take, LockBusy
from aipm.paths import normalize
try:
    fds = take(Path(sys.argv[1]), [normalize(t) for t in sys.argv[2:]])
except LockBusy as exc:
    print("busy", exc.node, flush=True)
    sys.exit(3)
print("held", flush=True)
sys.stdin.read()  # hold until the test closes our stdin
"""


def hold(root: Path, *targets: str) -> subprocess.Popen:
    """Another process that takes the locks of `targets` (as a launcher would) and keeps them until released."""
    proc = subprocess.Popen([PY, "-c", HOLDER, str(state(root, make=True)), *targets], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=30)


@pytest.mark.parametrize("held, wanted, excluded", [
    ("docs/conf.py", "docs/", True),
    ("docs/", "docs/conf.py", True),
    ("docs/conf.py", "docs/conf.py", True),
    ("tests/a/b.py", "tests/**/*.py", True),
    ("tests/**/*.py", "tests/a/b.py", True),
    ("tests/*.py", "tests/a/b.txt", False),  # a glob meets what it could match, not its whole directory
    ("tests/**/*.py", "tests/a/b.txt", True),  # a path's lock covers what is below it (b.txt/c.py)
    ("*.py", "src/deep/x.txt", False),
    ("*.md", "src/main.py", False),
    ("*.md", "README.md", True),
    ("docs/*.md", "docs/*.txt", False),
    ("docs/*.md", "docs/a*", True),
    ("docs/*.md", "docs/*.md", True),
    ("docs/a.md", "docs/", True),
    ("docs/*.md", "docs", True),  # a path's lock covers what is below it
    ("docs", "docs/*.md", True),
    ("docs/*/", "docs/a/x.md", True),  # a glob with a trailing slash: directories, and everything below them
    ("d*/", "docs/x", True),
    ("docs/*.md", "./", True),
    ("docs/a.py", "docs/b.py", False),
    ("docs/", "src/", False),
])
def test_a_directory_a_file_in_it_and_a_glob_exclude_each_other(project, held, wanted, excluded):
    """In the kernel, and for a glob by what it could match (checked by the taker: the test's takers hold no launch
    lock, which only keeps two takers from checking at once)."""
    holder = hold(project.root, held)
    try:
        probe = subprocess.run([PY, "-c", HOLDER, str(state(project.root)), wanted], input="",
                               capture_output=True, text=True, timeout=60)
        assert (probe.returncode == 3) == excluded, probe.stdout + probe.stderr
    finally:
        release(holder)


RACER = """
import os, random, sys, time
from pathlib import Path
import yaml
from aipm.locks import take, LockBusy
from aipm.paths import normalize
state, order, journal, seed = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
tasks = {p.stem: [normalize(t) for t in yaml.safe_load(p.read_text())["target_files"]] for p in order.glob("*.yaml")}
rng = random.Random(seed)
for _ in range(150):
    tid = rng.choice(sorted(tasks))
    try:
        fds = take(state, tasks[tid])
    except LockBusy:
        continue
    with open(journal, "a") as j:
        j.write(f"start {tid} {time.time_ns()} {os.getpid()}\\n")
    time.sleep(0.002)
    with open(journal, "a") as j:
        j.write(f"end {tid} {time.time_ns()} {os.getpid()}\\n")
    for fd in fds:
        os.close(fd)
"""


@pytest.mark.parametrize("pool", [
    ["docs/conf.py", "docs/", "docs/a.md", "docs/**/*.md", "src/f.py", "src/*.py", "src/", "tests/x/y.py",
     "tests/**/*.py", "README.md"],
    # globs that meet only by what they could match, none holding another's node (no launch lock either: each
    # taker checks what is held after taking its own locks, so of two at once one sees the other)
    ["*.md", "README.md", "docs/*.md", "docs/a*", "docs/a.md", "docs/*.txt", "docs/b.txt", "src/x.py", "s*/x.py",
     "docs/**"],
])
def test_racing_lock_takers_never_hold_overlapping_targets_at_once(project, pool):
    """Four processes race for files, directories and globs through take() alone (no planner, no records, no
    launch lock): the journal must never show two overlapping targets held at the same time."""
    order = project.order()
    for i, target in enumerate(pool):
        write_task(order, f"T{i}", target_files=[target], command="true")
    journal = project.root / "journal.txt"
    racers = [subprocess.Popen([PY, "-c", RACER, str(state(project.root, make=True)), str(order), str(journal), str(seed)])
              for seed in range(4)]
    assert [r.wait(timeout=300) for r in racers] == [0, 0, 0, 0]
    assert len(spans(journal)) > 100  # they did run: most attempts got their locks
    assert check(journal, order, once=False, root=project.root) == []


# ---- a lock held outside aipm ------------------------------------------------------------------------------


def docs_order(project):
    """FILE (docs/conf.py), DIR (docs/) and OTHER (src/a.py), each writing the journal; and a process holding
    docs/conf.py's lock outside aipm. The order, the journal, the holder."""
    order = project.order()
    journal = project.root / "journal.txt"
    write_task(order, "FILE", target_files=["docs/conf.py"], command=journal_command(journal))
    write_task(order, "DIR", target_files=["docs/"], command=journal_command(journal))
    write_task(order, "OTHER", target_files=["src/a.py"], command=journal_command(journal))
    return order, journal, hold(project.root, "docs/conf.py")


def test_a_lock_held_by_another_process_is_named_everywhere_and_run_waits_for_it(project):
    (project.root / "aipm.yaml").write_text("notify: 'true'\n")
    order, journal, holder = docs_order(project)
    try:
        # Every process that has the locked descriptor holds it (here: just the holder).
        rows = [r for r in project.json("locks")["locks"] if r["path"] == "docs/conf.py"]
        assert len(rows) == 1 and holder.pid in rows[0]["pids"], rows
        assert f"pid {holder.pid}, not an aipm worker" in rows[0]["holder"]
        why = project.json("why", "ORD/DIR")
        assert not why["launchable"]
        assert [(r["reason"], r["pids"]) for r in why["reasons"]] == [("file_held_outside", [holder.pid])]
        assert f"held by pid {holder.pid}, not an aipm worker" in why["reasons"][0]["detail"]
        detect = project.json("detect", "ORD")
        assert [t["id"] for t in detect["launchable"]] == ["OTHER"]
        assert {b["id"]: b["reason"] for b in detect["blocked"]} == {"FILE": "file_held_outside",
                                                                    "DIR": "file_held_outside"}
        launch = project.json("launch", "ORD", "--dry-run")
        assert [t["id"] for t in launch["launched"]] == ["OTHER"]
        assert {w["id"] for w in launch["waiting"]} == {"FILE", "DIR"}

        run = Proc(project.root, "run", "ORD", "--json", "--no-resource-monitoring")
        wait_for(lambda: task_statuses(order).get("OTHER") == "DONE" and any(
            '"waiting"' in line for line in run.lines), timeout=120)
        waiting = [e for e in run.events() if e["event"] == "waiting"]
        assert {e["task"] for e in waiting} == {"FILE", "DIR"} and all(e["pids"] == [holder.pid] for e in waiting)
        assert run.p.poll() is None, run.output  # still waiting, not given up
        assert task_statuses(order)["FILE"] == task_statuses(order)["DIR"] == "QUEUED"
    finally:
        release(holder)
    assert run.wait(timeout=300) == 0, run.output
    assert set(task_statuses(order).values()) == {"DONE"}
    assert check(journal, order) == []
    # The wait needs a person (only the holder's owner can let it go): told once for each task that waits.
    told = (project.root / ".aipm" / "notify.log").read_text()
    for task in ("FILE", "DIR"):
        assert told.count(f"needs_person WAITING: ORD/{task}: docs/conf.py is held by pid {holder.pid}") == 1, told


# A holder whose lock passes to child after child (a daemon's loop of `sleep`s, each with the descriptor): the
# pids that hold it change every fraction of a second.
CHURNING_HOLDER = HOLDER.replace("sys.stdin.read()  # hold until the test closes our stdin", """
import select
while not select.select([sys.stdin], [], [], 0)[0]:
    subprocess.run(["sleep", "0.1"], pass_fds=fds)
""").replace("import sys\n", "import subprocess\nimport sys\n", 1)


def test_a_wait_for_a_lock_whose_holders_change_is_said_and_told_once(project):
    """`run` printed its `wait` line again, and ran the notify command again, at every new `sleep` of the daemon
    that held the lock: the line named the holders' pids, and a new set was a new wait."""
    (project.root / "aipm.yaml").write_text("notify: 'true'\n")
    order, journal = project.order(), project.root / "journal.txt"
    write_task(order, "FILE", target_files=["docs/conf.py"], command=journal_command(journal))
    holder = subprocess.Popen([PY, "-c", CHURNING_HOLDER, str(state(project.root, make=True)), "docs/conf.py"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    try:
        run = Proc(project.root, "run", "ORD", "--json", "--no-resource-monitoring")
        wait_for(lambda: any('"waiting"' in line for line in run.lines), timeout=120)
        seen: set[int] = set()

        def churned() -> bool:  # the holder and at least four of its children seen holding the lock meanwhile
            for row in project.json("locks")["locks"]:
                seen.update(row["pids"] if row["path"] == "docs/conf.py" else ())
            return len(seen) >= 5

        wait_for(churned, timeout=60)
    finally:
        release(holder)
    assert run.wait(timeout=300) == 0, run.output
    assert [e["task"] for e in run.events() if e["event"] == "waiting"] == ["FILE"], run.output
    told = (project.root / ".aipm" / "notify.log").read_text()
    assert told.count("needs_person WAITING: ORD/FILE: docs/conf.py is held by") == 1, told


def test_a_glob_kept_out_by_a_lock_held_outside_names_the_path_it_could_match(project):
    """A process outside aipm holds src/a.txt and src/b.py: `src/*.py` waits for src/b.py, and its reason named
    src/a.txt (the first held path near src/, which it could not match)."""
    order = project.order()
    write_task(order, "PY", target_files=["src/*.py"], command="true")
    holder = hold(project.root, "src/a.txt", "src/b.py")
    try:
        why = project.json("why", "ORD/PY")
        assert [r["path"] for r in why["reasons"]] == ["src/b.py"], why
    finally:
        release(holder)


# ---- processes that leave their worker --------------------------------------------------------------------


def daemon_command(pidfile: Path, clear_env: bool) -> str:
    """Start a daemon in its own session that records its pid, keeps every inherited descriptor, then exit 0."""
    env = "env -i " if clear_env else ""
    return (f'{env}setsid /bin/sh -c \'echo $$ > "{pidfile}"; exec sleep 300\' </dev/null >/dev/null 2>&1 & '
            f'until [ -s "{pidfile}" ]; do sleep 0.01; done')


@pytest.mark.parametrize("how", ["run", "launch"])
@pytest.mark.parametrize("clear_env", [False, True], ids=["env", "env-cleared"])
def test_a_setsid_daemon_is_ended_when_its_attempt_ends(project, tmp_path, how, clear_env):
    order = project.order()
    journal = project.root / "journal.txt"
    pidfile = tmp_path / "daemon.pid"
    write_task(order, "A", target_files=["docs/conf.py"], command=daemon_command(pidfile, clear_env))
    write_task(order, "B", target_files=["docs/"], command=journal_command(journal), depends_on=["A"])
    try:
        if how == "run":
            proc = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=300)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        else:
            project.aipm("launch", "ORD", "--no-resource-monitoring", check=True)
            wait_for(lambda: set(task_statuses(order).values()) == {"DONE"}, timeout=120)
            wait_for(lambda: no_workers(project.root), timeout=60)
        daemon = int(pidfile.read_text())
        wait_for(lambda: not pid_alive(daemon), timeout=30)  # the owner may still be finishing up
        assert held_lock_files(project.root) == []
        assert cli_locks(project.root) == []
        log = (project.root / ".aipm" / "logs" / "ORD" / "A.1.log").read_text().splitlines()
        assert any("left running" in line and str(daemon) in line.split("pids ")[-1].split(", ") for line in log)
    finally:
        if pidfile.exists() and pid_alive(int(pidfile.read_text())):
            os.kill(int(pidfile.read_text()), 9)


# ---- a worker that deletes .aipm/ ------------------------------------------------------------------------


@pytest.mark.parametrize("clean", ["rm -rf .aipm", "git clean -fdqx"])
def test_a_worker_deleting_aipm_keeps_its_files_locked_and_run_finishes(tmp_path, clean):
    if clean.startswith("git") and shutil.which("git") is None:
        pytest.skip("git not installed")
    root = tmp_path / "proj"
    root.mkdir()
    project = Project(root)
    journal, go, cleaned, done = (tmp_path / n for n in ("journal.txt", "go", "cleaned", "done"))
    first, second = project.order("ONE"), project.order("TWO")
    write_task(first, "A", target_files=["x.py"], command=journal_command(
        journal, f'until [ -e "{go}" ]; do sleep 0.01; done; {clean}; touch "{cleaned}"; '
                 f'until [ -e "{done}" ]; do sleep 0.01; done'), review="true")  # its review log dir is gone
    write_task(first, "A2", target_files=["x.py"], command=journal_command(journal))  # queued behind A
    write_task(second, "B", target_files=["x.py"], command=journal_command(journal))
    if clean.startswith("git"):
        env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                   GIT_COMMITTER_EMAIL="t@t")
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "orders"]):
            subprocess.run(["git", *args], cwd=root, check=True, env=env)
    run = Proc(root, "run", "ONE", "--max-workers", "1", "--no-resource-monitoring")
    try:
        wait_for(lambda: any(s.task == "A" for s in spans(journal)), timeout=120)
        go.touch()
        wait_for(lambda: cleaned.exists(), timeout=60)
        assert not (root / ".aipm").exists()
        # Another launcher, in another order, wants A's file while A still holds it.
        out = project.json("launch", "TWO", "--no-resource-monitoring")
        assert out["launched"] == [], out
        done.touch()
        assert run.wait(timeout=300) == 0, run.output
    finally:
        run.kill()
    assert "Traceback" not in run.output
    project.aipm("run", "TWO", "--no-resource-monitoring", check=True)
    assert task_statuses(first) == {"A": "COMPLETED", "A2": "DONE"} and task_statuses(second) == {"B": "DONE"}
    both = tmp_path / "both"
    both.mkdir()
    for path in [*first.glob("*.yaml"), *second.glob("*.yaml")]:
        shutil.copy(path, both / path.name)
    assert check(journal, both, root=root) == []
    assert (root / ".aipm" / "logs" / "ONE" / "A2.1.log").exists()  # logs are written again


@pytest.mark.parametrize("clear_env", [False, True], ids=["marker", "env-cleared-holding-its-lock"])
def test_a_daemon_is_ended_when_its_attempt_ends_while_the_run_owns_others(project, tmp_path, clear_env):
    """With other attempts running, only the ended attempt's strays die: found by its environment marker, or by
    the lock file it still holds when it cleared its environment."""
    order = project.order()
    pidfile, release = tmp_path / "daemon.pid", tmp_path / "release"
    write_task(order, "A", target_files=["docs/conf.py"], command=daemon_command(pidfile, clear_env))
    write_task(order, "B", target_files=["src/"], command=f'until [ -e "{release}" ]; do sleep 0.02; done')
    run = Proc(project.root, "run", "ORD", "--no-resource-monitoring")
    try:
        wait_for(lambda: task_statuses(order).get("A") == "DONE", timeout=120)
        daemon = int(pidfile.read_text())
        wait_for(lambda: not pid_alive(daemon), timeout=30)
        assert task_statuses(order)["B"] == "IN_PROGRESS"  # ended with A, not at the end of the run
        release.touch()
        assert run.wait(timeout=120) == 0, run.output
    finally:
        release.touch()
        run.kill()
        if pidfile.exists() and pid_alive(int(pidfile.read_text())):
            os.kill(int(pidfile.read_text()), 9)


# ---- the planner agrees with the kernel -------------------------------------------------------------------


def _task(tid, *files, status="QUEUED"):
    from aipm.model import Priority, Status, Task

    return Task(id=tid, path=f"{tid}.yaml", status=Status(status), priority=Priority("P1"), depends_on=(),
                target_files=files, targets=tuple(normalize(f) for f in files))


def _plan(*tasks, outside=()):
    from aipm.model import Order
    from aipm.plan import plan

    running = {t.id: 0 for t in tasks if t.status.value == "IN_PROGRESS"}  # their workers live
    return plan(Order("O", "O", {t.id: t for t in tasks}), live=running, slots=9, outside=outside)


def test_a_glob_waits_only_for_running_files_it_could_match():
    """The contract's rule, "a glob overlaps whatever it could match": `src/*.py` locked all of src/, so it waited
    for a running `src/data.json` (and `*.md` for every running file of the project)."""
    result = _plan(_task("RUN", "src/data.json", status="IN_PROGRESS"), _task("PY", "src/d*.py"),
                   _task("JSON", "src/*.json"), _task("MD", "*.md"))
    assert [t.id for t in result.launchable] == ["MD", "PY"]
    blocked = result.blocked["JSON"]
    assert blocked.reason == "file_busy" and blocked.tasks == ("RUN",)
    assert "src/*.json ↔ src/data.json" in blocked.detail


def test_a_path_whose_lock_covers_a_running_file_below_it_is_not_called_a_glob():
    result = _plan(_task("RUN", "docs/a/b.txt", status="IN_PROGRESS"), _task("DOCS", "docs"))
    detail = result.blocked["DOCS"].detail
    assert "(the lock of docs covers everything below it)" in detail and "glob" not in detail, detail


@pytest.mark.parametrize("running, waiting", [("**/x?.txt", "docs/n.md"), ("docs/n.md", "**/x?.txt"),
                                             ("docs/*/x/*.md", "docs/s/x"), ("docs/s/x", "docs/*/x/*.md")])
def test_the_lock_said_to_cover_what_is_below_it_is_the_plain_paths_not_the_globs(running, waiting):
    """A file meets `**/x?.txt` because its lock covers what is below it (docs/n.md/x1.txt); the waiting file's
    reason named the running glob as the lock that covers everything below it."""
    result = _plan(_task("RUN", running, status="IN_PROGRESS"), _task("WAIT", waiting))
    plain = running if "*" not in running else waiting
    assert f"(the lock of {plain} covers everything below it)" in result.blocked["WAIT"].detail


@pytest.mark.parametrize("nodes, files, held", [
    ((("", False), ("docs", False), ("docs/conf.py", True)), ("docs/",), True),  # a daemon's full lock set
    ((("", False), ("docs", False), ("docs/conf.py", True)), ("docs/other.py",), False),
    ((("docs/conf.py", True),), ("docs/",), True),  # a holder that skipped the directory locks
    ((("docs", False),), ("docs/x.py",), False),  # shared: only a task wanting all of docs/ waits
    ((("docs", False),), ("docs/**/*.md",), False),  # a glob wants its directory shared only
    ((("docs", True),), ("docs/**/*.md",), True),
    ((("docs/a/x.md", True),), ("docs/**/*.md",), True),  # one it could match
    ((("docs/a/x.py", True),), ("docs/*.md",), False),
])
def test_a_lock_held_outside_blocks_exactly_what_it_would_block_in_the_kernel(nodes, files, held):
    from aipm.plan import FILE_HELD, ForeignLock

    result = _plan(_task("T", *files), outside=[ForeignLock((4242,), nodes)])
    assert (result.blocked.get("T") is not None) == held
    if held:
        assert result.blocked["T"].reason == FILE_HELD and result.blocked["T"].pids == (4242,)
        assert "held by pid 4242, not an aipm worker" in result.blocked["T"].detail
        assert [b.id for b in result.waiting] == ["T"]


def test_a_full_disk_leaves_no_empty_lock_file_and_fails_the_lock_cleanly(tmp_path):
    """A lock file is made with its node's name inside (for `aipm locks`); on a full disk that write fails, and
    neither locks.prepare (made while workers run: it gives up quietly) nor take() (an OSError, which the launcher
    reports as a failed launch) leaves an empty lock file behind or a descriptor open."""
    from aipm import locks

    disk = tmp_path / "state" / "locks"
    disk.mkdir(parents=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        filler = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)  # fill it for real
        try:
            while os.write(filler, b"x" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(filler)
        fds_before = len(os.listdir("/proc/self/fd"))
        made: set[str] = set()
        locks.prepare(tmp_path / "state", [normalize("a/b.txt", tmp_path)], made)
        assert made == set() and os.listdir(disk) == ["filler"]
        with pytest.raises(OSError):
            locks.take(tmp_path / "state", [normalize("a/b.txt", tmp_path)])
        assert os.listdir(disk) == ["filler"] and len(os.listdir("/proc/self/fd")) == fds_before
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


FAILING_LOCK = """
import errno, resource, signal, sys
from pathlib import Path
from aipm import locks
from aipm.paths import normalize
root = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (the write then fails with EFBIG, as on a full disk with ENOSPC)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
try:
    locks.take(root / "state", [normalize("a/b.txt", root)])
except OSError as exc:
    sys.exit(0 if exc.errno == errno.EFBIG else f"not the write's failure: {exc!r}")
sys.exit("taken")
"""


def test_a_lock_file_whose_write_fails_never_appears_under_its_name(tmp_path):
    """A new lock file was made under its name, its node's name written in, and removed again if that write failed
    (a full disk): between the two, another process could open it and take its lock, and a third then make and lock
    a new file of that name beside it, both holding the same node. Now it gets its name only once written: the
    directory sees no file come and go (inotify), and the failed take leaves nothing there."""
    from aipm.inotify import IN_CREATE, IN_MOVED_TO, DirWatch

    locks_dir = tmp_path / "state" / "locks"
    locks_dir.mkdir(parents=True)
    try:
        os.close(os.open(locks_dir, os.O_WRONLY | os.O_TMPFILE))
    except OSError:
        pytest.skip("no O_TMPFILE here: a lock file is made under its name, as before")
    watch = DirWatch.open(str(locks_dir), IN_CREATE | IN_MOVED_TO)
    if watch is None:
        pytest.skip("no inotify here")
    try:
        child = subprocess.run([sys.executable, "-c", FAILING_LOCK, str(tmp_path)], capture_output=True, text=True,
                               timeout=60)
        assert child.returncode == 0, child.stdout + child.stderr
        assert watch.events() == [] and os.listdir(locks_dir) == []
    finally:
        watch.close()
    # The same take with room: its files (the file's node and the directory's above it) hold their nodes' names.
    fds = locks.take(tmp_path / "state", [normalize("a/b.txt", tmp_path)])
    try:
        assert sorted((locks_dir / name).read_text() for name in os.listdir(locks_dir)) == ["a", "a/b.txt"]
    finally:
        for fd in fds:
            os.close(fd)


def test_a_state_directory_removed_while_a_lock_file_is_made_is_made_again_and_locked(tmp_path, monkeypatch):
    """A worker's `rm -rf` of the state directory in the instant between the opening of `locks/` and the making of a
    lock file in it: ext4 refuses a file of no name in a removed directory (EPERM), tmpfs a link into one (ENOENT).
    Either is a directory gone, which the taker makes again; not a lock that cannot be taken."""
    real_open = os.open
    removed = []

    def open_then_remove(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_PATH and not removed:
            removed.append(path)
            shutil.rmtree(tmp_path / "state")
        return fd

    monkeypatch.setattr(os, "open", open_then_remove)
    fds = locks.take(tmp_path / "state", [normalize("a/b.txt", tmp_path)])
    monkeypatch.undo()
    try:
        assert removed
        locks_dir = tmp_path / "state" / "locks"
        assert sorted((locks_dir / name).read_text() for name in os.listdir(locks_dir) if name.endswith(".lock")) \
            == ["a", "a/b.txt"]
    finally:
        for fd in fds:
            os.close(fd)


def test_who_holds_what_is_read_while_a_worker_removes_the_lock_files_without_failing(tmp_path):
    """`rm -rf` of the lock files (a worker's command) while a planner asks which nodes are held: a directory
    gone between its stat and its listing reads as no names, never an error (the planner of a `run` raised)."""
    import fcntl

    from aipm.locks import Holdings

    locks = tmp_path / "locks"
    locks.mkdir()
    fd = os.open(locks / "x.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    churn = subprocess.Popen(["sh", "-c", f'while :; do rm -rf "{locks}"; mkdir -p "{locks}"; '
                              f'touch "{locks}/y.lock"; done'], stderr=subprocess.DEVNULL)
    holdings = Holdings(tmp_path)
    try:
        seen = [holdings.held() for _ in range(5000)]
    finally:
        churn.kill()
        churn.wait()
        os.close(fd)
    # Before the first removal it is x.lock's; once removed its lock names no file, and y.lock is never held.
    assert all(h in ({"x.lock": True}, {}) for h in seen) and seen[-1] == {}


def test_a_descriptor_reused_on_a_named_file_of_the_noted_inode_holds_no_lock_of_a_removed_directory(tmp_path):
    """The note of locks held in a removed `locks/` names a process, its descriptor and the file's inode. A holder
    that closes that descriptor and opens a new lock file, which gets the same number and may get the freed
    inode's number too, holds nothing of the removed directory: taken for the old lock, it kept a detached owner
    from starting its own successor on that file, for good."""
    import json

    from aipm.liveness import process_ctime
    from aipm.locks import LockBusy, take
    from aipm.statedir import ORPHANS, make_state_dir

    st = state(tmp_path, make=True)
    x = [normalize("x.py")]
    held = take(st, x)
    # Really held in a removed directory: refused, by the note the directory's making writes.
    shutil.rmtree(st / "locks")
    make_state_dir(st)
    assert json.loads((st / ORPHANS).read_text())[-1][-1] == "x.py"
    with pytest.raises(LockBusy):
        take(st, x)
    for fd in held:
        os.close(fd)
    mine = take(st, x)  # its descriptors closed: nothing of the removed directory is held
    for fd in mine:
        os.close(fd)
    # The note's descriptor now open on a named lock file with the noted inode number: no lock of the removed one.
    fd = os.open(next((st / "locks").iterdir()), os.O_RDONLY)
    (st / ORPHANS).write_text(json.dumps([[os.getpid(), process_ctime(os.getpid()), fd, os.fstat(fd).st_ino, True,
                                            "x.py"]]))
    try:
        for lock in take(st, x):
            os.close(lock)
    finally:
        os.close(fd)



@pytest.mark.parametrize("also", ["", "made.txt", "orphans.json"],
                         ids=["lock file", "and the list", "then the note"])
def test_a_new_lock_file_in_place_of_a_removed_one_still_held_is_no_free_lock(tmp_path, also):
    """x.py's lock file removed while its lock is held, `locks/` left in place: the file made in its place is no
    free lock of x.py until the removed one is let go, also when the list of lock files made (which tells a file
    made again from a new one) is removed with it, or the note of who holds a removed one is removed after."""
    from aipm.locks import LockBusy, node_file, take

    st = state(tmp_path, make=True)
    x = [normalize("x.py")]
    other = take(st, [normalize("y.py")])  # another lock file listed: the list is not of x.py alone
    held = take(st, x)
    try:
        os.unlink(st / "locks" / node_file("x.py"))
        if also == "made.txt":
            os.unlink(st / also)
        with pytest.raises(LockBusy):
            take(st, x)  # its new file made and locked, and refused: the holder of the removed one is noted
        if also == "orphans.json":
            os.unlink(st / also)
        with pytest.raises(LockBusy):
            take(st, x)  # the same file again: known now, so only the note (or its absence) tells
    finally:
        for fd in held + other:
            os.close(fd)
    for fd in take(st, x):
        os.close(fd)


@pytest.mark.parametrize("removed", ["its own", "every one"])
def test_a_glob_whose_lock_file_was_removed_still_keeps_out_what_it_could_match(project, removed):
    """`*.md` held, its lock file removed (a worker's `rm`, a clean-up of `*.lock` files): a taker of README.md
    makes no lock file the list knew, so nobody noted the holder of the removed one, and README.md was locked
    beside the running glob. Twice: the second taker reads the note the first left."""
    holder = hold(project.root, "*.md")
    st = state(project.root)
    try:
        for lock_file in (st / "locks").iterdir():
            if removed == "every one" or lock_file.name.endswith(".glob.lock"):
                lock_file.unlink()
        for wanted, excluded in (("README.md", True), ("README.md", True), ("src/a.md", False)):
            probe = subprocess.run([PY, "-c", HOLDER, str(st), wanted], input="", capture_output=True, text=True,
                                   timeout=60)
            assert (probe.returncode == 3) == excluded, (wanted, probe.stdout + probe.stderr)
    finally:
        release(holder)


# ---- the launch lock held by a stopped process -------------------------------------------------------------


@pytest.mark.parametrize("command", [("cancel", "ORD/T"), ("run", "ORD", "--no-resource-monitoring")])
def test_a_command_waiting_for_a_launch_lock_whose_holder_is_stopped_says_so_once_and_goes_on(project, command):
    """cancel, retry, run... waited in silence for ever behind an `aipm run` stopped (Ctrl-Z, SIGSTOP) inside a
    round: now one line names the holder and that it is stopped, and the wait goes on until it is let go."""
    write_task(project.order(), "T", target_files=["a.txt"], command="true")
    holder = stopped_launch_lock_holder(project)
    try:
        err = project.root.parent / "err.txt"
        with open(err, "w") as handle:
            waiting = subprocess.Popen([PY, "-m", "aipm", "--root", str(project.root), *command],
                                       stdout=subprocess.DEVNULL, stderr=handle)
        said = f"aipm: waiting for the launch lock, held by pid {holder.pid} ("
        wait_for(lambda: said in err.read_text())
        assert waiting.poll() is None  # still waiting
    finally:
        holder.kill()  # (a stopped process dies of SIGKILL too): the lock is free
        holder.wait()
    assert waiting.wait(timeout=60) == 0, err.read_text()
    (line,) = err.read_text().splitlines()
    assert line.startswith(said) and line.endswith(f"which is stopped (Ctrl-Z or SIGSTOP): `fg` in its terminal, "
                                                   f"or `kill -CONT {holder.pid}`, lets it go on"), line
    assert task_statuses(project.order())["T"] == {"cancel": "CANCELLED", "run": "DONE"}[command[0]]


def test_a_target_through_a_link_into_a_directory_named_in_non_utf8_bytes_is_locked_and_run(project):
    """`cafe -> caf\\xe9` (a Latin-1 name, any bytes to Linux): the target cafe/x.txt is locked by its real path,
    `caf\\udce9/x.txt` as Python reads it, whose lock file's name and content could not be encoded: `aipm run`
    ended in a UnicodeEncodeError traceback, the task never started."""
    latin = os.fsdecode(b"caf\xe9")
    (project.root / latin).mkdir()
    (project.root / "cafe").symlink_to(latin)
    write_task(project.order(), "T", target_files=["cafe/x.txt"], command="echo hi > cafe/x.txt")
    write_task(project.order(), "U", target_files=["cafe/"], command="true", depends_on=["T"])
    proc = project.aipm("run", "ORD", "--no-review")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert task_statuses(project.order()) == {"T": "DONE", "U": "DONE"}
    assert (project.root / latin / "x.txt").read_text() == "hi\n"


def test_locks_says_a_reviewed_tasks_files_are_held_by_its_review_while_it_runs(project):
    """Under `run` a review holds no lock file (the worker that had the locks is gone; the reviewer gets none),
    yet its live record keeps the task's files from every other task: `locks` said `held: no` for them, as for
    free files, while `why` of a task on them said they are held."""
    gate = project.root / "gate"
    order = project.order()
    write_task(order, "A", command="true", review=f"while [ ! -e {gate} ]; do sleep 0.05; done",
               target_files=["a.txt", "docs/"])
    run = subprocess.Popen([PY, "-m", "aipm", "--root", str(project.root), "run", "ORD", "--no-resource-monitoring"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        (reviewer,) = wait_for(lambda: [w for w in project.json("ps")["workers"]
                                        if w["phase"] == "review" and w["state"] == "alive"])
        assert held_lock_files(project.root) == [], "a review under `run` was to hold no lock file"
        write_task(order, "B", command="true", target_files=["docs/b.md"])
        assert project.json("why", "ORD/B")["reasons"][0]["reason"] == "file_busy"
        rows = project.json("locks")["locks"]
        assert [(r["path"], r["pid"], r["held"], r["held_by"]) for r in rows] == [
            ("a.txt", reviewer["pid"], True, "review"), ("docs/", reviewer["pid"], True, "review")]
        table = project.aipm("locks", check=True).stdout
        assert table.count("yes (its review runs)") == 2 and " no " not in table, table
    finally:
        gate.touch()
    assert run.wait(timeout=120) == 0
    assert task_statuses(order) == {"A": "COMPLETED", "B": "DONE"}


def test_aipm_locks_waits_on_no_fifo_a_worker_holds_a_lock_on_in_place_of_a_lock_file(tmp_path):
    """`aipm locks` reads the node's name from each held lock file: a worker that put a FIFO in a lock file's place
    and holds a lock on it had `aipm locks` wait for ever in that read (found by the review of the hot path)."""
    from aipm.locks import node_file

    project = Project(tmp_path)
    project.order()
    st = state(tmp_path, make=True)
    fifo = st / "locks" / node_file("x.py")
    os.mkfifo(fifo)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY | os.O_NONBLOCK); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)"), str(fifo)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        proc = subprocess.run([sys.executable, "-m", "aipm", "--root", str(tmp_path), "locks", "--json"],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert holder.pid in {pid for row in json.loads(proc.stdout)["locks"] for pid in row["pids"]}
    finally:
        holder.kill()
        holder.wait()


def test_a_glob_at_the_root_runs_beside_tasks_on_files_it_cannot_match(project):
    """`*.md` at the project root locked the whole project (its fixed directory): while it ran, no task on any
    file could start, though the contract says a glob overlaps only what it could match. Now SRC (`src/main.py`)
    runs and ends while DOCS (`*.md`) runs; README (`README.md`, which `*.md` matches) waits for it."""
    order = project.order()
    gate = project.root / "gate"
    write_task(order, "DOCS", priority="P0", target_files=["*.md"],
               command=f"while [ ! -e {gate} ]; do sleep 0.05; done")
    write_task(order, "SRC", priority="P1", target_files=["src/main.py"], command="true")
    write_task(order, "README", priority="P1", target_files=["README.md"], command="true")
    proc = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD",
                             "--max-workers", "3"], cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, AIPM_ENABLE_MONITORING="false"))
    try:
        wait_for(lambda: task_statuses(order)["SRC"] == "DONE" or proc.poll() is not None, timeout=60)
        assert task_statuses(order) == {"DOCS": "IN_PROGRESS", "SRC": "DONE", "README": "QUEUED"}
        gate.touch()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        gate.touch()
        proc.kill()
    assert task_statuses(order) == {"DOCS": "DONE", "SRC": "DONE", "README": "DONE"}
