"""Landlock confinement: real workers under the real kernel trying every forbidden write, and the refusal path."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from aipm import confine, landlock
from conftest import Project, capped_memory, no_workers, state, task_statuses, wait_for, write_task

NO_LANDLOCK = landlock.unavailable() if os.environ.get(landlock.FAKE_ABI) is None else "fake ABI set"
needs_landlock = pytest.mark.skipif(NO_LANDLOCK is not None, reason=f"kernel without usable Landlock: {NO_LANDLOCK}")

# Each probe runs in the worker and prints one JSON line: name → "ok" or the errno name it got.
PROBE = r'''
import errno, json, os, subprocess, sys, tempfile
def attempt(name, action):
    try:
        action()
        result[name] = "ok"
    except OSError as exc:
        result[name] = errno.errorcode.get(exc.errno, str(exc.errno))
def write(path, text="x", mode="w"):
    with open(path, mode) as handle:
        handle.write(text)
result = {}
outside = sys.argv[1]
# forbidden
attempt("modify", lambda: write("src/a.c", "changed", "a"))
attempt("truncate", lambda: os.truncate("src/a.c", 0))
attempt("delete", lambda: os.unlink("src/a.c"))
attempt("rename_over", lambda: os.rename("docs/x.md", "README"))
attempt("rename_target_away", lambda: os.rename("docs/x.md", "src/x.md"))
attempt("create_in_dir_without_targets", lambda: write("src/new.c"))
attempt("create_at_root", lambda: write("new_at_root.txt"))
attempt("mkdir", lambda: os.mkdir("src/newdir"))
attempt("task_file", lambda: write(os.environ.get("TASK_FILE", "/nonexistent/T.yaml"), "status: DONE\n", "a"))
attempt("symlink", lambda: os.symlink("README", "src/link"))
child = subprocess.run(["sh", "-c", "echo child >> README"], capture_output=True)
result["child_shell"] = "ok" if child.returncode == 0 else "denied"
# allowed
attempt("target_file", lambda: write("out/result.txt", "r"))
attempt("target_file_truncate", lambda: os.truncate("out/result.txt", 0))
attempt("new_in_target_dir", lambda: write("docs/new.md"))
attempt("mkdir_in_target_dir", lambda: os.mkdir("docs/sub"))
attempt("delete_in_target_dir", lambda: os.unlink("docs/x.md"))
attempt("glob_match", lambda: write("tests/unit/test_new.py"))
attempt("tmpdir", lambda: write(os.path.join(tempfile.gettempdir(), "t")))
attempt("outside_project", lambda: write(os.path.join(outside, "note.txt")))
attempt("dev_null", lambda: write("/dev/null"))
attempt("log", lambda: write(os.environ["AIPM_LOG"], "log line\n", "a"))
result["TMPDIR"] = os.environ.get("TMPDIR")
print("PROBE " + json.dumps(result), flush=True)
'''

FORBIDDEN = ("modify", "truncate", "delete", "rename_over", "rename_target_away", "create_in_dir_without_targets",
             "create_at_root", "mkdir", "task_file", "symlink")
ALLOWED = ("target_file", "target_file_truncate", "new_in_target_dir", "mkdir_in_target_dir",
           "delete_in_target_dir", "glob_match", "tmpdir", "outside_project", "dev_null", "log")


def _tree(tmp_path: Path) -> tuple[Project, Path, Path]:
    root = tmp_path / "proj"
    root.mkdir()
    outside = tmp_path / "outside"  # beside the project: not below it
    outside.mkdir()
    project = Project(root)
    (root / "src").mkdir()
    (root / "src" / "a.c").write_text("int main;\n")
    (root / "docs").mkdir()
    (root / "docs" / "x.md").write_text("doc\n")
    (root / "tests" / "unit").mkdir(parents=True)
    (root / "README").write_text("readme\n")
    (root / "probe.py").write_text(PROBE)
    return project, root, outside


def _probe_result(root: Path, task: str = "T") -> dict:
    logs = [p for p in (root / ".aipm" / "logs" / "ORD").glob(f"{task}.*.log") if p.name.count(".") == 2]
    log = max(logs, key=lambda p: p.stat().st_mtime_ns).read_text()  # the latest attempt's log
    line = next(l for l in log.splitlines() if l.startswith("PROBE "))
    return json.loads(line[len("PROBE "):])


def _probe_task(project: Project, outside: Path, **fields) -> Path:
    order = project.order()
    return write_task(order, "T", target_files=["out/result.txt", "docs/", "tests/**/*.py"],
                      command=[sys.executable, "probe.py", str(outside)], **fields)


@needs_landlock
def test_confined_worker_gets_eacces_for_every_forbidden_write_and_can_do_the_allowed_ones(tmp_path):
    project, root, outside = _tree(tmp_path)
    task_file = _probe_task(project, outside, confine=True)
    before = {p: (root / p).read_bytes() for p in ("src/a.c", "README")}
    proc = project.aipm("run", "ORD", "--no-review", env={"TASK_FILE": str(task_file)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = _probe_result(root)
    for name in FORBIDDEN:
        assert result[name] in ("EACCES", "EPERM", "denied"), (name, result[name])
    for name in ALLOWED:
        assert result[name] == "ok", (name, result[name])
    assert {p: (root / p).read_bytes() for p in before} == before
    assert not (root / "src" / "new.c").exists() and not (root / "src" / "newdir").exists()
    # The denials are the worker's business: the task simply ended DONE, with no extra field from aipm.
    data = yaml.safe_load(task_file.read_text())
    assert data["status"] == "DONE" and data["exit_code"] == 0
    assert set(data) == {"id", "target_files", "command", "confine", "status", "attempts", "started_at",
                         "finished_at", "exit_code", "reason"}
    assert data["reason"] == "exit 0"
    # /tmp holds aipm's state directory (and here the project), so the worker got a TMPDIR of its own there,
    # with a short name (a socket's path must fit in 108 bytes), removed after the attempt.
    private = result["TMPDIR"]
    assert private.startswith(os.path.join(os.path.realpath(tempfile.gettempdir()), "aipm-tmp-"))
    assert len(private) < 40 and not os.path.exists(private)
    assert (outside / "note.txt").exists()


@needs_landlock
def test_unconfined_by_default_and_the_setting_flag_and_task_key_choose(tmp_path):
    project, root, outside = _tree(tmp_path)
    task_file = _probe_task(project, outside)

    def run(*flags, env=None):
        for leftover in (root / ".aipm" / "logs").rglob("*.log") if (root / ".aipm").exists() else ():
            leftover.unlink()
        text = task_file.read_text().split("status:")[0]
        task_file.write_text(text)
        (root / "src" / "a.c").write_text("int main;\n")
        (root / "README").write_text("readme\n")
        (root / "docs" / "x.md").write_text("doc\n")
        proc = project.aipm("run", "ORD", "--no-review", *flags, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return _probe_result(root)["modify"]

    assert run() == "ok"
    assert run("--confine") == "EACCES"
    assert run(env={"AIPM_CONFINE": "1"}) == "EACCES"
    (root / "aipm.yaml").write_text("confine: true\n")
    assert run() == "EACCES"
    task_file.write_text(task_file.read_text().split("status:")[0] + "confine: false\n")
    assert run("--confine") == "ok"  # the task's own word wins, like its timeout


@needs_landlock
def test_detached_launch_confines_too_and_missing_targets_are_tidied(tmp_path):
    project, root, _ = _tree(tmp_path)
    order = project.order()
    write_task(order, "W", target_files=["gen/made.txt", "gen/unused.txt", "newdir/"], confine=True,
               command="echo made > gen/made.txt; echo bad >> README; echo $? > gen/made.txt.code || true")
    proc = project.aipm("launch", "ORD", "--no-review")
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: task_statuses(order)["W"] == "DONE")
    wait_for(lambda: no_workers(root))
    assert (root / "README").read_text() == "readme\n"
    # gen/made.txt was created empty for the rule and written by the worker: it stays. gen/unused.txt and
    # newdir/ were created for the rules and never used: removed. gen/made.txt.code is no target: denied.
    assert (root / "gen" / "made.txt").read_text() == "made\n"
    assert not (root / "gen" / "unused.txt").exists() and not (root / "newdir").exists()
    assert not (root / "gen" / "made.txt.code").exists()


@needs_landlock
def test_a_confined_attempt_hands_its_files_on_only_after_what_was_made_for_it_is_tidied(tmp_path):
    """A is confined and wants gen/f.txt, which does not exist: confinement creates it (and gen/) empty for the
    rule. A ends without touching it; B, not confined, wants the same file and appends to it through a descriptor
    it holds open for a while. A's files go to B only once A's outcome is recorded and what was made for A is
    removed, so that removal never pulls the file from under B: B's line is in gen/f.txt at the end."""
    project, root, _ = _tree(tmp_path)
    order = project.order()
    write_task(order, "A", target_files=["gen/f.txt"], confine=True, command="true", priority="P0")
    write_task(order, "B", target_files=["gen/f.txt"], priority="P2",
               command="mkdir -p gen && exec 3>>gen/f.txt && sleep 0.3 && echo b >&3")
    proc = project.aipm("run", "ORD", "--max-workers", "2", "--no-resource-monitoring", "--no-review")
    assert proc.returncode == 0, proc.stderr
    assert task_statuses(order) == {"A": "DONE", "B": "DONE"}
    assert (root / "gen" / "f.txt").read_text() == "b\n"


def test_confine_is_refused_at_launch_with_one_line_where_landlock_is_missing(project):
    order = project.order()
    task = write_task(order, "T", target_files=["a.txt"], command="echo hi > a.txt", confine=True)
    write_task(order, "FREE", command="true")

    def unstarted() -> tuple:
        data = yaml.safe_load(task.read_text())
        return data.get("status", "QUEUED"), data.get("attempts", 0), data.get("reason")

    for abi, words in (("0", "no Landlock"), ("2", "ABI is 2")):
        env = {landlock.FAKE_ABI: abi}
        launch = project.aipm("launch", "ORD", "--json", env=env)
        assert launch.returncode == 1
        failed = json.loads(launch.stdout)["failed"]
        assert [f["id"] for f in failed] == ["T"] and words in failed[0]["error"], failed
        assert "\n" not in failed[0]["error"]
        # Still QUEUED, attempt not counted (never silently unconfined), the refusal kept as its reason.
        assert unstarted() == ("QUEUED", 0, f"launch failed: {failed[0]['error']}")
        wait_for(lambda: task_statuses(order)["FREE"] == "DONE")
        wait_for(lambda: no_workers(project.root))
        run = project.aipm("run", "ORD", env=env)
        assert run.returncode == 1 and "confine" in run.stdout + run.stderr
        assert unstarted() == ("QUEUED", 0, f"launch failed: {failed[0]['error']}")
        assert not (project.root / "a.txt").exists()
        (order / "FREE.yaml").write_text("command: 'true'\n")


def test_confine_must_be_a_boolean(project):
    order = project.order()
    path = write_task(order, "T", command="true", confine="yes")
    before = path.read_text()
    proc = project.aipm("validate", "ORD")
    assert proc.returncode == 2
    assert "T.yaml" in proc.stderr and "confine" in proc.stderr and "true or false" in proc.stderr
    assert path.read_text() == before
    bad = project.aipm("config", env={"AIPM_CONFINE": "maybe"})
    assert bad.returncode == 2 and "AIPM_CONFINE" in bad.stderr


def test_rules_never_open_the_project_through_its_ancestors_or_a_symlink(tmp_path):
    root = tmp_path / "proj"
    (root / "docs").mkdir(parents=True)
    (tmp_path / "sibling").mkdir()
    (tmp_path / "into_project").symlink_to(root)
    log = root / ".aipm" / "logs" / "O" / "T.1.log"
    log.parent.mkdir(parents=True)
    log.write_text("")
    made: list = []
    grants, tmp = confine.rules(str(root), ["docs/", "a/b.txt", "tests/**/*.py"], str(log), made)
    paths = {p: r for p, r in grants}
    real = os.path.realpath(root)
    for ancestor in [real, *map(str, Path(real).parents)]:
        assert ancestor not in paths  # a rule on an ancestor would cover the whole project
    assert str(tmp_path / "into_project") not in paths
    assert paths[os.path.realpath(tmp_path / "sibling")] == landlock.ALL_RIGHTS
    assert paths[os.path.join(real, "a", "b.txt")] == landlock.FILE_RIGHTS
    assert paths[os.path.join(real, "tests")] == landlock.ALL_RIGHTS  # a glob: its literal base
    assert tmp.startswith(os.path.join(os.path.realpath(tempfile.gettempdir()), "aipm-tmp-"))  # project in /tmp
    assert [m[0] for m in made] == [os.path.join(real, "a"), os.path.join(real, "a", "b.txt"),
                                    os.path.join(real, "tests"), tmp]
    os.rmdir(tmp)


def _git(top: Path, *args: str) -> None:
    import subprocess

    subprocess.run(["git", *args], cwd=top, check=True, capture_output=True)


def _repo_with_project(tmp_path: Path, below: str = "") -> tuple[Project, Path, Path]:
    """A git repository whose project root is its top, or a directory `below` it; returns (project, root, top)."""
    top = tmp_path / "repo"
    root = top / below if below else top
    root.mkdir(parents=True)
    project = Project(root)
    (root / "README.md").write_text("readme\n")
    (root / "notes.md").write_text("notes\n")
    (root / "src").mkdir()
    (root / "src" / "a.py").write_text("a = 1\n")
    write_task(project.order(), "OTHER", command="true", target_files=["other.txt"], status="DONE")
    _git(top, "init", "-q")
    _git(top, "config", "user.email", "t@example.com")
    _git(top, "config", "user.name", "t")
    _git(top, "add", "-A")
    _git(top, "commit", "-q", "-m", "init")
    return project, root, top


# What a confined task tries that touches aipm's and git's own files, each a line of the worker's log.
TAMPER = r'''
import json, os, subprocess
result = {}
def attempt(name, action):
    try:
        action()
        result[name] = "ok"
    except OSError as exc:
        result[name] = "denied"
def append(path, text):
    with open(path, "a") as handle:
        handle.write(text)
attempt("own_target", lambda: append("README.md", "more\n"))
attempt("task_file", lambda: append("orders/ORD/OTHER.yaml", "command: rm -rf /\n"))
attempt("new_task_file", lambda: append("orders/ORD/NEW.yaml", "id: NEW\n"))
attempt("runtime_dir", lambda: append(".aipm/evil", "x"))
attempt("new_at_root", lambda: append("new.md", "x"))
commit = subprocess.run(["git", "commit", "-qam", "agent"], capture_output=True)
result["git_commit"] = "ok" if commit.returncode == 0 else "denied"
print("PROBE " + json.dumps(result), flush=True)
'''


@needs_landlock
@pytest.mark.parametrize("below", ["", "sub/project"], ids=["root-at-top", "root-below-top"])
def test_a_glob_at_the_root_opens_neither_task_files_nor_runtime_nor_git(tmp_path, below):
    """`*.md` is granted its literal base, the project root: that rule opened every task file, `.aipm/` and
    `.git/` (a confined worker committed and rewrote another task's command). A project below the repository's
    top had `.git/` beside its path, granted as "outside the project". Now neither is opened, wherever it is."""
    project, root, top = _repo_with_project(tmp_path, below)
    (root / "tamper.py").write_text(TAMPER)
    write_task(project.order(), "T", command=[sys.executable, "tamper.py"], target_files=["*.md"], confine=True)
    head = (top / ".git" / "HEAD").read_text(), sorted(p.name for p in (top / ".git" / "refs" / "heads").iterdir())
    before = (root / "orders" / "ORD" / "OTHER.yaml").read_text()
    proc = project.aipm("run", "ORD", "--no-review")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = _probe_result(root)
    assert result == {"own_target": "ok", "task_file": "denied", "new_task_file": "denied", "runtime_dir": "denied",
                      "new_at_root": "denied", "git_commit": "denied"}, result
    assert (root / "orders" / "ORD" / "OTHER.yaml").read_text() == before
    assert not (root / "orders" / "ORD" / "NEW.yaml").exists() and not (root / ".aipm" / "evil").exists()
    assert ((top / ".git" / "HEAD").read_text(), sorted(p.name for p in (top / ".git" / "refs" / "heads").iterdir())
            ) == head
    import subprocess
    log = subprocess.run(["git", "log", "--format=%s"], cwd=top, capture_output=True, text=True).stdout.split()
    assert log == ["init"]


@needs_landlock
def test_a_target_through_a_symlink_is_its_real_path_for_locks_audit_and_kernel(tmp_path):
    """`notes -> README.md`: the lock was taken on `notes`, so a task on README.md ran beside it on the same file,
    and a directory link `lnk -> src` made the unconfined audit reject a task for writing its own target. Both
    are named by where they lead now."""
    project, root, top = _repo_with_project(tmp_path)
    os.symlink("README.md", root / "notes")
    os.symlink("src", root / "lnk")
    order = project.order()
    write_task(order, "A", command="sleep 1; echo a >> notes", target_files=["notes"], confine=True)
    write_task(order, "B", command="echo b >> README.md", target_files=["README.md"])
    write_task(order, "C", command="echo c >> lnk/a.py", target_files=["lnk/"])
    detect = project.json("detect", "ORD")
    launchable = [t["id"] for t in detect["launchable"]]
    assert "C" in launchable and not {"A", "B"} <= set(launchable), detect  # A and B share README.md
    proc = project.aipm("run", "ORD", "--max-workers", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert task_statuses(order) == {"A": "DONE", "B": "DONE", "C": "DONE", "OTHER": "DONE"}
    assert sorted((root / "README.md").read_text().split()) == ["a", "b", "readme"]
    assert (root / "src" / "a.py").read_text() == "a = 1\nc\n"


def test_rules_refuse_a_target_that_became_a_symlink_after_the_order_was_read(tmp_path):
    """Its locks were taken on the path as it was read; a link made since (by another worker) would open where
    it points, so the worker does not start."""
    root = tmp_path / "proj"
    (root / "src").mkdir(parents=True)
    os.symlink(".", root / "out")
    log = root / ".aipm" / "logs" / "O" / "T.1.log"
    log.parent.mkdir(parents=True)
    log.write_text("")
    with pytest.raises(OSError, match="symlink"):
        confine.rules(str(root), ["out/"], str(log), [])
    with pytest.raises(OSError, match="symlink"):
        confine.rules(str(root), ["out/src/x.py"], str(log), [])


def test_workers_whose_targets_share_a_missing_directory_each_get_their_rules(tmp_path, monkeypatch):
    """Confined tasks started together with targets in one directory that does not exist yet (`gen/a.txt`,
    `gen/b.txt`) each make it for their rules: the one whose mkdir came second failed with `File exists` and its
    attempt FAILED with exit 126, never run (one run in six, six such tasks). Here the other worker's real
    confinement step makes `gen/` just before ours does."""
    import subprocess

    root = tmp_path / "proj"
    logs = root / ".aipm" / "logs" / "O"
    logs.mkdir(parents=True)
    other = ("import sys; from aipm import confine; "
             "print(confine.rules(sys.argv[1], ['gen/b.txt'], sys.argv[2], [])[1] or '')")
    real_mkdir = os.mkdir
    others_tmp = []

    def other_worker_first(path, *args, **kwargs):
        if os.fspath(path) == str(root / "gen") and not others_tmp:
            done = subprocess.run([sys.executable, "-c", other, str(root), str(logs / "B.1.log")],
                                  capture_output=True, text=True, check=True, timeout=60)
            others_tmp.append(done.stdout.strip())
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", other_worker_first)
    made: list = []
    try:
        grants, tmp = confine.rules(str(root), ["gen/a.txt"], str(logs / "A.1.log"), made)
    finally:
        monkeypatch.undo()
        for leftover in others_tmp:
            if leftover:
                os.rmdir(leftover)
    assert (root / "gen" / "b.txt").exists()  # the other worker went first
    assert (str(root / "gen" / "a.txt"), landlock.FILE_RIGHTS) in grants
    # gen/ is the other worker's to tidy: ours lists only what it made itself
    assert [m[0] for m in made] == [str(root / "gen" / "a.txt")] + ([tmp] if tmp else [])
    if tmp:
        os.rmdir(tmp)


@needs_landlock
def test_a_confined_worktree_task_writes_its_targets_in_its_worktree_and_nothing_of_the_main_tree(tmp_path):
    """A worktree task was refused `confine`, and nothing stopped its worker writing the main tree by an
    absolute path (the merge brings only its targets, the write had already landed). Confined, it can write its
    targets in its worktree, nothing else there, and nothing of the main tree; a target file made empty for its
    rule and left untouched is not merged."""
    project, root, top = _repo_with_project(tmp_path)
    script = (f"echo more >> README.md; echo x >> src/a.py || echo denied-worktree; "
              f"echo x >> {root}/src/a.py || echo denied-main; echo x > {root}/new.txt || echo denied-new")
    write_task(project.order(), "T", command=script, target_files=["README.md", "out.txt"], confine=True,
               workspace="worktree")
    _git(top, "add", "-A")
    _git(top, "commit", "-q", "-m", "task")
    proc = project.aipm("run", "ORD", "--no-review")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert task_statuses(project.order())["T"] == "DONE"
    log = next((root / ".aipm" / "logs" / "ORD").glob("T.1.log")).read_text()
    assert "denied-worktree" in log and "denied-main" in log and "denied-new" in log, log
    assert (root / "README.md").read_text() == "readme\nmore\n"  # merged back
    assert (root / "src" / "a.py").read_text() == "a = 1\n"
    assert not (root / "new.txt").exists() and not (root / "out.txt").exists()


def test_a_confined_worktree_task_with_a_workspace_setup_is_refused_at_launch(tmp_path):
    """The setup runs in the worker's process before its command (npm install, uv sync): confined, it could not
    write what it makes. Refused with one line; the task stays QUEUED, its attempt not counted."""
    project, root, top = _repo_with_project(tmp_path)
    write_task(project.order(), "T", command="true", target_files=["README.md"], confine=True, workspace="worktree",
               workspace_setup="true")
    proc = project.aipm("run", "ORD", "--no-review", env={landlock.FAKE_ABI: "4"})
    assert proc.returncode != 0
    assert "T: confine: not with workspace_setup (yet)" in proc.stdout, proc.stdout + proc.stderr
    assert task_statuses(project.order())["T"] == "QUEUED"


@needs_landlock
def test_a_cancelled_confined_worktree_attempts_patch_holds_its_work_not_the_files_made_for_its_rules(tmp_path):
    """keep() captured the worktree before the tidy-up: the patch of a cancelled attempt created the empty
    target file aipm had made for its rule."""
    import subprocess

    project, root, top = _repo_with_project(tmp_path)
    (tmp_path / "signal").mkdir()  # beside the project: writable (its parent, on the way to the project, is not)
    ready = tmp_path / "signal" / "ready"
    write_task(project.order(), "T", command=f"echo work >> README.md; touch {ready}; sleep 60",
               target_files=["README.md", "untouched.txt"], confine=True, workspace="worktree")
    _git(top, "add", "-A")
    _git(top, "commit", "-q", "-m", "task")
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(root), "run", "ORD"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: ready.exists())
    project.aipm("cancel", "T", check=True)
    run.communicate(timeout=60)
    patch = (root / ".aipm" / "patches" / "ORD" / "T.1.patch").read_text()
    assert "+work" in patch and "untouched.txt" not in patch, patch


@needs_landlock
def test_a_confined_worktree_task_cannot_touch_task_files_under_an_absolute_symlinked_orders(tmp_path):
    """`orders -> /abs/project/tasks`, checked out in the worktree, leads back to the main tree: the worktree's
    copies of the task files were left open to a `./` target, and an edit of another task's file was merged."""
    project, root, top = _repo_with_project(tmp_path)
    (root / "orders").rename(root / "tasks")
    (root / "orders").symlink_to(root / "tasks")
    other = root / "tasks" / "ORD" / "OTHER.yaml"
    before = other.read_text()
    write_task(project.order(), "T", command="echo 'command: rm -rf /' >> tasks/ORD/OTHER.yaml || echo denied",
               target_files=["."], confine=True, workspace="worktree")
    _git(top, "add", "-A")
    _git(top, "commit", "-q", "-m", "task")
    proc = project.aipm("run", "ORD", "--no-review")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert other.read_text() == before
    assert "denied" in (root / ".aipm" / "logs" / "ORD" / "T.1.log").read_text()


@needs_landlock
@pytest.mark.parametrize("linked", [False, True], ids=["run-by-path", "linked-orders"])
def test_a_confined_worker_cannot_write_task_files_of_an_order_outside_the_project(tmp_path, linked):
    """An order directory outside the project (`aipm run /elsewhere/ORD`, or `orders -> /elsewhere`) was open as
    the rest of the outside is: a confined worker rewrote its own task file and wrote a new task beside it, which
    the run then started, unconfined."""
    root = tmp_path / "proj"
    root.mkdir()
    project = Project(root)
    elsewhere = tmp_path / "elsewhere"
    order = elsewhere / "ORD"
    if linked:
        (root / "orders").rmdir()
        (root / "orders").symlink_to(elsewhere)
    command = (f'echo "command: touch {root}/escaped" >> {order}/T.yaml; '
               f'printf "id: EVIL\\ncommand: touch {root}/escaped\\n" > {order}/EVIL.yaml; echo ok > out.txt')
    task = write_task(order, "T", target_files=["out.txt"], command=command, confine=True)
    proc = project.aipm("run", "ORD" if linked else str(order), "--no-review")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in order.iterdir()) == ["T.yaml"]
    data = yaml.safe_load(task.read_text())
    assert data["status"] == "DONE" and data["command"] == command
    assert (root / "out.txt").read_text() == "ok\n" and not (root / "escaped").exists()
    assert "Permission denied" in (root / ".aipm" / "logs" / "ORD" / "T.1.log").read_text()


@needs_landlock
def test_a_ruleset_refused_in_the_worker_is_the_attempts_reason_not_exit_126(tmp_path):
    """`sub` is a file, so the target `sub/out.txt` cannot be made for its rule: the attempt fails without running
    its command, and the console and the task said only `exit 126` (the why was in the log alone)."""
    project, root, outside = _tree(tmp_path)
    (root / "sub").write_text("a file, not a directory\n")
    write_task(project.order(), "T", command="echo ran > ran.txt", target_files=["sub/out.txt"], confine=True)
    proc = project.aipm("run", "ORD", "--no-review")
    assert proc.returncode == 1
    data = yaml.safe_load((root / "orders" / "ORD" / "T.yaml").read_text())
    assert data["status"] == "FAILED" and data["exit_code"] == 126
    assert data["reason"].startswith("confine: cannot confine the worker: "), data["reason"]
    assert "confine: cannot confine the worker" in proc.stdout, proc.stdout
    assert not (root / "ran.txt").exists()


@needs_landlock
def test_a_ruleset_refused_in_a_worktree_is_the_attempts_reason_too(tmp_path):
    """A worktree attempt is tidied before its end is judged, which removed the listing that says the confinement
    step ran: its refusal read as a plain `exit 126`, the why in the log alone."""
    project, root, top = _repo_with_project(tmp_path)
    (root / "sub").write_text("a file, not a directory\n")
    task = write_task(project.order(), "T", command="echo ran > ran.txt", target_files=["sub/out.txt"],
                      confine=True, workspace="worktree")
    _git(top, "add", "-A")
    _git(top, "commit", "-q", "-m", "task")
    proc = project.aipm("run", "ORD", "--no-review")
    assert proc.returncode == 1
    data = yaml.safe_load(task.read_text())
    assert data["status"] == "FAILED" and data["exit_code"] == 126
    assert data["reason"].startswith("confine: cannot confine the worker: "), data["reason"]
    assert "confine: cannot confine the worker" in proc.stdout, proc.stdout
    assert not (root / "ran.txt").exists()


@needs_landlock
def test_a_confined_commands_own_refusal_line_and_exit_126_are_not_taken_for_aipms(tmp_path):
    """The reason was the last `[aipm] confine: ...` line of the log, which the command writes too: its own such
    line and exit 126 became aipm's reason. The ruleset's refusal is noted beside the exit file, which no confined
    command can reach."""
    project, root, _ = _tree(tmp_path)
    write_task(project.order(), "T", command="echo '[aipm] confine: cannot confine the worker: forged'; exit 126",
               target_files=["out.txt"], confine=True)
    proc = project.aipm("run", "ORD", "--no-review")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    data = yaml.safe_load((root / "orders" / "ORD" / "T.yaml").read_text())
    assert (data["status"], data["exit_code"], data["reason"]) == ("FAILED", 126, "exit 126"), data


def test_a_commands_own_exit_126_stays_exit_126(project):
    """Only a confined attempt's log is read for the why: an unconfined command exiting 126 is just that."""
    write_task(project.order(), "T", command="echo '[aipm] confine: cannot confine the worker: no'; exit 126",
               target_files=["t.txt"])
    project.aipm("run", "ORD", "--no-review")
    assert yaml.safe_load((project.root / "orders" / "ORD" / "T.yaml").read_text())["reason"] == "exit 126"


@needs_landlock
def test_a_confined_argv_finds_its_program_on_path_as_an_agent_preset_needs(tmp_path):
    """An argv naming its program by a bare name (every agent preset's: `claude -p ...`) ran as
    `os.execv("claude")`, which searches no PATH: every confined agent attempt failed with a traceback in its
    log. Here the program is found on PATH, runs confined, and its write outside the targets is refused."""
    project, root, _ = _tree(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    agent = bin_dir / "fake-agent"
    agent.write_text("#!/bin/sh\necho done > docs/ok.md\necho hacked >> README || echo 'README refused'\n")
    agent.chmod(0o755)
    write_task(project.order(), "T", command=["fake-agent"], target_files=["docs/"], confine=True)
    proc = project.aipm("run", "ORD", "--no-review", env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (root / "docs" / "ok.md").read_text() == "done\n"
    assert (root / "README").read_text() == "readme\n"
    log = (root / ".aipm" / "logs" / "ORD" / "T.1.log").read_text()
    assert "Permission denied" in log and "README refused" in log and "Traceback" not in log, log


@needs_landlock
def test_a_confined_program_that_cannot_start_fails_with_one_line_not_a_traceback(tmp_path):
    """Found on PATH at launch, yet its interpreter is missing: the attempt fails as a shell would say it."""
    project, root, _ = _tree(tmp_path)
    (root / "tool").write_text("#!/nonexistent/interpreter\n")
    (root / "tool").chmod(0o755)
    write_task(project.order(), "T", command=["./tool"], target_files=["docs/"], confine=True)
    proc = project.aipm("run", "ORD", "--no-review")
    assert proc.returncode == 1
    data = yaml.safe_load((root / "orders" / "ORD" / "T.yaml").read_text())
    assert data["status"] == "FAILED" and data["exit_code"] == 127, data
    log = (root / ".aipm" / "logs" / "ORD" / "T.1.log").read_text()
    assert "aipm: cannot run ./tool: No such file or directory" in log and "Traceback" not in log, log


# -- cases an adversarial review reproduced (each failed before its fix) --------------------------------------

# Stands in for the standard library's `token` (which the confine step imports before its ruleset applies)
# after writing outside every target: run from the project root by `python -m`, it would run unconfined.
PLANTED = r'''
import importlib.util, os, sysconfig
with open(os.path.join(os.getcwd(), "README"), "a") as handle:
    handle.write("escaped\n")
_spec = importlib.util.spec_from_file_location("token", os.path.join(sysconfig.get_paths()["stdlib"], "token.py"))
_real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_real)
globals().update({k: v for k, v in vars(_real).items() if not k.startswith("__")})
'''


@needs_landlock
def test_a_module_a_task_left_in_the_project_root_never_runs_before_the_next_ruleset(tmp_path):
    (tmp_path / "p").mkdir()
    project = Project(tmp_path / "p")
    root = project.root
    (root / "README").write_text("readme\n")
    (root / "planted.txt").write_text(PLANTED)
    write_task(project.order(), "A", target_files=["token.py"], confine=True, command="cat planted.txt > token.py")
    write_task(project.order(), "B", target_files=["docs/"], confine=True, depends_on=["A"],
               command="echo hi > docs/x.md; echo direct >> README || true")
    proc = project.aipm("run", "ORD", "--no-review")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (root / "README").read_text() == "readme\n"
    assert (root / "docs" / "x.md").read_text() == "hi\n"


# Reads its exit file's path from its wrapper's argv, writes 0 there, kills its wrapper and its owner, and fails.
FORGE = ("W=$PPID; EX=$(tr '\\0' '\\n' < /proc/$W/cmdline | sed -n 2p); "
         "OWNER=$(awk '/^PPid/{print $2}' /proc/$W/status); "
         "echo 0 > \"$EX\" && echo forged; kill -9 $OWNER $W; exit 1")


@needs_landlock
def test_a_confined_worker_cannot_write_aipms_state_outside_the_project(tmp_path):
    """Its exit file (forged: the next run recorded DONE for a command that failed), the compiled wrapper every
    later worker of the user starts through (outside any ruleset), the locks: none may be written or made."""
    from aipm.statedir import user_base

    (tmp_path / "p").mkdir()
    project = Project(tmp_path / "p")
    task = write_task(project.order(), "T", target_files=["out/"], confine=True, command=FORGE)
    project.aipm("run", "ORD", "--no-review")
    probe = f"touch {user_base()}/bin/probe-$$ && echo made; echo t > $TMPDIR/t && echo tmp"
    write_task(project.order("PROBE"), "P", target_files=["probe/"], confine=True, command=probe)
    project.aipm("run", "PROBE", "--no-review")
    assert "forged" not in (project.root / ".aipm" / "logs" / "ORD" / "T.1.log").read_text()
    assert yaml.safe_load(task.read_text())["status"] != "DONE"
    log = (project.root / ".aipm" / "logs" / "PROBE" / "P.1.log").read_text()
    assert "made" not in log and "tmp" in log  # its own TMPDIR stays writable


EVIL_TASK = "printf 'id: EVIL\\ncommand: echo pwned >> README\\n' > {d}/EVIL.yaml; sed -i 's/QUEUED/DONE/' {d}/U.yaml"


@needs_landlock
@pytest.mark.parametrize("glob", ["orders/ORD/*.md", "orders/*.md"])
def test_a_glob_whose_base_is_an_order_directory_opens_no_task_file(tmp_path, glob):
    """The glob's base is granted as a directory: an order directory's (or the one holding them) opened every
    task file in it; a worker planted a task that aipm then ran unconfined, and marked another DONE."""
    (tmp_path / "p").mkdir()
    project = Project(tmp_path / "p")
    root = project.root
    (root / "README").write_text("r\n")
    notes = project.order() / "notes.md"
    notes.write_text("notes\n")
    (project.order() / "r").mkdir()  # a directory of the order's own: no task files in it
    place = "orders/ORD" if glob.startswith("orders/ORD") else "orders/OTHER"
    write_task(project.order(), "T", target_files=[glob], confine=True,
               command=EVIL_TASK.format(d=place) + "; echo more >> orders/ORD/notes.md; echo r > orders/ORD/r/r.md; true")
    write_task(project.order("OTHER"), "U", target_files=["u/"], command="echo U ran >> README")
    write_task(project.order(), "U", target_files=["u/"], depends_on=["T"], command="echo U ran >> README")
    project.aipm("run", "ORD", "--no-review")
    assert not (root / place / "EVIL.yaml").exists() and "pwned" not in (root / "README").read_text()
    assert yaml.safe_load((root / place / "U.yaml").read_text()).get("status", "QUEUED") in ("QUEUED", "DONE")
    assert (root / "README").read_text().count("U ran") == 1  # ORD's U, once: OTHER's is no task of this run
    # What is no task file stays writable: a file beside the task files, and below them (a glob `**` reaches).
    assert notes.read_text() == "notes\nmore\n" and (project.order() / "r" / "r.md").read_text() == "r\n"


@needs_landlock
@pytest.mark.parametrize("target", ["orders/OTHER/*.md", "orders/OTHER/", "orders/OTHER/U.yaml"])
def test_a_target_in_another_order_directory_opens_none_of_its_task_files(tmp_path, target):
    """Only the task's own order directory (and the one holding the orders) were kept: a glob, directory or file
    target in another order's directory opened its task files, so a worker planted a task there and rewrote one
    (`confine: true` to false, a command), to run unconfined when that order runs."""
    (tmp_path / "p").mkdir()
    project = Project(tmp_path / "p")
    other = project.order("OTHER")
    notes = other / "notes.md"
    notes.write_text("notes\n")
    task = write_task(other, "U", target_files=["u/"], confine=True, status="QUEUED", command="true")
    before = task.read_text()
    write_task(project.order(), "T", target_files=[target], confine=True,
               command=EVIL_TASK.format(d="orders/OTHER") + "; echo 'confine: false' >> orders/OTHER/U.yaml"
               "; echo more >> orders/OTHER/notes.md; true")
    proc = project.aipm("run", "ORD", "--no-review")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in other.iterdir()) == ["U.yaml", "notes.md"]
    assert task.read_text() == before
    # What is no task file stays as writable as the target makes it.
    assert notes.read_text() == ("notes\n" if target.endswith(".yaml") else "notes\nmore\n")


def test_rules_give_no_target_a_task_file_or_aipms_runtime_directory(tmp_path):
    root = tmp_path / "proj"
    order = root / "orders" / "ORD"
    order.mkdir(parents=True)
    (order / "T.yaml").write_text("command: true\n")
    log = root / ".aipm" / "logs" / "ORD" / "T.1.log"
    log.parent.mkdir(parents=True)
    log.write_text("")
    real = os.path.realpath(root)
    grants, tmp = confine.rules(str(root), ["orders/ORD/T.yaml", ".aipm/", ".aipm/x", "ok.txt"], str(log), [],
                                keep=[str(order), str(root / "orders")], state=str(tmp_path / "state"))
    paths = {p for p, _ in grants}
    assert os.path.join(real, "ok.txt") in paths
    assert not {p for p in paths if p.startswith((os.path.join(real, ".aipm"), str(order)))} - {str(log), tmp}
    os.rmdir(tmp)


@needs_landlock
@pytest.mark.skipif(landlock.abi() < 6, reason="signals are scoped from Landlock ABI 6 (Linux 6.12)")
def test_a_confined_worker_cannot_signal_its_wrapper_or_its_owner(tmp_path):
    (tmp_path / "p").mkdir()
    project = Project(tmp_path / "p")
    command = ("sleep 30 & kill -0 $! && echo own-child; kill -0 $PPID 2>/dev/null || echo wrapper-denied; "
               "O=$(awk '/^PPid/{print $2}' /proc/$PPID/status); kill -0 $O 2>/dev/null || echo owner-denied; "
               "kill $!")
    write_task(project.order(), "T", target_files=["out/"], confine=True, command=command)
    proc = project.aipm("run", "ORD", "--no-review")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (project.root / ".aipm" / "logs" / "ORD" / "T.1.log").read_text()
    assert ("own-child", "wrapper-denied", "owner-denied") == tuple(w for w in log.split() if w.endswith(
        ("child", "denied"))), log


@needs_landlock
def test_a_confined_task_runs_where_aipm_and_landlockpy_are_found_through_pythonpath_only(tmp_path):
    """The step that builds the ruleset runs isolated (no PYTHONPATH, no site): it must still find aipm and the
    binding where the process that started it found them, or every confined task fails with exit 126."""
    import subprocess
    import sysconfig

    base = os.path.join(sys.base_prefix, "bin", "python3")
    if not os.access(base, os.X_OK) or subprocess.run([base, "-c", "import landlockpy"],
                                                      capture_output=True).returncode == 0:
        pytest.skip("needs a base interpreter without landlockpy of its own")
    (tmp_path / "p").mkdir()
    project = Project(tmp_path / "p")
    task = write_task(project.order(), "T", target_files=["out.txt"], command="echo ok > out.txt", confine=True)
    env = dict(os.environ, AIPM_ENABLE_MONITORING="false",
               PYTHONPATH=os.pathsep.join([str(Path(confine.__file__).parents[1]), sysconfig.get_paths()["purelib"]]))
    proc = subprocess.run([base, "-m", "aipm", "--root", str(project.root), "run", "ORD", "--no-review"],
                          capture_output=True, text=True, env=env, cwd=project.root, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert yaml.safe_load(task.read_text())["status"] == "DONE"
    assert (project.root / "out.txt").read_text() == "ok\n"


def test_rules_keep_out_the_runtime_directory_where_a_link_at_aipm_leads(tmp_path):
    """`.aipm` may be a link to a directory in the project: the rules kept out the link's path, not the place,
    and a target of the root (or of that place) opened other tasks' logs, feedback and merge plans."""
    root = tmp_path / "proj"
    (root / "rt" / "logs" / "ORD").mkdir(parents=True)
    (root / "orders" / "ORD").mkdir(parents=True)
    os.symlink("rt", root / ".aipm")
    log = str(root / ".aipm" / "logs" / "ORD" / "T.1.log")
    real = os.path.realpath(root / "rt")
    for targets in (["./"], ["rt/"]):
        grants, tmp = confine.rules(str(root), targets, log, [], [str(root / "orders" / "ORD"),
                                                                  str(root / "orders")])
        opened = [p for p, _ in grants if os.path.realpath(p) == real or os.path.realpath(p).startswith(real + "/")]
        assert opened == [log], (targets, opened)
        os.rmdir(tmp)


def test_an_unconfined_worker_cannot_have_aipm_remove_what_it_lists_beside_its_log(project, tmp_path):
    """After every attempt, confined or not, the listing beside its log (`A.1.confine.json`: what was made for a
    ruleset's rules) was read back and what it named removed, a directory named whole with all it holds. An
    unconfined worker may write there: it had aipm `rm -rf` any directory (`victim/` here, outside the project),
    or held its run for ever with a FIFO there. Only a confined attempt's listing is read now."""
    victim = tmp_path.parent / f"{tmp_path.name}-victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "precious").write_text("keep\n")
    order = project.order()
    listing = json.dumps([[str(victim), True, confine.WHOLE]])
    write_task(order, "A", command=f"echo '{listing}' > \"${{AIPM_LOG%.log}}.confine.json\"")
    write_task(order, "B", command='mkfifo "${AIPM_LOG%.log}.confine.json"')
    try:
        proc = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert task_statuses(order) == {"A": "DONE", "B": "DONE"} and no_workers(project.root)
        assert (victim / "sub" / "precious").read_text() == "keep\n"
    finally:
        import shutil

        shutil.rmtree(victim, ignore_errors=True)


@needs_landlock
def test_the_listing_of_what_was_made_for_the_rules_is_never_written_through_a_link(tmp_path):
    """The listing beside the log is written in the worker's process before the ruleset applies: a link an
    earlier, unconfined attempt left under the next attempt's name had the file it led to truncated and written."""
    import subprocess

    root = tmp_path / "p"
    (root / ".aipm" / "logs").mkdir(parents=True)
    log = root / ".aipm" / "logs" / "T.2.log"
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's\n")
    Path(confine.made_file(str(log))).symlink_to(victim)
    argv = confine.prefix(str(root), ["new.txt"], str(log), str(tmp_path / "T.2"), [])
    assert subprocess.run([*argv, "true"], cwd=root, timeout=60).returncode == 0
    assert victim.read_text() == "the user's\n"
    assert json.loads(Path(confine.made_file(str(log))).read_text())[0][0] == str(root / "new.txt")
    confine.tidy(str(log), True)  # as an owner does after the attempt: its TMPDIR in /tmp goes


@needs_landlock
def test_a_listing_another_worker_rewrote_never_removes_more_than_a_tmpdir_of_ours(project, tmp_path_factory):
    """The listing of a confined attempt lies in `.aipm/logs`, which another task's unconfined worker can write
    while the attempt runs: one that named a directory of the user's to be removed whole had the attempt's end
    `rm -rf` it."""
    victim = tmp_path_factory.mktemp("victim")
    (victim / "notes.txt").write_text("the user's\n")
    logs = project.root / ".aipm" / "logs" / "ORD"
    write_task(project.order(), "C", target_files=["c.txt"], confine=True,
               command=f'while [ ! -e "{logs}/go" ]; do sleep 0.05; done; echo "$TMPDIR" > c.txt')
    (victim / "empty").mkdir()
    (victim / "empty.txt").touch()
    mtime = (victim / "empty.txt").stat().st_mtime_ns
    listing = json.dumps([[str(victim), True, -1], [str(victim / "empty"), True, 0],
                          [str(victim / "empty.txt"), False, mtime]])
    write_task(project.order(), "U", target_files=["u.txt"],
               command=f"""sleep 0.5; echo '{listing}' > "{logs}/C.1.confine.json"; touch "{logs}/go" """)
    assert project.aipm("run", "ORD").returncode == 0
    assert sorted(p.name for p in victim.iterdir()) == ["empty", "empty.txt", "notes.txt"]
    assert (victim / "notes.txt").read_text() == "the user's\n"
    shutil.rmtree((project.root / "c.txt").read_text().strip())  # C's TMPDIR, which the rewritten listing lost


@needs_landlock
@pytest.mark.parametrize("make", ["mkfifo", "truncate -s 1T"])
def test_a_reviewer_cannot_hold_a_confined_tasks_owner_with_a_fifo_or_sparse_file_beside_its_log(project, make):
    """A confined attempt's listing of what was made for its rules (`A.1.confine.json`) is trusted, since its
    worker cannot write beside its log; but its review runs unconfined, and a reviewer (or another task's
    unconfined worker) that put a FIFO in the listing's place held the run for ever when the attempt was dropped,
    under the launch lock: every command of the project, SIGTERM too. The listing is read without waiting now,
    and a sparse terabyte there (a MemoryError traceback) is not read."""
    order = project.order()
    write_task(order, "A", command="echo hi > out.txt", target_files=["out.txt"], confine=True,
               review=f'L="${{AIPM_LOG%.log}}.confine.json"; mv "$L" "$L.was"; {make} "$L"')
    proc = project.aipm("run", "ORD", "--no-resource-monitoring", timeout=60, preexec_fn=capped_memory)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert task_statuses(order) == {"A": "COMPLETED"} and no_workers(project.root)
    assert (project.root / "out.txt").read_text() == "hi\n"
    log = str(project.root / ".aipm" / "logs" / "ORD" / "A.1.log")
    os.replace(f"{confine.made_file(log)}.was", confine.made_file(log))  # what the reviewer moved aside, back:
    confine.tidy(log, True)  # its TMPDIR in /tmp goes


@needs_landlock
def test_a_project_whose_path_is_not_utf8_runs_shared_worktree_and_confined_tasks(tmp_path):
    """A project in a directory whose name is not UTF-8 (a Latin-1 `caf\\xe9`): every command died with a traceback
    (UnicodeEncodeError: surrogates not allowed) at the state directory's name, then at the parse cache's, the
    workers' environment markers, a worktree's git paths and a confined worktree's `.git` file."""
    project, root, top = _repo_with_project(tmp_path, below=os.fsdecode(b"caf\xe9"))
    order = project.order()
    write_task(order, "S", command="echo s > s.txt", target_files=["s.txt"])
    write_task(order, "W", command="echo w > w.txt", target_files=["w.txt"], confine=True, workspace="worktree")
    _git(top, "add", "-A")
    _git(top, "commit", "-q", "-m", "tasks")
    proc = project.aipm("run", "ORD", "--no-review")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert task_statuses(order) == {"OTHER": "DONE", "S": "DONE", "W": "DONE"}
    assert (root / "s.txt").read_text() == "s\n" and (root / "w.txt").read_text() == "w\n"
    for args in (("status", "ORD", "--json"), ("ps", "--json"), ("locks", "--json"), ("diff", "W"),
                 ("logs", "W"), ("recover",)):
        done = project.aipm(*args)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (args, done.stdout + done.stderr)
    assert no_workers(root)


@needs_landlock
@pytest.mark.parametrize("end", ["file still gone", "another task", "owner killed after its final write"])
def test_the_tmpdir_of_a_confined_attempt_that_recovery_ends_is_removed(project, gate, end):
    """A confined attempt of a project in /tmp gets a TMPDIR of its own there (`aipm-tmp-*`), which its owner removes
    at the attempt's end. One that `aipm recover` ended instead (its outcome dropped or discarded, or the record an
    owner killed after its final write left) kept it for good: one more empty directory in /tmp each time."""
    import subprocess

    order = project.order()
    path = write_task(order, "T1", target_files=["a.txt"], confine=True,
                      command=f'echo "$TMPDIR" > a.txt; while [ ! -e {gate} ]; do sleep 0.05; done')
    record = state(project.root) / "workers" / "ORD" / "T1.json"
    listing = Path(confine.made_file(str(project.root / ".aipm" / "logs" / "ORD" / "T1.1.log")))
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD",
                            "--no-resource-monitoring"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (project.root / "a.txt").exists() and (project.root / "a.txt").read_text().strip())
        private = (project.root / "a.txt").read_text().strip()
        assert os.path.basename(private).startswith("aipm-tmp-") and os.path.isdir(private)
        saved = record.read_text(), listing.read_text()
        if end != "owner killed after its final write":
            path.unlink()  # its outcome is held until the file is back
        gate.touch()
        assert run.wait(timeout=60) == (0 if end == "owner killed after its final write" else 1)
    finally:
        gate.touch()
        run.kill()
    if end == "another task":
        write_task(order, "T1", target_files=["b.txt"], command="true")
    if end == "owner killed after its final write":  # what the kill leaves: the record, the listing, the TMPDIR
        assert task_statuses(order) == {"T1": "DONE"} and not os.path.exists(private)
        record.write_text(saved[0])
        listing.write_text(saved[1])
        os.mkdir(private)
    project.aipm("recover", "ORD", check=True)
    assert no_workers(project.root) and not os.path.exists(private)


@needs_landlock
@pytest.mark.parametrize("beside", [False, True], ids=["within-its-glob", "beside-its-glob"])
def test_a_confined_glob_tasks_audit_charges_it_only_with_what_its_glob_opened_to_it(tmp_path, beside):
    """A glob target makes a confined task's audit run (Landlock grants the glob's whole base directory), and that
    audit charged it with a person's edits meanwhile where the kernel refused its worker every write (README.md, a
    new file at the root): the task was sent back for them, told to set `confine: true`, which it had."""
    import subprocess

    project, root, _ = _repo_with_project(tmp_path)
    (root / "aipm.yaml").write_text("confine: true\nmax_rework: 0\n")
    gates = tmp_path / "gates"  # beside the project, not on its path: writable by the confined worker
    gates.mkdir()
    write_task(project.order(), "T", target_files=["src/*.py"], command=(
        "echo 'b = 2' > src/b.py; " + ("echo notes > src/notes.md; " if beside else "")
        + f'touch "{gates}/ready"; i=0; while [ ! -e "{gates}/go" ] && [ $i -lt 1200 ]; do sleep 0.05; '
        'i=$((i+1)); done'))
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(root), "run", "ORD"],
                           env=dict(os.environ, AIPM_ENABLE_MONITORING="false"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for((gates / "ready").exists)
    with open(root / "README.md", "a") as readme:  # a person's edits while it runs
        readme.write("edited by a person\n")
    (root / "new.txt").write_text("a person's\n")
    (gates / "go").touch()
    stdout, stderr = run.communicate(timeout=120)
    task = yaml.safe_load((project.order() / "T.yaml").read_text())
    if not beside:
        assert run.returncode == 0 and task["status"] == "DONE", stdout + stderr
        return
    assert task["status"] == "REJECTED" and task["reason"] == "scope: wrote src/notes.md", stdout + stderr
    finish = next(line for line in stdout.splitlines() if line.startswith("finish"))
    assert "confine: true" not in finish and "a glob target opens all of src/ to it" in finish, finish
