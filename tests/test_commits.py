"""Commits made in the shared tree while tasks run (aipm/commits.py): said at the task's end, audited as writes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aipm import commits
from aipm.record import Record
from conftest import capped_memory, wait_for

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

COMMIT = "git -c user.name=w -c user.email=w@w commit -qm agent"


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def project(tmp_path: Path, tasks: dict, settings: str = "max_rework: 0\n") -> tuple[Path, Path]:
    """A git repository with an order of `tasks`; `gate/` (where the workers signal each other) is ignored."""
    root = tmp_path / "repo"
    order = root / "orders" / "ORD"
    order.mkdir(parents=True)
    (root / "src").mkdir()
    (root / "aipm.yaml").write_text(settings)
    (root / ".gitignore").write_text("gate/\n")
    (root / "src" / "a.py").write_text("a = 0\n")
    (root / "src" / "b.py").write_text("b = 0\n")
    for tid, body in tasks.items():
        (order / f"{tid}.yaml").write_text(yaml.safe_dump(body))
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return root, order


def run(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aipm", "--root", str(root), "run", "ORD",
                           "--no-resource-monitoring", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def statuses(order: Path) -> dict[str, str]:
    return {p.stem: yaml.safe_load(p.read_text())["status"] for p in order.glob("*.yaml")}


# T1 commits everything (`git add -A`) while T2 has written half of its file and waits: T2's half-written
# src/b.py goes into T1's commit.
SWEEP = {
    "T1": {"command": f"until [ -e gate/b_started ]; do sleep 0.02; done; echo 'a = 1' > src/a.py && "
                      f"git add -A && {COMMIT} && touch gate/t1_committed", "target_files": ["src/a.py"]},
    # T2 runs on until T1's outcome is written (its commit said just before): then T2 is "still running" however
    # slowly a loaded machine records T1 (a run beside another test file's once said "ended").
    "T2": {"command": "echo 'b = half' > src/b.py; mkdir -p gate; touch gate/b_started; "
                      "until [ -e gate/t1_committed ]; do sleep 0.02; done; "
                      "until grep -q '^status: DONE' orders/ORD/T1.yaml; do sleep 0.02; done; echo 'b = 1' > src/b.py",
           "target_files": ["src/b.py"]},
}


@pytest.mark.parametrize("watch", [True, False], ids=["watch", "git"])
def test_a_commit_that_sweeps_in_a_running_tasks_file_is_said_not_failed(tmp_path, watch):
    """Two tasks in the shared tree; T1 ends with `git add -A && git commit` while T2 is half-way. aipm said
    nothing. Now T1's end says HEAD moved, from and to which commit, who was running, and that T2's file (and
    the task files aipm writes) were swept in; a warning: both are DONE (the scope audit allows what a task
    running beside it may write)."""
    root, order = project(tmp_path, SWEEP, f"max_rework: 0\nscope_watch: {str(watch).lower()}\n")
    before = git(root, "rev-parse", "HEAD")
    proc = run(root, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert statuses(order) == {"T1": "DONE", "T2": "DONE"}
    after = git(root, "rev-parse", "HEAD")
    assert git(root, "show", "HEAD:src/b.py") == "b = half"  # what the sweep is: a half-written file committed
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert not [e for e in events if e.get("scope")]
    said = {e["task"]: e for e in events if e["event"] == "committed"}
    assert said["T1"]["from"] == before and said["T1"]["to"] == after
    assert said["T1"]["running"] == ["T1", "T2"]
    assert said["T1"]["swept_in"] == [
        {"path": "orders/ORD/T1.yaml", "task": None, "state": "task_file"},
        {"path": "orders/ORD/T2.yaml", "task": None, "state": "task_file"},
        {"path": "src/b.py", "task": "T2", "state": "running"}]
    # T2's run saw the same commit: from its side, T1's file came in, T1 having ended.
    assert said["T2"]["running"] == ["T2", "T1"]
    assert {"path": "src/a.py", "task": "T1", "state": "ended"} in said["T2"]["swept_in"]
    # Said before the attempt's `finished`, and in the task's log, one line.
    kinds = [(e["event"], e.get("task")) for e in events]
    assert kinds.index(("committed", "T1")) < kinds.index(("finished", "T1"))
    line = [x for x in (root / ".aipm" / "logs" / "ORD" / "T1.1.log").read_text().splitlines() if "HEAD moved" in x]
    assert len(line) == 1
    assert f"HEAD moved {before[:10]} → {after[:10]} during attempt 1 (running then: T1, T2)" in line[0]
    assert line[0].endswith("src/b.py (target of T2, still running)")


def test_the_plain_output_says_it_in_one_line(tmp_path):
    root, order = project(tmp_path, SWEEP)
    proc = run(root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [x for x in proc.stdout.splitlines() if x.startswith("commit   T1: ")]
    assert len(lines) == 1, proc.stdout
    assert "(running then: T1, T2); swept in: " in lines[0]
    assert "src/b.py (target of T2, still running)" in lines[0]


def test_a_commit_of_its_own_targets_flags_nothing_and_no_commit_costs_no_git(tmp_path):
    """T1 commits only its own file; T2 (after it) commits nothing. T1's end says HEAD moved with nothing swept
    in; T2's says nothing at all, and finding that out ran no git (one `git diff`, for T1's commit)."""
    root, order = project(tmp_path, {
        "T1": {"command": f"echo 'a = 1' > src/a.py && git add src/a.py && {COMMIT} src/a.py",
               "target_files": ["src/a.py"]},
        "T2": {"command": "echo 'b = 1' > src/b.py", "target_files": ["src/b.py"], "depends_on": ["T1"]}})
    shim = tmp_path / "shim"
    shim.mkdir()
    calls = tmp_path / "git-calls"
    (shim / "git").write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {shutil.which("git")} "$@"\n')
    (shim / "git").chmod(0o755)
    proc = run(root, "--json", env=dict(os.environ, PATH=f"{shim}:{os.environ['PATH']}"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert statuses(order) == {"T1": "DONE", "T2": "DONE"}
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    said = [e for e in events if e["event"] == "committed"]
    assert [(e["task"], e["swept_in"]) for e in said] == [("T1", [])]
    assert said[0]["detail"].endswith("every committed file is among its targets")
    assert not [e for e in events if e.get("scope")]
    ours = [c for c in calls.read_text().splitlines() if " diff " in f" {c} " or "rev-parse -q --verify" in c]
    assert len(ours) == 1, ours
    assert "HEAD moved" not in (root / ".aipm" / "logs" / "ORD" / "T2.1.log").read_text()


def test_nothing_is_said_outside_a_git_work_tree(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    order = tmp_path / "orders" / "ORD"
    order.mkdir(parents=True)
    (order / "T.yaml").write_text(yaml.safe_dump({"command": "echo a > a.txt", "target_files": ["a.txt"]}))
    assert commits.at_start(tmp_path) == [] and commits.moved(tmp_path, []) is None
    proc = run(tmp_path, "--json", env=dict(os.environ, GIT_CEILING_DIRECTORIES=str(tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [line for line in proc.stdout.splitlines() if json.loads(line)["event"] == "committed"]


# -- the scope audit ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("watch", [True, False], ids=["watch", "git"])
def test_a_dirty_file_swept_into_a_commit_as_it_was_is_said_not_charged(tmp_path, watch):
    """A person's uncommitted notes.txt, written before the attempt began, swept into the worker's `git add -A`
    commit: the commit's notice names it, but the worker did not write it (its content is what it was when the
    attempt began), so the task is not sent back."""
    root, order = project(tmp_path, {"T": {"command": f"echo 'a = 1' > src/a.py && git add -A && {COMMIT}",
                                           "target_files": ["src/a.py"]}},
                          f"max_rework: 0\nscope_watch: {str(watch).lower()}\n")
    (root / "notes.txt").write_text("a person's notes\n")
    proc = run(root, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert statuses(order) == {"T": "DONE"}
    assert git(root, "show", "HEAD:notes.txt") == "a person's notes"  # swept in, indeed
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert not [e for e in events if e.get("scope")]
    swept = next(e for e in events if e["event"] == "committed")["swept_in"]
    assert {"path": "notes.txt", "task": None, "state": "none"} in swept


# What the worker does to a person's uncommitted y.txt ("useredit"), and what HEAD's and the file's y.txt are after.
_REWRITES = {
    # rewritten to the same size, its mtime set back, and committed: clean at the end with its old fingerprint, it
    # was taken for one a commit swept in as it was (a review of the commit-sweep change)
    "committed": ("printf 'USEREDIT\\n' > y.txt && touch -d \"$t\" y.txt && git add -A && {commit}", "USEREDIT",
                  "USEREDIT\n"),
    # the same left uncommitted: dirty at both ends with its old size and mtime, the snapshots saw no change
    "left dirty": ("printf 'USEREDIT\\n' > y.txt && touch -d \"$t\" y.txt", "committed", "USEREDIT\n"),
    # rewritten and committed, then the person's bytes put back with their mtime: dirty at the end with its old
    # fingerprint, while HEAD holds the worker's out-of-scope write
    "put back": ("printf 'USEREDIT\\n' > y.txt && git add -A && {commit} && printf 'useredit\\n' > y.txt && "
                 "touch -d \"$t\" y.txt", "USEREDIT", "useredit\n"),
}


@pytest.mark.parametrize("rewrite", list(_REWRITES))
@pytest.mark.parametrize("watch", [True, False], ids=["watch", "git"])
def test_a_dirty_file_rewritten_as_it_measured_is_charged(tmp_path, watch, rewrite):
    """A person's uncommitted y.txt that the worker rewrites keeping its size and mtime (`scope_watch: false` sees
    no fingerprint move): its inode's change after the start, or a commit of it that the file does not hold, says
    it was written."""
    command, head, after = _REWRITES[rewrite]
    root, order = project(tmp_path, {"T": {"command": (
        "echo 'a = 1' > src/a.py && t=$(stat -c %y y.txt) && " + command.format(commit=COMMIT)),
        "target_files": ["src/a.py"]}}, f"max_rework: 0\nscope_watch: {str(watch).lower()}\n")
    (root / "y.txt").write_text("committed\n")
    git(root, "add", "y.txt")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "y")
    (root / "y.txt").write_text("useredit\n")  # the person's edit, uncommitted as the run starts
    proc = run(root, "--json")
    assert (git(root, "show", "HEAD:y.txt"), (root / "y.txt").read_text()) == (head, after)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert statuses(order) == {"T": "REJECTED"}
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["scope"] for e in events if e.get("scope")] == [["y.txt"]]


@pytest.mark.parametrize("where", ["tracked", "new", "ignored"])
@pytest.mark.parametrize("watch", [True, False], ids=["watch", "git"])
def test_a_worker_that_writes_outside_its_targets_and_commits_it_is_sent_back(tmp_path, watch, where):
    """The worker writes outside its targets and commits it, so `git status` is clean at its end: a tracked file
    changed, a new file, and one in a directory git ignores, added with `git add -f` (the watch has no events
    there).
    Each is charged, whatever the audit."""
    path, add = {"tracked": ("README.md", "git add -A"), "new": ("notes.txt", "git add -A"),
                 "ignored": ("build/out.txt", "git add -f build/out.txt")}[where]
    root, order = project(tmp_path, {"T": {
        "command": f"echo 'a = 1' > src/a.py && mkdir -p build && echo x >> {path} && {add} && {COMMIT} -a",
        "target_files": ["src/a.py"]}}, f"max_rework: 0\nscope_watch: {str(watch).lower()}\n")
    (root / "README.md").write_text("readme\n")
    (root / ".gitignore").write_text("gate/\nbuild/\n")
    (root / "build").mkdir()  # ignored as the run starts: the watch does not look into it
    (root / "build" / "old.txt").write_text("built\n")
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "readme")
    proc = run(root, "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert statuses(order) == {"T": "REJECTED"}
    assert git(root, "status", "--porcelain", "--", path) == ""  # nothing for `git status` to show
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["scope"] for e in events if e.get("scope")] == [[path]]


@pytest.mark.parametrize("watch", [True, False], ids=["watch", "git"])
def test_an_agents_commit_charges_no_file_written_before_to_a_task_spanning_it(tmp_path, watch):
    """TA writes src/a.py and ends; TB and TC start after it. TC ends with `git add -A && git commit` while TB
    runs: TA's uncommitted src/a.py goes into TC's commit. TB wrote only src/b.py, and src/a.py is as it was
    when TB (and TC) began: neither is sent back (TB was, for `scope: wrote src/a.py`, and `running then` named
    TA, which had ended before TB began)."""
    root, order = project(tmp_path, {
        "TA": {"command": "echo 'a = 1' > src/a.py", "target_files": ["src/a.py"]},
        "TB": {"command": "mkdir -p gate && touch gate/b_started && until [ -e gate/c_committed ]; do sleep 0.02; "
                          "done; echo 'b = 1' > src/b.py", "target_files": ["src/b.py"], "depends_on": ["TA"]},
        "TC": {"command": f"until [ -e gate/b_started ]; do sleep 0.02; done; echo c > src/c.py && git add -A && "
                          f"{COMMIT} && touch gate/c_committed", "target_files": ["src/c.py"], "depends_on": ["TA"]},
    }, f"max_rework: 0\nscope_watch: {str(watch).lower()}\n")
    proc = run(root, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert statuses(order) == {"TA": "DONE", "TB": "DONE", "TC": "DONE"}
    assert [yaml.safe_load((order / f"{t}.yaml").read_text())["attempts"] for t in ("TB", "TC")] == [1, 1]
    assert git(root, "show", "HEAD:src/a.py") == "a = 1"  # swept in, indeed
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert not [e for e in events if e.get("scope")]
    said = {e["task"]: e for e in events if e["event"] == "committed"}
    assert said["TB"]["running"] == ["TB", "TC"] and said["TC"]["running"] == ["TC", "TB"]
    assert {"path": "src/a.py", "task": "TA", "state": "ended"} in said["TB"]["swept_in"]


@pytest.mark.parametrize("watch", [True, False], ids=["watch", "git"])
def test_a_persons_commit_of_the_orders_sends_no_running_task_of_another_order_back(tmp_path, watch):
    """`aipm run O2` left O2/Y1.yaml modified (its status); while `aipm run ORD` runs T1, the person commits
    `orders/`. aipm wrote Y1.yaml before T1 began and it did not change since: T1 is not sent back (it was, for
    `scope: wrote orders/O2/Y1.yaml`), and the notice calls it a task file aipm writes, as it does ORD's."""
    root, order = project(tmp_path, {"T1": {
        "command": "mkdir -p gate && touch gate/t1_started && until [ -e gate/committed ]; do sleep 0.02; done; "
                   "echo 'a = 1' > src/a.py", "target_files": ["src/a.py"]}},
        f"max_rework: 0\nscope_watch: {str(watch).lower()}\n")
    other = root / "orders" / "O2"
    other.mkdir()
    (other / "Y1.yaml").write_text(yaml.safe_dump({"command": "echo 'b = 1' > src/b.py", "target_files": ["src/b.py"]}))
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "O2")
    first = subprocess.run([sys.executable, "-m", "aipm", "--root", str(root), "run", "O2", "--no-resource-monitoring"],
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "orders/O2/Y1.yaml" in git(root, "status", "--porcelain")
    proc = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(root), "run", "ORD", "--json",
                             "--no-resource-monitoring"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (root / "gate" / "t1_started").exists())
        git(root, "add", "orders")
        git(root, "-c", "user.name=p", "-c", "user.email=p@p", "commit", "-qm", "wip")
        (root / "gate" / "committed").touch()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out + err
    assert statuses(order) == {"T1": "DONE"}
    events = [json.loads(line) for line in out.splitlines()]
    assert not [e for e in events if e.get("scope")]
    said = next(e for e in events if e["event"] == "committed")
    assert said["running"] == ["T1"]
    assert {"path": "orders/O2/Y1.yaml", "task": None, "state": "task_file"} in said["swept_in"]


def test_a_commit_does_not_hide_a_write_from_the_audit_of_an_adopted_attempt(tmp_path):
    """The run that started T is SIGKILLed after T wrote README.md (outside its targets) and committed it; a
    second run adopts T without the first run's events, and its audit falls back to `git status`, which is
    clean: T passed. The commits since its start count as its writes."""
    root, order = project(tmp_path, {"T": {
        "command": f"echo more >> README.md && git add README.md && {COMMIT} README.md && mkdir -p gate && "
                   "touch gate/committed && until [ -e gate/go ]; do sleep 0.02; done",
        "target_files": ["src/a.py"]}})
    first = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(root), "run", "ORD",
                              "--no-resource-monitoring"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (root / "gate" / "committed").exists())
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    (root / "gate" / "go").touch()
    proc = run(root, "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert statuses(order) == {"T": "REJECTED"}
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["scope"] for e in events if e.get("scope")] == [["README.md"]]
    assert [e["swept_in"] for e in events if e["event"] == "committed"] == [
        [{"path": "README.md", "task": None, "state": "none"}]]


# -- reading HEAD from .git's files ---------------------------------------------------------------------------


def test_head_is_read_from_loose_and_packed_refs_detached_and_in_a_linked_worktree(tmp_path):
    root, _ = project(tmp_path, {})
    head = git(root, "rev-parse", "HEAD")
    start = commits.at_start(root)
    assert start[:2] == [head, "refs/heads/" + git(root, "symbolic-ref", "--short", "HEAD")]
    assert commits.moved(root, start) is None
    git(root, "pack-refs", "--all")  # the branch's loose ref goes: the ref files changed, HEAD did not
    assert commits.moved(root, start) is None
    packed = commits.at_start(root)
    assert packed[0] == head
    (root / "new.txt").write_text("x\n")
    git(root, "add", "new.txt")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "next")
    assert commits.moved(root, packed) == (head, git(root, "rev-parse", "HEAD"))
    git(root, "checkout", "-q", "--detach", head)
    assert commits.at_start(root)[:2] == [head, ""]
    git(root, "worktree", "add", "-q", "--detach", str(tmp_path / "linked"), head)
    linked = commits.at_start(tmp_path / "linked")
    assert linked[:2] == [head, ""]
    (tmp_path / "linked" / "l.txt").write_text("l\n")
    git(tmp_path / "linked", "add", "l.txt")
    git(tmp_path / "linked", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "linked")
    assert commits.moved(tmp_path / "linked", linked) == (head, git(tmp_path / "linked", "rev-parse", "HEAD"))
    assert commits.moved(root, commits.at_start(root)) is None  # the main tree's HEAD did not move


def test_what_a_worker_leaves_in_head_is_no_option_and_no_wait(tmp_path):
    """.git/HEAD is the worker's to write: text that is no commit id never reaches git's command line (an
    `--output=` would write a file), and a FIFO there is not waited for (the end is read under the launch lock)."""
    root, _ = project(tmp_path, {})
    start = commits.at_start(root)
    head = root / ".git" / "HEAD"
    head.write_text(f"--output={tmp_path / 'written'}\n")
    assert commits.moved(root, start) == (start[0], "")
    rec = Record(order="ORD", order_dir=str(root / "orders" / "ORD"), task="T", task_file="", attempt=1,
                 targets=[], log="", exit_file="", started_at="", head=start)
    assert commits.committed_during(root, rec) == (start[0], "", set())
    assert not (tmp_path / "written").exists()
    head.unlink()
    os.mkfifo(head)
    assert commits.at_start(root)[:2] == ["", ""]


def test_a_sparse_packed_refs_a_worker_leaves_is_read_no_further_than_a_line(tmp_path):
    """HEAD's branch is looked for in packed-refs when it has no file of its own (after `git pack-refs`, `git gc`):
    a sparse terabyte a worker left there was read to its first newline, a MemoryError traceback as its attempt
    started or ended. A branch named in bytes that are no UTF-8 is looked for as those bytes."""
    root, _ = project(tmp_path, {})
    start = commits.at_start(root)
    git(root, "pack-refs", "--all")
    assert commits.at_start(root)[:2] == start[:2] and not (root / ".git" / start[1]).exists()  # from packed-refs
    packed = root / ".git" / "packed-refs"
    os.truncate(packed, 0)
    os.truncate(packed, 1 << 40)
    proc = subprocess.run([sys.executable, "-c", f"""
import json
from pathlib import Path
from aipm import commits
root = Path({str(root)!r})
found = [commits.at_start(root)[:2]]
(root / ".git" / "HEAD").write_bytes(b"ref: refs/heads/\\xff\\n")
print(json.dumps(found + [commits.at_start(root)[:2]]))
"""], capture_output=True, text=True, timeout=60, preexec_fn=capped_memory)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [["", start[1]], ["", "refs/heads/\udcff"]]
