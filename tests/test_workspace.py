"""Issue 15: `workspace: worktree` — each task in its own git worktree, merged back without losing a byte.

Every test runs the real CLI in a real git repository. Workers record what they saw in a journal outside the
repository; the tests judge the journal, the main tree, the task files and git's own state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import sys
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from aipm.workspace import mergeplan
from invariants import KILL_OWNER
from conftest import Project, capped_memory, no_workers, state, task_statuses, wait_for, write_task

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

IDENTITY = {"GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "Test",
            "GIT_COMMITTER_EMAIL": "test@example.com", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}


def git(top: Path, *args: str) -> str:
    return subprocess.run(["git", "--no-optional-locks", *args], cwd=top, check=True, capture_output=True,
                          text=True).stdout


def user_state(top: Path) -> dict:
    """What belongs to the user and aipm must never change: HEAD, branches, tags, stash, the index."""
    index = top / ".git" / "index"
    return {
        "head": git(top, "rev-parse", "HEAD"),
        "symbolic": git(top, "symbolic-ref", "HEAD"),
        "refs": git(top, "for-each-ref", "--format=%(refname) %(objectname)", "refs/heads", "refs/tags",
                    "refs/stash"),
        "stash": git(top, "stash", "list"),
        "index_sha": hashlib.sha256(index.read_bytes()).hexdigest(),
        "staged": git(top, "ls-files", "-s"),
    }


def aipm_leftovers(top: Path) -> dict:
    """Worktrees other than the user's, and refs under refs/aipm/."""
    worktrees = [line for line in git(top, "worktree", "list", "--porcelain").splitlines()
                 if line.startswith("worktree ")]
    return {"worktrees": worktrees[1:], "refs": git(top, "for-each-ref", "refs/aipm/").split()}


@pytest.fixture
def repo(tmp_path: Path, monkeypatch) -> Path:
    """A git repository with history, a stash, a staged change and an unstaged one (the user's work)."""
    for key, value in IDENTITY.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.delenv("AIPM_WORKSPACE", raising=False)
    top = tmp_path / "repo"
    top.mkdir()
    git(top, "init", "-q", "-b", "main")
    (top / "src").mkdir()
    for name in ("a", "b", "c", "d"):
        (top / "src" / f"{name}.txt").write_text("".join(f"{name} line {i}\n" for i in range(1, 21)))
    (top / ".gitignore").write_text(".env\nbuild/\n")
    git(top, "add", ".")
    git(top, "commit", "-q", "-m", "init")
    (top / "src" / "d.txt").write_text("stashed\n")
    git(top, "stash", "-q")
    (top / "src" / "staged.txt").write_text("staged\n")
    git(top, "add", "src/staged.txt")
    return top


def project_in(top: Path, *, sub: str = "", config: str = "workspace: worktree\n") -> Project:
    root = top / sub if sub else top
    root.mkdir(exist_ok=True)
    project = Project(root)
    (root / "aipm.yaml").write_text("max_workers: 5\n" + config)
    return project


def journal_lines(journal: Path) -> list[str]:
    return journal.read_text().splitlines() if journal.exists() else []


def wait_gate(gate: Path) -> str:
    """Shell: wait until `gate` exists (bounded, so a broken test fails instead of hanging)."""
    return f'i=0; while [ ! -e "{gate}" ] && [ $i -lt 2400 ]; do sleep 0.05; i=$((i+1)); done; '


# -- 1. isolation, and a successor's view --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["worktree", "shared"])
def test_concurrent_worktree_tasks_do_not_see_each_others_edits(repo, tmp_path, mode):
    project = project_in(repo, config=f"workspace: {mode}\nscope_audit: false\n")
    journal, gates = tmp_path / "journal", tmp_path / "gates"
    gates.mkdir()
    order = project.order()
    for me, other in (("A", "B"), ("B", "A")):
        write_task(order, me, target_files=[f"src/{me.lower()}.txt"], command=(
            f'echo "marker {me}" >> src/{me.lower()}.txt; touch "{gates}/{me}"; ' + wait_gate(gates / other)
            + f'if grep -q "marker {other}" src/{other.lower()}.txt; then s=yes; else s=no; fi; '
            f'echo "{me} saw {other}: $s" >> "{journal}"'))
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0, proc.stderr
    seen = sorted(journal_lines(journal))
    if mode == "shared":  # the control: the same workers in one tree do see each other
        assert seen == ["A saw B: yes", "B saw A: yes"]
        return
    assert seen == ["A saw B: no", "B saw A: no"]
    assert "marker A" in (repo / "src/a.txt").read_text()  # both merged back
    assert "marker B" in (repo / "src/b.txt").read_text()
    assert aipm_leftovers(repo) == {"worktrees": [], "refs": []}


def test_successor_starts_from_its_dependencys_merged_edit(repo, tmp_path):
    project = project_in(repo)
    journal = tmp_path / "journal"
    order = project.order()
    write_task(order, "T1", target_files=["src/a.txt"], command="echo 'from T1' >> src/a.txt")
    write_task(order, "T2", depends_on=["T1"], target_files=["src/b.txt"],
               command=f'tail -n 1 src/a.txt >> "{journal}"; echo "from T2" >> src/b.txt')
    assert project.aipm("run", "ORD").returncode == 0
    assert journal_lines(journal) == ["from T1"]
    assert (repo / "src/b.txt").read_text().endswith("from T2\n")
    assert project.statuses() == {"T1": "DONE", "T2": "DONE"}


def test_a_project_that_ignores_its_runtime_directory_runs_worktree_tasks(repo):
    """`.aipm/` in the project's .gitignore (as many add it): the capture's pathspec excluding the runtime
    directory named an ignored path, which git add refuses, so every worktree task failed to launch with
    `git add failed: hint: ...` and stayed QUEUED."""
    (repo / ".gitignore").write_text(".env\nbuild/\n.aipm/\n")
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/a.txt"], command="echo 'from T' >> src/a.txt")
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert project.statuses() == {"T": "DONE"}
    assert (repo / "src/a.txt").read_text().endswith("from T\n")
    assert aipm_leftovers(repo) == {"worktrees": [], "refs": []}


def test_a_worktree_attempt_keeps_its_files_until_it_has_merged_back(repo, tmp_path):
    """T1 (a worktree) and T2 (any workspace) want the same file and do not depend on each other. An attempt that
    no reviewer follows hands its files on at its command's end, except one in a worktree: its edit reaches the
    shared file only when its outcome is recorded (the merge), so T2 starts from the merged file."""
    project = project_in(repo, config="workspace: worktree\nscope_audit: false\n")
    journal = tmp_path / "journal"
    order = project.order()
    write_task(order, "T1", target_files=["src/a.txt"], priority="P0", command="echo 'from T1' >> src/a.txt")
    write_task(order, "T2", target_files=["src/a.txt"], priority="P2",
               command=f'tail -n 1 src/a.txt >> "{journal}"; echo "from T2" >> src/a.txt')
    assert project.aipm("run", "ORD", "--max-workers", "2").returncode == 0
    assert journal_lines(journal) == ["from T1"]
    assert (repo / "src/a.txt").read_text().endswith("from T1\nfrom T2\n")
    assert project.statuses() == {"T1": "DONE", "T2": "DONE"}


# -- 2. the start state, the user's git state, setup and copy --------------------------------------------------


def test_worktree_starts_from_what_the_user_sees_without_touching_their_git_state(repo, tmp_path):
    (repo / "src" / "a.txt").write_text("uncommitted edit\n")
    (repo / "src" / "new.txt").write_text("untracked\n")
    (repo / ".env").write_text("SECRET=1\n")  # ignored, and copied in
    (repo / "build").mkdir()
    (repo / "build" / "out.o").write_text("ignored, not copied\n")
    project = project_in(repo, sub="proj")
    (project.root / ".env").write_text("PROJ=1\n")  # the project root's own ignored file, copied
    (project.root / "aipm.yaml").write_text(
        "max_workers: 5\nworkspace: worktree\nworkspace_copy: ['.env']\n"
        f"workspace_setup: 'pwd > \"{tmp_path}/setup-cwd\"; cat .env > \"{tmp_path}/setup-env\"'\n")
    git(repo, "add", "proj/aipm.yaml")  # staged: part of what the user sees
    before = user_state(repo)
    journal = tmp_path / "journal"
    order = project.order()
    write_task(order, "T", target_files=["out.txt"], command=(
        f'{{ pwd; echo "root=$AIPM_ROOT"; echo "ws=$AIPM_WORKSPACE"; cat ../src/a.txt ../src/new.txt '
        f'../src/staged.txt; cat .env; ls ../.env ../build 2>&1 | sed "s/^ls: //"; }} >> "{journal}"; '
        'echo done > out.txt'))
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    tree = project.root / ".aipm" / "worktrees" / "ORD" / "T"
    lines = journal_lines(journal)
    assert lines[:3] == [str(tree / "proj"), f"root={tree / 'proj'}", f"ws={tree}"]
    assert lines[3:7] == ["uncommitted edit", "untracked", "staged", "PROJ=1"]
    assert "cannot access '../.env'" in lines[7] and "cannot access '../build'" in lines[8]
    assert (tmp_path / "setup-cwd").read_text().strip() == str(tree / "proj")  # setup ran in the worktree
    assert (tmp_path / "setup-env").read_text() == "PROJ=1\n"  # ... after the copy
    assert (project.root / "out.txt").read_text() == "done\n"  # merged back at the same sub-path
    assert user_state(repo) == before
    assert aipm_leftovers(repo) == {"worktrees": [], "refs": []}
    assert not tree.exists()


@pytest.mark.parametrize("mode", ["worktree", "shared"])
def test_the_worker_and_its_review_get_the_targets_normalised(repo, tmp_path, mode):
    """AIPM_TARGET_FILES held the targets as written (`./src/../out.txt`), not as aipm locks and confines them."""
    project = project_in(repo, config=f"workspace: {mode}\n")
    journal = tmp_path / "journal"
    tell = f'printf "%s\\n" "$AIPM_TARGET_FILES" >> "{journal}"'
    write_task(project.order(), "T", target_files=["./src/../out.txt", "src", "./docs//x.md"],
               command=f"{tell}; echo done > out.txt", review=tell)
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert journal_lines(journal) == ["out.txt", "src/", "docs/x.md"] * 2  # the worker's, then its review's


def test_failed_setup_fails_the_attempt(repo, tmp_path):
    project = project_in(repo, config="workspace: worktree\nworkspace_setup: 'exit 3'\n")
    write_task(project.order(), "T", target_files=["src/a.txt"], command="echo ran >> src/a.txt")
    assert project.aipm("run", "ORD").returncode == 1
    assert project.statuses() == {"T": "FAILED"}
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert "workspace_setup failed (exit 3)" in log and "attempt 1 ended: exit 3" in log
    assert "ran" not in (repo / "src/a.txt").read_text()


def test_a_task_opts_out_of_the_projects_setup_with_an_empty_string(repo, tmp_path):
    """reference.md: `workspace_setup: ""` for none. validate refused it ("is empty"), so a task could not leave
    out a project-wide setup."""
    project = project_in(repo, config="workspace: worktree\nworkspace_setup: 'exit 3'\n")
    write_task(project.order(), "T", target_files=["src/a.txt"], command="echo ran >> src/a.txt",
               workspace_setup="")
    assert project.aipm("validate", "ORD").returncode == 0
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert project.statuses() == {"T": "DONE"} and "ran" in (repo / "src/a.txt").read_text()


# -- 3. exact scope --------------------------------------------------------------------------------------------


def test_out_of_scope_write_merges_nothing_and_names_the_paths(repo, tmp_path):
    project = project_in(repo, config="workspace: worktree\nmax_rework: 0\n")
    before_a = (repo / "src/a.txt").read_bytes()
    write_task(project.order(), "T", target_files=["src/a.txt"],
               command="echo mine >> src/a.txt; echo stray > stray.txt; echo other >> src/b.txt")
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 1
    assert project.statuses() == {"T": "REJECTED"}
    feedback = (repo / ".aipm/feedback/ORD/T.txt").read_text()
    assert "src/b.txt" in feedback and "stray.txt" in feedback and "src/a.txt" not in feedback
    assert "nothing of this attempt was merged" in feedback
    # The in-scope change was not merged either: the feedback and the log say where it is kept.
    patch = repo / ".aipm/patches/ORD/T.1.patch"
    assert f"its changes are kept in {patch}" in feedback and "+mine" in patch.read_text()
    assert f"its changes are kept in {patch}" in (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert (repo / "src/a.txt").read_bytes() == before_a
    assert not (repo / "stray.txt").exists()
    # The failed attempt stays inspectable until `aipm recover`.
    shown = project.aipm("diff", "T")
    assert shown.returncode == 0 and "+mine" in shown.stdout and "+stray" in shown.stdout
    assert len(aipm_leftovers(repo)["worktrees"]) == 1
    assert project.aipm("recover").returncode == 0
    assert aipm_leftovers(repo) == {"worktrees": [], "refs": []}
    assert "+mine" in project.aipm("diff", "T").stdout  # the attempt's patch is kept


@pytest.mark.parametrize("workspace", ["worktree", "shared"])
def test_a_changed_file_is_judged_by_its_exact_name(repo, workspace):
    """The audit read each changed path as a target is read: stripped of surrounding blanks and refused for a
    backslash. So `src/a.txt ` (a trailing space) written by a task on src/a.txt passed as src/a.txt, and a
    worktree merged it into the main tree; and `src/b/x\\y.txt`, which a task on src/b/ may write, was charged to
    it as outside its targets, every attempt. Once merged, that name (noted for the audits in flight) must not
    stop the audit of a task running beside it (LATER) with a traceback either."""
    project = project_in(repo, config=f"workspace: {workspace}\nmax_rework: 0\n")
    write_task(project.order(), "SLASH", target_files=["src/b/"], command="mkdir -p src/b && echo ok > 'src/b/x\\y.txt'")
    write_task(project.order(), "LATER", target_files=["src/c.txt"], command="sleep 2; echo later >> src/c.txt")
    write_task(project.order(), "SPACE", target_files=["src/a.txt"], command="echo sneak > 'src/a.txt '",
               depends_on=["SLASH", "LATER"])  # (in the shared tree a stray write is charged to all running then)
    proc = project.aipm("run", "ORD")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert project.statuses() == {"SLASH": "DONE", "LATER": "DONE", "SPACE": "REJECTED"}, proc.stdout
    assert "changed outside target_files while this attempt ran: src/a.txt " in (
        repo / ".aipm/feedback/ORD/SPACE.txt").read_text()
    assert (repo / "src/b/x\\y.txt").read_text() == "ok\n"
    if workspace == "worktree":
        assert not (repo / "src/a.txt ").exists()


def test_a_merged_file_noted_for_the_audits_in_flight_excuses_that_file_alone(repo, tmp_path):
    """The files a merge wrote, noted in written.log when its worktree is removed, were read back as targets a
    person writes: `docs/a*.md` excused every docs/a… file of a shared task's audit in flight, `docs/[draft].md`
    docs/d.md (a character class), `docs/q?.md` docs/qz.md, and `docs/t.md ` (stripped) docs/t.md. A name that
    holds a newline and what looks like a line of the log must stay one name too (`**` would excuse anything)."""
    project = project_in(repo, config="workspace: shared\nmax_rework: 0\n")
    merged = ["docs/a*.md", "docs/[draft].md", "docs/q?.md", "docs/t.md ", 'docs/e\n99999999999999999999 ["**"]']
    maker = tmp_path / "make.py"
    maker.write_text(f"import os\nos.makedirs('docs', exist_ok=True)\nfor name in {merged!r}:\n"
                     "    open(name, 'w').write('merged\\n')\n")
    # Each target covers its file and nothing else a shared task writes here (fnmatch's brackets quote).
    write_task(project.order(), "W", workspace="worktree", command=f"{sys.executable} {maker}",
               target_files=["docs/a[*].md", "docs/[[]draft].md", "docs/q[?].md", "docs/t.md[ ]", "docs/e*"])
    stray = ["docs/ab.md", "docs/d.md", "docs/qz.md", "docs/t.md"]
    # S's audit is in flight from before W's merge to after its worktree (and merge plan) is removed.
    write_task(project.order(), "S", target_files=["src/s.txt"], command=(
        "i=0; while { [ ! -e 'docs/a*.md' ] || [ -e .aipm/merges/ORD/W ]; } && [ $i -lt 600 ]; do sleep 0.05; "
        "i=$((i+1)); done; mkdir -p docs; " + "".join(f"echo stray > '{p}'; " for p in stray) + "echo s > src/s.txt"))
    proc = project.aipm("run", "ORD")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert all((repo / name).read_text() == "merged\n" for name in merged)
    assert project.statuses() == {"W": "DONE", "S": "REJECTED"}, proc.stdout
    assert f"changed outside target_files while this attempt ran: {', '.join(stray)}" in (
        repo / ".aipm/feedback/ORD/S.txt").read_text()


def test_a_file_target_the_task_makes_a_directory_says_how_to_cover_it(repo):
    """`target_files: [gen]` for a directory the task makes: gen did not exist, so it is a file target and
    gen/out.txt lies outside it (though its lock covers it). In a worktree that can never pass (every attempt starts
    without gen/), and the feedback only said 'changed outside target_files: gen/out.txt', which names a path under
    the very target the user listed. It now says how to write the target. Found by a review."""
    project = project_in(repo, config="workspace: worktree\nmax_rework: 0\n")
    write_task(project.order(), "T", target_files=["gen", "src/a.txt"],
               command="mkdir -p gen && echo x > gen/out.txt && echo y > stray.txt")
    assert project.aipm("run", "ORD").returncode == 1
    feedback = (repo / ".aipm/feedback/ORD/T.txt").read_text()
    assert "gen/out.txt" in feedback and "stray.txt" in feedback
    assert "gen is a file target, not a directory" in feedback and "write `gen/` in target_files" in feedback
    assert feedback.count("is a file target") == 1  # src/a.txt has nothing below it


# -- 4. a person's concurrent edit ----------------------------------------------------------------------------


def _gated_task(order: Path, tmp_path: Path, command_after_gate: str, **fields) -> None:
    ready, gate = tmp_path / "ready", tmp_path / "gate"
    write_task(order, "T", target_files=["src/a.txt"], command=(
        f'if [ "$AIPM_ATTEMPT" = 1 ]; then touch "{ready}"; {wait_gate(gate)} fi; '
        f'[ -n "$AIPM_REVIEW_FEEDBACK" ] && cp "$AIPM_REVIEW_FEEDBACK" "{tmp_path}/feedback-seen"; '
        + command_after_gate), **fields)


def _run_with_person(project: Project, tmp_path: Path, edit) -> subprocess.CompletedProcess:
    """Start `aipm run`, let the person edit once the worker is running, then let the worker go on."""
    run = subprocess.Popen([os.sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"],
                           cwd=project.root, env=dict(os.environ, AIPM_ENABLE_MONITORING="false"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (tmp_path / "ready").exists())
    edit()
    (tmp_path / "gate").touch()
    out, err = run.communicate(timeout=120)
    return subprocess.CompletedProcess(run.args, run.returncode, out, err)


def test_a_persons_edit_elsewhere_in_the_file_survives_a_clean_three_way_merge(repo, tmp_path):
    project = project_in(repo)
    _gated_task(project.order(), tmp_path, "sed -i 's/a line 18/a line 18 by the task/' src/a.txt")
    shown = {}

    def edit():
        text = (repo / "src/a.txt").read_text()
        (repo / "src/a.txt").write_text(text.replace("a line 2\n", "a line 2 by a person\n"))
        shown["diff"] = project.aipm("diff", "T").stdout  # the running task's diff: its worktree so far

    proc = _run_with_person(project, tmp_path, edit)
    assert proc.returncode == 0, proc.stderr
    text = (repo / "src/a.txt").read_text()
    assert "a line 2 by a person\n" in text and "a line 18 by the task\n" in text
    assert text.count("\n") == 20
    assert project.statuses() == {"T": "DONE"}
    assert shown["diff"] == ""  # the worker had not edited yet when the person did
    assert "+a line 18 by the task" in project.aipm("diff", "T").stdout
    assert aipm_leftovers(repo) == {"worktrees": [], "refs": []}


def test_a_conflicting_edit_sends_the_task_back_with_the_conflict_and_keeps_the_patch(repo, tmp_path):
    project = project_in(repo)
    _gated_task(project.order(), tmp_path, 'sed -i "s/a line 5\\$/a line 5 by the task $AIPM_ATTEMPT/" src/a.txt',
                review="true")
    person = "a line 5 by a person\n"

    def edit():
        text = (repo / "src/a.txt").read_text()
        (repo / "src/a.txt").write_text(text.replace("a line 5\n", person))

    proc = _run_with_person(project, tmp_path, edit)
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load((project.order() / "T.yaml").read_text())
    assert (data["status"], data["attempts"], data["reworks"]) == ("COMPLETED", 2, 1)
    seen = (tmp_path / "feedback-seen").read_text()  # what attempt 2 was told
    assert "merge conflict" in seen and "src/a.txt" in seen and "<<<<<<<" in seen
    patch = repo / ".aipm/patches/ORD/T.1.patch"
    assert str(patch) in seen and "+a line 5 by the task 1" in patch.read_text()
    # The log and the reason name the path (the log's line ended "nothing of this attempt was merged:", with
    # neither the path nor the kept patch); the log has the rest, indented.
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert "] merge conflict in src/a.txt: " in log and f"\n  This attempt's changes are kept in {patch}" in log
    assert "\n  <<<<<<< main tree" in log
    run_lines = [line for line in proc.stdout.splitlines() if "merge conflict" in line]
    assert run_lines and "merge conflict in src/a.txt:" in run_lines[0], proc.stdout
    assert run_lines[0].endswith(f"; its changes are kept in {patch}; a next attempt starts from the main tree as "
                                 "it is now, your edit included"), run_lines[0]  # where the work is, said where seen
    # Attempt 2 started from the main tree with the person's edit: its sed found no "a line 5" to change.
    text = (repo / "src/a.txt").read_text()
    assert person in text and "by the task" not in text
    assert aipm_leftovers(repo) == {"worktrees": [], "refs": []}


# -- 5. file kinds -------------------------------------------------------------------------------------------


def test_deletions_new_files_modes_symlinks_and_binaries_are_merged(repo, tmp_path):
    (repo / "tool.sh").write_text("#!/bin/sh\necho hi\n")
    (repo / "blob.bin").write_bytes(b"\0\1\2" * 100)
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/", "tool.sh", "blob.bin", "link", "newdir/"], command=(
        "rm src/c.txt; mkdir -p newdir/deep && echo new > newdir/deep/n.txt; chmod +x tool.sh; "
        "ln -s src/a.txt link; printf '\\000\\377' >> blob.bin; rm src/b.txt && mkdir src/b.txt && "
        "echo inside > src/b.txt/f"))
    assert project.aipm("run", "ORD").returncode == 0
    assert not (repo / "src/c.txt").exists()
    assert (repo / "newdir/deep/n.txt").read_text() == "new\n"
    assert os.access(repo / "tool.sh", os.X_OK)
    assert os.readlink(repo / "link") == "src/a.txt"
    assert (repo / "blob.bin").read_bytes() == b"\0\1\2" * 100 + b"\0\377"
    assert (repo / "src/b.txt/f").read_text() == "inside\n"
    assert not list(repo.rglob("*.aipm-merge.tmp"))


def test_not_a_git_repository_is_a_clear_launch_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    project = project_in(tmp_path / "plain")
    write_task(project.order(), "T", target_files=["a.txt"], command="true")
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 1
    assert "needs a git repository" in proc.stdout + proc.stderr
    assert project.statuses() == {"T": "QUEUED"}


# -- 6. settings ---------------------------------------------------------------------------------------------


def test_workspace_setting_sources_and_bad_values(repo, tmp_path):
    project = project_in(repo, config="")
    config = project.json("config")["settings"]
    assert config["workspace"] == {"value": "shared", "source": "default"}
    env = {"AIPM_WORKSPACE": "worktree"}
    assert project.json("config", env=env)["settings"]["workspace"]["source"] == "env AIPM_WORKSPACE"
    # Inside a worker AIPM_WORKSPACE names its worktree: not a setting, so a nested aipm still works.
    assert project.json("config", env={"AIPM_WORKSPACE": str(tmp_path)})["settings"]["workspace"]["value"] == "shared"
    bad = project.aipm("config", env={"AIPM_WORKSPACE": "isolated"})
    assert bad.returncode == 2 and "AIPM_WORKSPACE" in bad.stderr and "Traceback" not in bad.stderr
    (project.root / "aipm.yaml").write_text("workspace_copy: ['/etc/passwd']\n")
    bad = project.aipm("config")
    assert bad.returncode == 2 and "workspace_copy" in bad.stderr and "relative" in bad.stderr
    (project.root / "aipm.yaml").write_text("max_workers: 5\n")
    write_task(project.order(), "T", workspace="sandbox", command="true")
    before = (project.order() / "T.yaml").read_bytes()
    bad = project.aipm("validate", "ORD")
    assert bad.returncode == 2 and "T.yaml: workspace:" in bad.stderr
    assert (project.order() / "T.yaml").read_bytes() == before


def test_flag_and_task_choose_the_workspace(repo, tmp_path):
    project = project_in(repo, config="")
    journal = tmp_path / "journal"
    order = project.order()
    write_task(order, "W", target_files=["src/a.txt"], command=f'echo "W $AIPM_WORKSPACE" >> "{journal}"')
    write_task(order, "S", workspace="shared", target_files=["src/b.txt"],
               command=f'echo "S ${{AIPM_WORKSPACE:-none}} $PWD" >> "{journal}"')
    assert project.aipm("run", "ORD", "--workspace", "worktree").returncode == 0
    assert sorted(journal_lines(journal)) == [f"S none {repo}", f"W {repo / '.aipm/worktrees/ORD/W'}"]


# -- 7. crashes ----------------------------------------------------------------------------------------------


def _crash_order(project: Project) -> dict[str, list[str]]:
    """Five tasks, two chains and a loner, each appending one line to each of its files: task id → its files."""
    files = {"T1": ["src/a.txt", "src/b.txt"], "T2": ["src/a.txt", "src/c.txt"], "T3": ["src/d.txt"],
             "T4": ["src/b.txt", "src/d.txt", "src/new.txt"], "T5": ["docs/x.txt"]}
    deps = {"T2": ["T1"], "T4": ["T3", "T1"]}
    for task, paths in files.items():
        cmd = "; ".join(f"mkdir -p $(dirname {p}) && echo \"{task} wrote this\" >> {p}" for p in paths)
        write_task(project.order(), task, target_files=paths, depends_on=deps.get(task, []), command=cmd)
    return files


def _check_exactly_once(repo: Path, files: dict[str, list[str]]) -> None:
    for task, paths in files.items():
        for p in paths:
            assert (repo / p).read_text().count(f"{task} wrote this\n") == 1, (task, p)
    assert not list(repo.rglob("*.aipm-merge.tmp"))


@pytest.mark.parametrize("point", ["prepare", "merge:0", "merge:1", "merge:2", "cleanup"])
def test_sigkill_of_run_at_a_seam_then_rerun_merges_every_change_exactly_once(repo, point):
    project = project_in(repo)
    files = _crash_order(project)
    before = user_state(repo)
    killed = project.aipm("run", "ORD", env={"AIPM_TEST_KILL_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert set(project.statuses().values()) == {"DONE"}
    _check_exactly_once(repo, files)
    assert aipm_leftovers(repo) == {"worktrees": [], "refs": []}
    assert not list((repo / ".aipm" / "worktrees").rglob("*.txt"))
    assert user_state(repo) == before


def test_sigkill_of_run_while_workers_run_then_rerun(repo, tmp_path):
    project = project_in(repo, config="workspace: worktree\nreview:\n  command: 'true'\n")
    gate = tmp_path / "gate"
    files = {"T1": ["src/a.txt"], "T2": ["src/b.txt"], "T3": ["src/c.txt"]}
    for task, paths in files.items():
        write_task(project.order(), task, target_files=paths,
                   command=f'touch "{tmp_path}/{task}.ready"; {wait_gate(gate)} echo "{task} wrote this" >> {paths[0]}')
    before = user_state(repo)
    run = subprocess.Popen([os.sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"],
                           cwd=project.root, env=dict(os.environ, AIPM_ENABLE_MONITORING="false"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: all((tmp_path / f"{t}.ready").exists() for t in files))
    run.kill()
    run.wait()
    gate.touch()
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert set(project.statuses().values()) == {"COMPLETED"}
    _check_exactly_once(repo, files)
    assert aipm_leftovers(repo) == {"worktrees": [], "refs": []}
    assert user_state(repo) == before


# -- 8. detached owners, review, diff ------------------------------------------------------------------------


def test_detached_launch_runs_reviews_and_merges_in_worktrees(repo, tmp_path):
    project = project_in(repo)
    journal = tmp_path / "journal"
    order = project.order()
    write_task(order, "T1", target_files=["src/a.txt"], command="echo T1 >> src/a.txt",
               review=f'echo "review $PWD $(tail -n 1 src/a.txt)" >> "{journal}"')
    write_task(order, "T2", depends_on=["T1"], target_files=["src/b.txt"],
               command=f'echo "T2 sees $(tail -n 1 src/a.txt)" >> "{journal}"; echo T2 >> src/b.txt')
    assert project.aipm("launch", "ORD", "--workspace", "worktree").returncode == 0
    wait_for(lambda: task_statuses(order) == {"T1": "COMPLETED", "T2": "DONE"})
    wait_for(lambda: aipm_leftovers(repo) == {"worktrees": [], "refs": []})
    assert journal_lines(journal) == [f"review {repo / '.aipm/worktrees/ORD/T1'} T1", "T2 sees T1"]
    assert (repo / "src/b.txt").read_text().endswith("T2\n")


@pytest.mark.parametrize("config", ["", "workspace: worktree\n"], ids=["shared", "worktree"])
def test_diff_of_a_task_with_no_changes_recorded_says_why_there_is_none(repo, config):
    """`aipm diff` of a task that has not run (in a worktree) exited 2, a usage error, though workspaces.md says
    nothing to show prints no patch and exits 0: it now does, with the line saying why on stderr."""
    project = project_in(repo, config=config)
    write_task(project.order(), "T", target_files=["src/a.txt"], command="true")
    proc = project.aipm("diff", "T")
    assert (proc.returncode, proc.stdout) == (0, ""), proc
    assert proc.stderr == ("aipm: ORD/T: no changes to show: none recorded; only an attempt that ran its command "
                           "with workspace: worktree has one\n"), proc.stderr
    assert project.json("diff", "T") == {"order": "ORD", "task": "T", "source": None, "also_kept": [], "patch": ""}


def test_diff_of_an_attempt_that_changed_nothing_says_so(repo, tmp_path):
    """An empty patch printed nothing at all, exit 0: no word on whether the task changed nothing or diff broke.
    It still prints no patch and exits 0 (git diff's way), with one line on stderr saying why."""
    project = project_in(repo)
    _gated_task(project.order(), tmp_path, "true")
    seen = {}
    proc = _run_with_person(project, tmp_path, lambda: seen.update(running=project.aipm("diff", "T")))
    assert proc.returncode == 0, proc.stderr
    running, done = seen["running"], project.aipm("diff", "T")
    for shown in (running, done):
        assert (shown.returncode, shown.stdout) == (0, ""), shown
        (line,) = shown.stderr.splitlines()
        assert line.startswith("aipm: ORD/T: no changes to show: "), line
    assert f"its worktree ({repo / '.aipm/worktrees/ORD/T'}) has none against its attempt's start" in running.stderr
    assert f"its last attempt changed nothing ({repo / '.aipm/patches/ORD/T.1.patch'} is empty)" in done.stderr
    assert project.json("diff", "T")["patch"] == ""


def test_a_sibling_file_saved_invalid_mid_run_stops_no_logs_diff_or_why_of_another_task(repo, tmp_path):
    """A typo saved in one task file while the order runs (the run keeps that file out and waits for its fix) made
    `aipm logs W`, `aipm diff W` and `aipm why W` of every other task exit 2, naming the broken file. They read W's
    own file and order.yaml only (as `cancel` does); `why` plans with the broken file as a task that cannot start,
    says so on stderr, and explains a task that depends on it as waiting for its fix. The broken file's own task is
    still the one-line error."""
    project = project_in(repo)
    order = project.order()
    write_task(order, "W", target_files=["src/a.txt"], command=(
        f'echo "from W" >> src/a.txt; echo W-working; touch "{tmp_path}/ready"; ' + wait_gate(tmp_path / "gate")))
    write_task(order, "N", depends_on=["W"], target_files=["src/b.txt"], command="echo N >> src/b.txt")
    bad = order / "BAD.yaml"
    error = f"{bad}: priority: 'P9' is not one of P0, P1, P2, P3"
    seen = {}

    def edit():
        bad.write_text("title: oops\npriority: P9\n")
        write_task(order, "X", depends_on=["BAD"], command="true")
        calls = [("logs", "W"), ("logs", "W", "--json"), ("diff", "W"), ("why", "W"), ("why", "N"), ("why", "X"),
                 ("why", "X", "--json"), ("logs", "BAD"), ("diff", "BAD"), ("why", "BAD")]
        seen.update(zip(calls, project.aipm_all(calls)))
        bad.write_text("title: fixed\ncommand: echo fixed\n")  # the run goes on (and ends)

    proc = _run_with_person(project, tmp_path, edit)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for call, shown in seen.items():
        if call[1] == "BAD":
            assert (shown.returncode, shown.stderr) == (2, f"aipm: error: {error}\n"), (call, shown)
        else:
            assert shown.returncode == 0, (call, shown.stderr)
    assert "W-working" in seen[("logs", "W")].stdout
    assert "W-working" in json.loads(seen[("logs", "W", "--json")].stdout)["text"]
    assert "+from W" in seen[("diff", "W")].stdout
    warned = (f"aipm: warning: {error} (explained as a task that cannot start: a run going on waits for its fix; "
              "`launch` or a new `run` refuses the order until then)\n")
    assert seen[("why", "W")].stdout.startswith("W cannot start:\n  - status is IN_PROGRESS")
    assert seen[("why", "W")].stderr == warned
    assert (seen[("why", "N")].stdout, seen[("why", "N")].stderr) == (
        "N cannot start:\n  - waiting on W (IN_PROGRESS)\n", warned)
    waits = f"waiting on BAD: its file does not validate ({error}); fix it"
    assert seen[("why", "X")].stdout == f"X cannot start:\n  - {waits}\n", seen[("why", "X")].stdout
    assert seen[("why", "X")].stderr == ""  # (its reason names the file)
    assert json.loads(seen[("why", "X", "--json")].stdout)["reasons"] == [
        {"id": "X", "reason": "waiting_on_dependencies", "detail": waits, "tasks": ["BAD"]}]
    assert project.statuses() == {"W": "DONE", "N": "DONE", "BAD": "DONE", "X": "DONE"}


@pytest.mark.parametrize("breaks", ["rm .git", "rm .git && git init -q && git add -A && git commit -qm mine"])
def test_a_worker_that_breaks_its_worktrees_git_file_still_has_its_work_merged(repo, breaks):
    """A worker that deleted its worktree's `.git` file (or made a repository of its own there): git no longer
    found the worktree from it, the end capture failed, and the task went round REWORK to REJECTED with nothing
    merged and no patch; each next attempt's start, then `aipm recover`, removed the worktree and the work with
    it. The capture finds the worktree through git's own note of it instead."""
    project = project_in(repo, config="workspace: worktree\nmax_rework: 0\n")
    write_task(project.order(), "T", target_files=["src/a.txt"], command=f"echo 'from T' >> src/a.txt; {breaks}")
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert project.statuses() == {"T": "DONE"}
    assert (repo / "src/a.txt").read_text().endswith("from T\n")
    assert aipm_leftovers(repo) == {"worktrees": [], "refs": []}


def test_a_worktree_whose_git_file_a_worker_deleted_keeps_its_note_while_another_task_of_its_order_ends(repo):
    """Removing a finished task's worktree prunes git's notes of the order's worktrees, and did so for every one
    whose `.git` file was missing, not whose directory was gone: the note of a running worker that had deleted
    its `.git` went when another task of its order ended first, and its end capture, which finds the worktree
    through that note, failed (REJECTED, nothing merged)."""
    project = project_in(repo, config="workspace: worktree\nmax_rework: 0\n")
    order = project.order()
    u_tree = repo / ".aipm/worktrees/ORD/U"
    write_task(order, "T", target_files=["src/a.txt"],
               command=f"echo 'from T' >> src/a.txt; rm .git; touch {repo.parent}/T.ready; "
                       f"until [ -e {repo.parent}/U.began ] && [ ! -e {u_tree} ]; do sleep 0.05; done")
    write_task(order, "U", target_files=["src/b.txt"],
               command=f"until [ -e {repo.parent}/T.ready ]; do sleep 0.05; done; touch {repo.parent}/U.began; echo 'from U' >> src/b.txt")
    proc = project.aipm("run", "ORD", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert project.statuses() == {"T": "DONE", "U": "DONE"}
    assert (repo / "src/a.txt").read_text().endswith("from T\n")
    assert (repo / "src/b.txt").read_text().endswith("from U\n")


def test_a_repository_without_commits_in_the_worktree_fails_the_attempt_and_keeps_the_rest(repo):
    """A worker's `git init` (cargo new, ...) left a repository without commits in its worktree: `git add` refused
    it ("does not have a commit checked out"), the end capture failed, and the task went round REWORK until
    REJECTED, with no patch. Now the attempt fails as a try (nothing merged), its reason and log say why and
    where its files are (moved beside its patch: the worktree goes), and the rest of its changes are in its patch,
    as for any failed attempt."""
    project = project_in(repo, config="workspace: worktree\n")
    order = project.order()
    nested = "mkdir -p {d} && (cd {d} && git init -q . && echo new > f.txt) && echo more >> src/{f}.txt"
    write_task(order, "T", target_files=["src/a.txt", "src/new/"], command=nested.format(d="src/new", f="a"))
    write_task(order, "U", target_files=["src/b.txt", "src/other/"],
               command=nested.format(d="src/other", f="b") + " && exit 3")
    before = {p: (repo / p).read_bytes() for p in ("src/a.txt", "src/b.txt")}
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    rows = {t["id"]: t for t in project.json("status", "ORD")["tasks"]}
    assert [(rows[t]["status"], rows[t]["attempts"]) for t in "TU"] == [("FAILED", 1), ("FAILED", 1)]
    assert rows["T"]["reason"].startswith("attempt 1 cannot be merged: src/new/: a git repository without commits")
    assert {p: (repo / p).read_bytes() for p in before} == before
    assert not (repo / "src/new").exists() and not (repo / "src/other").exists()
    for task, name, path in (("T", "a", "src/new"), ("U", "b", "src/other")):
        patch = (repo / f".aipm/patches/ORD/{task}.1.patch").read_text()
        assert f"+++ b/src/{name}.txt" in patch and "f.txt" not in patch, patch
        rest = repo / f".aipm/patches/ORD/{task}.1.rest"
        assert (rest / f"{path}/f.txt").read_text() == "new\n"
        log = (repo / f".aipm/logs/ORD/{task}.1.log").read_text()
        assert f"{path}/: a git repository without commits (a `git init` in the worktree)" in log, log
        assert f"moved out of the worktree, whole, into {rest}" in log, log
    assert project.aipm("recover").returncode == 0
    assert aipm_leftovers(repo) == {"worktrees": [], "refs": []}


# -- 9. the merge plan, directly -----------------------------------------------------------------------------


def _commits(repo: Path, edits: dict[str, str | None]) -> tuple:
    """(Repo, base, end): base = the tree now, end = the tree with `edits` (None deletes), main tree restored."""
    from aipm.workspace.repo import Repo

    r = Repo(repo)
    scratch = repo / ".aipm" / "tmp"
    base = r.capture(repo, scratch, r.head(), "base")
    saved = {p: (repo / p).read_bytes() if (repo / p).exists() else None for p in edits}
    for p, text in edits.items():
        if text is None:
            (repo / p).unlink()
        else:
            (repo / p).write_text(text)
    end = r.capture(repo, scratch, base, "end")
    for p, data in saved.items():
        if data is None:
            (repo / p).unlink(missing_ok=True)
        else:
            (repo / p).write_bytes(data)
    return r, base, end


def test_a_saved_plan_resumes_without_repeating_a_step_and_keeps_a_persons_conflicting_edit(repo):
    from aipm.workspace import mergeback as merge

    r, base, end = _commits(repo, {"src/a.txt": "A\n", "src/b.txt": "B\n", "src/c.txt": None, "src/n.txt": "N\n"})
    steps = merge.plan(r, base, end, r.changes(base, end))
    assert [s.step.path for s in steps] == ["src/c.txt", "src/a.txt", "src/b.txt", "src/n.txt"]  # deletions first
    plan_dir = repo / ".aipm" / "merges" / "x"
    mergeplan.save(plan_dir, 1, steps)
    assert mergeplan.pending(plan_dir, 1) and not mergeplan.pending(plan_dir, 2)

    class Stop(Exception):
        pass

    def stop_after_two(n):
        if n == 2:
            raise Stop

    with pytest.raises(Stop):  # as if killed after two files
        merge.apply(repo, plan_dir, after_each=stop_after_two)
    assert not (repo / "src/c.txt").exists() and (repo / "src/a.txt").read_text() == "A\n"
    assert (repo / "src/b.txt").read_text().startswith("b line 1")
    (repo / "src/a.txt").write_text("a person, after the step\n")  # journalled: must not be redone
    (repo / "src/b.txt").write_text("a person, during the crash\n")  # not yet applied, changed meanwhile
    conflict = [("src/b.txt", "changed in the main tree after the merge was planned; changed on both sides in "
                              "overlapping lines")]
    assert merge.apply(repo, plan_dir) == merge.Applied([], conflict, 4)
    assert (repo / "src/a.txt").read_text() == "a person, after the step\n"
    assert (repo / "src/b.txt").read_text() == "a person, during the crash\n"
    assert (repo / "src/n.txt").read_text() == "N\n"
    assert mergeplan.progress(plan_dir) == (1, 4, 4)
    (repo / "src/n.txt").write_text("a person, after the merge\n")
    assert merge.apply(repo, plan_dir) == merge.Applied([], conflict, 4)  # the same conflict, nothing rewritten
    assert (repo / "src/n.txt").read_text() == "a person, after the merge\n"


def test_a_persons_edit_to_a_file_the_held_up_plan_has_not_written_is_merged_with_its_step(repo):
    """Killed mid-merge, and a person edits a file the plan has not reached: the step is merged with the edit
    three ways (the file as planned is the ancestor), not skipped with the task's change lost."""
    from aipm.workspace import mergeback as merge

    lines = "".join(f"b line {i}\n" for i in range(1, 9))
    (repo / "src/b.txt").write_text(lines)
    r, base, end = _commits(repo, {"src/b.txt": lines + "the task's\n"})
    plan_dir = repo / ".aipm" / "merges" / "x"
    mergeplan.save(plan_dir, 1, merge.plan(r, base, end, r.changes(base, end)))
    (repo / "src/b.txt").write_text("a person's\n" + lines.split("\n", 1)[1])
    applied = merge.apply(repo, plan_dir)
    assert applied == merge.Applied(["src/b.txt: changed in the main tree after the merge was planned; merged "
                                     "with it"], [], 1)
    assert (repo / "src/b.txt").read_text() == "a person's\n" + lines.split("\n", 1)[1] + "the task's\n"
    (repo / "src/b.txt").write_text("later\n")
    assert merge.apply(repo, plan_dir) == merge.Applied([], [], 1)  # journalled: never applied twice
    assert (repo / "src/b.txt").read_text() == "later\n"


# Reviewed cases of a plan held up by a crash (each failed before its fix).


class Killed(BaseException):
    """Stands for SIGKILL: not an OSError, so apply() does not catch it."""


def _plan(repo: Path, edits: dict):
    from aipm.workspace import mergeback as merge

    r, base, end = _commits(repo, edits)
    steps = merge.plan(r, base, end, r.changes(base, end))
    plan_dir = repo / ".aipm" / "merges" / "ORD" / "T"
    mergeplan.save(plan_dir, 1, steps)
    return merge, plan_dir, [s.step.path for s in steps]


def test_a_journal_line_a_crash_cut_short_is_cut_off_before_the_next_is_appended(repo):
    """A journal ending in a fragment ("0..9\\n" + "1"): the next line was appended to it ("110"), so step 10
    was never journalled, and a later apply (remove() after a crash at the `cleanup` seam, recover) wrote it
    again over a person's later edit."""
    merge, plan_dir, paths = _plan(repo, {f"src/{n}.txt": f"{n}\n" for n in "abcdefghijkl"})
    (plan_dir / "applied").write_text("".join(f"{i}\n" for i in range(10)) + "1")
    merge.apply(repo, plan_dir)
    journal = mergeplan.journal(mergeplan.journal_text(plan_dir))[0]
    assert (repo / "src/k.txt").read_text() == "k\n"
    (repo / "src/k.txt").unlink()  # a person removes the file the task added, after the merge was done
    merge.apply(repo, plan_dir)  # as remove() does when the rerun tidies the worktree (crash at `cleanup`)
    back = (repo / "src/k.txt").exists()
    assert (10 in journal, back) == (True, False), (sorted(journal), back)


def test_a_journal_line_aipm_never_wrote_counts_for_nothing(repo):
    """A line of the journal a worker wrote (`.aipm/` is in its reach) that is a list not led by a step number was
    a TypeError traceback (unhashable) in every later apply, progress and `aipm recover`."""
    assert mergeplan.journal(b'[[0], ""]\n{"0": 1}\n[0, null, 5]\n[1, ""]\n7\n') == ({1: "", 7: ""}, {0: 5})


@pytest.mark.parametrize("where, make, why", [
    ("plan.json", "mkfifo", "not a regular file (its worker replaced it)"),
    ("plan.json", "truncate -s 1T", "over 268435456 bytes (its worker made it)"),
    ("plan.json", "garbage", "not JSON (Expecting value: line 1 column 1 (char 0))"),
    ("plan.json", '{"attempt": 1, "steps": [{"path": 1}]}', "not a merge plan aipm wrote"),
    ("applied", "mkfifo", "not a regular file (its worker replaced it)"),
    ("applied", "truncate -s 1T", "over 268435456 bytes (its worker made it)"),
    ("1.state", "mkfifo", "not a regular file (its worker replaced it)"),
    ("1.state", "truncate -s 1T", "the file is over 256 MiB, more than a merge holds in memory"),
    ("1.state", "garbage", "not a step's file aipm wrote"),
    ("1.state", '{"kind": "file", "exec": false}\nnot the task\'s B\n',
     "not what the plan saved there (its digest differs)"),
    ("1.before", "truncate -s 1T", "the file is over 256 MiB, more than a merge holds in memory"),
])
def test_a_half_applied_plan_that_cannot_be_read_is_stopped_at_and_kept(repo, where, make, why):
    """A merge killed after its first step, then a file of its plan replaced (`.aipm/merges/` is in a worker's
    reach). They were opened as any file and read whole: a FIFO held `aipm recover` (or the owner finishing the
    merge) for ever, a sparse terabyte (a step's result, or its planned state, read to merge a person's edit since)
    was a MemoryError traceback, a step's file that was no JSON a ValueError one, and a plan.json that was no JSON
    was taken for no plan: the half-applied merge was forgotten, its directory removed with the worktree. Now the
    merge stops with one line naming the file and what is wrong, and everything stays for a person to repair."""
    project = project_in(repo)
    merge, plan_dir, paths = _plan(repo, {"src/a.txt": "A\n", "src/b.txt": "B\n"})

    def killed(n):
        raise Killed

    with pytest.raises(Killed):
        merge.apply(repo, plan_dir, after_each=killed)
    if where.endswith(".before"):
        with open(repo / "src/b.txt", "a") as edit:  # a person's, since the plan: merged with N.before the ancestor
            edit.write("a person's line\n")
    path = plan_dir / where
    if make == "mkfifo":
        path.unlink(missing_ok=True)
        os.mkfifo(path)
    elif make.startswith("truncate"):
        os.truncate(path, 1 << 40)
    else:
        path.write_text(make)
    kept = sorted(os.listdir(plan_dir))
    proc = project.aipm("recover", timeout=60, preexec_fn=capped_memory)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"ORD/T: worktree not removed: merge stopped: {path}: {why}; the merge it plans (perhaps half applied) " \
           f"stays pending until the file is repaired, or {plan_dir} removed" in proc.stdout, proc.stdout
    assert sorted(os.listdir(plan_dir)) == kept
    assert (path.is_fifo(), path.stat().st_size == 1 << 40) == (make == "mkfifo", make.startswith("truncate"))
    assert (repo / "src/a.txt").read_text() == "A\n" and (repo / "src/b.txt").read_text().startswith("b line 1")


def test_a_main_tree_file_grown_past_the_bound_after_planning_is_kept_as_a_conflict(repo):
    """A merge killed after its first step, then the main tree's file of the next one made a sparse terabyte (by
    another task's unconfined worker): it was read whole, a MemoryError traceback in `aipm recover` and every owner
    after. It is neither the step's result nor its planned state (both are within the bound), so it changed since
    the plan and cannot be merged with: kept as it is, the rest written, and the log says why."""
    project = project_in(repo)
    merge, plan_dir, paths = _plan(repo, {"src/a.txt": "A\n", "src/b.txt": "B\n", "src/c.txt": "C\n"})

    def killed(n):
        raise Killed

    with pytest.raises(Killed):
        merge.apply(repo, plan_dir, after_each=killed)
    os.truncate(repo / "src/b.txt", 1 << 40)
    proc = project.aipm("recover", timeout=60, preexec_fn=capped_memory)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert (repo / "src/b.txt").stat().st_size == 1 << 40 and (repo / "src/c.txt").read_text() == "C\n"
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert ("src/b.txt: changed in the main tree after the merge was planned; the main tree's file is over 256 MiB, "
            "more than a merge holds in memory; left as it is (the attempt's change is in its patch)") in log, log


@pytest.mark.parametrize("side", ["main tree", "task"])
def test_a_file_over_the_bound_on_either_side_is_a_conflict_that_merges_nothing(repo, side):
    """The merge read the main tree's file and the task's whole: a sparse terabyte another task's unconfined
    worker made of the main tree's file was a MemoryError traceback; a task's file of gigabytes was held in memory
    (and saved, and read back) whole. Over the bound, either is a conflict naming the path and why: nothing of the
    attempt is merged, its patch keeps it, and the main tree's file is left as it is."""
    project = project_in(repo, config="workspace: worktree\nmax_rework: 0\n")
    big = f"truncate -s 1T {repo}/src/b.txt" if side == "main tree" else f"truncate -s {(256 << 20) + 1} src/b.txt"
    write_task(project.order(), "T", target_files=["src/"], command=f"echo T >> src/a.txt; echo T >> src/b.txt; {big}")
    a_before, b_before = (repo / "src/a.txt").read_bytes(), (repo / "src/b.txt").read_bytes()
    proc = project.aipm("run", "ORD", "--no-review", timeout=120, preexec_fn=capped_memory)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert project.statuses() == {"T": "REJECTED"}
    feedback = (repo / ".aipm/feedback/ORD/T.txt").read_text()
    whose = "the main tree's file" if side == "main tree" else "the task's file"
    assert f"  src/b.txt: {whose} is over 256 MiB, more than a merge holds in memory\n" in feedback, feedback
    assert f"This attempt's changes are kept in {repo}/.aipm/patches/ORD/T.1.patch" in feedback, feedback
    assert (repo / "src/a.txt").read_bytes() == a_before
    assert (repo / "src/b.txt").stat().st_size == (1 << 40 if side == "main tree" else len(b_before))


def _a_fifo_at_the_plan_of_a_merge_cut_short(repo: Path) -> tuple[Project, Path, bytes]:
    """Task T's merge killed after its first file (of src/a, b, c.txt), then its plan.json replaced with a FIFO:
    (project, plan.json, what it held)."""
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/"], command="for f in a b c; do echo T >> src/$f.txt; done")
    killed = project.aipm("run", "ORD", "--no-review", env={"AIPM_TEST_KILL_AT": "merge:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    plan = repo / ".aipm" / "merges" / "ORD" / "T" / "plan.json"
    text = plan.read_bytes()
    plan.unlink()
    os.mkfifo(plan)
    return project, plan, text


def test_an_owner_finishing_a_merge_whose_plan_a_worker_replaced_stops_and_the_person_can_repair_it(repo):
    """Killed at merge:1, and a FIFO left at the plan's plan.json: the next run, adopting the attempt to finish its
    merge, opened it as any file and waited for ever, under the launch lock. It says which file is wrong and keeps
    the outcome and the plan; put back, `aipm recover` writes the rest."""
    project, plan, text = _a_fifo_at_the_plan_of_a_merge_cut_short(repo)
    kept = sorted(os.listdir(plan.parent))
    rerun = project.aipm("run", "ORD", "--no-review", timeout=60)
    assert rerun.returncode == 1 and "Traceback" not in rerun.stderr, rerun.stderr
    assert (f"cannot record the outcome of T (exit 0): merge stopped: {plan}: not a regular file (its worker "
            "replaced it)") in rerun.stderr, rerun.stderr
    assert plan.is_fifo() and sorted(os.listdir(plan.parent)) == kept
    assert [(repo / f"src/{n}.txt").read_text().endswith("T\n") for n in "abc"] == [True, False, False]
    plan.unlink()
    plan.write_bytes(text)  # the person's repair
    assert project.aipm("recover").returncode == 0  # (a detached aipm records the outcome, merging the rest)
    wait_for(lambda: task_statuses(project.order()) == {"T": "DONE"} and not plan.parent.exists())
    assert [(repo / f"src/{n}.txt").read_text().count("T\n") for n in "abc"] == [1, 1, 1]


def test_cancelling_a_task_whose_pending_plan_cannot_be_read_says_what_is_wrong(repo):
    """Killed at merge:1, a FIFO at plan.json: `aipm cancel` (and the end of every run after) reads the plan to say
    how far the merge got, and waited for ever. It says the plan's file is wrong, and the plan stays."""
    project, plan, _ = _a_fifo_at_the_plan_of_a_merge_cut_short(repo)
    said = f"T: merge stopped: {plan}: not a regular file (its worker replaced it); the merge it plans"
    cancel = project.aipm("cancel", "T", timeout=60)
    assert cancel.returncode == 0 and said in cancel.stdout, cancel.stdout + cancel.stderr
    run = project.aipm("run", "ORD", timeout=60)
    assert f"aipm: {said}" in run.stderr and plan.is_fifo(), run.stderr


def test_a_crash_while_the_plan_is_saved_leaves_no_plan_to_stop_at(repo, monkeypatch):
    """plan.json was written in place: a crash part-way left a piece of it, which is stopped at as a plan that
    cannot be read (a person asked to repair a merge that wrote nothing yet). It is renamed into place whole."""
    from aipm.workspace import mergeback as merge

    r, base, end = _commits(repo, {"src/a.txt": "A\n"})
    steps = merge.plan(r, base, end, r.changes(base, end))
    real = mergeplan.write_durably

    def cut_short(path, *chunks):
        if not path.name.startswith("plan.json"):
            return real(path, *chunks)
        path.write_bytes(chunks[0][:10])
        raise Killed

    plan_dir = repo / ".aipm" / "merges" / "ORD" / "T"
    monkeypatch.setattr(mergeplan, "write_durably", cut_short)
    with pytest.raises(Killed):
        mergeplan.save(plan_dir, 1, steps)
    assert not mergeplan.pending(plan_dir, 1) and mergeplan.progress(plan_dir) is None


def test_a_crash_between_a_deletion_and_its_pruning_is_no_conflict(repo, monkeypatch):
    """dir -> file: step 0 deletes src/x/f, step 1 writes the file src/x. Killed after the unlink, before the
    empty directory src/x is pruned: the rerun finds src/x an empty directory and reports a conflict, though
    nobody touched anything."""
    (repo / "src/x").mkdir()
    (repo / "src/x/f").write_text("f\n")
    from aipm.workspace import mergeback as merge

    r, base, end = _commits(repo, {"src/x/f": None})
    # end: src/x is a file
    (repo / "src/x/f").unlink(); (repo / "src/x").rmdir(); (repo / "src/x").write_text("now a file\n")
    end = r.capture(repo, repo / ".aipm" / "tmp", base, "end")
    (repo / "src/x").unlink(); (repo / "src/x").mkdir(); (repo / "src/x/f").write_text("f\n")
    steps = merge.plan(r, base, end, r.changes(base, end))
    assert [s.step.path for s in steps] == ["src/x/f", "src/x"]
    plan_dir = repo / ".aipm" / "merges" / "ORD" / "T"
    mergeplan.save(plan_dir, 1, steps)

    def killed(*a, **k):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(merge, "_prune_empty", killed)
        with pytest.raises(Killed):
            merge.apply(repo, plan_dir)
    assert not (repo / "src/x/f").exists() and (repo / "src/x").is_dir()
    applied = merge.apply(repo, plan_dir)  # the rerun
    assert applied.conflicts == [], applied.conflicts
    assert (repo / "src/x").read_text() == "now a file\n"


def test_a_write_cut_off_from_its_journal_line_then_edited_in_place_is_no_conflict(repo, monkeypatch):
    """The step's write landed (os.replace done), killed before its journal line. A person then adds a line
    after the task's line. The rerun merges three ways with the *planned* state as ancestor: the task's own line
    is in "ours" and "theirs" with different neighbours -> a conflict; the attempt is sent back and its feedback
    says the path was "left as the main tree has them" though the task's change is there."""
    merge, plan_dir, paths = _plan(repo, {"src/a.txt": "".join(f"a line {i}\n" for i in range(1, 21)) + "T\n"})
    real = merge.fsync_dir

    def fsync_then_die(d):
        real(d)
        raise Killed  # the file is replaced and durable; its journal line is not written

    with monkeypatch.context() as m:
        m.setattr(merge, "fsync_dir", fsync_then_die)
        with pytest.raises(Killed):
            merge.apply(repo, plan_dir)
    assert (repo / "src/a.txt").read_text().endswith("a line 20\nT\n")
    assert mergeplan.progress(plan_dir) == (1, 0, 1)
    (repo / "src/a.txt").write_text((repo / "src/a.txt").read_text() + "a person's line\n")
    applied = merge.apply(repo, plan_dir)
    text = (repo / "src/a.txt").read_text()
    assert text.count("T\n") == 1  # the change landed once
    assert applied.conflicts == [], applied.conflicts  # it was read as a conflict (ancestor: the planned state)


def test_a_newline_in_a_reason_cannot_forge_a_journal_line(repo):
    """The journal line of a step left out because its parent became a file carries that parent's name; a
    newline in it ("0dir\\n3") splits the line, and the tail "3 became a file ..." reads as step 3 (src/c.txt)
    applied as a conflict. Killed after two steps, the rerun never writes src/c.txt and blames it wrongly."""
    from aipm.workspace import mergeback as merge

    weird = "0dir\n3"
    (repo / weird).mkdir()
    r, base, end = _commits(repo, {f"{weird}/new.txt": "new\n",
                                   **{f"src/{n}.txt": f"{n} by the task\n" for n in "abcd"}})
    (repo / weird).rmdir()
    steps = merge.plan(r, base, end, r.changes(base, end))
    assert [s.step.path for s in steps] == [f"{weird}/new.txt", "src/a.txt", "src/b.txt", "src/c.txt", "src/d.txt"]
    plan_dir = repo / ".aipm" / "merges" / "ORD" / "T"
    mergeplan.save(plan_dir, 1, steps)
    (repo / weird).write_text("a person's file where the task needs a directory\n")

    class Stop(BaseException):
        pass

    def stop_after_two(n):
        if n == 2:
            raise Stop

    with pytest.raises(Stop):
        merge.apply(repo, plan_dir, after_each=stop_after_two)
    applied = merge.apply(repo, plan_dir)  # the rerun
    assert (repo / "src/c.txt").read_text() == "c by the task\n", applied.conflicts


def test_a_held_up_conflict_names_its_path_whole_and_logs_what_was_merged(repo):
    """CLI: killed at merge:2; a person edits the first line of src/c.txt (merges cleanly) and appends to
    "src/z: note.txt" (overlaps the task's line). The rerun's reason/feedback should name "src/z: note.txt"
    (it names "src/z": paths are cut at the first ": "), and the log should say src/c.txt was merged with the
    person's edit (the note is dropped when the same apply also met a conflict)."""
    (repo / "src/z: note.txt").write_text("".join(f"z line {i}\n" for i in range(1, 21)))
    project = project_in(repo, config="workspace: worktree\nmax_rework: 0\n")
    write_task(project.order(), "T", target_files=["src/"],
               command="for f in a b c 'z: note'; do echo T >> \"src/$f.txt\"; done")
    killed = project.aipm("run", "ORD", "--no-review", env={"AIPM_TEST_KILL_AT": "merge:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    c, z = repo / "src/c.txt", repo / "src/z: note.txt"
    c.write_text("a person's\n" + c.read_text().split("\n", 1)[1])
    z.write_text(z.read_text() + "a person's last line\n")
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert c.read_text().startswith("a person's\n") and c.read_text().endswith("T\n")  # c was merged ...
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    feedback = (repo / ".aipm/feedback/ORD/T.txt").read_text()
    first = feedback.splitlines()[0]
    problems = []
    if not first.startswith("merge conflict in src/z: note.txt:"):
        problems.append(f"reason names the wrong path: {first[:60]!r}")
    if "src/c.txt: changed in the main tree after the merge was planned; merged with it" not in log:
        problems.append("the log never says src/c.txt was merged with the person's edit")
    assert not problems, problems


def test_a_held_up_conflict_on_a_name_that_is_not_utf8_sends_the_attempt_back(repo):
    import os
    odd = os.fsdecode(b"src/\xff.txt")
    (repo / odd).write_text("".join(f"x line {i}\n" for i in range(1, 21)))
    project = project_in(repo, config="workspace: worktree\nmax_rework: 0\n")
    write_task(project.order(), "T", target_files=["src/"],
               command="echo T >> src/a.txt; echo T >> \"$(printf 'src/\\377.txt')\"")
    killed = project.aipm("run", "ORD", "--no-review", env={"AIPM_TEST_KILL_AT": "merge:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    (repo / odd).write_text((repo / odd).read_text() + "a person's last line\n")
    runs = [project.aipm("run", "ORD") for _ in range(2)]  # it crashed on the log's and the reason's encoding
    tails = [(p.returncode, p.stderr.strip().splitlines()[-1][:90]) for p in runs]
    assert project.statuses() == {"T": "REJECTED"} and tails[-1][0] == 1, (project.statuses(), tails)


def test_a_pending_merge_applied_when_its_worktree_is_removed_is_noted_for_audits_in_flight(repo):
    """A merge cut short and then applied by remove() (its task was reset meanwhile): the files it writes are
    noted like any merge's, so a shared task's audit in flight is not charged with them."""
    import time

    from aipm import workspace, writtenlog
    from aipm.paths import Target
    from aipm.runtime import Runtime
    from aipm.workspace import mergeback as merge, places

    r, base, end = _commits(repo, {"src/a.txt": "W\n", "src/new.txt": "N\n"})
    mergeplan.save(places.merge_dir(repo, "ORD", "W"), 1, merge.plan(r, base, end, r.changes(base, end)))
    Runtime(repo).state.mkdir(parents=True, exist_ok=True)  # where a run keeps the log its audits read
    since = time.time_ns()
    workspace.remove(repo, "ORD", "W")
    assert (repo / "src/a.txt").read_text() == "W\n"
    assert sorted(writtenlog.written_since(Runtime(repo), since), key=str) == [
        Target("src/a.txt", False, False), Target("src/new.txt", False, False)]  # exact names, never targets


def test_plan_refuses_overlapping_edits_and_touches_nothing(repo):
    from aipm.workspace import mergeback as merge

    r, base, end = _commits(repo, {"src/a.txt": "task\n", "src/b.txt": "b line 1 task\n"})
    (repo / "src/a.txt").write_text("person\n")
    before = {p: (repo / p).read_bytes() for p in ("src/a.txt", "src/b.txt")}
    with pytest.raises(merge.Conflict) as caught:
        merge.plan(r, base, end, r.changes(base, end))
    assert caught.value.paths == ["src/a.txt"]
    assert "<<<<<<< main tree" in str(caught.value) and ">>>>>>> task" in str(caught.value)
    assert {p: (repo / p).read_bytes() for p in before} == before


# -- 10. a random mixed order, killed again and again --------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_random_mixed_order_killed_at_every_seam_keeps_the_invariants(repo, tmp_path, seed):
    import random

    from invariants import check, journal_command

    project = project_in(repo, config="")  # the shared audit on: merges and ends in flight are no one's fault
    rng = random.Random(seed)
    pool = [f"src/{n}.txt" for n in "abcd"] + ["docs/", "src/"]
    journal = tmp_path / "journal"
    order = project.order()
    writes: dict[str, list[str]] = {}
    for i in range(10):
        tid = f"T{i}"
        targets = rng.sample(pool, k=rng.randint(1, 2))
        writes[tid] = [t + f"{tid}.txt" if t.endswith("/") else t for t in targets]
        work = "; ".join(f'mkdir -p $(dirname {p}) && echo "{tid} wrote this" >> {p}' for p in writes[tid])
        write_task(order, tid, target_files=targets, workspace=rng.choice(["shared", "worktree"]),
                   depends_on=sorted(rng.sample([f"T{j}" for j in range(i)], k=min(i, rng.randint(0, 2)))),
                   command=journal_command(journal, work))
    before = user_state(repo)
    deaths = 0
    for point in ("merge:1", "prepare", "merge:0", "cleanup", "merge:2"):
        proc = project.aipm("run", "ORD", "--max-workers", "3", env={"AIPM_TEST_KILL_AT": point})
        deaths += proc.returncode == -signal.SIGKILL
    assert deaths >= 3  # the seams were reached: the order did not just run through
    proc = project.aipm("run", "ORD", "--max-workers", "3")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert set(project.statuses().values()) == {"DONE"}
    assert check(journal, order, max_workers=3, root=project.root) == []
    _check_exactly_once(repo, writes)
    assert aipm_leftovers(repo) == {"worktrees": [], "refs": []}
    assert user_state(repo) == before


def test_a_merge_within_a_shared_tasks_run_is_not_charged_to_the_shared_task(repo, tmp_path):
    project = project_in(repo, config="")  # shared by default, with the scope audit on
    gate = tmp_path / "gate"
    order = project.order()
    write_task(order, "S", priority="P0", target_files=["src/b.txt"],
               command=wait_gate(gate) + "echo S >> src/b.txt")
    write_task(order, "W", workspace="worktree", target_files=["src/a.txt"], command="echo W >> src/a.txt")
    run = subprocess.Popen([os.sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"],
                           cwd=project.root, env=dict(os.environ, AIPM_ENABLE_MONITORING="false"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: task_statuses(order)["W"] == "DONE")  # started after S, merged while S still runs
    gate.touch()
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, out + err
    assert project.statuses() == {"S": "DONE", "W": "DONE"}
    shared = yaml.safe_load((order / "S.yaml").read_text())
    assert (shared["attempts"], shared.get("reworks", 0)) == (1, 0)  # not sent back for W's merge
    assert (repo / "src/a.txt").read_text().endswith("W\n") and (repo / "src/b.txt").read_text().endswith("S\n")


# -- 11. the review of the worktree mode: paths the main tree blocks, crashes mid-merge, kept work -----------


def test_a_file_where_the_task_needs_a_directory_is_a_conflict_found_before_anything_is_written(repo, tmp_path):
    """A person makes a file src/zz while the task makes src/zz/new.txt: the plan sees it, nothing is written
    (src/a.txt neither), and the task is sent back naming src/zz, not left IN_PROGRESS."""
    project = project_in(repo, config="workspace: worktree\nmax_rework: 0\n")
    ready, gate = tmp_path / "ready", tmp_path / "gate"
    write_task(project.order(), "T", target_files=["src/a.txt", "src/zz/"], command=(
        f'touch "{ready}"; {wait_gate(gate)} echo task >> src/a.txt; mkdir -p src/zz; echo new > src/zz/new.txt'))
    before = (repo / "src/a.txt").read_bytes()
    proc = _run_with_person(project, tmp_path, lambda: (repo / "src/zz").write_text("a person's notes\n"))
    assert proc.returncode == 1, proc.stderr
    assert project.statuses() == {"T": "REJECTED"}
    feedback = (repo / ".aipm/feedback/ORD/T.txt").read_text()
    assert "src/zz/new.txt: src/zz is not a directory in the main tree" in feedback
    assert (repo / "src/a.txt").read_bytes() == before and (repo / "src/zz").read_text() == "a person's notes\n"
    assert "T.yaml" not in proc.stderr


def test_plan_refuses_a_directory_where_the_task_has_a_file_unless_its_own_deletions_empty_it(repo):
    from aipm.workspace import mergeback as merge
    from aipm.workspace.repo import Repo

    r = Repo(repo)
    scratch = repo / ".aipm" / "tmp"
    (repo / "d").mkdir()
    (repo / "d/f.txt").write_text("f\n")
    base = r.capture(repo, scratch, r.head(), "base")
    shutil.rmtree(repo / "d")
    (repo / "d").write_text("now a file\n")
    end = r.capture(repo, scratch, base, "end")
    (repo / "d").unlink()
    (repo / "d").mkdir()
    (repo / "d/f.txt").write_text("f\n")
    (repo / "d/person.txt").write_text("a person's\n")
    with pytest.raises(merge.Conflict) as caught:
        merge.plan(r, base, end, r.changes(base, end))
    assert "d: a directory in the main tree, where the task has a file" in str(caught.value)
    assert (repo / "d/person.txt").exists()
    (repo / "d/person.txt").unlink()  # now the task's own deletion empties it: a plain change of kind
    plan_dir = repo / ".aipm" / "merges" / "x"
    mergeplan.save(plan_dir, 1, merge.plan(r, base, end, r.changes(base, end)))
    assert merge.apply(repo, plan_dir) == merge.Applied([], [], 2)
    assert (repo / "d").read_text() == "now a file\n"


def test_a_parent_made_a_file_after_planning_leaves_that_path_out_and_the_rest_is_applied(repo):
    from aipm.workspace import mergeback as merge

    (repo / "src/zz").mkdir()
    r, base, end = _commits(repo, {"src/a.txt": "A\n", "src/zz/new.txt": "N\n"})
    (repo / "src/zz").rmdir()
    plan_dir = repo / ".aipm" / "merges" / "x"
    mergeplan.save(plan_dir, 1, merge.plan(r, base, end, r.changes(base, end)))
    (repo / "src/zz").write_text("a person's\n")  # between the plan and its application
    applied = merge.apply(repo, plan_dir)
    assert applied.conflicts == [("src/zz/new.txt", "src/zz became a file in the main tree after the merge was planned")]
    assert (repo / "src/a.txt").read_text() == "A\n" and (repo / "src/zz").read_text() == "a person's\n"


def test_recover_reports_a_merge_that_cannot_be_written_names_its_path_and_tidies_the_rest(repo):
    """A pending plan whose path cannot be written (a name too long for the file system): `aipm recover` says
    which path, keeps the plan, and still removes the other tasks' worktrees."""
    from aipm.workspace import mergeback as merge, places

    project = project_in(repo, config="workspace: worktree\n")
    write_task(project.order(), "F", target_files=["src/a.txt"], command="echo x >> src/a.txt; exit 1")
    assert project.aipm("run", "ORD").returncode == 1
    assert aipm_leftovers(repo)["worktrees"]  # the failed attempt's, kept until recover
    long = "src/" + "x" * 300
    plan_dir = places.merge_dir(repo, "ORD", "B")
    mergeplan.save(plan_dir, 1, [merge.Planned(merge.Step(long, None, merge.State("file", b"b\n").digest()),
                                           merge.State("file", b"b\n"))])
    proc = project.aipm("recover")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"ORD/B: worktree not removed: merge stopped at {long}: File name too long" in proc.stdout
    assert mergeplan.progress(plan_dir) == (1, 0, 1)
    assert aipm_leftovers(repo)["worktrees"] == []


def test_recover_keeps_the_worktree_of_a_live_worker_whose_task_file_was_reset(repo, tmp_path):
    """A sibling's `git checkout -- orders/` resets the file to QUEUED under a live worktree worker: `aipm
    recover` must judge by the worker's record, not the file, and leave its worktree alone."""
    project = project_in(repo)
    ready, gate = tmp_path / "ready", tmp_path / "gate"
    order = project.order()
    write_task(order, "T", target_files=["src/a.txt"],
               command=f'touch "{ready}"; {wait_gate(gate)} echo T >> src/a.txt')
    git(repo, "add", "orders")
    git(repo, "commit", "-q", "-m", "orders")
    project.aipm("launch", "ORD", check=True)
    wait_for(lambda: ready.exists())
    git(repo, "checkout", "--", "orders/ORD/T.yaml")
    proc = project.aipm("recover", check=True)
    assert "worktree removed" not in proc.stdout
    assert (repo / ".aipm/worktrees/ORD/T").is_dir()
    gate.touch()
    wait_for(lambda: task_statuses(order)["T"] == "DONE")
    assert (repo / "src/a.txt").read_text().endswith("T\n")


def _killed_mid_merge(repo: Path, **fields) -> tuple[Project, list[Path]]:
    """T appends a line to four files; `aipm run --no-review` is SIGKILLed after two of them are merged."""
    project = project_in(repo, config="workspace: worktree\nmax_rework: 0\n")
    files = [repo / f"src/{n}.txt" for n in "abcd"]
    write_task(project.order(), "T", target_files=["src/"],
               command="for f in a b c d; do echo T >> src/$f.txt; done", **fields)
    killed = project.aipm("run", "ORD", "--no-review", env={"AIPM_TEST_KILL_AT": "merge:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [f.read_text().endswith("T\n") for f in files] == [True, True, False, False]
    return project, files


def test_a_merge_killed_half_way_is_finished_by_its_adopter_and_never_reviewed_again(repo):
    """The plan was saved after approval (--no-review): a rerun without --no-review finishes it, DONE, instead
    of sending a half-merged attempt to a review that could reject it with its changes in the tree."""
    project, files = _killed_mid_merge(repo, review="exit 1")
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert project.statuses() == {"T": "DONE"}
    assert all(f.read_text().count("T\n") == 1 for f in files)
    assert not (repo / ".aipm/logs/ORD/T.1.review.log").exists()
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert "not reviewed again" in log
    assert "when its worktree was removed" not in log  # merge() wrote the rest; the removal found nothing left
    assert aipm_leftovers(repo) == {"worktrees": [], "refs": []}


def test_a_persons_edit_during_a_merge_held_up_by_a_crash_is_merged_with_the_rest_of_it(repo):
    """Killed after two of four files; a person edits the first line of a third before the rerun: the rerun
    merges the task's line into it (it was skipped, and the task recorded DONE without it)."""
    project, files = _killed_mid_merge(repo)
    files[2].write_text("a person's\n" + files[2].read_text().split("\n", 1)[1])
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert project.statuses() == {"T": "DONE"}
    assert files[2].read_text().startswith("a person's\n")
    assert all(f.read_text().count("T\n") == 1 for f in files)
    assert ("merge: src/c.txt: changed in the main tree after the merge was planned; merged with it"
            in (repo / ".aipm/logs/ORD/T.1.log").read_text())


def test_a_persons_conflicting_edit_during_a_held_up_merge_sends_the_attempt_back_and_keeps_both(repo):
    """The person's edit overlaps the task's line: their file is kept, the other files are finished, and the
    attempt is not DONE; its feedback names the path and the patch that keeps its changes. Every later look
    at the plan (recover, a rerun) reports the same and writes nothing."""
    project, files = _killed_mid_merge(repo)
    person = files[3].read_text() + "a person's last line\n"
    files[3].write_text(person)
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert project.statuses() == {"T": "REJECTED"}  # max_rework: 0
    assert files[3].read_text() == person
    assert [f.read_text().count("T\n") for f in files] == [1, 1, 1, 0]
    feedback = (repo / ".aipm/feedback/ORD/T.txt").read_text()
    assert feedback.startswith("merge conflict in src/d.txt: the main tree changed there after this attempt's "
                               "merge was planned"), feedback
    assert "3 of 4 paths were merged" in feedback
    assert "src/d.txt: changed in the main tree after the merge was planned; changed on both sides" in feedback
    patch = repo / ".aipm/patches/ORD/T.1.patch"
    assert f"kept in {patch}" in feedback and "+T" in patch.read_text()
    project.aipm("recover", check=True)
    assert files[3].read_text() == person and [f.read_text().count("T\n") for f in files] == [1, 1, 1, 0]
    assert aipm_leftovers(repo) == {"worktrees": [], "refs": []}


def test_cancel_of_a_task_killed_mid_merge_says_the_tree_is_half_merged_and_remove_logs_the_rest(repo):
    project, files = _killed_mid_merge(repo)
    proc = project.aipm("cancel", "T", check=True)
    assert "the merge of attempt 1 was cut short with 2 of 4 paths written" in proc.stdout
    log = repo / ".aipm/logs/ORD/T.1.log"
    assert "cancelled: the merge of attempt 1 was cut short" in log.read_text()
    proc = project.aipm("run", "ORD")
    assert "aipm: T: the merge of attempt 1 was cut short with 2 of 4 paths written" in proc.stderr
    project.aipm("recover", check=True)
    assert all(f.read_text().count("T\n") == 1 for f in files)  # the decided plan, finished once
    assert ("merge: the rest of attempt 1's saved merge plan (2 of 4 paths) was written when its worktree was "
            "removed") in log.read_text()
    assert aipm_leftovers(repo) == {"worktrees": [], "refs": []}


def test_retry_of_a_task_killed_mid_merge_says_the_rest_of_its_merge_is_written_when_its_worktree_goes(repo):
    """A lost attempt (its worker and its `run` gone) whose merge was decided and cut short: `aipm retry` re-queued
    it saying only what the attempt had come to, and the next attempt's start wrote the rest of that merge into
    the main tree without a word to the person who asked for the task to start anew."""
    project, files = _killed_mid_merge(repo)
    proc = project.aipm("retry", "T")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    said = (f"T: the merge of attempt 1 was cut short with 2 of 4 paths written; the rest is planned in "
            f"{repo / '.aipm/merges/ORD/T'} and is written when its worktree is removed (`aipm recover`, its next "
            "attempt)\n")
    assert said in proc.stdout, proc.stdout
    assert "retried: the merge of attempt 1 was cut short" in (repo / ".aipm/logs/ORD/T.1.log").read_text()
    project.aipm("recover", check=True)
    assert all(f.read_text().count("T\n") == 1 for f in files)  # what it said: the decided plan, finished once


def test_a_kept_patch_is_never_written_over_by_a_later_attempt(repo):
    """Attempt numbers came from logs and exit files only: with the logs cleared, a retry was attempt 1 again
    and its patch replaced the one kept from the first (the only copy once its worktree is gone)."""
    project = project_in(repo)
    order = project.order()
    write_task(order, "T", target_files=["src/a.txt"], command="echo first >> src/a.txt")
    project.aipm("run", "ORD", check=True)
    kept = repo / ".aipm/patches/ORD/T.1.patch"
    assert "+first" in kept.read_text()
    shutil.rmtree(repo / ".aipm/logs")
    project.aipm("retry", "T", check=True)
    (order / "T.yaml").write_text((order / "T.yaml").read_text().replace("first", "second"))
    project.aipm("run", "ORD", check=True)
    assert "+first" in kept.read_text()
    assert "+second" in (repo / ".aipm/patches/ORD/T.2.patch").read_text()


@pytest.mark.parametrize("ending", ["exit 3", "sleep 30"])
def test_a_failed_or_timed_out_attempts_changes_are_kept_as_a_patch_and_the_log_says_where(repo, ending):
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/a.txt"], max_attempts=2, timeout=2,
               command=f'echo "work of attempt $AIPM_ATTEMPT" >> src/a.txt; {ending}')
    assert project.aipm("run", "ORD").returncode == 1
    assert project.statuses() == {"T": "FAILED"}
    project.aipm("recover", check=True)  # removes the last attempt's worktree
    for n in (1, 2):
        patch = repo / f".aipm/patches/ORD/T.{n}.patch"
        assert f"+work of attempt {n}" in patch.read_text()
        assert f"the changes of attempt {n} are kept in {patch}" in (repo / f".aipm/logs/ORD/T.{n}.log").read_text()
    assert aipm_leftovers(repo) == {"worktrees": [], "refs": []}


@pytest.mark.parametrize("how", [{"command": "echo work >> src/a.txt; exit 3"},
                                 {"command": "echo work >> src/a.txt; sleep 30"},
                                 {"command": "echo work >> src/a.txt; echo out >> src/b.txt"},
                                 {"command": "echo work >> src/a.txt", "review": "exit 1"}],
                         ids=["failed", "timed out", "out of scope", "review rejected"])
def test_the_finish_line_of_an_attempt_that_merged_nothing_names_the_patch_that_keeps_its_work(repo, how):
    """`run` said where a conflicting attempt's work is (and `aipm cancel` where a cancelled one's is), but of a
    failed, timed-out, out-of-scope or rejected one only `finish T → FAILED (exit 3)`: its worktree goes when the
    next attempt starts (`aipm retry T`, which that line's closing advice suggests), and the log alone said where
    the work stays."""
    project = project_in(repo, config="workspace: worktree\nmax_rework: 0\n")
    write_task(project.order(), "T", target_files=["src/a.txt"], timeout=2, **how)
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 1
    patch = repo / ".aipm/patches/ORD/T.1.patch"
    assert "+work" in patch.read_text()
    finish = [line for line in proc.stdout.splitlines() if line.startswith("finish")]
    assert len(finish) == 1 and finish[0].endswith(f"its changes are kept in {patch}"), proc.stdout


def _lose_run_and_worker(project: Project, tmp_path: Path, command: str) -> None:
    """`aipm run ORD` and its worker both SIGKILLed once the worker says it is `ready` (a machine or a terminal
    session going down): no exit code, no one to record the attempt, its worktree left behind."""
    ready, pid = tmp_path / "ready", tmp_path / "pid"
    write_task(project.order(), "T", target_files=["src/a.txt"], command=(
        f'if [ ! -e "{ready}" ]; then {command}; echo $$ > "{pid}"; touch "{ready}"; sleep 600; fi'))
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"],
                           cwd=project.root, env=dict(os.environ, AIPM_ENABLE_MONITORING="false"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: ready.exists() and pid.read_text().strip())
    run.kill()
    run.wait()
    os.killpg(os.getpgid(int(pid.read_text())), signal.SIGKILL)


@pytest.mark.parametrize("then", [["recover", "ORD"], ["recover", "--json"], ["run", "ORD"]])
def test_the_recovery_of_a_lost_worktree_attempt_names_the_patch_that_keeps_its_work(repo, tmp_path, then):
    """A killed `aipm run` and its worker: recovery re-queues the task and keeps the attempt's work as a patch
    (the next attempt's start, or `aipm recover`'s sweep, removes its worktree), but said only `ORD/T: requeued`
    (`recover  T: ... re-queued, attempt not counted` in a run): the log alone said where the work went."""
    project = project_in(repo)
    _lose_run_and_worker(project, tmp_path, "echo precious >> src/a.txt")
    proc = project.aipm(*then)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    patch = repo / ".aipm/patches/ORD/T.1.patch"
    assert "+precious" in patch.read_text()
    if "--json" in then:
        assert {"order": "ORD", "id": "T", "action": "requeued", "kept": str(patch)} \
            in json.loads(proc.stdout)["recovered"], proc.stdout
    elif then[0] == "recover":
        assert f"ORD/T: requeued; its changes are kept in {patch}\n" in proc.stdout, proc.stdout
    else:
        assert ("recover  T: its worker was lost with its supervisor; re-queued, attempt not counted; the changes of T "
                f"are kept in {patch}\n") in proc.stdout, proc.stdout


def test_the_recovery_of_a_lost_worktree_attempt_that_changed_nothing_names_no_patch(repo, tmp_path):
    project = project_in(repo)
    _lose_run_and_worker(project, tmp_path, "true")
    proc = project.aipm("recover", "ORD", check=True)
    assert "ORD/T: requeued\n" in proc.stdout, proc.stdout


@pytest.mark.parametrize("out", ["plain", "json"])
def test_the_line_of_a_stopped_run_names_the_patches_that_keep_its_worktree_attempts_work(repo, tmp_path, out):
    """Ctrl-C of `aipm run`: its worktree attempts are stopped and re-queued, their work kept as patches (their
    worktrees go when their next attempts start), but the line said only `stopped  by signal; re-queued: A, B`."""
    project = project_in(repo)
    ready = tmp_path / "ready"
    ready.mkdir()
    write_task(project.order(), "A", target_files=["src/a.txt"],
               command=f'echo "work of A" >> src/a.txt; touch "{ready}/A"; sleep 60')
    write_task(project.order(), "B", target_files=["src/b.txt"], command=f'touch "{ready}/B"; sleep 60')
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(repo), "run", "ORD",
                            *(["--json"] if out == "json" else [])],
                           env=dict(os.environ, AIPM_ENABLE_MONITORING="false"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: {p.name for p in ready.iterdir()} == {"A", "B"})
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 130, stdout + stderr
    patch = repo / ".aipm/patches/ORD/A.1.patch"
    assert "+work of A" in patch.read_text()
    if out == "json":
        stop = next(json.loads(line) for line in stdout.splitlines() if '"interrupted"' in line)
        assert (sorted(stop["requeued"]), stop["kept"]) == (["A", "B"], {"A": str(patch)}), stdout
    else:
        stop = next(line for line in stdout.splitlines() if line.startswith("stopped"))
        assert stop in (f"stopped  by signal; re-queued: {both}; the changes of A are kept in {patch}"
                        for both in ("A, B", "B, A")), stdout


@pytest.mark.parametrize("stop", ["cancel", "SIGINT"])
def test_a_stopped_attempts_changes_are_kept_as_a_patch(repo, tmp_path, stop):
    """Cancelled, or interrupted by Ctrl-C of its run: the attempt's worktree went with the next attempt's start
    (or `aipm recover`) and its work with it, unlike a failed one's."""
    project = project_in(repo)
    ready = tmp_path / "ready"
    write_task(project.order(), "T", target_files=["src/a.txt"],
               command=f'echo "work of attempt $AIPM_ATTEMPT" >> src/a.txt; touch "{ready}"; sleep 60')
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(repo), "run", "ORD"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: ready.exists())
    patch = repo / ".aipm/patches/ORD/T.1.patch"
    if stop == "cancel":  # the person who cancelled is told where the work is, not only its log
        said = project.aipm("cancel", "T", check=True).stdout
        assert f"T: the changes of its attempt are kept in {patch}" in said
    else:
        run.send_signal(signal.SIGINT)
    run.communicate(timeout=60)
    project.aipm("recover", check=True)  # removes the worktree
    assert "+work of attempt 1" in patch.read_text()
    assert f"the changes of attempt 1 are kept in {patch}" in (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert aipm_leftovers(repo)["worktrees"] == []


def test_recover_removes_the_worktree_and_refs_of_a_deleted_order_but_not_of_one_outside_orders_dir(repo, tmp_path):
    project = project_in(repo)
    write_task(project.order("GONE"), "T", target_files=["src/a.txt"], command="echo x >> src/a.txt; exit 1")
    assert project.aipm("run", "GONE").returncode == 1
    elsewhere = repo / "more" / "ELSE"  # an order given by its path, not under orders/
    ready, gate = tmp_path / "ready", tmp_path / "gate"
    write_task(elsewhere, "L", target_files=["src/b.txt"],
               command=f'touch "{ready}"; {wait_gate(gate)} echo L >> src/b.txt')
    project.aipm("launch", str(elsewhere), check=True)
    wait_for(lambda: ready.exists())
    shutil.rmtree(project.order("GONE"))
    proc = project.aipm("recover", check=True)
    assert "GONE/T: worktree removed (its order is gone)" in proc.stdout
    assert "ELSE" not in proc.stdout
    assert [ref for ref in git(repo, "for-each-ref", "--format=%(refname)", "refs/aipm/").split()
            if "/GONE/" in ref] == []
    assert not (repo / ".aipm/worktrees/GONE").exists() and (repo / ".aipm/worktrees/ELSE/L").is_dir()
    gate.touch()
    wait_for(lambda: task_statuses(elsewhere)["L"] == "DONE")
    wait_for(lambda: aipm_leftovers(repo) == {"worktrees": [], "refs": []})  # removed just after DONE is written


def test_a_git_failure_names_its_cause_not_only_gits_last_line(repo):
    """An untracked repository without commits in the main tree: `git add` says why on its first error line and
    only "fatal: adding files failed" on its last; the launch error must show the first."""
    project = project_in(repo)
    (repo / "scratch").mkdir()
    git(repo / "scratch", "init", "-q")
    (repo / "scratch/notes.txt").write_text("hi\n")
    write_task(project.order(), "T", target_files=["src/a.txt"], command="echo T >> src/a.txt")
    proc = project.aipm("launch", "ORD")
    assert "'scratch/' does not have a commit checked out" in proc.stdout + proc.stderr
    assert project.statuses() == {"T": "QUEUED"}


def test_what_workspace_setup_writes_is_not_charged_to_the_task_nor_merged(repo):
    """The start is captured again after workspace_setup: its write to src/c.txt (a lock file, codegen) is not
    the task's out-of-scope write, and only the task's own change reaches the main tree."""
    project = project_in(repo, config="workspace: worktree\nmax_rework: 0\n"
                                      "workspace_setup: 'echo regenerated >> src/c.txt'\n")
    write_task(project.order(), "T", target_files=["src/a.txt"], command="echo T >> src/a.txt")
    c_before = (repo / "src/c.txt").read_bytes()
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert project.statuses() == {"T": "DONE"}
    assert (repo / "src/a.txt").read_text().endswith("T\n") and (repo / "src/c.txt").read_bytes() == c_before
    assert "src/c.txt" not in (repo / ".aipm/patches/ORD/T.1.patch").read_text()


def test_ignored_files_a_task_writes_in_its_targets_are_named_as_not_merged(repo):
    """.gitignore has .env and build/: the task's new build/ and its changed .env.local are left behind with
    its worktree, and the log says so; the .env workspace_copy brought in unchanged is not named, nor a
    build/ directory the main tree has too."""
    (repo / ".gitignore").write_text(".env\n.env.local\nbuild/\n")
    (repo / ".env").write_text("A=1\n")
    (repo / ".env.local").write_text("B=1\n")
    project = project_in(repo, config="workspace: worktree\nworkspace_copy: ['.env*']\n")
    write_task(project.order(), "T", target_files=["src/a.txt", ".env", ".env.local", "build/"],
               command="echo T >> src/a.txt; mkdir -p build && echo out > build/out.js; echo B=2 > .env.local")
    proc = project.aipm("run", "ORD", check=True)
    assert project.statuses() == {"T": "DONE"}
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    rest = repo / ".aipm/patches/ORD/T.1.rest"
    assert ("merge: .env.local, build/: ignored by git, so not merged back; moved out of the worktree, whole, into "
            f"{rest}") in log, log
    assert ".env," not in log and ".env:" not in log
    # What the task was asked to make is kept, not removed with the worktree.
    assert (rest / ".env.local").read_text() == "B=2\n" and (rest / "build/out.js").read_text() == "out\n"
    assert (repo / ".env.local").read_text() == "B=1\n" and not (repo / "build").exists()
    # Said where the user looks too, not in the log alone: a plain DONE read as everything merged.
    said = "exit 0; ignored files in its targets not merged back, kept aside (its log says where)"
    assert yaml.safe_load((project.order() / "T.yaml").read_text())["reason"] == said
    assert f"finish   T → DONE ({said})" in proc.stdout, proc.stdout
    (repo / "build").mkdir()
    project.aipm("retry", "T", check=True)
    project.aipm("run", "ORD", check=True)
    assert "merge: .env.local: ignored by git" in (repo / ".aipm/logs/ORD/T.2.log").read_text()
    assert (repo / ".aipm/patches/ORD/T.2.rest/.env.local").read_text() == "B=2\n"
    # The same after an approving review.
    write_task(project.order(), "R", target_files=[".env.local"], command="echo B=3 > .env.local", review="true")
    project.aipm("run", "ORD", check=True)
    assert yaml.safe_load((project.order() / "R.yaml").read_text())["reason"] == (
        "review approved; ignored files in its targets not merged back, kept aside (its log says where)")
    assert (repo / ".aipm/patches/ORD/R.1.rest/.env.local").read_text() == "B=3\n"
    write_task(project.order(), "S", target_files=["src/b.txt"], command="echo S >> src/b.txt", review="true")
    project.aipm("run", "ORD", check=True)  # nothing ignored written: the reason says nothing of it
    assert yaml.safe_load((project.order() / "S.yaml").read_text())["reason"] == "review approved"


@pytest.mark.parametrize("how", ["review", "scope", "conflict"])
def test_ignored_files_of_an_attempt_sent_back_whole_outlive_its_worktree(repo, how):
    """An attempt sent back with nothing of it merged (its review says no, its scope audit finds a write outside
    its targets, its merge conflicts): its worktree goes when the next attempt starts, and with it the ignored
    files it wrote in its targets (only a failed attempt's were kept). Kept in its rest now, and named."""
    (repo / ".gitignore").write_text(".env.local\n")
    project = project_in(repo, config="workspace: worktree\nmax_rework: 0\n")
    command = {"review": "echo B=2 > .env.local; echo T >> src/a.txt",
               "scope": "echo B=2 > .env.local; echo T >> src/a.txt; echo x > outside.txt",
               # the main tree's src/a.txt changes while it runs: its merge cannot combine the two
               "conflict": "echo B=2 > .env.local; printf 'mine\\n' > src/a.txt; printf 'theirs\\n' > "
                           f"{repo}/src/a.txt"}[how]
    write_task(project.order(), "T", target_files=[".env.local", "src/a.txt"], command=command,
               **({"review": "false"} if how == "review" else {}))
    project.aipm("run", "ORD")
    assert project.statuses() == {"T": "REJECTED"}
    rest = repo / ".aipm/patches/ORD/T.1.rest"
    assert (rest / ".env.local").read_text() == "B=2\n"
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert f".env.local: ignored by git, so in no patch; moved out of the worktree, whole, into {rest}" in log, log
    if how != "review":  # the line that says where its changes are kept names the rest too
        assert f"and what no patch can hold in {rest}" in log, log


def test_ignored_files_are_kept_only_from_the_attempts_own_worktree_not_through_a_link(repo, tmp_path):
    """A reviewer runs in the worktree and may replace it with a link (to another task's worktree, say): keeping
    the ignored files of an attempt sent back followed it, and moved that other tree's files into this attempt's
    rest."""
    from aipm import workspace
    from aipm.record import Record

    (repo / ".gitignore").write_text(".env.local\n")
    other = tmp_path / "other"  # a tree git lists the ignored .env.local of, as it would a worktree's
    other.mkdir()
    git(other, "init", "-q")
    (other / ".gitignore").write_text(".env.local\n")
    (other / ".env.local").write_text("theirs\n")
    tree = repo / ".aipm" / "worktrees" / "ORD" / "T"
    tree.parent.mkdir(parents=True)
    tree.symlink_to(other)
    rec = Record("ORD", "", "T", "", 1, [".env.local"], str(repo / "T.1.log"), "", "", workspace=str(tree))
    assert workspace.keep_ignored(repo, rec) == []
    assert (other / ".env.local").read_text() == "theirs\n"
    assert not (repo / ".aipm" / "patches").exists()


def test_a_sparse_terabyte_a_worker_leaves_as_an_ignored_file_in_its_targets_is_named_not_read(repo):
    """An ignored file the worktree holds in the task's targets is compared with the main tree's to say whether
    the merge leaves it behind: both were read whole, so a worker's `truncate -s 1T src/big.bin` was a MemoryError
    traceback after the merge was applied, and again in every owner that adopted the task."""
    (repo / ".gitignore").write_text(".env\nbuild/\n*.bin\n")
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/"],
               command="echo T >> src/a.txt; truncate -s 1T src/big.bin; echo same > src/same.bin")
    (repo / "src/same.bin").write_text("same\n")  # unchanged in the worktree: not named
    proc = project.aipm("run", "ORD", timeout=120, preexec_fn=capped_memory)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert "merge: src/big.bin: ignored by git, so not merged back; moved out of the worktree, whole" in log, log
    assert (repo / ".aipm/patches/ORD/T.1.rest/src/big.bin").stat().st_size == 1 << 40
    assert (repo / "src/a.txt").read_text().endswith("T\n")


@pytest.mark.parametrize("targets, named", [(["."], ".env.local, build/"), (["*.txt", ".env.local"], ".env.local")],
                         ids=["root", "glob"])
def test_the_ignored_files_note_follows_the_targets_for_the_root_and_globs(repo, targets, named):
    """The root target ("./") gave git a pathspec that matches nothing: no note at all. A glob made git list the
    directories that might hold a match (`build/` for `*.txt`), named although no target covers them."""
    (repo / ".gitignore").write_text(".env.local\nbuild/\n")
    project = project_in(repo, config="workspace: worktree\n")
    write_task(project.order(), "T", target_files=targets,
               command="echo T >> top.txt; mkdir -p build && echo out > build/out.js; echo B=2 > .env.local")
    project.aipm("run", "ORD", check=True)
    assert project.statuses() == {"T": "DONE"}
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert f"merge: {named}: ignored by git, so not merged back; moved out of the worktree, whole" in log, log
    assert (repo / ".aipm/patches/ORD/T.1.rest/.env.local").read_text() == "B=2\n"


@pytest.mark.parametrize("sub", ["proj", "p[1]*", "p\\q"])
def test_a_project_root_below_the_top_is_named_to_git_by_its_exact_name(repo, sub):
    """The project root's place in the repository (`p[1]*/`, `p\\q/`) was written into git's patterns as it is,
    where git reads `[1]` and `*` as wildcards and `\\` as an escape: the runtime directory a worker made in its
    worktree was not left out of the capture (the attempt was charged with `.aipm/junk.txt`, or with `./` it was
    merged into aipm's own), and the ignored files in its targets were looked for elsewhere, not named."""
    (repo / ".gitignore").write_text("build/\n")
    project = project_in(repo, sub=sub, config="workspace: worktree\nmax_rework: 0\n")
    write_task(project.order(), "T", target_files=["top.txt", "build/"],
               command="echo T > top.txt; mkdir -p .aipm build; echo junk > .aipm/junk.txt; echo o > build/o.js")
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0 and project.statuses() == {"T": "DONE"}, proc.stdout + proc.stderr
    assert (project.root / "top.txt").read_text() == "T\n" and not (project.root / ".aipm/junk.txt").exists()
    log = (project.root / ".aipm/logs/ORD/T.1.log").read_text()
    assert f"merge: {sub}/build/: ignored by git, so not merged back; moved out of the worktree, whole" in log, log


def test_what_an_approving_review_changed_in_the_worktree_is_merged_or_sends_the_attempt_back(repo):
    """The review runs after the end capture: its edit inside the targets is what it approved, so it is merged
    (and logged); an edit outside them merges nothing of the attempt."""
    project = project_in(repo, config="workspace: worktree\nmax_rework: 0\n")
    write_task(project.order(), "IN", target_files=["src/a.txt"], command="echo task >> src/a.txt",
               review="sed -i 's/^task$/task, fixed by the review/' src/a.txt")
    write_task(project.order(), "OUT", target_files=["src/c.txt"], command="echo task >> src/c.txt",
               review="echo review >> src/d.txt")
    d_before = (repo / "src/d.txt").read_bytes()
    c_before = (repo / "src/c.txt").read_bytes()
    assert project.aipm("run", "ORD").returncode == 1
    assert project.statuses() == {"IN": "COMPLETED", "OUT": "REJECTED"}
    assert (repo / "src/a.txt").read_text().endswith("a line 20\ntask, fixed by the review\n")
    assert ("merge: the review changed src/a.txt in the worktree; merged with the task's changes"
            in (repo / ".aipm/logs/ORD/IN.1.log").read_text())
    assert "the review wrote outside target_files: src/d.txt" in (repo / ".aipm/feedback/ORD/OUT.txt").read_text()
    kept = repo / ".aipm/patches/ORD/OUT.1.patch"  # the task's work and the review's, named in the log
    assert f"This attempt's changes are kept in {kept}" in (repo / ".aipm/logs/ORD/OUT.1.log").read_text()
    assert "+task" in kept.read_text() and "+review" in kept.read_text()
    assert (repo / "src/d.txt").read_bytes() == d_before and (repo / "src/c.txt").read_bytes() == c_before


def test_a_review_writing_outside_the_targets_is_no_persons_edit_and_the_last_send_back_starts_nothing(repo):
    """The finish line of a task whose review wrote outside its targets said "a next attempt starts from the main
    tree as it is now, your edit included": nobody edited, and after the last send-back (REJECTED) nothing starts."""
    project = project_in(repo, config="workspace: worktree\nmax_rework: 1\n")
    write_task(project.order(), "OUT", target_files=["src/c.txt"], command="echo task >> src/c.txt",
               review="echo review >> src/d.txt")
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 1 and project.statuses() == {"OUT": "REJECTED"}
    first, last = [line for line in proc.stdout.splitlines() if "the review wrote outside target_files" in line]
    patches = repo / ".aipm/patches/ORD"
    assert first.endswith(f"; its changes are kept in {patches / 'OUT.1.patch'}; a next attempt starts from the main "
                          "tree as it is now"), first
    assert "REJECTED" in last and last.endswith(f"; its changes are kept in {patches / 'OUT.2.patch'}"), last


@pytest.mark.parametrize("review", ["git checkout -- .", "git stash -q"])
def test_an_approving_review_that_puts_the_tasks_changes_back_keeps_them_in_the_patch(repo, review):
    """A review that undid the task's edits in the worktree (a `git checkout .`, a `git stash` in its script) and
    exited 0: COMPLETED with nothing merged, its log saying the review's changes were "merged with the task's
    changes", and the end capture after the review wrote the attempt's patch over with an empty one: the task's
    work was gone (or in the user's stash). What the review approved is still what is merged."""
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/a.txt", "src/b.txt"], review=review,
               command="echo 'from T' >> src/a.txt")
    before = (repo / "src/a.txt").read_bytes()
    assert project.aipm("run", "ORD").returncode == 0
    assert project.statuses() == {"T": "COMPLETED"}
    assert (repo / "src/a.txt").read_bytes() == before
    patch = repo / ".aipm/patches/ORD/T.1.patch"
    assert "+from T" in patch.read_text()
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert f"merge: src/a.txt: put back as they were by the review, so the task's changes there are not merged; " \
           f"the task's changes are kept in {patch}" in log and "merged with the task's changes" not in log
    assert "the review put back some of the task's changes" in project.json("status", "ORD")["tasks"][0]["reason"]


def test_a_same_size_edit_in_the_second_of_the_checkout_is_captured(repo):
    """The capture seeds a temporary index from the tree's own. A copy with a new mtime made git trust the stat
    data of a file edited (same size) in the second its index was written: racy git's check (a file not older
    than its index is read again) compares against the index's mtime, so the copy must keep it. Without that,
    the worker's edit was missing from the capture (and from the merge), once the next second had begun."""
    from aipm.workspace.repo import Repo

    r = Repo(repo)
    path = repo / "src" / "a.txt"
    index = repo / ".git" / "index"
    for _ in range(50):  # the checkout's index, the edit and its stat in one second (retried at a boundary)
        git(repo, "checkout", "-q", "--", "src/a.txt")
        git(repo, "update-index", "--refresh", "-q")
        path.write_text(path.read_text().replace("a line 1\n", "A line 1\n"))
        st, ix = path.stat(), index.stat()
        if int(st.st_mtime) == int(ix.st_mtime) == int(st.st_ctime):
            break
    else:
        pytest.skip("could not edit within the second of the index write")
    time.sleep(1.05 - time.time() % 1)  # the capture's copy of the index now carries a later second
    tree = r.capture(repo, repo / ".aipm" / "tmp", None, "end")
    blob = git(repo, "rev-parse", f"{tree}:src/a.txt").strip()
    assert git(repo, "cat-file", "-p", blob).startswith("A line 1\n")


@pytest.mark.parametrize("orders_dir, order_dir", [("orders", "ORD"), ("or\\ders", "O[1]*")], ids=["plain", "odd"])
def test_a_worktree_task_on_the_whole_project_never_merges_an_edit_of_a_task_file(repo, orders_dir, order_dir):
    """`./` covers the order directory too: a worker's edit of another task's file (its command) was merged into
    the main tree. Task files are aipm's state: such an attempt is sent back with nothing merged. Its order
    directory is that one exactly: `or\\ders/O[1]*` was read as a pattern that matched no such file."""
    project = project_in(repo, config=f"workspace: worktree\nmax_rework: 0\norders_dir: {json.dumps(orders_dir)}\n")
    order = repo / orders_dir / order_dir
    order.mkdir(parents=True)
    (order / "order.yaml").write_text("id: ORD\n")
    other_file = f"{orders_dir}/{order_dir}/OTHER.yaml"
    write_task(order, "OTHER", command="true", target_files=["o.txt"], status="DONE")
    write_task(order, "T", target_files=["."],
               command=f"echo T >> src/a.txt; echo 'command: rm -rf /' >> {shlex.quote(other_file)}")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "order")
    other = (repo / other_file).read_text()
    a_before = (repo / "src/a.txt").read_text()
    assert project.aipm("run", "ORD").returncode == 1
    assert project.statuses() == {"OTHER": "DONE", "T": "REJECTED"}
    assert (repo / other_file).read_text() == other and (repo / "src/a.txt").read_text() == a_before
    assert other_file in (repo / ".aipm/feedback/ORD/T.txt").read_text()


@pytest.mark.parametrize("then", ["recover while it is gone", "run, put back, recover"])
def test_a_worktree_whose_outcome_is_held_keeps_its_work_until_it_is_recorded_or_kept(repo, tmp_path, then):
    """The task file is moved away while its attempt runs: the outcome is held (the file may come back), and the
    attempt's work is in its worktree alone. No sweep may remove that worktree: `aipm recover` keeps the work as a
    patch when it drops the outcome, and a file put back gets its outcome, the work merged."""
    project = project_in(repo)
    order = project.order()
    away = tmp_path / "away.yaml"
    path = write_task(order, "T1", target_files=["src/a.txt"],
                      command=f'echo "WORKER WORK" >> src/a.txt; mv "{order}/T1.yaml" "{away}"')
    write_task(order, "T2", command="true")
    project.aipm("run", "ORD")
    assert not path.exists()
    if then == "recover while it is gone":
        project.aipm("recover", "ORD")
    else:
        write_task(order, "T3", command="true")
        project.aipm("run", "ORD")  # its recovery sweeps the order's worktrees
        shutil.move(str(away), str(path))
        project.aipm("recover", "ORD")
        wait_for(lambda: task_statuses(order)["T1"] != "IN_PROGRESS")
    wait_for(lambda: no_workers(repo))  # (recover's owner removes the worktree after its write: no walk meanwhile)
    patches = list((project.root / ".aipm").rglob("*.patch"))
    assert "WORKER WORK" in (repo / "src/a.txt").read_text() or any("WORKER WORK" in p.read_text() for p in patches)


def test_a_worktree_whose_file_a_checkout_reset_to_done_meanwhile_keeps_its_work(repo, tmp_path):
    """A worker's `git checkout` brings back a committed DONE of its own task file while its owner is dead: the
    record, not the file, says the attempt's outcome is unrecorded, and its worktree stays until it is."""
    project = project_in(repo)
    order = project.order()
    gate, ready = tmp_path / "gate", tmp_path / "ready"
    command = (f'echo "WORKER WORK" >> src/a.txt; touch "{ready}"; {wait_gate(gate)}'
               f'git -C "{repo}" checkout -- orders/ORD/T1.yaml')
    path = write_task(order, "T1", status="DONE", target_files=["src/a.txt"], command=command)
    git(repo, "add", "orders")
    git(repo, "commit", "-qm", "done before")
    write_task(order, "T1", target_files=["src/a.txt"], command=command)  # queued again, not committed
    _owner_killed_when(repo, ready, gate, "--no-review")
    wait_for(lambda: (state(repo) / "exit" / "ORD" / "T1.1").exists())  # the worker ended, its file says DONE
    assert yaml.safe_load(path.read_text())["status"] == "DONE"
    project.aipm("recover", "ORD")
    wait_for(lambda: no_workers(repo))
    patches = list((project.root / ".aipm").rglob("*.patch"))
    assert "WORKER WORK" in (repo / "src/a.txt").read_text() or any("WORKER WORK" in p.read_text() for p in patches)


def test_a_target_in_a_directory_ignored_whole_is_named_as_not_merged(repo):
    """git names a directory ignored whole alone (`build/`), not the task's target in it (`build/out.js`): taken for
    a path outside the targets, it was left behind with no word."""
    project = project_in(repo, config="workspace: worktree\n")
    write_task(project.order(), "T", target_files=["build/out.js"], command="mkdir -p build && echo out > build/out.js")
    project.aipm("run", "ORD", check=True)
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert "merge: build/: ignored by git, so not merged back; moved out of the worktree, whole" in log, log


def test_a_persons_worktree_whose_directory_is_away_keeps_its_note_in_git(repo, tmp_path):
    """aipm ran `git worktree prune` after each removal: a person's worktree on a disk unmounted for a while
    lost git's note of it, and with it that worktree's index (a staged change) and HEAD (found by a review)."""
    user_tree = tmp_path / "mnt" / "feature-wt"
    git(repo, "worktree", "add", "-q", "-b", "feature", str(user_tree))
    (user_tree / "src" / "a.txt").write_text("staged in the person's worktree\n")
    git(user_tree, "add", "src/a.txt")
    shutil.move(str(tmp_path / "mnt"), str(tmp_path / "away"))
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/b.txt"], command="echo hi >> src/b.txt")
    assert project.aipm("run", "ORD").returncode == 0
    project.aipm("recover", check=True)
    shutil.move(str(tmp_path / "away"), str(tmp_path / "mnt"))
    assert str(user_tree) in git(repo, "worktree", "list", "--porcelain")
    assert git(user_tree, "diff", "--cached", "--name-only").split() == ["src/a.txt"]
    assert aipm_leftovers(repo) == {"worktrees": [f"worktree {user_tree}"], "refs": []}


def test_a_workspace_copy_glob_that_matches_git_s_directory_leaves_it_out(repo):
    """`workspace_copy: ['.*']` matched the main tree's .git and copied it over the worktree's .git file: every
    worktree task failed to launch, File exists (found by a review)."""
    (repo / ".env").write_text("SECRET=1\n")
    with open(repo / ".gitignore", "a") as handle:
        handle.write(".env\n")
    project = project_in(repo, config="workspace: worktree\nworkspace_copy: ['.*']\n")
    write_task(project.order(), "T", target_files=["src/b.txt"], command="cat .env >> src/b.txt")
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (repo / "src/b.txt").read_text().endswith("SECRET=1\n")


def _start_run(project: Project, order: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", order],
                            cwd=project.root, env=dict(os.environ, AIPM_ENABLE_MONITORING="false"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_projects_of_one_repository_keep_their_attempts_refs_apart(repo, tmp_path):
    """Refs were refs/aipm/<ORDER>/<TASK>/ whatever the project: `aipm recover` in sub2 took sub1's running
    order for a deleted one and removed its refs, and the attempt's work, with no start to diff against, was
    in no patch when the next attempt removed its worktree (found by a review)."""
    (repo / "sub1").mkdir()
    (repo / "sub1" / "x.txt").write_text("x\n")
    git(repo, "add", "sub1")
    git(repo, "commit", "-q", "-m", "sub1")
    one, two = project_in(repo, sub="sub1"), project_in(repo, sub="sub2")
    two.order("OTHER")
    started, go = tmp_path / "started", tmp_path / "go"
    write_task(one.order("ORD_A"), "T", target_files=["x.txt"],
               command=f'echo "work of A" >> x.txt; touch "{started}"; {wait_gate(go)}')
    run = _start_run(one, "ORD_A")
    try:
        wait_for(lambda: started.exists())
        refs = git(repo, "for-each-ref", "--format=%(refname)", "refs/aipm/").split()
        assert refs and all(ref.startswith("refs/aipm/@sub1/ORD_A/T/") for ref in refs), refs
        two.aipm("recover", check=True)
        assert git(repo, "for-each-ref", "--format=%(refname)", "refs/aipm/").split() == refs
    finally:
        go.touch()
    assert run.wait(timeout=120) == 0, run.communicate()
    assert (repo / "sub1" / "x.txt").read_text() == "x\nwork of A\n"


@pytest.mark.parametrize("setup, commit", [("", ""), ("echo generated > src/setup.txt", ""),
                                           ("", "git commit -qam mine; ")], ids=["plain", "after-setup", "committed"])
def test_an_attempt_whose_start_ref_was_deleted_is_captured_against_its_start_in_its_worktree(repo, tmp_path, setup,
                                                                                              commit):
    """Found by reviews: with no start ref the attempt's work was in no patch when the next attempt removed its
    worktree; and after a workspace_setup the fallback took the commit from before the setup, whose output was
    then charged to the attempt, which was sent back. A worker that had committed in its worktree: the fallback
    took its commit for the start, so what it committed was in no patch, and the merge met the main tree without
    it as a conflict ("the main tree changed meanwhile"), until REJECTED."""
    config = "workspace: worktree\n" + (f"workspace_setup: '{setup}'\n" if setup else "")
    project = project_in(repo, config=config)
    started, go = tmp_path / "started", tmp_path / "go"
    write_task(project.order(), "T", target_files=["src/a.txt"],
               command=f'echo "work" >> src/a.txt; {commit}touch "{started}"; {wait_gate(go)}')
    run = _start_run(project, "ORD")
    try:
        wait_for(lambda: started.exists())
        git(repo, "update-ref", "-d", "refs/aipm/ORD/T/base")  # a person's clean-up of refs
    finally:
        go.touch()
    assert run.wait(timeout=120) == 0, run.communicate()
    assert project.statuses() == {"T": "DONE"}
    assert "+work" in (repo / ".aipm" / "patches" / "ORD" / "T.1.patch").read_text()
    assert (repo / "src" / "a.txt").read_text().endswith("work\n") and not (repo / "src" / "setup.txt").exists()
    log = (repo / ".aipm" / "logs" / "ORD" / "T.1.log").read_text()
    assert "was gone: the attempt is captured against its start in its worktree's history" in log
    assert "scope audit" not in log


def test_a_worktree_task_runs_in_a_sparse_checkout_and_keeps_it_sparse(repo):
    """`git add --all` refused the untracked task file outside the sparse set: every worktree task failed to
    launch (found by a review)."""
    (repo / "docs").mkdir()
    (repo / "docs" / "x.txt").write_text("x\n")
    git(repo, "add", "docs")
    git(repo, "commit", "-q", "-m", "docs")
    git(repo, "sparse-checkout", "set", "src")
    assert not (repo / "docs" / "x.txt").exists()
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/a.txt"], command="echo 'from T' >> src/a.txt")
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (repo / "src" / "a.txt").read_text().endswith("from T\n")
    assert not (repo / "docs" / "x.txt").exists() and "docs/x.txt" in git(repo, "ls-files")
    assert aipm_leftovers(repo) == {"worktrees": [], "refs": []}


@pytest.mark.parametrize("link", ["worktrees/ORD", "worktrees", "merges/ORD", "merges"])
def test_a_link_left_in_the_workspace_directories_is_never_listed_or_removed_through(repo, tmp_path, link):
    """A worker that made `.aipm/worktrees/ORD` a link to a directory of the user's: every run's sweep listed it
    and `rm -rf`ed each directory there as a finished task's worktree (`aipm recover`: through `.aipm/worktrees`
    too), and a merge saved its plan where `.aipm/merges/...` led, removing what had its task's name."""
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/a.txt"], command="echo done >> src/a.txt")
    victim = tmp_path / "victim"
    for where in ("T", "ORD/T", "ORD/other", "other"):
        (victim / where).mkdir(parents=True)
        (victim / where / "keep.txt").write_text("the user's\n")
    before = sorted(str(p.relative_to(victim)) for p in victim.rglob("*"))
    (repo / ".aipm" / link).parent.mkdir(parents=True, exist_ok=True)
    (repo / ".aipm" / link).symlink_to(victim)
    assert project.aipm("run", "ORD").returncode == 0
    assert project.aipm("recover").returncode == 0
    assert sorted(str(p.relative_to(victim)) for p in victim.rglob("*")) == before
    assert project.statuses() == {"T": "DONE"}
    assert (repo / "src/a.txt").read_text().endswith("done\n")
    assert aipm_leftovers(repo) == {"worktrees": [], "refs": []}


def test_a_kept_patch_and_a_captures_index_are_never_written_where_a_workers_link_leads(repo, tmp_path):
    """A link at `.aipm/patches/ORD` had a failed attempt's patch (the only copy of its work) written where it
    led, outside the project; one at a capture's temporary index had copy2 write git's index into the file it
    led to."""
    import re as regex

    from aipm.workspace import repo as repository

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "T.1.patch").write_text("the user's\n")
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/a.txt"], command="echo work >> src/a.txt; exit 1")
    (repo / ".aipm" / "patches").mkdir(parents=True)
    (repo / ".aipm" / "patches" / "ORD").symlink_to(victim)
    assert project.aipm("run", "ORD").returncode == 1
    assert [(p.name, p.read_text()) for p in victim.iterdir()] == [("T.1.patch", "the user's\n")]
    assert any("+work" in p.read_text() for p in (repo / ".aipm/patches/ORD").glob("T.*.patch"))

    index_victim = tmp_path / "index.txt"
    index_victim.write_text("the user's\n")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    after = int(regex.search(r"\d+", repr(repository._counter)).group())
    for n in range(after, after + 3):
        (scratch / f"index.{os.getpid()}.{n}").symlink_to(index_victim)
    repository.Repo(repo).capture(repo, scratch, None, "capture")
    assert index_victim.read_text() == "the user's\n"


def test_an_attempt_whose_exit_code_was_lost_keeps_its_changes_as_a_patch(repo, tmp_path):
    """Its wrapper's write of the exit code failed (a full disk): the task is left INTERRUPTED, "check its work,
    then `aipm retry`". Its work was in its worktree alone, and the retried attempt's start removed that worktree:
    no patch had been written, so the work was gone."""
    project = project_in(repo)
    order = project.order()
    gate, ready = tmp_path / "gate", tmp_path / "ready"
    write_task(order, "T", target_files=["src/a.txt"],
               command=f'echo "WORKER WORK" >> src/a.txt; touch "{ready}"; {wait_gate(gate)}')
    _owner_killed_when(repo, ready, gate)
    exit_file = state(repo) / "exit" / "ORD" / "T.1"
    wait_for(lambda: exit_file.exists() and exit_file.read_text())
    exit_file.write_text("")  # the code never reached the disk
    project.aipm("run", "ORD")
    assert project.statuses() == {"T": "INTERRUPTED"}
    patch = repo / ".aipm/patches/ORD/T.1.patch"
    assert patch.exists() and "WORKER WORK" in patch.read_text()
    assert str(patch) in (repo / ".aipm/logs/ORD/T.1.log").read_text()


def test_edits_of_files_marked_assume_unchanged_or_skip_worktree_are_captured(repo, tmp_path):
    """`git update-index --assume-unchanged` / `--skip-worktree` (the usual way to keep a local edit of a tracked
    file out of commits) made `git add` skip the file, and the capture's index is seeded from the tree's own: a
    worker that marked its target so and edited it ended DONE with its edit silently not merged, and a user's
    marked local edit was not in the worktree the task started from."""
    journal = tmp_path / "journal"
    (repo / "src" / "c.txt").write_text("the user's local setting\n")
    git(repo, "update-index", "--skip-worktree", "src/c.txt")
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/a.txt", "src/b.txt"], command=(
        f'cat src/c.txt >> "{journal}"; git update-index --assume-unchanged src/a.txt; '
        "git update-index --skip-worktree src/b.txt; echo 'from T' >> src/a.txt; echo 'from T' >> src/b.txt"))
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert journal_lines(journal) == ["the user's local setting"]
    assert (repo / "src" / "a.txt").read_text().endswith("from T\n")
    assert (repo / "src" / "b.txt").read_text().endswith("from T\n")


def _owner_killed_when(repo, ready, gate, *flags: str) -> None:
    """`aipm run ORD` SIGKILLed once its worker says it is `ready`; then the `gate` opens: the worker ends with no
    owner to record it."""
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(repo), "run", "ORD", *flags],
                           cwd=repo, env=dict(os.environ, AIPM_ENABLE_MONITORING="false"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(ready.exists)
    run.kill()
    run.wait()
    gate.touch()


def test_an_attempts_start_is_found_by_its_whole_message_not_a_longer_one(repo):
    """An attempt's start is found in its worktree's history by its commit message (its start ref deleted); a grep
    for "attempt 1" also found "attempt 10", the newer of the two, and took it for attempt 1's start."""
    from aipm.workspace.repo import _IDENTITY, Repo

    made = {}
    for subject in ("aipm: start of ORD/T, attempt 1", "aipm: start of ORD/T, attempt 10"):
        subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", subject], cwd=repo, check=True,
                       env={**os.environ, **_IDENTITY})
        made[subject] = git(repo, "rev-parse", "HEAD").strip()
    r = Repo(repo)
    head = made["aipm: start of ORD/T, attempt 10"]
    assert r.made_before(head, "aipm: start of ORD/T, attempt 1") == made["aipm: start of ORD/T, attempt 1"]
    assert r.made_before(head, "aipm: start of ORD/T, attempt 10") == head
    assert r.made_before(head, "aipm: start of ORD/T, attempt 2") is None


def test_a_repository_with_commits_made_in_the_worktree_fails_the_attempt_and_is_kept(repo):
    """A worker that made a repository and committed in it (a `git init` + commit, a vendored checkout) left git a
    submodule entry: the merge refused it as "a submodule ... (commit them there)" under a header saying the main
    tree had changed (it had not), sent the task back, and the next attempt's start removed the worktree holding
    that repository's only copy: its files and commits were gone, and the kept patch held one `Subproject commit`
    line. Now the attempt fails as a try, as for a repository without commits, the repository kept beside its patch
    (test_kept_work.py)."""
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["lib/"], command=(
        "mkdir -p lib/sub && (cd lib/sub && git init -q . && echo precious > code.txt && git add . "
        "&& git commit -qm sub) && echo other > lib/plain.txt"))
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    row = project.json("status", "ORD")["tasks"][0]
    assert (row["status"], row["attempts"]) == ("FAILED", 1), row
    assert row["reason"].startswith("attempt 1 cannot be merged: lib/sub/: a git repository with commits"), row
    assert "changed meanwhile" not in row["reason"] and "commit in it" not in row["reason"]
    assert (repo / ".aipm/patches/ORD/T.1.rest/lib/sub/code.txt").read_text() == "precious\n"
    assert not (repo / "lib").exists()
    assert "+++ b/lib/plain.txt" in (repo / ".aipm/patches/ORD/T.1.patch").read_text()
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert f"moved out of the worktree, whole, into {repo}/.aipm/patches/ORD/T.1.rest" in log, log


@pytest.mark.parametrize("ending", ["exit 0", "exit 3", "git stash apply -q"])
def test_changes_a_worker_stashed_are_named_where_they_are_not_said_merged(repo, ending):
    """A worker's `git stash` (to see whether the tests failed before its edit, say) moves its work out of its
    worktree. Exit 0 went DONE with "merged" and nothing merged, a failed attempt "changed nothing in its worktree".
    Now the log and the reason name the worker's entry, moved from its worktree's own stash (which goes with the
    worktree) to the repository's; the user's entry is untouched beside it."""
    project = project_in(repo)
    users = git(repo, "rev-parse", "refs/stash").strip()
    write_task(project.order(), "T", target_files=["src/a.txt", "src/new.txt"],
               command=f"echo work >> src/a.txt && echo new > src/new.txt && git stash -q -u && {ending}")
    project.aipm("run", "ORD")
    row = project.json("status", "ORD")["tasks"][0]
    stashed = git(repo, "rev-parse", "refs/stash").strip()
    assert stashed != users and git(repo, "rev-parse", "stash@{1}").strip() == users
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    if ending == "git stash apply -q":  # its work is back in its worktree as stashed: merged, and not said stashed
        assert row["reason"] == "exit 0" and "stash@" not in log, log
        assert (repo / "src/new.txt").exists() and "work" in (repo / "src/a.txt").read_text()
        return
    assert f"src/a.txt, src/new.txt (stash@{{0}}, {stashed[:10]}): stashed by the worker, so not merged" in log, log
    assert "the worker left changes in the repository's stash" in row["reason"] or ending != "exit 0", row
    assert not (repo / "src/new.txt").exists() and "work" not in (repo / "src/a.txt").read_text()


def test_a_worker_stash_dated_before_its_start_is_named_too(repo):
    """The worker's entries were told from older ones by their commit time (not before the attempt's start): with
    the clock stepped back since the start (here GIT_COMMITTER_DATE), the worker's `git stash` went DONE "merged",
    its work only in the stash and unnamed. The entries in the stash at the start (pinned then) are the older ones."""
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/a.txt"],
               command="echo work >> src/a.txt && GIT_COMMITTER_DATE='2001-01-01T00:00:00Z' git stash -q")
    project.aipm("run", "ORD")
    stashed = git(repo, "rev-parse", "refs/stash").strip()
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert f"src/a.txt (stash@{{0}}, {stashed[:10]}): stashed by the worker, so not merged" in log, log


@pytest.mark.parametrize("then", [["run", "ORD"], ["recover"]])
def test_an_attempt_whose_record_went_with_the_state_directory_keeps_its_changes(repo, tmp_path, then):
    """The state directory lives in /tmp, which a reboot (or a tmp cleaner) empties while a worktree stays in the
    project. Its worker and run gone and its record with them, recovery re-queued the task with no one to capture
    the attempt's end, and the next attempt's start (or `aipm recover`'s sweep) removed the worktree: the work was
    in no patch, nowhere. Now a worktree whose attempt's patch was never written is kept as that patch first."""
    project = project_in(repo)
    ready, pid = tmp_path / "ready", tmp_path / "pid"
    write_task(project.order(), "T", target_files=["src/a.txt"], command=(
        f'if [ ! -e "{ready}" ]; then echo precious >> src/a.txt; echo $$ > "{pid}"; touch "{ready}"; sleep 600; fi; '
        'exit 3'))
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"],
                           cwd=project.root, env=dict(os.environ, AIPM_ENABLE_MONITORING="false"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: ready.exists() and pid.read_text().strip())
    run.kill()  # the machine goes down: the run, the worker, and /tmp with the state directory
    run.wait()
    os.killpg(os.getpgid(int(pid.read_text())), signal.SIGKILL)
    shutil.rmtree(state(repo))
    project.aipm(*then)
    swept = project.aipm(*then).stdout  # (a first recover re-queues the task; the second sweeps its worktree)
    wait_for(lambda: no_workers(repo))
    patches = list((repo / ".aipm/patches/ORD").glob("T.*.patch"))
    assert any("+precious" in p.read_text() for p in patches), [p.name for p in patches]
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    kept = (f"the changes of attempt 1 are kept in {repo}/.aipm/patches/ORD/T.1.patch (`git apply` it at the "
            "repository's top)")
    assert kept in log, log
    # Kept as its worktree is removed: recover said `worktree removed; ...; its worktree is removed when the next
    # attempt starts or by `aipm recover``, and the log the same
    assert "removed when the next attempt starts" not in log, log
    if then == ["recover"]:
        assert f"ORD/T: worktree removed; {kept}\n" in swept, swept


@pytest.mark.parametrize("max_rework", [0, 1])
def test_a_rejected_worktree_task_s_log_says_no_next_attempt_continues_its_changes(repo, max_rework):
    """A review that rejected the task for good (max_rework spent) left a log saying "review sent back" and "the
    changes of attempt 1 are kept in ...; its next attempt continues them": no next attempt ran, the log never said
    REJECTED, and `aipm retry` starts the task anew. Only an attempt sent back for another one says it is continued."""
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/a.txt"], max_rework=max_rework,
               command="echo work >> src/a.txt", review='echo "bad style"; exit 4')
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 1 and project.statuses() == {"T": "REJECTED"}, proc.stdout + proc.stderr
    logs = repo / ".aipm/logs/ORD"
    last = (logs / f"T.{max_rework + 1}.log").read_text()
    assert "next attempt continues" not in last, last
    assert (f"the changes of attempt {max_rework + 1} are kept in {repo}/.aipm/patches/ORD/T.{max_rework + 1}.patch\n"
            in last), last
    assert last.rstrip().endswith(
        "REJECTED (review rejected: bad style): no next attempt starts; `aipm retry T` starts it anew"), last
    if max_rework:  # the attempt sent back for another one: continued, as its log says
        first = (logs / "T.1.log").read_text()
        assert "are kept in" in first and first.rstrip().endswith("its next attempt continues them"), first


def test_a_merge_conflict_that_rejects_the_task_says_no_next_attempt_starts(repo, tmp_path):
    """A merge conflict that spent max_rework logged "...; the next attempt starts from the main tree as it is now."
    of a task it made REJECTED."""
    project = project_in(repo)
    _gated_task(project.order(), tmp_path, "sed -i 's/^a line 1$/task/' src/a.txt", max_rework=0)
    proc = _run_with_person(project, tmp_path, lambda: (repo / "src/a.txt").write_text(
        (repo / "src/a.txt").read_text().replace("a line 1\n", "yours\n", 1)))
    assert proc.returncode == 1 and project.statuses() == {"T": "REJECTED"}, proc.stdout + proc.stderr
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert "merge conflict in src/a.txt" in log and "the next attempt starts" not in log, log
    assert (f"This attempt's changes are kept in {repo}/.aipm/patches/ORD/T.1.patch; no next attempt starts: the "
            "task is rejected, its reworks spent (max_rework).") in log, log
    assert re.search(r"REJECTED \(merge conflict in src/a.txt[^\n]*\): no next attempt starts; `aipm retry T` starts "
                     r"it anew\n$", log), log


@pytest.mark.parametrize("json_out", [False, True])
def test_recover_of_a_worktree_attempt_that_had_ended_names_its_kept_patch(repo, json_out):
    """`aipm recover` of a worktree attempt that had ended with its owner dead said `recorded FAILED (exit 3); a
    detached aipm starts what that unblocks`: a FAILED task unblocks nothing, and the patch that keeps its changes
    (its worktree goes at the next attempt's start, or by a recover's sweep) was in neither its line nor --json."""
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/a.txt"],
               command=f"echo work >> src/a.txt; {KILL_OWNER}; exit 3")
    project.aipm("launch", "ORD", check=True)
    wait_for(lambda: [w for w in project.json("ps")["workers"] if w["state"] == "gone"])
    patch = f"{repo}/.aipm/patches/ORD/T.1.patch"
    if json_out:
        (said,) = project.json("recover", "ORD")["recovered"]
        assert {k: said.get(k) for k in ("action", "status", "exit_code", "kept")} == {
            "action": "recorded", "status": "FAILED", "exit_code": 3, "kept": patch}, said
    else:
        said = project.aipm("recover", "ORD", check=True).stdout
        assert said == f"ORD/T: its worker had ended: recorded FAILED (exit 3); its changes are kept in {patch}\n", said
    assert "+work" in Path(patch).read_text()
    wait_for(lambda: no_workers(repo))
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()  # (and it is the last: no next attempt follows)
    assert log.rstrip().endswith("FAILED (exit 3): no next attempt starts; `aipm retry T` starts it anew"), log


@pytest.mark.parametrize("command, what", [("mkdir -p docs && echo more >> docs/x.txt", "change"),
                                           ("git sparse-checkout disable && rm docs/x.txt", "deletion")])
def test_a_file_outside_the_main_trees_sparse_checkout_is_not_said_deleted_there(repo, command, what):
    """The worktree inherits the sparse checkout; a worker that made a file outside it (`mkdir -p docs` and wrote
    docs/x.txt) was sent back with "docs/x.txt: deleted in the main tree since the task started": the user had
    deleted nothing, the file is outside their sparse checkout. Now the conflict says so and how to merge it. One
    that deleted such a file went DONE, "merged": the file was absent from the main tree already, so the merge had
    nothing to write, and it stayed in the user's HEAD and index as if never deleted. Now that is a conflict too."""
    (repo / "docs").mkdir()
    (repo / "docs" / "x.txt").write_text("x\n")
    git(repo, "add", "docs")
    git(repo, "commit", "-q", "-m", "docs")
    git(repo, "sparse-checkout", "set", "src")
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["docs/x.txt"], max_rework=0, command=command)
    project.aipm("run", "ORD")
    row = project.json("status", "ORD")["tasks"][0]
    assert row["status"] == "REJECTED" and "merge conflict in docs/x.txt" in row["reason"], row
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert (f"docs/x.txt: outside the main tree's sparse checkout; `git sparse-checkout add` its directory to have the "
            f"task's {what} merged") in log and "deleted in the main tree" not in log, log
    assert not (repo / "docs").exists()



def test_the_line_of_a_preemption_names_the_patch_that_keeps_the_stopped_attempts_work(repo, tmp_path):
    """`run --preempt` stops a worktree attempt for a more urgent task and re-queues it: its work is kept as a patch
    (its worktree goes when its next attempt starts), as a Ctrl-C's is, and its line must say where."""
    project = project_in(repo)
    ready, gate = tmp_path / "ready", tmp_path / "gate"
    write_task(project.order(), "LOW", priority="P3", target_files=["src/a.txt"],
               command=f'echo "work of LOW" >> src/a.txt; touch "{ready}"; {wait_gate(gate)}')
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(repo), "run", "ORD", "--preempt"],
                           env=dict(os.environ, AIPM_ENABLE_MONITORING="false"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: ready.exists())
    write_task(project.order(), "URGENT", priority="P0", target_files=["src/a.txt"], command=f'touch "{gate}"')
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stdout + stderr
    patch = repo / ".aipm/patches/ORD/LOW.1.patch"
    assert "+work of LOW" in patch.read_text()
    assert (f"preempt  LOW for URGENT (re-queued, attempt not counted); the changes of LOW are kept in {patch}\n"
            in stdout), stdout


def test_a_file_git_ignores_in_the_main_tree_where_the_task_adds_one_is_said_so(repo):
    """A worker that force-adds an ignored file the main tree already has (`.env`): no capture holds an ignored
    file, so the start had none, and the merge said "the main tree changed meanwhile ... your edit included" of a
    file no one touched, attempt after attempt. Nothing is written over yours, and the reason says why."""
    (repo / ".env").write_text("USER\n")
    project = project_in(repo)
    write_task(project.order(), "T", target_files=[".env"], max_rework=0,
               command="echo task > .env && git add -f .env")
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 1 and project.statuses() == {"T": "REJECTED"}, proc.stdout + proc.stderr
    assert (repo / ".env").read_text() == "USER\n"
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert "the main tree holds what no attempt starts with there (files git ignores" in log, log
    assert "changed meanwhile" not in log and ".env: the main tree has a file here that git ignores" in log
    assert "your edit included" not in proc.stdout and "+task" in (repo / ".aipm/patches/ORD/T.1.patch").read_text()


def test_an_empty_directory_made_where_the_task_puts_a_file_is_no_lasting_conflict(repo, gate):
    """A person's `mkdir out` in the main tree while the task writes the file `out`: their edit meanwhile (it may
    go), not what no attempt starts with: the task is sent back for another attempt, not REJECTED at once."""
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["out"], max_rework=1,
               command=f'if [ "$AIPM_ATTEMPT" = 1 ]; then while [ ! -e {gate} ]; do sleep 0.05; done; fi; echo o > out')
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(repo), "run", "ORD"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (repo / ".aipm/worktrees/ORD/T").is_dir())
        (repo / "out").mkdir()
    finally:
        gate.touch()
    out, err = run.communicate(timeout=120)
    finish = [line for line in out.splitlines() if line.startswith("finish")]
    assert finish[0].startswith("finish   T → QUEUED (merge conflict in out: the main tree changed meanwhile"), out
    assert finish[0].endswith("a next attempt starts from the main tree as it is now, your edit included"), out


def test_a_directory_holding_files_git_ignores_where_the_task_puts_a_file_is_met_once_not_retried(repo):
    """The task replaces a directory with a file, and the main tree's directory holds a file git ignores (no
    capture holds one: no attempt ever sees it). Called "the main tree changed meanwhile ... your edit included",
    it was retried until REJECTED, each attempt meeting it again (each an agent paid). It is said so, and REJECTED
    at once with what to do; the person's file stays."""
    (repo / ".gitignore").write_text("*.secret\n")
    (repo / "pkg" / "sub").mkdir(parents=True)
    (repo / "pkg" / "sub" / "kept.txt").write_text("t\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "pkg")
    (repo / "pkg" / "sub" / "local.secret").write_text("S\n")
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["pkg/"], command="rm -rf pkg/sub && echo file > pkg/sub")
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 1 and project.statuses() == {"T": "REJECTED"}, proc.stdout + proc.stderr
    finish = [line for line in proc.stdout.splitlines() if line.startswith("finish")]
    assert len(finish) == 1 and "the main tree holds what no attempt starts with there" in finish[0], proc.stdout
    assert finish[0].endswith("no next attempt starts, as each would meet the same: move them away, then `aipm retry "
                              "T`"), finish[0]
    assert (repo / "pkg" / "sub" / "local.secret").read_text() == "S\n"
    assert "pkg/sub: a directory in the main tree, where the task has a file, holding what no attempt starts with" \
        in (repo / ".aipm/logs/ORD/T.1.log").read_text()


def test_a_rerun_after_a_kill_while_the_worktree_is_made_ends_the_killed_runs_checkout_first(repo, tmp_path):
    """`aipm run` SIGKILLed while `git worktree add` checked its files out: that git (and the `git reset --hard` it
    runs) went on filling the directory, and the rerun, clearing the path to make the worktree again, collided with
    it (`fatal: '...' already exists`, the task not launched, exit 1). A smudge filter holds the first checkout of
    one file, so the killed run's checkout is still at work, for as long as the test likes, when the rerun starts."""
    held, pid, go = tmp_path / "held", tmp_path / "pid", tmp_path / "go"
    os.mkfifo(go)
    (tmp_path / "smudge.sh").write_text(f'if mkdir "{held}" 2>/dev/null; then echo $$ > "{pid}"; read x < "{go}"; fi\n'
                                        "exec cat\n")
    git(repo, "config", "filter.held.smudge", f"sh {tmp_path / 'smudge.sh'}")
    (repo / ".gitattributes").write_text("src/held.txt filter=held\n")
    (repo / "src" / "held.txt").write_text("held\n")
    git(repo, "add", ".gitattributes", "src/held.txt")
    git(repo, "commit", "-q", "-m", "a file whose checkout is held")
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/"], command="echo done >> src/a.txt")
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"],
                           cwd=project.root, env=dict(os.environ, AIPM_ENABLE_MONITORING="false"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        filter_pid = int(wait_for(lambda: pid.exists() and pid.read_text().strip()))
        run.kill()
        run.wait()
        proc = project.aipm("run", "ORD")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert not _working(filter_pid), "the killed run's checkout outlived the rerun's start"
        assert project.statuses() == {"T": "DONE"}
        assert (repo / "src/a.txt").read_text().endswith("done\n")
        assert aipm_leftovers(repo) == {"worktrees": [], "refs": []}
    finally:
        with contextlib.suppress(OSError):  # a checkout still held (the test failed): let it go
            os.close(os.open(go, os.O_WRONLY | os.O_NONBLOCK))


def test_making_and_removing_a_worktree_reads_no_process_environment_unless_a_dead_owner_left_its_git_marked(
        repo, monkeypatch):
    """Ending a killed owner's git (the test above) read /proc/*/environ of every process (71 ms at 1,666 processes)
    on every worktree attempt's start, under the launch lock, and finish. Now only a marker file left by an owner
    that died (its `git worktree add`, `git apply` or `git worktree remove` cut short) makes it look."""
    from aipm import subreaper
    from aipm.workspace import cleanup, orphans
    from aipm.workspace.places import scratch, worktree_path
    from aipm.workspace.repo import Repo

    scans = []
    real = subreaper.environs
    monkeypatch.setattr(subreaper, "environs", lambda *a: scans.append(a) or real(*a))
    project_in(repo)
    tree = worktree_path(repo, "ORD", "T")
    Repo(repo).add_worktree(tree, git(repo, "rev-parse", "HEAD").strip())
    assert (tree / "src/a.txt").is_file()
    cleanup.remove(repo, "ORD", "T")
    assert not tree.exists() and scans == [], "a worktree's start or end read every process's environment"
    assert list((scratch(repo) / "worktree-git").iterdir()) == [], "a finished git's marker stayed"
    dead = subprocess.Popen(["true"])
    dead.wait()
    with orphans.marked(repo, tree):  # as an owner killed while its git ran leaves it
        marker = next((scratch(repo) / "worktree-git").iterdir())
        left = marker.read_text().replace(f"{os.getpid()} ", f"{dead.pid} ", 1)
    marker.write_text(left)
    cleanup.remove(repo, "ORD", "T")
    assert len(scans) == 1 and not marker.exists(), "a dead owner's marker was not acted on, or stayed"


def _working(pid: int) -> bool:
    """Not ended (a zombie has ended: whoever it was re-parented to may not have reaped it yet)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_a_worktree_made_before_aipm_named_its_notes_is_still_found_by_its_own_note(repo, tmp_path):
    """aipm names a worktree's git note itself (a worker may rewrite its `gitdir`); a worktree an older aipm made,
    its note named by git, running across the upgrade, had no note found: its capture lost its index and its stash
    was never moved. It is found by its `gitdir` as before, but never a note named as aipm names them, whatever its
    `gitdir` claims."""
    from aipm.workspace.repo import Repo

    r = Repo(repo)
    old, new = tmp_path / "wt" / "OLD", tmp_path / "wt" / "NEW"
    git(repo, "worktree", "add", "-q", "--detach", str(old), "HEAD")  # git's own name for its note: OLD
    r.add_worktree(new, git(repo, "rev-parse", "HEAD").strip())
    assert r.note_of(old) == repo / ".git" / "worktrees" / "OLD"
    mine = r.note_of(new)
    assert mine is not None and mine.name.startswith("NEW-")
    (mine / "gitdir").write_text(f"{tmp_path / 'wt' / 'THIRD'}/.git\n")  # a claim on a worktree with no note
    assert r.note_of(tmp_path / "wt" / "THIRD") is None and r.note_of(new) == mine
