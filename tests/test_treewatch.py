"""The scope audit from one inotify watch of the tree (aipm/treewatch.py, scope.watching): what `run` uses for
its own attempts instead of `git status` per wake-up. Real git repositories, real processes writing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import yaml

from aipm import scope, writtenlog
from aipm.gitstatus import real_root

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path: Path, monkeypatch) -> Path:
    """Tracked src/a.py, README.md, tests/test_a.py; ignored build/ (present) and cache/ (absent), *.log; an
    untracked notes.txt and a dirty CHANGES.md, both older than any window the test opens."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    root = tmp_path / "repo"
    (root / "src").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "src" / "a.py").write_text("a = 1\n")
    (root / "README.md").write_text("hello\n")
    (root / "CHANGES.md").write_text("v1\n")
    (root / "tests" / "test_a.py").write_text("def test(): pass\n")
    (root / ".gitignore").write_text("build/\ncache/\n*.log\n")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    (root / "build").mkdir()
    (root / "build" / "old.o").write_text("o\n")
    (root / "notes.txt").write_text("mine\n")
    (root / "CHANGES.md").write_text("v2, not committed\n")
    time.sleep(scope.CTIME_SLACK_NS / 1e9 + 0.05)  # so that nothing above counts as written in a window
    return root


def audit(repo: Path, script: str, targets=("src/",), watch: bool = True) -> list[str]:
    """Start an attempt as `run` does (watched, or from a git snapshot), let a real shell run `script` in the
    tree, and return the audit's findings against `targets`."""
    start = repo.parent / "state" / "T.1.scope.json"
    with scope.watching(repo) if watch else nullcontext():
        assert scope.save_before(repo, start, lambda: None, ours=True)
        assert isinstance(scope.load(start), scope.Watched if watch else scope.Snapshot)
        subprocess.run(["sh", "-c", script], cwd=repo, check=True)
        with scope.shared():
            found = scope.findings(repo, start, lambda since_ns: list(targets))
        scope.end(repo, start)
    assert not start.exists()
    return found


# What both audits must agree on: (script, findings with targets ["src/"]).
AGREED = {
    "in its targets": ("echo b > src/b.py && mkdir -p src/pkg && echo c > src/pkg/c.py", []),
    "a new file outside": ("echo x > stray.txt", ["stray.txt"]),
    "a tracked file deleted": ("rm README.md", ["README.md"]),
    "files in a new directory": ("mkdir -p new/deep && echo x > new/deep/f && echo y > new/g", ["new/deep/f", "new/g"]),
    "a temp file made and removed": ("touch scratch && rm scratch", []),
    "what git ignores, old and new directories": (
        "echo x > build/x.o && mkdir -p cache/d && echo 1 > cache/d/c && echo l > run.log", []),
    "sed -i in a target, its temp file beside": ("sed -i s/1/2/ src/a.py", []),
    "sed -i outside": ("sed -i s/hello/bye/ README.md", ["README.md"]),
    "opened for writing, not written": ("exec 3>>notes.txt; exec 3>&-; : > /dev/null", []),
    "an untracked file written again": ("echo more >> notes.txt", ["notes.txt"]),
    "a dirty file reverted to clean": ("git checkout -q -- CHANGES.md", ["CHANGES.md"]),
    "the runtime directory": ("mkdir -p .aipm/logs && echo l > .aipm/logs/x", []),
    "a directory made, filled and moved into a target": (
        "mkdir dist.tmp && echo x > dist.tmp/f && mv dist.tmp src/dist", []),
    "a nested repository made": ("mkdir -p vendor/lib && cd vendor/lib && git init -q && echo x > f.c",
                                 ["vendor/lib"]),
}


@pytest.mark.parametrize("case", sorted(AGREED))
@pytest.mark.parametrize("watch", [True, False], ids=["watch", "git"])
def test_the_watch_finds_what_git_status_finds(repo, case, watch):
    script, expected = AGREED[case]
    assert audit(repo, script, watch=watch) == expected


def test_a_directory_moved_away_is_charged_unless_a_target_covers_all_of_it(repo):
    """Its files had no events of their own: the directory is named (git would name each file)."""
    assert audit(repo, "mv tests moved") == ["moved/test_a.py", "tests/"]
    assert audit(repo, "mv moved tests", targets=("tests/", "moved/")) == []


@pytest.mark.parametrize("watch", [True, False], ids=["watch", "git"])
def test_a_nested_repository_is_one_path(repo, watch):
    """git shows a nested repository as one path, fingerprinted by its top directory; so does the watch: a file
    made at its top changes it, a write deeper inside is not seen, its removal is."""
    inner = repo / "vendor" / "lib"
    (inner / "sub").mkdir(parents=True)
    git(inner, "init", "-q")
    time.sleep(scope.CTIME_SLACK_NS / 1e9 + 0.05)
    assert audit(repo, "echo x > vendor/lib/sub/f.c", targets=("src/",), watch=watch) == []
    assert audit(repo, "echo x > vendor/lib/f.c", targets=("src/",), watch=watch) == ["vendor/lib"]
    assert audit(repo, "rm -rf vendor/lib", targets=("src/",), watch=watch) == ["vendor/lib"]


def test_a_directory_git_ignores_made_during_the_run_is_not_watched(repo):
    start = repo.parent / "state" / "T.1.scope.json"
    with scope.watching(repo):
        watch = scope._WATCHES[real_root(repo)]
        scope.save_before(repo, start, lambda: None, ours=True)
        subprocess.run(["sh", "-c", "mkdir -p cache/a/b src/new && echo 1 > cache/a/b/f"], cwd=repo, check=True)
        scope.ended(repo, start)
        assert sorted(watch.touched(str(start))) == ["cache/", "src/new/"]
        watched = set(watch._dirs.values())
        assert "src/new" in watched and not any(d.startswith("cache") for d in watched)
        scope.end(repo, start)


def test_after_lost_events_the_next_window_watches_the_tree_afresh(repo):
    """A flood overflows the kernel's queue while a directory is made in it: the flooded window falls back to
    git, and the next window, opened after a fresh walk of the tree, is complete and sees a write in that new
    directory (whose creation event was lost)."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 100_000:
        pytest.skip(f"max_queued_events is {limit}: too many files to make")
    first, second = (repo.parent / "state" / f"{t}.1.scope.json" for t in "AB")
    (repo / "gen").mkdir()
    with scope.watching(repo):
        watch = scope._WATCHES[real_root(repo)]
        scope.save_before(repo, first, lambda: None, ours=True)
        subprocess.run([sys.executable, "-c", f"""
import os
for i in range({limit + 500}):
    open(f"gen/f{{i}}", "w").close()
os.mkdir("gen/sub")
"""], cwd=repo, check=True)
        scope.ended(repo, first)
        assert watch.touched(str(first)) is None
        scope.end(repo, first)
        scope.save_before(repo, second, lambda: None, ours=True)
        subprocess.run(["sh", "-c", "echo evil > gen/sub/evil.txt && echo b > b.txt"], cwd=repo, check=True)
        scope.ended(repo, second)
        assert watch.touched(str(second)) is not None  # complete: not the fallback
        assert scope.findings(repo, second, lambda since_ns: ["b.txt"]) == ["gen/sub/evil.txt"]
        scope.end(repo, second)


def test_lost_events_fall_back_to_what_git_shows_written_since_the_start(repo):
    """More events than the kernel queues between two reads (16384 by default): the window is incomplete, and
    the audit takes what git status shows with an inode changed since the window opened."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 100_000:
        pytest.skip(f"max_queued_events is {limit}: too many files to make")
    start = repo.parent / "state" / "T.1.scope.json"
    with scope.watching(repo):
        watch = scope._WATCHES[real_root(repo)]
        (repo / "flood").mkdir()  # watched before the files come: an event each
        assert scope.save_before(repo, start, lambda: None, ours=True)
        subprocess.run([sys.executable, "-c", f"""
for i in range({limit + 500}):
    open(f"flood/f{{i}}", "w").close()
"""], cwd=repo, check=True)
        assert watch.touched(str(start)) is None  # overflowed
        with scope.shared():
            found = scope.findings(repo, start, lambda since_ns: ["src/"])
        scope.end(repo, start)
    assert len(found) == limit + 500 and all(p.startswith("flood/f") for p in found)


def test_windows_see_only_their_own_span_and_old_events_are_dropped(repo):
    """Two overlapping attempts: each sees the events from its own start to its end; once both are over the log
    is empty again."""
    first, second = (repo.parent / "state" / f"{t}.scope.json" for t in "AB")
    with scope.watching(repo):
        watch = scope._WATCHES[real_root(repo)]
        scope.save_before(repo, first, lambda: None, ours=True)
        subprocess.run(["sh", "-c", "echo 1 > one.txt"], cwd=repo, check=True)
        scope.save_before(repo, second, lambda: None, ours=True)
        subprocess.run(["sh", "-c", "echo 2 > two.txt"], cwd=repo, check=True)
        scope.ended(repo, first)  # its processes are gone: what follows is not its doing
        subprocess.run(["sh", "-c", "echo 3 > three.txt"], cwd=repo, check=True)
        assert sorted(watch.touched(str(first))) == ["one.txt", "two.txt"]
        assert sorted(watch.touched(str(second))) == ["three.txt", "two.txt"]
        scope.end(repo, first)
        assert sorted(watch.touched(str(second))) == ["three.txt", "two.txt"]
        scope.end(repo, second)
        assert watch._log == [] and watch.touched(str(second)) is None


# -- through `aipm run` ----------------------------------------------------------------------------------------


def _order(root: Path, tasks: dict, settings: str = "max_rework: 0\n") -> Path:
    order = root / "orders" / "ORD"
    order.mkdir(parents=True)
    (root / "aipm.yaml").write_text(settings)
    for tid, body in tasks.items():
        (order / f"{tid}.yaml").write_text(yaml.safe_dump(body))
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "order")
    return order


def test_an_attempt_adopted_after_its_run_was_killed_is_still_audited(repo):
    """The run that started (and watched) SNEAKY is SIGKILLed; its worker lives on, writes outside its targets
    and ends under a second run, which adopts it without the first run's events: the audit falls back to git
    status and the inodes changed since the attempt began, and still names the stray file — and not the
    untracked notes.txt that was there before."""
    order = _order(repo, {"SNEAKY": {
        "command": "touch started; until [ -e go ]; do sleep 0.02; done; echo c > stray.txt; echo a > src/a.py",
        "target_files": ["src/"]}})
    aipm = [sys.executable, "-m", "aipm", "--root", str(repo)]
    first = subprocess.Popen([*aipm, "run", "ORD", "--no-resource-monitoring"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (repo / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (repo / "started").exists()
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    (repo / "go").touch()
    second = subprocess.run([*aipm, "run", "ORD", "--no-resource-monitoring", "--json"], capture_output=True,
                            text=True, timeout=120)
    task = yaml.safe_load((order / "SNEAKY.yaml").read_text())
    assert task["status"] == "REJECTED", second.stdout + second.stderr
    # `started` and `go` were made by the test and the worker, both outside its targets: they count too.
    assert task["reason"] == "scope: wrote go, started, stray.txt"


def test_run_audits_without_git_status_and_with_it_when_told(repo, tmp_path):
    """A chain of three in a git tree: with the watch, no `git status` at all; with `scope_watch: false`, one per
    wake-up (4). Either way the stray write is found."""
    tasks = {tid: {"command": f"echo {tid} > {tid}.txt" + (" && echo s > stray.txt" if tid == "C" else ""),
                   "target_files": [f"{tid}.txt"], "depends_on": [dep] if dep else []}
             for tid, dep in (("A", None), ("B", "A"), ("C", "B"))}
    for watch, expected_calls in ((True, 0), (False, 4)):
        root = tmp_path / f"r{watch}"
        shutil.copytree(repo, root)
        order = _order(root, tasks, f"max_rework: 0\nscope_watch: {str(watch).lower()}\n")
        shim = tmp_path / "shim"
        shim.mkdir(exist_ok=True)
        calls = tmp_path / f"calls-{watch}"
        (shim / "git").write_text(f'#!/bin/sh\ncase " $* " in *" status "*) echo x >> {calls};; esac\n'
                                  f'exec {shutil.which("git")} "$@"\n')
        (shim / "git").chmod(0o755)
        env = dict(os.environ, PATH=f"{shim}:{os.environ['PATH']}", AIPM_ENABLE_MONITORING="false")
        proc = subprocess.run([sys.executable, "-m", "aipm", "--root", str(root), "run", "ORD", "--max-workers", "1"],
                              capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        statuses = {p.stem: yaml.safe_load(p.read_text()) for p in order.glob("*.yaml")}
        assert {t: s["status"] for t, s in statuses.items()} == {"A": "DONE", "B": "DONE", "C": "REJECTED"}
        assert statuses["C"]["reason"] == "scope: wrote stray.txt"
        assert (len(calls.read_text().splitlines()) if calls.exists() else 0) == expected_calls


def test_a_worker_that_cleans_the_runtime_directory_away_is_still_audited(repo):
    """`git clean -fdx` takes `.aipm/` (and the file that says where the attempt's audit starts) with it: the
    run's own window is kept in memory, so the stray write — and the untracked file the clean removed — are
    still named (what git ignores is not)."""
    # `;`: the clean may fail to remove a directory aipm writes in meanwhile (its logs); what counts is the audit
    order = _order(repo, {"SNEAKY": {"command": "git clean -fdxq; echo c > stray.txt && echo a > src/a.py",
                                     "target_files": ["src/"]}})
    (repo / "draft.txt").write_text("not committed yet\n")
    proc = subprocess.run([sys.executable, "-m", "aipm", "--root", str(repo), "run", "ORD",
                           "--no-resource-monitoring"], capture_output=True, text=True, timeout=120)
    task = yaml.safe_load((order / "SNEAKY.yaml").read_text())
    assert task["status"] == "REJECTED", proc.stdout + proc.stderr
    assert task["reason"] == "scope: wrote draft.txt, stray.txt"
    assert not (repo / "build").exists()  # ignored: cleaned away, and not charged


def test_adopted_audit_does_not_charge_what_a_task_that_just_ended_wrote(repo):
    """Without the events (an adopted attempt), a write counts as in the window when its inode changed up to
    CTIME_SLACK_NS before it opened: so the tasks that ended that recently may have written it. Here OTHER writes
    its target and ends, and SNEAKY's window opens a moment later; SNEAKY's audit, in a process without the
    watch, does not charge OTHER's file (and still charges its own stray write)."""
    from aipm.runtime import Runtime

    rt = Runtime(repo)
    rt.state.mkdir(parents=True, exist_ok=True)
    start = repo.parent / "state" / "SNEAKY.1.scope.json"
    subprocess.run(["sh", "-c", "echo o > other.txt"], cwd=repo, check=True)  # OTHER's work, just now
    writtenlog.note_written(rt, ["other.txt"])  # OTHER has ended
    with scope.watching(repo):
        assert scope.save_before(repo, start, lambda: None, ours=True)
    subprocess.run(["sh", "-c", "echo s > stray.txt"], cwd=repo, check=True)
    with scope.shared():  # its owner died: the next run has no window for it
        found = scope.findings(repo, start, lambda since_ns: ["src/", *writtenlog.written_since(rt, since_ns)])
    assert found == ["stray.txt"]


def test_a_watch_closed_at_exit_is_handed_to_a_child_that_ends_with_us(tmp_path):
    """Closing an inotify descriptor waits for a kernel grace period; `run` hands its watches to a child
    instead. The descriptor is closed here at once, the child holds the instance, and the child ends when the
    process that handed it over ends (it is never left behind)."""
    script = """
import os
from aipm.inotify import DirWatch, close_at_exit
from aipm.subreaper import children
watch = DirWatch.open(".")
close_at_exit(watch.fd)
try:
    os.fstat(watch.fd)
    print("still open here")
except OSError:
    pass
(child,) = children(os.getpid())
print(child, os.readlink(f"/proc/{child}/fd/3"), flush=True)
"""
    env = {k: v for k, v in os.environ.items() if k != "AIPM_TASK_ID"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    pid, held = proc.stdout.split()
    assert held == "anon_inode:inotify"

    def running() -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 30
    while running() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not running()


def test_inside_an_aipm_worker_a_watch_is_closed_here(tmp_path):
    """An aipm run that is itself some aipm's worker: a child it left behind would be reparented to that owner
    (a subreaper) and ended as a stray of the attempt, so it closes its watches itself."""
    script = """
import os
from aipm.inotify import DirWatch, close_at_exit
from aipm.subreaper import children
watch = DirWatch.open(".")
close_at_exit(watch.fd)
print(len(children(os.getpid())))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, AIPM_TASK_ID="T1"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0"]
