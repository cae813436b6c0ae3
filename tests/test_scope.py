"""Scope audit (issue 8 item 3): git status before/after a worker, compared with its target files."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from aipm.paths import normalize
from aipm.gitstatus import changed
from aipm.coverage import out_of_scope
from aipm.scope import load, save, snapshot
from aipm.writtenlog import WRITTEN_LOG
from conftest import capped_memory, state, task_statuses, wait_for, write_task

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    git(root, "config", "user.email", "t@example.com")
    git(root, "config", "user.name", "t")
    (root / "src").mkdir()
    (root / "src" / "a.py").write_text("a = 1\n")
    (root / "README.md").write_text("hello\n")
    (root / "tests").mkdir()
    (root / "tests" / "test_a.py").write_text("def test(): pass\n")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "init")
    return root


def targets(*raw: str, root: Path | None = None):
    return [normalize(r, str(root) if root else None) for r in raw]


def bump(path: Path, text: str) -> None:
    """Rewrite `path` and push its mtime forward, so the change is visible even on a coarse-clock filesystem."""
    st = path.stat()
    path.write_text(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_clean_repo_has_no_changes(repo):
    before = snapshot(repo)
    assert before == {}
    assert changed(before, snapshot(repo), str(repo)) == set()


def test_new_untracked_file_inside_a_target_dir_is_covered(repo):
    before = snapshot(repo)
    (repo / "src" / "pkg").mkdir()
    (repo / "src" / "pkg" / "new.py").write_text("x = 1\n")
    paths = changed(before, snapshot(repo), str(repo))
    assert paths == {"src/pkg/new.py"}  # every untracked file, not just its directory
    assert out_of_scope(paths, targets("src/")) == []
    assert out_of_scope(paths, targets("src/a.py")) == ["src/pkg/new.py"]


def test_write_outside_targets_is_named(repo):
    before = snapshot(repo)
    (repo / "src" / "a.py").write_text("a = 2\n")
    (repo / "README.md").write_text("changed\n")
    (repo / "stray.txt").write_text("oops\n")
    paths = changed(before, snapshot(repo), str(repo))
    assert paths == {"src/a.py", "README.md", "stray.txt"}
    assert out_of_scope(paths, targets("src/a.py")) == ["README.md", "stray.txt"]
    assert out_of_scope(paths, []) == ["README.md", "src/a.py", "stray.txt"]


def test_a_changed_name_with_pattern_characters_is_matched_against_a_glob_as_the_name_it_is(repo):
    """A changed file's `*`, `?` and `[` are characters of its name: `docs/a*.md` was read as a pattern against a
    glob target, so a task on `docs/*b.md` (which could meet it in `docs/ab.md`) wrote it unseen; and
    `docs/[draft].md` (read as a class) was outside the only target that names it, `docs/[[]draft].md`."""
    before = snapshot(repo)
    (repo / "docs").mkdir()
    for name in ("a*.md", "[draft].md", "q?.md"):
        (repo / "docs" / name).write_text("x\n")
    paths = changed(before, snapshot(repo), str(repo))
    assert paths == {"docs/a*.md", "docs/[draft].md", "docs/q?.md"}
    assert out_of_scope(paths, targets("docs/*b.md", "docs/?z.md", "docs/d.md")) == sorted(paths)
    assert out_of_scope(paths, targets("docs/a[*].md", "docs/[[]draft].md", "docs/q[?].md")) == []


def test_file_dirty_before_and_modified_again_is_seen(repo):
    (repo / "README.md").write_text("dirty before the worker\n")
    before = snapshot(repo)
    assert set(before) == {"README.md"}
    assert changed(before, snapshot(repo), str(repo)) == set()  # untouched since: not charged to the worker
    bump(repo / "README.md", "dirty before the worker, and written again\n")
    paths = changed(before, snapshot(repo), str(repo))
    assert paths == {"README.md"}
    assert out_of_scope(paths, targets("src/")) == ["README.md"]


def test_same_size_rewrite_is_seen_by_mtime(repo):
    (repo / "README.md").write_text("aaaa\n")
    before = snapshot(repo)
    bump(repo / "README.md", "bbbb\n")
    assert changed(before, snapshot(repo), str(repo)) == {"README.md"}


def test_deleted_file_is_changed(repo):
    before = snapshot(repo)
    (repo / "README.md").unlink()
    after = snapshot(repo)
    assert after == {"README.md": None}
    assert changed(before, after, str(repo)) == {"README.md"}
    assert out_of_scope({"README.md"}, targets("src/")) == ["README.md"]


def test_file_reverted_to_clean_is_changed(repo):
    (repo / "README.md").write_text("dirty\n")
    os.utime(repo / "README.md", ns=(0, 1_000_000_000))  # (so the checkout's write is seen on a coarse clock)
    before = snapshot(repo)
    git(repo, "checkout", "--", "README.md")
    assert changed(before, snapshot(repo), str(repo)) == {"README.md"}


def test_rename_names_both_paths(repo):
    before = snapshot(repo)
    git(repo, "mv", "README.md", "docs.md")
    paths = changed(before, snapshot(repo), str(repo))
    assert paths == {"README.md", "docs.md"}
    assert out_of_scope(paths, targets("docs.md")) == ["README.md"]


def test_runtime_dir_is_ignored(repo):
    before = snapshot(repo)
    (repo / ".aipm" / "logs").mkdir(parents=True)
    (repo / ".aipm" / "logs" / "T.1.log").write_text("log\n")
    (repo / ".aipm" / "records.json").write_text("{}\n")
    (repo / ".aipmx").write_text("not the runtime dir\n")
    assert changed(before, snapshot(repo), str(repo)) == {".aipmx"}


def test_not_a_git_repo_gives_none(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.py").write_text("x\n")
    assert snapshot(tmp_path / "plain") is None


def test_git_missing_gives_none(repo, monkeypatch):
    import aipm.gitstatus as gitstatus

    monkeypatch.setattr(gitstatus, "_PREFIXES", {})
    monkeypatch.setenv("PATH", "")
    assert snapshot(repo) is None


def test_root_in_a_subdirectory_of_the_work_tree(repo):
    sub = repo / "src"
    before = snapshot(sub)
    (repo / "README.md").write_text("outside the root: not our project\n")
    (sub / "b.py").write_text("b = 1\n")
    paths = changed(before, snapshot(sub), str(sub))
    assert paths == {"b.py"}  # relative to the root, not to the top of the work tree
    assert out_of_scope(paths, targets("b.py")) == []


def test_globs_and_directories_as_targets(repo):
    before = snapshot(repo)
    (repo / "tests" / "unit").mkdir()
    (repo / "tests" / "unit" / "test_b.py").write_text("x\n")
    (repo / "tests" / "test_a.py").write_text("changed\n")
    (repo / "tests" / "data.json").write_text("{}\n")
    (repo / "docs" / "guide").mkdir(parents=True)
    (repo / "docs" / "guide" / "intro.md").write_text("# hi\n")
    (repo / "src" / "a.py").write_text("a = 3\n")
    paths = changed(before, snapshot(repo), str(repo))
    assert paths == {"tests/unit/test_b.py", "tests/test_a.py", "tests/data.json", "docs/guide/intro.md",
                     "src/a.py"}
    allowed = targets("tests/**/*.py", "docs/", "src/*.py")
    assert out_of_scope(paths, allowed) == ["tests/data.json"]
    assert out_of_scope(paths, targets("docs", "tests/*.py", root=repo)) == ["src/a.py", "tests/data.json",
                                                                  "tests/unit/test_b.py"]
    assert out_of_scope(paths, targets("docs", "tests/*.py")) == sorted(paths - {"tests/test_a.py"})  # a file
    # Record.targets holds str(Target): directories end in "/"
    assert out_of_scope(paths, ["docs/", "tests/", "src/a.py"]) == []


def test_literal_path_with_glob_characters_is_not_a_pattern():
    assert out_of_scope({"a[1].py", "x*.py"}, targets("a1.py", "xy.py")) == ["a[1].py", "x*.py"]
    assert out_of_scope({"src/a[1].py"}, targets("src/*.py")) == []


def test_snapshot_survives_save_and_load(repo, tmp_path):
    (repo / "README.md").write_text("dirty\n")
    before = snapshot(repo)
    save(before, tmp_path / "state" / "before.json")
    loaded = load(tmp_path / "state" / "before.json")
    assert loaded == before
    assert changed(loaded, snapshot(repo), str(repo)) == set()
    (repo / "src" / "a.py").unlink()
    assert changed(loaded, snapshot(repo), str(repo)) == {"src/a.py"}
    assert load(tmp_path / "missing.json") is None
    assert loaded.head is not None and loaded.head == before.head
    # the form an aipm from before HEAD was kept saved (a dict): still read, without HEAD, not as "no audit"
    (tmp_path / "old.json").write_text(json.dumps(dict(before)))
    old = load(tmp_path / "old.json")
    assert old == before and old.head is None


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.parametrize("watch", [True, False], ids=["watch", "git"])
def test_run_fails_the_review_of_a_worker_that_writes_outside_its_targets(tmp_path, watch):
    import subprocess as sp
    import sys

    import yaml

    root = tmp_path / "repo"
    order = root / "orders" / "ORD"
    order.mkdir(parents=True)
    (root / "aipm.yaml").write_text(f"max_rework: 0\nscope_watch: {str(watch).lower()}\n")
    # One at a time: aipm cannot tell which of two concurrent workers wrote a file outside both their targets,
    # so it charges every task that was running then (fail closed).
    (order / "GOOD.yaml").write_text(yaml.safe_dump(
        {"command": "echo a > a.txt", "target_files": ["a.txt"], "priority": "P0"}))
    (order / "SNEAKY.yaml").write_text(yaml.safe_dump(
        {"command": "mkdir -p src && echo b > src/b.txt && echo c > c.txt", "target_files": ["src/"]}))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        sp.run(["git", *args], cwd=root, check=True)
    proc = sp.run([sys.executable, "-m", "aipm", "--root", str(root), "run", "ORD", "--no-resource-monitoring",
                   "--max-workers", "1", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    statuses = {p.stem: yaml.safe_load(p.read_text())["status"] for p in order.glob("*.yaml")}
    assert statuses == {"GOOD": "DONE", "SNEAKY": "REJECTED"}
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["scope"] for e in events if e.get("scope")] == [["c.txt"]]
    # The send-back says why, in the event and in the task file (not "exit 0", which is how the worker ended).
    assert [e["reason"] for e in events if e.get("scope")] == ["scope: wrote c.txt"]
    assert yaml.safe_load((order / "SNEAKY.yaml").read_text())["reason"] == "scope: wrote c.txt"
    feedback = root / ".aipm" / "feedback" / "ORD" / "SNEAKY.txt"
    assert "c.txt" in feedback.read_text() and "src/b.txt" not in feedback.read_text()


def test_a_class_in_a_glob_target_covers_its_members_only(repo):
    """`src/[ab].txt` covered `src/c.txt` too: a class was read as any character."""
    assert out_of_scope({"src/a.txt", "src/b.txt", "src/c.txt"}, targets("src/[ab].txt")) == ["src/c.txt"]
    assert out_of_scope({"src/a.txt", "src/c.txt"}, targets("src/[!a].txt")) == ["src/a.txt"]


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_run_sends_back_a_worker_that_writes_beside_its_class_target(tmp_path):
    import subprocess as sp
    import sys

    import yaml

    root = tmp_path / "repo"
    order = root / "orders" / "ORD"
    order.mkdir(parents=True)
    (root / "aipm.yaml").write_text("max_rework: 0\n")
    (order / "T.yaml").write_text(yaml.safe_dump(
        {"command": "mkdir -p src && echo b > src/b.txt && echo c > src/c.txt", "target_files": ["src/[ab].txt"]}))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        sp.run(["git", *args], cwd=root, check=True)
    proc = sp.run([sys.executable, "-m", "aipm", "--root", str(root), "run", "ORD", "--no-resource-monitoring",
                   "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["scope"] for e in events if e.get("scope")] == [["src/c.txt"]]
    assert yaml.safe_load((order / "T.yaml").read_text())["status"] == "REJECTED"


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.parametrize("order_at", ["orders/ORD", "."], ids=["orders", "root"])
def test_the_order_directory_allows_its_task_files_not_everything_in_it(tmp_path, order_at):
    """The audit allowed every order directory whole: a worker's notes file beside the task files passed, and
    an order directory at the root (`aipm run .`) allowed every path of the project."""
    import subprocess as sp
    import sys

    import yaml

    root = tmp_path / "repo"
    order = root / order_at
    order.mkdir(parents=True, exist_ok=True)
    (root / "aipm.yaml").write_text("max_rework: 0\n")
    (root / "README.md").write_text("readme\n")
    stray = "notes.txt" if order_at == "." else f"{order_at}/notes.txt"
    (order / "T.yaml").write_text(yaml.safe_dump(
        {"command": f"echo a > a.txt && echo n > {stray} && echo more >> README.md", "target_files": ["a.txt"]}))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        sp.run(["git", *args], cwd=root, check=True)
    proc = sp.run([sys.executable, "-m", "aipm", "--root", str(root), "run", str(order), "--no-resource-monitoring",
                   "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert yaml.safe_load((order / "T.yaml").read_text())["status"] == "REJECTED"
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["scope"] for e in events if e.get("scope")] == [sorted(["README.md", stray])]


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.parametrize("watch", [True, False], ids=["watch", "git"])
def test_a_write_outside_the_targets_that_the_worker_commits_is_still_found(tmp_path, watch):
    """`git status` is clean again after `git commit -a`: the audit by snapshots (launch, scope_watch: false)
    passed such a worker. The commits since the attempt's start count as its writes."""
    import subprocess as sp
    import sys

    import yaml

    root = tmp_path / "repo"
    order = root / "orders" / "ORD"
    order.mkdir(parents=True)
    (root / "aipm.yaml").write_text(f"max_rework: 0\nscope_watch: {str(watch).lower()}\n")
    (root / "README.md").write_text("readme\n")
    (order / "T.yaml").write_text(yaml.safe_dump({
        "command": "echo a > a.txt && echo more >> README.md && git add README.md && "
                   "git -c user.name=w -c user.email=w@w commit -qm agent README.md",
        "target_files": ["a.txt"]}))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        sp.run(["git", *args], cwd=root, check=True)
    proc = sp.run([sys.executable, "-m", "aipm", "--root", str(root), "run", "ORD", "--no-resource-monitoring",
                   "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert yaml.safe_load((order / "T.yaml").read_text())["status"] == "REJECTED"
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["scope"] for e in events if e.get("scope")] == [["README.md"]]


def _counting_git(tmp_path: Path) -> tuple[dict, Path]:
    """A `git` first on PATH that logs each `status` call and runs the real git."""
    shim = tmp_path / "shim"
    shim.mkdir()
    calls = tmp_path / "git-status-calls"
    (shim / "git").write_text(f'#!/bin/sh\ncase " $* " in *" status "*) echo x >> {calls};; esac\n'
                              f'exec {shutil.which("git")} "$@"\n')
    (shim / "git").chmod(0o755)
    return dict(os.environ, PATH=f"{shim}:{os.environ['PATH']}", AIPM_ENABLE_MONITORING="false"), calls


@pytest.mark.parametrize("confined", [False, True])
def test_one_snapshot_per_wake_up_and_none_for_confined_tasks(tmp_path, confined):
    """Auditing with `git status` (`scope_watch: false`), a chain A → B → C: the snapshot after A is the one
    before B (and so on): 4 `git status`, not 6.
    Confined tasks (where the kernel has Landlock) need none: the kernel held them to their targets."""
    import subprocess as sp
    import sys

    import yaml

    from aipm import landlock

    if confined and landlock.unavailable():
        pytest.skip(f"kernel without usable Landlock: {landlock.unavailable()}")
    root = tmp_path / "repo"
    order = root / "orders" / "ORD"
    order.mkdir(parents=True)
    (root / "aipm.yaml").write_text(f"confine: {str(confined).lower()}\nscope_watch: false\n")
    for tid, dep in (("A", None), ("B", "A"), ("C", "B")):
        (order / f"{tid}.yaml").write_text(yaml.safe_dump(
            {"command": f"echo {tid} > {tid}.txt", "target_files": [f"{tid}.txt"], "depends_on": [dep] if dep else []}))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        sp.run(["git", *args], cwd=root, check=True)
    env, calls = _counting_git(tmp_path)
    proc = sp.run([sys.executable, "-m", "aipm", "--root", str(root), "run", "ORD", "--max-workers", "1"],
                  capture_output=True, text=True, timeout=120, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {p.stem: (root / f"{p.stem}.txt").read_text() for p in order.glob("*.yaml")} == {
        "A": "A\n", "B": "B\n", "C": "C\n"}
    count = len(calls.read_text().splitlines()) if calls.exists() else 0
    assert count == (0 if confined else 4)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.parametrize("how", ["run", "run with git status", "launch"])
def test_a_task_that_started_and_ended_within_anothers_run_is_not_charged_to_it(tmp_path, how):
    """LONG runs while SHORT starts after it and ends before it, writing only its own target: SHORT's write shows
    up in LONG's audit, and it was charged to LONG (scope: wrote short/...) because SHORT's record was gone by then.
    Every task that ran at any moment between LONG's two snapshots may write its targets."""
    import subprocess as sp
    import sys
    import time

    import yaml

    root = tmp_path / "repo"
    order = root / "orders" / "ORD"
    order.mkdir(parents=True)
    (root / "aipm.yaml").write_text("max_rework: 0\nmax_workers: 2\nenable_monitoring: false\n"
                                    f"scope_watch: {str(how == 'run').lower()}\n")
    tasks = {
        "FIRST": {"command": "echo 1 > first.txt", "target_files": ["first.txt"], "priority": "P0"},
        # SHORT starts only once FIRST is finished, i.e. after LONG's "before" snapshot.
        "SHORT": {"command": "mkdir -p short && echo s > short/out.txt && touch short/done",
                  "target_files": ["short/"], "depends_on": ["FIRST"]},
        "LONG": {"command": "until [ -e short/done ]; do sleep 0.02; done; echo l > long.txt",
                 "target_files": ["long.txt"], "priority": "P0"},
    }
    for tid, body in tasks.items():
        (order / f"{tid}.yaml").write_text(yaml.safe_dump(body))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        sp.run(["git", *args], cwd=root, check=True)
    aipm = [sys.executable, "-m", "aipm", "--root", str(root)]

    def statuses() -> dict:
        return {p.stem: yaml.safe_load(p.read_text()).get("status") for p in order.glob("*.yaml")}

    if how != "launch":
        proc = sp.run([*aipm, "run", "ORD"], capture_output=True, text=True, timeout=120)
        out = proc.stdout + proc.stderr
    else:
        proc = sp.run([*aipm, "launch", "ORD"], capture_output=True, text=True, timeout=120)
        out = proc.stdout + proc.stderr
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(s in ("DONE", "REJECTED", "FAILED") for s in statuses().values()):
            time.sleep(0.05)
    assert statuses() == {"FIRST": "DONE", "SHORT": "DONE", "LONG": "DONE"}, (out, {
        p.stem: yaml.safe_load(p.read_text()).get("reason") for p in order.glob("*.yaml")})
    assert (root / "long.txt").read_text() == "l\n" and (root / "short" / "out.txt").read_text() == "s\n"


def test_the_written_log_is_cut_to_what_an_audit_in_flight_may_need(tmp_path, monkeypatch):
    """note_ended appends; past its size limit the log keeps the lines newer than the oldest saved snapshot of a
    live record (and the grace period), so it stays small however many tasks end."""
    import time

    from aipm import scope, writtenlog
    from aipm.record import Record
    from aipm.runtime import Runtime

    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    rt = Runtime(root)
    rt.state.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(writtenlog, "WRITTEN_LOG_BYTES", 2000)
    monkeypatch.setattr(writtenlog, "WRITTEN_LOG_GRACE_NS", 0)
    old = time.time_ns() - 10**12
    (rt.state / writtenlog.WRITTEN_LOG).write_text("".join(f"{old + i} [\"old/{i}\"]\n" for i in range(100)))
    log_dir = root / ".aipm" / "logs"
    log_dir.mkdir(parents=True)
    live = Record(order="O", order_dir=str(root), task="L", task_file=str(root / "L.yaml"), attempt=1,
                  targets=["l.txt"], log=str(log_dir / "L.1.log"), exit_file="x", started_at="")
    taken = time.time_ns()
    snap = scope.Snapshot()
    snap.taken_ns = taken
    scope.save(snap, Path(live.scope_file))
    rt.write_record(live)
    ended = Record(order="O", order_dir=str(root), task="E", task_file=str(root / "E.yaml"), attempt=1,
                   targets=["e.txt"], log=str(log_dir / "E.1.log"), exit_file="y", started_at="")
    writtenlog.note_ended(rt, ended)
    noted = ["e.txt", "*.yaml", ".*.tmp"]  # its targets, and its order's task files (the order is the root here)
    assert list(map(str, writtenlog.written_since(rt, taken))) == noted
    assert list(map(str, writtenlog.written_since(rt, 0))) == noted  # the 100 old lines were cut


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_a_killed_runs_output_is_charged_to_another_orders_worker_that_writes_it(tmp_path):
    """`aipm run O1 > run.log`, killed (SIGKILL) while its worker runs on: its record still notes run.log as its
    owner's output, but no aipm writes it any more. A worker of another run that appends to it is charged (it was
    excused by that record's note, whoever the audited attempt was)."""
    import signal

    root = tmp_path / "repo"
    gate = tmp_path / "gate"  # outside the tree: no write of the test's is audited
    root.mkdir()
    (root / "aipm.yaml").write_text("max_rework: 0\n")
    write_task(root / "orders" / "O1", "T", command=f"until [ -e {shlex.quote(str(gate))} ]; do sleep 0.02; done",
               target_files=["t.txt"])
    write_task(root / "orders" / "O2", "U", command="echo u >> run.log; echo u > u.txt", target_files=["u.txt"])
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=root, check=True)
    aipm = [sys.executable, "-m", "aipm", "--root", str(root), "run"]
    try:
        with open(root / "run.log", "w") as out:
            first = subprocess.Popen([*aipm, "O1", "--no-resource-monitoring"], stdout=out, stderr=subprocess.STDOUT,
                                     cwd=root, start_new_session=True)
        wait_for(lambda: "start    T" in (root / "run.log").read_text(), timeout=60)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        assert "run.log" in (state(root) / "workers" / "O1" / "T.json").read_text()  # its owner's output, noted
        second = subprocess.run([*aipm, "O2", "--no-resource-monitoring"], capture_output=True, text=True, cwd=root,
                                timeout=120, start_new_session=True)
        assert "scope: wrote run.log" in second.stdout, second.stdout + second.stderr
        assert task_statuses(root / "orders" / "O2") == {"U": "REJECTED"}
    finally:
        gate.touch()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.parametrize("command", ["run", "exec"])
def test_a_runs_output_is_noted_after_its_last_line(tmp_path, command):
    """Other runs' audits excuse a run's output file by its notes made in their windows (writtenlog.outputs_since):
    its last note must come after its last line, or a window opened in between saw run2.log change with no
    note (the note was made at the end of the loop, before the closing lines)."""
    from aipm.statedir import state_dir
    from aipm.writtenlog import WRITTEN_LOG

    root = tmp_path / "repo"
    root.mkdir()
    write_task(root / "orders" / "O2", "B", command="echo b > b.txt", target_files=["b.txt"])
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=root, check=True)
    with open(root / "run2.log", "w") as out:
        subprocess.run([sys.executable, "-m", "aipm", "--root", str(root), command,
                        "O2" if command == "run" else "B", "--no-resource-monitoring"], stdout=out,
                       stderr=subprocess.STDOUT, cwd=root, timeout=120, check=True)
    said = (root / "run2.log").read_text()
    assert "DONE" in said.splitlines()[-1], said  # (its closing line)
    notes = [line.split(" ", 1) for line in (state_dir(root) / WRITTEN_LOG).read_text().splitlines()]
    last = max(int(stamp) for stamp, note in notes if "run2.log" in json.loads(note).get("output", [[""]])[0][0])
    assert last >= (root / "run2.log").stat().st_mtime_ns


def test_only_output_notes_as_aipm_writes_them_excuse_a_file(tmp_path):
    """outputs_since takes what _note wrote ([path, device, inode] lists, at or after the time asked) and nothing
    a worker could leave in the state directory's log in another shape."""
    import time

    from aipm import writtenlog
    from aipm.runtime import Runtime

    root = tmp_path / "repo"
    root.mkdir()
    rt = Runtime(root)
    rt.state.mkdir(parents=True, exist_ok=True)
    now = time.time_ns()
    lines = [(now - 10, {"output": [["old.log", 1, 2]]}), (now, {"output": [["run2.log", 3, 4], ["run2.log", 3, 4]]}),
             (now, {"output": [["a.log", "3", 4], ["b.log", 3], "c.log", ["d.log", 3, 4.0], [5, 3, 4]]}),
             (now, {"output": "e.log"}), (now, [["f.log", 3, 4]]), (now, {"targets": ["g.txt"]})]
    deep = f"{now} {'[' * 200_000}\n"  # deeper than the JSON parser goes: a RecursionError, not a note
    text = "".join(f"{t} {json.dumps(e)}\n" for t, e in lines) + "x y\n" + deep
    (rt.state / writtenlog.WRITTEN_LOG).write_text(text)
    assert writtenlog.outputs_since(rt, now) == [["run2.log", 3, 4]]
    assert "g.txt" in [str(t) for t in writtenlog.written_since(rt, now)]  # (read past the deep line too)
    assert writtenlog.outputs_since(rt, 0) == [["old.log", 1, 2], ["run2.log", 3, 4]]


def test_a_file_held_for_writing_in_a_session_a_worker_leads_is_no_owners_output(tmp_path):
    """The files another aipm's session writes are its output, unless a worker leads that session (an aipm that a
    worker's command started writes where that worker does): there they are still charged."""
    from aipm import ownoutput

    root = tmp_path / "repo"
    root.mkdir()
    holder = subprocess.Popen(["sh", "-c", "exec 3>>held.log; echo ready; exec sleep 30"], cwd=root,
                              stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert holder.stdout.readline() == b"ready\n"
        assert ownoutput.not_own_output(root, ["held.log", "other.log"], [], owners=[holder.pid]) == ["other.log"]
        assert ownoutput.not_own_output(root, ["held.log"], [], owners=[holder.pid], workers={holder.pid}) == [
            "held.log"]
        assert ownoutput.not_own_output(root, ["held.log"], []) == ["held.log"]  # (not this process's session)
    finally:
        holder.kill()
        holder.wait()


def test_the_written_log_is_never_appended_or_cut_through_a_link_a_worker_left(tmp_path, monkeypatch):
    """The written log is in the state directory, which any unconfined worker can write: a link at its name had
    each ended attempt's line appended to the file it led to, and one at the fixed temp name of its cut
    (`written.log.tmp`) had that file truncated and written with the log."""
    import time

    from aipm import writtenlog
    from aipm.runtime import Runtime

    root = tmp_path / "repo"
    root.mkdir()
    rt = Runtime(root)
    rt.state.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(writtenlog, "WRITTEN_LOG_BYTES", 2000)
    log = rt.state / writtenlog.WRITTEN_LOG
    victims = {name: tmp_path / name for name in ("appended.txt", "cut.txt")}
    for victim in victims.values():
        victim.write_text("the user's\n")
    log.symlink_to(victims["appended.txt"])
    writtenlog.note_written(rt, ["a.txt"])
    log.unlink()
    log.write_text("".join(f"{time.time_ns()} [\"old/{i}\"]\n" for i in range(100)))
    log.with_name(log.name + ".tmp").symlink_to(victims["cut.txt"])
    writtenlog.note_written(rt, ["b.txt"])
    assert {name: victim.read_text() for name, victim in victims.items()} == {
        "appended.txt": "the user's\n", "cut.txt": "the user's\n"}
    assert str(writtenlog.written_since(rt, 0)[-1]) == "b.txt"


def test_a_sparse_terabyte_a_worker_left_as_the_written_log_is_not_read(project):
    """The written log is in the state directory, which any unconfined worker can write: a sparse terabyte there
    (`truncate -s 1T`) was read whole when the next attempt ended, a MemoryError traceback that ended the run. It
    is no log of aipm's: none, and written anew."""
    from aipm.statedir import state_dir
    from aipm.writtenlog import WRITTEN_LOG

    log = state_dir(project.root) / WRITTEN_LOG
    write_task(project.order(), "A", command=f"truncate -s 1T {shlex.quote(str(log))}", target_files=["a.txt"])
    write_task(project.order(), "B", command="echo b > b.txt", target_files=["b.txt"], depends_on=["A"])
    git(project.root, "init", "-q")
    proc = project.aipm("run", "ORD", "--max-workers", "1", timeout=60, preexec_fn=capped_memory)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert task_statuses(project.order()) == {"A": "DONE", "B": "DONE"}
    assert log.stat().st_size < 1 << 20


def test_a_line_a_worker_wrote_in_the_written_log_excuses_nothing_and_stops_nothing(project):
    """The written log is in the state directory, which any unconfined worker can write: a line there naming no
    target (`../x`, "") stopped `aipm run` with a PathError traceback at the next audit. It excuses nothing."""
    from aipm.statedir import state_dir
    from aipm.writtenlog import WRITTEN_LOG

    (project.root / "aipm.yaml").write_text("max_rework: 0\n")
    log = shlex.quote(str(state_dir(project.root) / WRITTEN_LOG))
    lines = ['99999999999999999999 ["../x", "", "/etc"]', '99999999999999999999 {"files": 7}']
    write_task(project.order(), "A", target_files=["a.txt"], command="".join(
        f"echo {shlex.quote(line)} >> {log}; " for line in lines) + "echo a > a.txt; echo x > b.txt")
    git(project.root, "init", "-q")
    proc = project.aipm("run", "ORD", timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert task_statuses(project.order()) == {"A": "REJECTED"} and "(scope: wrote b.txt)" in proc.stdout, proc.stdout


def test_a_sparse_terabyte_a_worker_left_as_its_snapshot_is_not_read_and_its_audit_still_holds(project):
    """The snapshot an attempt's audit starts from lies beside its log, where its worker can write: a sparse
    terabyte there (`truncate -s 1T`) was read whole by the audit, a MemoryError traceback that ended the run. It
    is no snapshot, as one the worker removed: the audit goes by what git shows written since the attempt began."""
    (project.root / "aipm.yaml").write_text("scope_watch: false\nmax_rework: 0\n")
    write_task(project.order(), "A", target_files=["a.txt"],
               command='truncate -s 1T "${AIPM_LOG%.log}.scope.json"; echo a > a.txt; echo x > stray.txt')
    git(project.root, "init", "-q")
    proc = project.aipm("run", "ORD", timeout=60, preexec_fn=capped_memory)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert task_statuses(project.order()) == {"A": "REJECTED"} and "stray.txt" in proc.stdout, proc.stdout


def test_a_prefetched_snapshot_is_read_at_its_first_use_and_one_never_read_leaves_no_git_behind(repo):
    """`prefetch` starts git now; the snapshot, read later, is the tree as git saw it from its start. Inside one
    shared block it is the one every later snapshot() of the root returns; a prefetch nobody read is ended with
    the block (no git left running, no zombie)."""
    from aipm import scope

    with scope.shared():
        scope.prefetch(repo)
        pids = scope.running_pids()
        assert len(pids) == 1
        first = scope.snapshot(repo)
        assert scope.running_pids() == set() and scope.snapshot(repo) is first
    assert first == {} and first.taken_ns > 0
    (repo / "new.txt").write_text("x\n")
    with scope.shared():
        scope.prefetch(repo)
        (pid,) = scope.running_pids()
    assert scope.running_pids() == set()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped already
    assert set(snapshot(repo)) == {"new.txt"}


def test_a_lone_task_is_audited_even_when_git_is_slower_than_its_end(tmp_path):
    """`run` starts the audit's `git status` before it reaps a task that ended and ends what the task left
    running. With one task and a slow git, that git is still running then: it is ours, not a stray of the
    attempt, so the audit still sees the write outside the targets and names it."""
    import subprocess as sp
    import sys

    import yaml

    root = tmp_path / "repo"
    order = root / "orders" / "ORD"
    order.mkdir(parents=True)
    (root / "aipm.yaml").write_text("max_rework: 0\nscope_watch: false\n")
    (order / "SNEAKY.yaml").write_text(yaml.safe_dump(
        {"command": "echo a > a.txt && echo c > c.txt", "target_files": ["a.txt"]}))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        sp.run(["git", *args], cwd=root, check=True)
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "git").write_text(f'#!/bin/sh\ncase " $* " in *" status "*) sleep 1;; esac\n'
                              f'exec {shutil.which("git")} "$@"\n')
    (shim / "git").chmod(0o755)
    env = dict(os.environ, PATH=f"{shim}:{os.environ['PATH']}", AIPM_ENABLE_MONITORING="false")
    proc = sp.run([sys.executable, "-m", "aipm", "--root", str(root), "run", "ORD", "--max-workers", "1", "--json"],
                  capture_output=True, text=True, timeout=120, env=env, cwd=root)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert yaml.safe_load((order / "SNEAKY.yaml").read_text())["status"] == "REJECTED"
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["scope"] for e in events if e.get("scope")] == [["c.txt"]]


def test_a_before_saved_while_its_snapshot_is_taken_waits_for_the_round_and_a_failed_save_refuses(repo, tmp_path):
    """save_before() with a prefetch in flight: nothing is saved until the round's durable point (where the
    task's go waits too), then the complete snapshot is; a save that fails then calls refuse() (the task must
    not begin), instead of letting it run without a "before"."""
    from aipm import durable, scope

    (repo / "dirty.txt").write_text("x\n")
    good, bad = tmp_path / "logs" / "a.scope.json", repo / "README.md" / "b.scope.json"  # under a file: fails
    refused = []
    with scope.shared():
        scope.prefetch(repo)
        with durable.batch():
            assert scope.save_before(repo, good, lambda: refused.append("good"))
            assert scope.save_before(repo, bad, lambda: refused.append("bad"))
            assert not good.exists() and refused == []
        assert set(load(good)) == {"dirty.txt"} and refused == ["bad"]
    assert scope.running_pids() == set()
    # Without a prefetch in flight it is saved at once, and a failure raises (the launch fails and is undone).
    assert scope.save_before(repo, tmp_path / "c.scope.json", lambda: refused.append("c"))
    assert set(load(tmp_path / "c.scope.json")) == {"dirty.txt"}
    with pytest.raises(OSError):
        scope.save_before(repo, bad, lambda: refused.append("c"))
    assert refused == ["bad"]


def _run_json(root: Path, env: dict, workers: int) -> tuple[int, list[dict]]:
    import subprocess as sp
    import sys

    proc = sp.run([sys.executable, "-m", "aipm", "--root", str(root), "run", "ORD", "--max-workers", str(workers),
                   "--json"], capture_output=True, text=True, timeout=180, env=env, cwd=root)
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _git_repo_order(tmp_path: Path, tasks: dict, settings: str = "max_rework: 0\n") -> Path:
    import yaml

    root = tmp_path / "repo"
    order = root / "orders" / "ORD"
    order.mkdir(parents=True)
    (root / "aipm.yaml").write_text(settings)
    for tid, body in tasks.items():
        (order / f"{tid}.yaml").write_text(yaml.safe_dump(body))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=root, check=True)
    return root


@pytest.mark.parametrize("mode", ["watch", "git", "slow git"])
def test_an_independent_task_starts_before_the_audit_of_the_one_that_ended_and_neither_is_misjudged(
        tmp_path, mode):
    """One worker slot. FIRST (honest) ends; NEXT, which does not depend on it, starts in the same wake-up before
    FIRST's audit and outcome (its "started" comes before FIRST's "finished"), and writes outside its targets at
    once. Its go waits for the snapshot it starts from — with a git that takes a second too — so that snapshot
    holds none of its writes: NEXT is sent back naming the path, and FIRST, whose audit reads the same snapshot,
    is not charged with NEXT's write."""
    import yaml

    root = _git_repo_order(tmp_path, {
        "FIRST": {"command": "echo 1 > first.txt", "target_files": ["first.txt"], "priority": "P0"},
        "NEXT": {"command": "echo x > stray.txt && echo 2 > next.txt", "target_files": ["next.txt"]},
    }, f"max_rework: 0\nscope_watch: {str(mode == 'watch').lower()}\n")
    env = dict(os.environ, AIPM_ENABLE_MONITORING="false")
    if mode == "slow git":
        shim = tmp_path / "shim"
        shim.mkdir()
        (shim / "git").write_text(f'#!/bin/sh\ncase " $* " in *" status "*) sleep 1;; esac\n'
                                  f'exec {shutil.which("git")} "$@"\n')
        (shim / "git").chmod(0o755)
        env["PATH"] = f"{shim}:{env['PATH']}"
    code, events = _run_json(root, env, 1)
    assert code == 1
    order = root / "orders" / "ORD"
    statuses = {p.stem: yaml.safe_load(p.read_text())["status"] for p in order.glob("*.yaml")}
    assert statuses == {"FIRST": "DONE", "NEXT": "REJECTED"}
    assert [(e["task"], e["scope"]) for e in events if e.get("scope")] == [("NEXT", ["stray.txt"])]
    at = {(e["event"], e.get("task")): e["time"] for e in events if e["event"] in ("started", "finished")}
    assert at[("started", "NEXT")] < at[("finished", "FIRST")], at


@pytest.mark.parametrize("watch", [True, False], ids=["watch", "git"])
def test_honest_concurrent_work_started_early_is_never_charged(tmp_path, watch):
    """Twelve independent tasks on two slots in a git repository, each writing only its own file in one shared
    directory: every wake-up starts the next before the audit of the one that ended. None is charged with
    another's write."""
    import yaml

    tasks = {f"T{i:02d}": {"command": f"mkdir -p out && echo {i} > out/{i}.txt && sleep 0.0{i % 3}",
                           "target_files": [f"out/{i}.txt"]} for i in range(12)}
    root = _git_repo_order(tmp_path, tasks, f"max_rework: 0\nscope_watch: {str(watch).lower()}\n")
    code, events = _run_json(root, dict(os.environ, AIPM_ENABLE_MONITORING="false"), 2)
    assert code == 0, events
    assert [e for e in events if e.get("scope")] == []
    order = root / "orders" / "ORD"
    assert {yaml.safe_load(p.read_text())["status"] for p in order.glob("*.yaml")} == {"DONE"}
    assert sorted((root / "out").iterdir()) == sorted(root / "out" / f"{i}.txt" for i in range(12))


def test_an_early_start_keeps_the_plans_order_for_what_the_ended_task_makes_launchable(tmp_path):
    """One slot. When FIRST ends, its P0 dependant URGENT outranks the independent P3 LATER, and FIRST's first
    attempt fails (it is retried, and ranks before LATER too): neither loses its turn to LATER because the
    outcome was not recorded yet when LATER could have started early. Every task ends DONE, in rank order."""
    import yaml

    root = _git_repo_order(tmp_path, {
        "FIRST": {"command": "test -e tried || { touch tried; exit 1; }; echo 1 > first.txt",
                  "target_files": ["first.txt", "tried"], "priority": "P1", "max_attempts": 2},
        "URGENT": {"command": "echo u > urgent.txt", "target_files": ["urgent.txt"], "priority": "P0",
                   "depends_on": ["FIRST"]},
        "LATER": {"command": "echo l > later.txt", "target_files": ["later.txt"], "priority": "P3"},
    })
    code, events = _run_json(root, dict(os.environ, AIPM_ENABLE_MONITORING="false"), 1)
    assert code == 0, events
    started = [(e["task"], e["attempt"]) for e in events if e["event"] == "started"]
    assert started == [("FIRST", 1), ("FIRST", 2), ("URGENT", 1), ("LATER", 1)]
    order = root / "orders" / "ORD"
    assert {yaml.safe_load(p.read_text())["status"] for p in order.glob("*.yaml")} == {"DONE"}


def test_a_stopped_attempt_is_noted_once_in_the_written_log(repo):
    """Ctrl-C re-queues each running task (interrupt notes its end) and drops its record: one line each."""
    import signal
    import sys
    import time

    import yaml

    from aipm import writtenlog
    from aipm.runtime import Runtime

    order = repo / "orders" / "ORD"
    order.mkdir(parents=True)
    for i in range(2):
        (order / f"S{i}.yaml").write_text(yaml.safe_dump({"command": f"touch started{i}; sleep 60",
                                                          "target_files": [f"out{i}.txt"]}))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "order")
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(repo), "run", "ORD",
                            "--no-resource-monitoring"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not all((repo / f"started{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=60) == 130
    lines = (Runtime(repo).state / writtenlog.WRITTEN_LOG).read_text().splitlines()
    noted = sorted((json.loads(line.split(" ", 1)[1]) for line in lines), key=lambda e: e["task"])
    began = [e.pop("began") for e in noted]
    assert all(type(b) is int and b > 0 for b in began), lines
    # which attempt it was, and its targets, for a commit's notice (writtenlog.ended_since)
    assert noted == [{"order": "orders/ORD", "targets": ["out0.txt"], "task": "ORD/S0", "targets_of": ["out0.txt"]},
                     {"order": "orders/ORD", "targets": ["out1.txt"], "task": "ORD/S1", "targets_of": ["out1.txt"]}], lines


def test_an_audited_attempt_killed_by_a_signal_keeps_its_status(repo):
    """In a git tree the ended attempt's group is cleared before the audit's snapshot, and its leader is reaped
    there, before its outcome is recorded: the signal that ended it must still be the outcome."""
    import sys

    import yaml

    order = repo / "orders" / "ORD"
    order.mkdir(parents=True)
    # The whole group, the wrapper too (SIGKILL: a SIGTERM waits for the command): no exit file, only the
    # wrapper's wait status tells the signal.
    (order / "SIG.yaml").write_text(yaml.safe_dump({"command": "kill -KILL 0", "target_files": ["sig.txt"],
                                                    "max_attempts": 1}))
    (order / "OK.yaml").write_text(yaml.safe_dump({"command": "echo x > ok.txt", "target_files": ["ok.txt"]}))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "order")
    proc = subprocess.run([sys.executable, "-m", "aipm", "--root", str(repo), "run", "ORD", "--no-resource-monitoring",
                           "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    tasks = {p.stem: yaml.safe_load(p.read_text()) for p in order.glob("*.yaml")}
    assert (tasks["SIG"]["status"], tasks["SIG"]["exit_code"], tasks["SIG"]["reason"]) == (
        "FAILED", -9, "killed by SIGKILL"), tasks["SIG"]
    assert (tasks["OK"]["status"], tasks["OK"]["exit_code"]) == ("DONE", 0)


@pytest.mark.parametrize("watch", [True, False], ids=["watch", "git"])
def test_a_run_of_another_order_ending_a_task_meanwhile_is_not_charged(tmp_path, watch):
    """Two `run`s of two orders in one tree: B's outcome is written in O2's task file during A's attempt, and
    B's record is gone by A's audit, which then charged A with `orders/O2/B.yaml`. An ended attempt's order
    files are noted in the written log with its targets."""
    import yaml

    root = _git_repo_order(tmp_path, {"A": {"command": "sleep 2; echo a > a.txt", "target_files": ["a.txt"]}},
                           f"max_rework: 0\nscope_watch: {str(watch).lower()}\n")
    o2 = root / "orders" / "O2"
    o2.mkdir()
    (o2 / "B.yaml").write_text(yaml.safe_dump({"command": "echo b > b.txt", "target_files": ["b.txt"]}))
    env = dict(os.environ, AIPM_ENABLE_MONITORING="false")
    first = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(root), "run", "ORD"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    a_file = root / "orders" / "ORD" / "A.yaml"
    wait_for(lambda: yaml.safe_load(a_file.read_text()).get("status") == "IN_PROGRESS", timeout=30)
    second = subprocess.run([sys.executable, "-m", "aipm", "--root", str(root), "run", "O2"], env=env,
                            capture_output=True, text=True, timeout=60)
    out, err = first.communicate(timeout=60)
    assert second.returncode == 0 and first.returncode == 0, out + err + second.stdout + second.stderr
    assert yaml.safe_load(a_file.read_text())["status"] == "DONE"


def test_an_order_directory_reached_through_a_symlink_allows_its_task_files_by_their_real_path(tmp_path):
    """`orders -> real`: git names `real/ORD/A.yaml`, the allow-list named `orders/ORD/*.yaml`, and every task
    was sent back for its own status writes."""
    import yaml

    root = tmp_path / "repo"
    order = root / "real" / "ORD"
    order.mkdir(parents=True)
    (root / "orders").symlink_to("real")
    (root / "aipm.yaml").write_text("max_rework: 0\n")
    (order / "A.yaml").write_text(yaml.safe_dump({"command": "echo a > a.txt", "target_files": ["a.txt"]}))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=root, check=True)
    proc = subprocess.run([sys.executable, "-m", "aipm", "--root", str(root), "run", "ORD"], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, AIPM_ENABLE_MONITORING="false"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert yaml.safe_load((order / "A.yaml").read_text())["status"] == "DONE"


@pytest.mark.parametrize("watch", [True, False], ids=["watch", "git"])
@pytest.mark.parametrize("orders_dir, order_dir, lookalike", [
    ("or\\ders", "ORD", "or/ders/ORD/X.yaml"), ("orders", "O[1]", "orders/O1/X.yaml"), ("or*", "O?", "orx/OX/X.yaml")],
    ids=["backslash", "class", "star"])
def test_an_order_directory_is_excused_by_its_exact_name(tmp_path, watch, orders_dir, order_dir, lookalike):
    """The task files aipm writes were excused by their order directory read as a target a person writes: a
    backslash in it (`orders_dir: "or\\\\ders"`) was refused, so nothing excused them and every task was charged
    with its own task file; `O[1]` excused orders/O1/ and not itself; `or*/O?` excused every orx/OX/."""
    import yaml

    root = tmp_path / "repo"
    order = root / orders_dir / order_dir
    order.mkdir(parents=True)
    (root / "aipm.yaml").write_text(f"max_rework: 0\norders_dir: {json.dumps(orders_dir)}\n"
                                    f"scope_watch: {str(watch).lower()}\n")
    (order / "order.yaml").write_text("id: ORD\n")
    (order / "T.yaml").write_text(yaml.safe_dump({
        "command": f"echo a > a.txt && mkdir -p {shlex.quote(os.path.dirname(lookalike))} && "
                   f"echo x > {shlex.quote(lookalike)}", "target_files": ["a.txt"]}))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=root, check=True)
    code, events = _run_json(root, dict(os.environ, AIPM_ENABLE_MONITORING="false"), 5)
    assert code == 1 and [e["scope"] for e in events if e.get("scope")] == [[lookalike]], events
    assert yaml.safe_load((order / "T.yaml").read_text())["status"] == "REJECTED"


@pytest.mark.parametrize("o3_dir", ["O3", "O[3]"])
@pytest.mark.parametrize("steer", ["cancel", "retry"])
def test_a_cancel_or_retry_in_another_order_during_an_attempt_is_not_charged(tmp_path, steer, o3_dir):
    """`aipm cancel`/`retry` write a task file of an order no one runs: the audit of an attempt running then
    charged it with that file (a rework, an extra attempt). They note it in the written log, as an ended
    attempt does: its order directory by its exact name (`O[3]` was read back as a pattern that covers O3/)."""
    import yaml

    root = _git_repo_order(tmp_path, {"A": {"command": "sleep 2; echo a > a.txt", "target_files": ["a.txt"]}})
    o3 = root / "orders" / o3_dir
    o3.mkdir()
    (o3 / "order.yaml").write_text("id: O3\n")
    (o3 / "X.yaml").write_text(yaml.safe_dump({"command": "true", "target_files": ["x.txt"],
                                               **({"status": "FAILED"} if steer == "retry" else {})}))
    env = dict(os.environ, AIPM_ENABLE_MONITORING="false")
    first = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(root), "run", "ORD"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    a_file = root / "orders" / "ORD" / "A.yaml"
    wait_for(lambda: yaml.safe_load(a_file.read_text()).get("status") == "IN_PROGRESS", timeout=30)
    steered = subprocess.run([sys.executable, "-m", "aipm", "--root", str(root), steer, "O3/X"], env=env,
                             capture_output=True, text=True, timeout=60)
    out, err = first.communicate(timeout=60)
    assert steered.returncode == 0, steered.stderr
    assert first.returncode == 0, out + err
    assert yaml.safe_load(a_file.read_text())["status"] == "DONE"


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.parametrize("watch", [True, False], ids=["watch", "git"])
@pytest.mark.parametrize("how", ["redirect", "tee"])
def test_the_runs_own_output_file_in_the_tree_is_not_charged_to_its_workers(tmp_path, watch, how):
    """`nohup aipm run ORD` in the project root writes nohup.out there (as `aipm run ORD > run.log` does): every
    line the run printed while a worker ran was charged to that worker ('scope: wrote nohup.out'), so every task
    was sent back until REJECTED, an agent paid for each attempt. `aipm run ORD | tee nohup.out` did the same
    through tee, a process of the run's session (no worker's)."""
    import subprocess as sp

    import yaml

    root = tmp_path / "repo"
    order = root / "orders" / "ORD"
    order.mkdir(parents=True)
    (root / "aipm.yaml").write_text(f"max_rework: 0\nmax_workers: 2\nscope_watch: {str(watch).lower()}\n")
    (order / "FIRST.yaml").write_text(yaml.safe_dump({"command": "echo 1 > first.txt", "target_files": ["first.txt"]}))
    # LONG ends only once the run has written FIRST's outcome to its output file: a write inside LONG's run.
    (order / "LONG.yaml").write_text(yaml.safe_dump({
        "command": "until grep -q 'finish   FIRST' nohup.out; do sleep 0.02; done; echo l > long.txt",
        "target_files": ["long.txt"]}))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        sp.run(["git", *args], cwd=root, check=True)
    argv = [sys.executable, "-m", "aipm", "--root", str(root), "run", "ORD", "--no-resource-monitoring"]
    if how == "tee":
        proc = sp.run(f"{shlex.join(argv)} 2>&1 | tee nohup.out; exit ${{PIPESTATUS[0]}}", shell=True,
                      executable="/bin/bash", stdout=sp.DEVNULL, timeout=120, cwd=root)
    else:
        with open(root / "nohup.out", "w") as out:
            proc = sp.run(argv, stdout=out, stderr=sp.STDOUT, text=True, timeout=120, cwd=root)
    statuses = {p.stem: yaml.safe_load(p.read_text()) for p in order.glob("*.yaml")}
    assert proc.returncode == 0, (root / "nohup.out").read_text()
    assert {t: s["status"] for t, s in statuses.items()} == {"FIRST": "DONE", "LONG": "DONE"}


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.parametrize("other", ["redirect-live", "tee-live", "redirect-ended"])
def test_another_runs_output_in_the_tree_is_not_charged_to_this_runs_workers(tmp_path, other):
    """Two runs of two orders at once, each from its own terminal (session), the second one's output in the tree
    (`aipm run O2 > run2.log`, or `| tee run2.log`): the lines it printed while a worker of the first ran were
    charged to that worker ('scope: wrote run2.log', sent back), whether the second run was still running at the
    audit (by its records and its session's open files) or had ended (by its notes in the written log)."""
    how, when = other.split("-")
    root = tmp_path / "repo"
    ended = tmp_path / "ended"  # outside the tree: no write of the test's is audited
    root.mkdir()
    (root / "aipm.yaml").write_text("max_rework: 0\n")
    wait = f"until [ -e {shlex.quote(str(ended))} ]" if when == "ended" else "until grep -q 'finish   B' run2.log"
    write_task(root / "orders" / "O1", "LONG", command=f"{wait}; do sleep 0.02; done; echo l > long.txt",
               target_files=["long.txt"])
    write_task(root / "orders" / "O2", "B", command="echo b > b.txt", target_files=["b.txt"])
    if when == "live":  # the second run still runs while LONG is audited
        write_task(root / "orders" / "O2", "HOLD", command=f"until [ -e {shlex.quote(str(ended))} ]; do sleep 0.02; "
                   "done", target_files=["hold.txt"])
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=root, check=True)
    aipm = [sys.executable, "-m", "aipm", "--root", str(root), "run"]
    first = subprocess.Popen([*aipm, "O1", "--no-resource-monitoring"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, cwd=root, start_new_session=True)
    second = None
    try:
        wait_for(lambda: task_statuses(root / "orders" / "O1")["LONG"] == "IN_PROGRESS", timeout=60)
        argv = [*aipm, "O2", "--no-resource-monitoring"]
        if how == "tee":
            second = subprocess.Popen(f"{shlex.join(argv)} 2>&1 | tee run2.log >/dev/null", shell=True, cwd=root,
                                      start_new_session=True)
        else:
            with open(root / "run2.log", "w") as out:
                second = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=root,
                                          start_new_session=True)
        if when == "ended":
            assert second.wait(timeout=120) == 0, (root / "run2.log").read_text()
            ended.touch()
        said, _ = first.communicate(timeout=120)
    finally:
        ended.touch()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.wait(timeout=60)
    assert "finish   B" in (root / "run2.log").read_text()
    assert "scope:" not in said and first.returncode == 0, said
    assert task_statuses(root / "orders" / "O1") == {"LONG": "DONE"}, said
    assert second.returncode == 0 and task_statuses(root / "orders" / "O2")["B"] == "DONE"


def _a_run_waiting_for_a_detached_attempt(tmp_path: Path, long: dict) -> tuple[Path, subprocess.Popen]:
    """ORD's LONG (`long`: its fields) launched detached, then `aipm run O2 > run2.log`, whose B waits for LONG's
    f.txt, once the run has noted its output for LONG's attempt in the written log."""

    root = _git_repo_order(tmp_path, {"LONG": long})
    write_task(root / "orders" / "O2", "B", command="echo b >> f.txt", target_files=["f.txt"])
    aipm = [sys.executable, "-m", "aipm", "--root", str(root)]
    subprocess.run([*aipm, "launch", "ORD"], check=True, capture_output=True, timeout=60)
    written = state(root) / WRITTEN_LOG
    with open(root / "run2.log", "w") as out:
        second = subprocess.Popen([*aipm, "run", "O2", "--no-resource-monitoring"], stdout=out,
                                  stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    try:
        wait_for(lambda: written.exists() and "run2.log" in written.read_text(), timeout=30)
    except BaseException:
        second.kill()
        raise
    return root, second


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_the_output_of_a_run_waiting_for_a_detached_attempts_files_is_not_charged_to_it(tmp_path):
    """`aipm launch ORD`, then `aipm run O2 > run2.log`, whose B waits for the file ORD's detached LONG holds: the run
    owned no attempt while LONG ran, so nothing told LONG's audit that run2.log was its output: LONG was REJECTED
    ('scope: wrote run2.log'). A run notes its output for the attempts of other owners that it sees in flight."""
    gate = tmp_path / "gate"
    root, second = _a_run_waiting_for_a_detached_attempt(tmp_path, {
        "command": f"until [ -e {gate} ]; do sleep 0.02; done; echo l > f.txt", "target_files": ["f.txt"]})
    gate.touch()
    assert second.wait(timeout=120) == 0, (root / "run2.log").read_text()
    statuses = {t: yaml.safe_load((root / "orders" / o / f"{t}.yaml").read_text())
                for o, t in (("ORD", "LONG"), ("O2", "B"))}
    assert {t: s["status"] for t, s in statuses.items()} == {"LONG": "DONE", "B": "DONE"}, statuses


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_the_output_of_such_a_run_is_noted_again_for_the_next_attempt_of_the_same_task(tmp_path):
    """As above, and LONG's first attempt fails, so its detached owner starts a second: a new audit window, which
    the run's notes for the first attempt do not reach. The run noted its output once per task, so whatever it
    printed while the second attempt ran (before an attempt of its own ended, which notes too) was charged to it.
    It notes it again for each attempt it sees in flight: a note after the first attempt's end names run2.log."""
    from aipm.runtime import Runtime
    from aipm.writtenlog import outputs_since

    gates = {name: tmp_path / name for name in ("first", "second")}
    root, second = _a_run_waiting_for_a_detached_attempt(tmp_path, {
        "command": f"if [ ! -e {gates['first']}.done ]; then until [ -e {gates['first']} ]; do sleep 0.02; done; "
                   f"touch {gates['first']}.done; exit 1; fi; until [ -e {gates['second']} ]; do sleep 0.02; done; "
                   "echo l > f.txt", "target_files": ["f.txt"], "max_attempts": 2})
    try:
        first_ends = time.time_ns()
        gates["first"].touch()
        wait_for(lambda: any(out[0] == "run2.log" for out in outputs_since(Runtime(root), first_ends)), timeout=30)
        long = yaml.safe_load((root / "orders" / "ORD" / "LONG.yaml").read_text())
        assert (long["status"], long["attempts"]) == ("IN_PROGRESS", 2), long  # (noted for the second attempt)
    finally:
        for gate in gates.values():
            gate.touch()
        assert second.wait(timeout=120) == 0, (root / "run2.log").read_text()
    long = yaml.safe_load((root / "orders" / "ORD" / "LONG.yaml").read_text())
    assert (long["status"], long["attempts"]) == ("DONE", 2), long
    assert task_statuses(root / "orders" / "O2") == {"B": "DONE"}


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_a_file_the_runs_session_holds_open_only_for_reading_is_still_charged(tmp_path):
    """Only files the run's session writes are its output: one it merely reads (its standard input here) and a
    worker appends to is that worker's out-of-scope write."""
    import subprocess as sp

    import yaml

    root = tmp_path / "repo"
    order = root / "orders" / "ORD"
    order.mkdir(parents=True)
    (root / "aipm.yaml").write_text("max_rework: 0\n")
    (root / "notes.txt").write_text("n\n")
    (order / "W.yaml").write_text(yaml.safe_dump({"command": "echo x >> notes.txt; echo w > w.txt",
                                                  "target_files": ["w.txt"]}))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        sp.run(["git", *args], cwd=root, check=True)
    with open(root / "notes.txt") as notes:
        proc = sp.run([sys.executable, "-m", "aipm", "--root", str(root), "run", "ORD", "--no-resource-monitoring"],
                      stdin=notes, capture_output=True, text=True, timeout=120, cwd=root)
    assert "scope: wrote notes.txt" in proc.stdout, proc.stdout + proc.stderr
    assert yaml.safe_load((order / "W.yaml").read_text())["status"] == "REJECTED"


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.parametrize("ignored", [False, True], ids=["charged", "scope_ignore"])
def test_a_file_a_person_edits_during_a_run_is_charged_unless_scope_ignore_names_it(tmp_path, ignored):
    """aipm cannot tell a person's write from a worker's: a note saved while U ran sends U back. The feedback its
    next attempt reads says the file changed, not that U wrote it, and to leave it alone if U did not (an agent
    told it wrote a file could undo the person's note). `scope_ignore` names files never charged."""
    import yaml

    gate = tmp_path / "go"
    root = _git_repo_order(tmp_path, {"U": {"command": f"until [ -e {gate} ]; do sleep 0.02; done; echo u > u.txt",
                                            "target_files": ["u.txt"]}},
                           "max_rework: 0\n" + ("scope_ignore: [NOTES.md, 'drafts/**']\n" if ignored else ""))
    (root / "NOTES.md").write_text("mine\n")
    subprocess.run(["git", "add", "NOTES.md"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "n"], cwd=root, check=True)
    task_file = root / "orders" / "ORD" / "U.yaml"
    proc = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(root), "run", "ORD",
                             "--no-resource-monitoring"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: yaml.safe_load(task_file.read_text()).get("status") == "IN_PROGRESS", timeout=30)
        with open(root / "NOTES.md", "a") as notes:  # the person's edit, while U runs
            notes.write("a thought\n")
        gate.touch()
        out, _ = proc.communicate(timeout=60)
    finally:
        gate.touch()
        proc.kill()
    status = yaml.safe_load(task_file.read_text())["status"]
    if ignored:
        assert (proc.returncode, status) == (0, "DONE"), out
        return
    assert (proc.returncode, status) == (1, "REJECTED"), out
    # and the person reading the run is told what to do if the edit was theirs (an end-to-end session's user saw
    # their own README edit blamed on a task, which was sent back, with no word of scope_ignore)
    assert ("finish   U → REJECTED (scope: wrote NOTES.md); aipm cannot tell who wrote them: if you edited them "
            "yourself during the attempt, list them in scope_ignore (aipm.yaml), or run such tasks with confine: true, "
            "which holds their workers to their targets") in out, out
    feedback = (root / ".aipm" / "feedback" / "ORD" / "U.txt").read_text()
    assert "changed outside target_files while this attempt ran: NOTES.md" in feedback
    assert "if you did not, leave them as they are" in feedback


@pytest.mark.parametrize("how", ["launch", "run with git status"])
def test_a_worker_that_cleans_away_aipms_directory_is_still_audited(tmp_path, how):
    """An attempt's saved start lives beside its log, in `.aipm/`: a worker that wrote outside its targets and
    then ran `git clean -fdx` (a build's usual clean-up) took it away, and its audit found nothing to compare
    with: DONE. Now the audit falls back on what `git status` shows written since the attempt began (B, after
    it, is not charged with A's write: a moment later, beyond the slack of inode times)."""
    import yaml

    root = tmp_path / "repo"
    order = root / "orders" / "ORD"
    order.mkdir(parents=True)
    # (one at a time: a write no task may make is charged to every task running then)
    (root / "aipm.yaml").write_text("max_workers: 1\nmax_rework: 0\nenable_monitoring: false\nscope_watch: false\n")
    (root / "notes.txt").write_text("a person's\n")
    # A clean fails ("failed to remove .aipm/spare: Directory not empty", exit 1) when aipm writes in `.aipm/` at
    # that moment (the next attempt's files made ready, the last one's outcome), as beside any process writing
    # there: retried, as a build script would, so that what is tested is the audit (B failed so 5 times in 30).
    clean = "for i in 1 2 3 4 5 6 7 8 9 10; do git clean -fdxq 2>/dev/null && break; sleep 0.05; done"
    (order / "A.yaml").write_text(yaml.safe_dump({"target_files": ["a.txt"], "priority": "P0",
                                                  "command": f"echo a > a.txt; echo b >> notes.txt; sleep 0.2; {clean}"}))
    (order / "B.yaml").write_text(yaml.safe_dump({"target_files": ["b.txt"], "command": f"echo b > b.txt; {clean}"}))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=root, check=True)
    aipm = [sys.executable, "-m", "aipm", "--root", str(root)]

    def outcomes() -> dict:
        return {p.stem: (data.get("status"), data.get("reason")) for p in order.glob("*.yaml")
                for data in [yaml.safe_load(p.read_text())]}

    proc = subprocess.run([*aipm, how.split()[0], "ORD"], capture_output=True, text=True, timeout=120)
    wait_for(lambda: all(status in ("DONE", "REJECTED") for status, _ in outcomes().values()))
    assert outcomes() == {"A": ("REJECTED", "scope: wrote notes.txt"), "B": ("DONE", "exit 0")}, (
        proc.stdout + proc.stderr)


def test_a_send_back_feedback_goes_when_the_task_ends_done_and_with_a_retry(tmp_path):
    """An attempt the scope audit sent back left `.aipm/feedback/ORD/T.txt`; the next attempt ended DONE (no
    review to approve it and delete the file), and the file stayed for a task put back to QUEUED by hand to read
    as its last review's word. A retry drops a rejected task's feedback, as documented."""
    import yaml

    # Attempt 2 ends DONE only if it was given attempt 1's feedback: the file was there to be left behind.
    command = ('if [ "$AIPM_ATTEMPT" = 1 ]; then echo c > c.txt; else test -s "$AIPM_REVIEW_FEEDBACK"; fi '
               '&& echo t > t.txt')
    root = _git_repo_order(tmp_path, {"T": {"command": command, "target_files": ["t.txt"]},
                                      "R": {"command": "echo r > r2.txt", "target_files": ["r.txt"],
                                            "max_rework": 0}}, "")
    feedback = root / ".aipm" / "feedback" / "ORD"
    proc = subprocess.run([sys.executable, "-m", "aipm", "--root", str(root), "run", "ORD", "--max-workers", "1",
                           "--no-resource-monitoring"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and task_statuses(root / "orders" / "ORD") == {"T": "DONE", "R": "REJECTED"}, proc
    assert yaml.safe_load((root / "orders" / "ORD" / "T.yaml").read_text())["reworks"] == 1
    assert not (feedback / "T.txt").exists() and "r2.txt" in (feedback / "R.txt").read_text()
    subprocess.run([sys.executable, "-m", "aipm", "--root", str(root), "retry", "R"], check=True, capture_output=True)
    assert not (feedback / "R.txt").exists()


def test_an_attempt_sent_back_for_its_scope_says_its_command_was_edited_while_it_ran(repo):
    """A wrote outside its targets, and its command was edited meanwhile (to stop doing so): the outcome sends it
    back and says, as any outcome does now, that the edited command runs in its next attempt (the scope path said
    nothing of the edit)."""
    order = repo / "orders" / "ORD"
    gate = repo.parent / "gate"  # (outside the tree: no write of the test's is charged to A)
    a = write_task(order, "A", command=f"while [ ! -e {gate} ]; do sleep 0.05; done; echo x > stray.txt",
                   target_files=["src/a.py"], max_attempts=2)
    proc = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(repo), "run", "ORD", "--json"], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, AIPM_ENABLE_MONITORING="false"))
    try:
        wait_for(lambda: task_statuses(order)["A"] == "IN_PROGRESS")
        a.write_text(a.read_text().replace("echo x > stray.txt", "echo x > src/a.py"))
        gate.touch()
        out, err = proc.communicate(timeout=120)
    finally:
        gate.touch()
        proc.kill()
    finished = [e for e in map(json.loads, out.splitlines()) if e.get("event") == "finished"]
    assert finished and finished[0].get("scope") == ["stray.txt"], (finished, err)
    assert "its next attempt runs the edited one" in finished[0].get("hint", ""), finished
    assert "its next attempt runs the edited one" in (repo / ".aipm" / "logs" / "ORD" / "A.1.log").read_text()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.parametrize("adopter, watch", [("run", True), ("run", False), ("run twice", True), ("recover", False)],
                         ids=["run-watch", "run-git", "run-twice", "recover"])
def test_the_output_of_a_killed_run_is_not_charged_to_the_worker_a_new_aipm_adopts(tmp_path, adopter, watch):
    """`aipm run ORD > run.log 2>&1` in the project root, killed (SIGKILL) while its worker runs, and a new
    `aipm run ORD` (its output elsewhere) adopts that worker: the adopter's audit charged run.log, which only the
    dead run had written, to the worker (`scope: wrote run.log`, sent back); so did a third run, adopting it from a
    second one killed as well, its run2.log too. `aipm recover ORD > recover.log` adopting it through a detached
    owner (another session) charged both. run.log is aipm's output only for the attempts that run started: a task
    the adopter starts afterwards that writes it is still charged."""
    import signal

    root = tmp_path / "repo"
    order = root / "orders" / "ORD"
    go = tmp_path / "go"  # outside the tree: no write of the test's is audited
    root.mkdir()
    (root / "aipm.yaml").write_text(f"max_rework: 0\nscope_watch: {str(watch).lower()}\n")
    write_task(order, "T", command=f"until [ -e {shlex.quote(str(go))} ]; do sleep 0.02; done; echo t > t.txt",
               target_files=["t.txt"])
    write_task(order, "U", command="echo u >> run.log; echo u > u.txt", target_files=["u.txt"], depends_on=["T"])
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=root, check=True)
    aipm = [sys.executable, "-m", "aipm", "--root", str(root)]
    run = [*aipm, "run", "ORD", "--no-resource-monitoring"]
    with open(root / "run.log", "w") as out:  # (closed here once the run has it: only the run's session holds it)
        first = subprocess.Popen(run, stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    try:
        wait_for(lambda: "start    T" in (root / "run.log").read_text(), timeout=60)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert task_statuses(order)["T"] == "IN_PROGRESS"
    record = state(root) / "workers" / "ORD" / "T.json"
    if adopter == "run twice":  # the adopter, its output in the tree too, killed as well before a third adopts
        with open(root / "run2.log", "w") as out:
            second = subprocess.Popen(run, stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
        wait_for(lambda: json.loads(record.read_text())["owner_pid"] == second.pid, timeout=60)
        os.kill(second.pid, signal.SIGKILL)
        second.wait()
    if adopter != "recover":
        last = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root,
                                start_new_session=True)
        wait_for(lambda: json.loads(record.read_text())["owner_pid"] == last.pid, timeout=60)  # still running
        go.touch()
        out, err = last.communicate(timeout=120)
        said = out + err
        assert "scope: wrote run.log" in out and out.count("scope:") == 1, said
    else:
        with open(root / "recover.log", "w") as out:
            recovered = subprocess.run([*aipm, "recover", "ORD"], stdout=out, stderr=subprocess.STDOUT, cwd=root,
                                       start_new_session=True, timeout=60)
        said = (root / "recover.log").read_text()
        assert recovered.returncode == 0 and "adopted" in said, said
        go.touch()
        final = ("DONE", "FAILED", "REJECTED")
        wait_for(lambda: (lambda s: s["T"] != "IN_PROGRESS" and (s["T"] != "DONE" or s["U"] in final))(
            task_statuses(order)), timeout=60)  # (U runs only once T is DONE)
        said = (order / "T.yaml").read_text() + (order / "U.yaml").read_text()
        assert "scope: wrote run.log" in (order / "U.yaml").read_text(), said
    assert task_statuses(order) == {"T": "DONE", "U": "REJECTED"}, said


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_the_output_of_aipm_launch_is_not_charged_to_the_worker_it_started(tmp_path):
    """`aipm launch ORD > launch.log` in the project root writes its report there after its worker starts; the
    detached owner that audits the worker (a session of its own) charged launch.log to it: REJECTED."""
    import yaml

    root = tmp_path / "repo"
    order = root / "orders" / "ORD"
    (root / "orders").mkdir(parents=True)
    (root / "aipm.yaml").write_text("max_rework: 0\n")
    write_task(order, "T", command="sleep 0.5; echo t > t.txt", target_files=["t.txt"])
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=root, check=True)
    with open(root / "launch.log", "w") as out:
        launched = subprocess.run([sys.executable, "-m", "aipm", "--root", str(root), "launch", "ORD",
                                   "--no-resource-monitoring"], stdout=out, stderr=subprocess.STDOUT, cwd=root,
                                  timeout=60)
    assert launched.returncode == 0, (root / "launch.log").read_text()
    wait_for(lambda: task_statuses(order)["T"] not in ("QUEUED", "IN_PROGRESS", "IN_REVIEW"), timeout=60)
    assert yaml.safe_load((order / "T.yaml").read_text())["status"] == "DONE", (order / "T.yaml").read_text()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_a_run_watching_a_launched_attempt_writes_its_output_without_sending_it_back(tmp_path):
    """`aipm launch O` then `aipm run O > run2.log`: the run owns no attempt (it watches the detached owner's), so
    the owner's audit took run2.log for the worker's write, and the attempt went back to rework."""
    root = tmp_path / "repo"
    gate = tmp_path / "gate"  # outside the tree: no write of the test's is audited
    root.mkdir()
    (root / "aipm.yaml").write_text("max_rework: 1\n")
    write_task(root / "orders" / "O", "A", command=f"until [ -e {shlex.quote(str(gate))} ]; do sleep 0.02; done; "
               "echo a > a.txt", target_files=["a.txt"])
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=root, check=True)
    aipm = [sys.executable, "-m", "aipm", "--root", str(root)]
    try:
        subprocess.run([*aipm, "launch", "O", "--no-resource-monitoring"], cwd=root, check=True, capture_output=True,
                       timeout=60)
        with open(root / "run2.log", "w") as out:
            run = subprocess.Popen([*aipm, "run", "O", "--no-resource-monitoring"], stdout=out,
                                   stderr=subprocess.STDOUT, cwd=root)
        wait_for(lambda: "watch" in (root / "run2.log").read_text(), timeout=60)
        gate.touch()
        assert run.wait(timeout=120) == 0, (root / "run2.log").read_text()
    finally:
        gate.touch()
    task = yaml.safe_load((root / "orders" / "O" / "A.yaml").read_text())
    assert (task["status"], task["attempts"], task.get("reworks", 0)) == ("DONE", 1, 0), task


def _a_run_of_a_long_task(tmp_path: Path, gate: Path) -> tuple[Path, list[str], subprocess.Popen]:
    """`aipm run ORD` of LONG (target f.txt), which writes f.txt once `gate` exists: (root, aipm's argv, the run)."""
    root = _git_repo_order(tmp_path, {"LONG": {"command": f"until [ -e {gate} ]; do sleep 0.02; done; echo l > f.txt",
                                               "target_files": ["f.txt"]}})
    aipm = [sys.executable, "-m", "aipm", "--root", str(root)]
    run = subprocess.Popen([*aipm, "run", "ORD", "--no-resource-monitoring"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, cwd=root)
    return root, aipm, run


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_new_and_add_of_another_order_during_a_run_are_not_charged_to_its_workers(tmp_path):
    """Planning the next order while one runs: `aipm new NEXT` and `aipm add NEXT N2` wrote files no target covers,
    and every attempt running then was sent back (`scope: wrote orders/NEXT/order.yaml`), an agent paid again."""
    gate = tmp_path / "gate"
    root, aipm, run = _a_run_of_a_long_task(tmp_path, gate)
    try:
        wait_for(lambda: task_statuses(root / "orders" / "ORD")["LONG"] == "IN_PROGRESS", timeout=60)
        subprocess.run([*aipm, "new", "NEXT"], check=True, capture_output=True, cwd=root)
        subprocess.run([*aipm, "add", "NEXT", "N2", "--command", "echo n2"], check=True, capture_output=True, cwd=root)
    finally:
        gate.touch()
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 0 and "scope:" not in out, out
    assert task_statuses(root / "orders" / "ORD") == {"LONG": "DONE"}, out
    # Each command notes the editor schema it writes the first time before writing it, as it does its task file: an
    # audit between the write and a note after it alone would charge it.
    notes = [json.loads(line.split(" ", 1)[1]) for line in (state(root) / WRITTEN_LOG).read_text().splitlines()]
    before = [n["targets"] for n in notes if isinstance(n, dict) and n.get("order") == "orders/NEXT"][::2]
    assert len(before) == 2 and "orders/order.schema.json" in before[0] and "orders/task.schema.json" in before[1], \
        notes


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.parametrize("command, stop", [(["status", "ORD"], None), (["ui", "--port", "0"], None),
                                           (["ui", "--port", "0"], signal.SIGINT)], ids=["status", "ui", "ui-ctrl-c"])
def test_the_output_of_an_aipm_that_owns_no_attempt_is_not_charged_to_the_workers(tmp_path, command, stop):
    """Another terminal (a session of its own), while a run goes: `aipm status ORD > status.txt`, which ends before
    the audit, or `nohup aipm ui &` (its output in the project), which outlives it, or is stopped (Ctrl-C) before
    it. Each wrote a file no target covers, and every attempt running then was sent back (`scope: wrote ui.log`),
    an agent paid again."""
    if command[0] == "ui":
        pytest.importorskip("uvicorn")
    gate = tmp_path / "gate"
    root, aipm, run = _a_run_of_a_long_task(tmp_path, gate)
    other = None
    try:
        wait_for(lambda: task_statuses(root / "orders" / "ORD")["LONG"] == "IN_PROGRESS", timeout=60)
        with open(root / "other.log", "w") as out:
            other = subprocess.Popen([*aipm, *command], stdout=out, stderr=subprocess.STDOUT, cwd=root,
                                     start_new_session=True)
        if command[0] == "ui":
            wait_for(lambda: "token=" in (root / "other.log").read_text(), timeout=60)
            if stop:
                other.send_signal(stop)
                # (its exit is not what is tested here: in one CI run it took over 60 s, once locally 30 s of ~35
                # runs, with this run going; not found why, and left open)
                other.wait(timeout=180)
        else:
            assert other.wait(timeout=60) == 0, (root / "other.log").read_text()
    finally:
        gate.touch()
        out, _ = run.communicate(timeout=120)
        if other is not None and other.poll() is None:
            other.terminate()
            other.wait(timeout=30)
    assert run.returncode == 0 and "scope:" not in out, out
    assert task_statuses(root / "orders" / "ORD") == {"LONG": "DONE"}, out


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.parametrize("command", ["status ORD", "env -u AIPM_TASK_ID {aipm} status ORD",
                                     "run ORD2 --no-resource-monitoring"],
                         ids=["status", "no-task-id", "run"])
def test_an_aipm_that_a_workers_command_runs_writes_what_that_worker_does(tmp_path, command):
    """The exception to the one above: `aipm status ORD > stray.txt` in a task's own command is that task's write,
    charged as any other (its end must note nothing that excuses it), its environment cleared on the way too (`env
    -u AIPM_TASK_ID`, `env -i`, sudo), and the output of an `aipm run` it starts (noted at the run's end)."""
    aipm = f"{shlex.quote(sys.executable)} -m aipm"
    line = command.format(aipm=aipm) if "{aipm}" in command else f"{aipm} {command}"
    root = _git_repo_order(tmp_path, {"T": {"command": f"{line} > stray.txt", "target_files": ["f.txt"]}})
    write_task(root / "orders" / "ORD2", "X", command="true")
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "y"], cwd=root, check=True)
    run = subprocess.run([sys.executable, "-m", "aipm", "--root", str(root), "run", "ORD", "--no-resource-monitoring"],
                         capture_output=True, text=True, cwd=root, timeout=120)
    assert "scope: wrote stray.txt" in run.stdout, run.stdout + run.stderr
    assert task_statuses(root / "orders" / "ORD") == {"T": "REJECTED"}, run.stdout


def test_a_read_only_command_whose_output_is_a_file_in_a_tree_where_nothing_ran_makes_no_state(tmp_path):
    """`aipm status ORD > s.txt` is an observer while it lives; at its end it took the launch lock to note its
    output, which made `.aipm/` (its .gitignore and logs/) in a tree where nothing had run: a read-only command
    writes nothing there."""
    root = _git_repo_order(tmp_path, {"T": {"command": "true"}})
    with open(root / "s.txt", "w") as out:
        subprocess.run([sys.executable, "-m", "aipm", "--root", str(root), "status", "ORD"], stdout=out, check=True,
                       cwd=root)
    assert "T" in (root / "s.txt").read_text() and not (root / ".aipm").exists()
