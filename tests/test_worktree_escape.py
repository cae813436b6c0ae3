"""A worktree task whose worker writes out of its worktree: into the main tree by an absolute path (its log lies in
the main tree's `.aipm/`, so it can work the root out), by `../..`, through a symbolic link it made, or by a commit
in the main repository. Unconfined, the write lands: the main tree's audit then judges it as the shared tree's
audit judges a write outside the targets (the task is sent back, the paths named, nothing merged). Confined, the
kernel refuses it, and git still works in the worktree."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import task_statuses, wait_for, write_task
from test_confine import needs_landlock
from test_workspace import git, project_in, repo, wait_gate  # noqa: F401 - repo is a fixture

MAIN = '"${AIPM_LOG%/.aipm/*}"'  # the main tree's root, as a worker can work it out
UP = "../../../.."  # the main tree's root from the worktree, .aipm/worktrees/ORD/T

ESCAPES = {
    "absolute": f"echo escaped >> {MAIN}/src/b.txt",
    "relative": f"echo escaped >> {UP}/src/b.txt",
    "symlink": f"mkdir -p out && ln -s {MAIN}/src out/way && echo escaped >> out/way/b.txt && rm out/way",
    "commit": f"echo escaped >> {MAIN}/src/b.txt && git -C {MAIN} commit -q -m stray src/b.txt",
}


@pytest.mark.parametrize("audit", ["watch", "git status", "exec"])
@pytest.mark.parametrize("escape", list(ESCAPES))
def test_an_unconfined_worktree_worker_that_writes_the_main_tree_is_sent_back_with_the_paths(repo, escape, audit):
    """The scope check looked at the worktree alone: a worker that wrote src/b.txt of the main tree (outside its
    targets) went unnoticed, its task DONE and its work merged, the stray write left in the user's tree. Now the
    main tree is audited as the shared tree is (from `run`'s watch, or `git status`; `exec` too; a commit's files
    count): the
    attempt is sent back naming the path and that it lies in the main tree, nothing of it merged."""
    project = project_in(repo, config="workspace: worktree\n" + "scope_watch: false\n" * (audit == "git status"))
    before = (repo / "src/a.txt").read_text()
    write_task(project.order(), "T", target_files=["src/a.txt", "out/"], max_rework=0,
               command=f"echo work >> src/a.txt && {ESCAPES[escape]}")
    proc = project.aipm(*(["exec", "T"] if audit == "exec" else ["run", "ORD"]))
    row = project.json("status", "ORD")["tasks"][0]
    assert (row["status"], row["reason"]) == ("REJECTED", "scope: wrote src/b.txt"), (row, proc.stdout)
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert "src/b.txt changed in the main tree, outside this task's worktree" in log, log
    assert "run such tasks with confine: true" in proc.stdout, proc.stdout
    assert (repo / "src/a.txt").read_text() == before  # nothing merged; the work is in the patch
    assert "+work" in (repo / ".aipm/patches/ORD/T.1.patch").read_text()


def test_what_others_merge_and_the_person_edits_in_its_targets_and_ignored_paths_is_not_charged(repo, tmp_path):
    """The main tree's audit of a worktree task allows what a shared audit allows: another worktree task's merge
    while it runs (noted in the written log), a person's edit of the task's own targets (merged three ways), and
    the paths of `scope_ignore`."""
    project = project_in(repo, config="workspace: worktree\nscope_ignore: [NOTES.md]\n")
    gates = tmp_path / "gates"
    gates.mkdir()
    write_task(project.order(), "A", target_files=["src/a.txt"], max_rework=0,
               command=f'sed -i "1s/.*/task A/" src/a.txt && touch "{gates}/A"; {wait_gate(gates / "go")}')
    write_task(project.order(), "B", target_files=["src/b.txt"], max_rework=0,
               command=f'{wait_gate(gates / "A")}echo from B >> src/b.txt')
    # A waits for "go", given only once B is DONE: the two must run at once. With resource monitoring on (the
    # default), a busy machine lets `run` start one worker (`defer B: machine busy (cpu 100%, ...)`): A held it
    # until its gate gave up, and B was not DONE within wait_for's minute. The machine's load must not decide
    # what a test launches (as Project.aipm, so here).
    env = {k: v for k, v in os.environ.items() if k != "AIPM_FAKE_LOAD"}
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(repo), "run", "ORD"], cwd=repo,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**env, "AIPM_ENABLE_MONITORING": "false"})
    try:
        wait_for(lambda: task_statuses(project.order())["B"] == "DONE")
    except AssertionError as error:  # with what `run` said of it, and nothing left running A's gate out
        (gates / "go").touch()
        out, err = run.communicate(timeout=120)
        raise AssertionError(f"{error}\n{out}{err}") from None
    with open(repo / "src/a.txt", "a") as handle:  # the person, at the end of A's target
        handle.write("the person's line\n")
    (repo / "NOTES.md").write_text("a note of the person's\n")
    (gates / "go").touch()
    out, err = run.communicate(timeout=120)
    assert project.statuses() == {"A": "DONE", "B": "DONE"}, out + err
    text = (repo / "src/a.txt").read_text()
    assert text.startswith("task A\n") and text.endswith("the person's line\n")
    assert (repo / "src/b.txt").read_text().endswith("from B\n")


@needs_landlock
def test_a_confined_worktree_worker_reaches_nothing_of_the_main_tree_and_its_git_works(repo, tmp_path):
    """Confined, every way out of the worktree is refused by the kernel (the main tree by an absolute path, `../..`,
    a symbolic link made in a target directory; another task's worktree; the main repository's refs), while git
    works in the worktree: the worker's `git add`, `git commit` and `git stash` failed there (its index and refs
    in its own git directory, its objects in the repository's, were all refused), which agents take for a broken
    repository."""
    project = project_in(repo, config="workspace: worktree\nconfine: true\n")
    gates = tmp_path / "gates"
    gates.mkdir()
    user = {p: (repo / p).read_text() for p in ("src/b.txt", "src/c.txt")}
    branch = git(repo, "rev-parse", "main")
    tries = {
        "absolute": f"echo escaped >> {MAIN}/src/b.txt",
        "relative": f"echo escaped >> {UP}/src/b.txt",
        "symlink": f"ln -s {MAIN}/src out/way && echo escaped >> out/way/c.txt",
        "other worktree": "echo escaped >> ../B/src/b.txt",
        "main refs": f"git -C {MAIN} commit -q --allow-empty -m stray",
    }
    script = "".join(f'{{ {command}; }} 2>/dev/null && echo "ESCAPED {name}"; ' for name, command in tries.items())
    write_task(project.order(), "B", target_files=["src/b.txt"], max_rework=0,
               command=f'{wait_gate(gates / "A")}echo from B >> src/b.txt')
    write_task(project.order(), "A", target_files=["src/a.txt", "out/"], max_rework=0, command=(
        f'echo work >> src/a.txt && {script}touch "{gates}/A"; '
        "echo new > out/n.txt && git add src/a.txt out/n.txt && git commit -q -m mine && echo more >> out/n.txt && "
        "git stash -q && git stash pop -q && echo GIT-WORKS"))
    proc = project.aipm("run", "ORD")
    log = (repo / ".aipm/logs/ORD/A.1.log").read_text()
    assert project.statuses() == {"A": "DONE", "B": "DONE"}, proc.stdout + log
    assert "ESCAPED" not in log and "GIT-WORKS" in log, log
    assert (repo / "src/a.txt").read_text().endswith("work\n") and (repo / "out/n.txt").read_text() == "new\nmore\n"
    assert (repo / "src/b.txt").read_text() == user["src/b.txt"] + "from B\n"
    assert (repo / "src/c.txt").read_text() == user["src/c.txt"] and git(repo, "rev-parse", "main") == branch
    git(repo, "fsck", "--no-dangling")


@pytest.mark.parametrize("cmd", [("run", "ORD"), ("exec", "T")])
def test_a_worktree_a_worker_replaced_by_a_link_to_the_main_tree_is_never_captured_through_it(repo, cmd):
    """A worker that removed its worktree and left a link to the main tree in its place had the main tree captured
    as its end: what people and aipm changed there meanwhile was taken for its work (the attempt was sent back
    for `scope: wrote orders/ORD/T.yaml`, its own status; a merge would have written the main tree's earlier
    state back over a person's later edit). Now the attempt's end is not captured through the link: the attempt
    is sent back saying so, nothing merged, the main tree as it was; `aipm diff` no longer shows the main tree's
    changes as the task's."""
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/"], max_rework=0,
               command=f'W="$PWD"; M={MAIN}; cd / && rm -rf "$W" && ln -s "$M" "$W"')
    (repo / "src/a.txt").write_text("the person's\n")  # dirty in the main tree, as the task starts
    proc = project.aipm(*cmd)
    row = project.json("status", "ORD")["tasks"][0]
    assert row["status"] == "REJECTED" and "was replaced by a link" in row["reason"], (row, proc.stdout)
    assert (repo / "src/a.txt").read_text() == "the person's\n"
    assert git(repo, "status", "--porcelain", "--", "src/a.txt") == " M src/a.txt\n"
    diff = project.aipm("diff", "T")  # nor shown as the task's changes: there are none
    assert diff.returncode == 0 and "no changes to show: none recorded" in diff.stderr and not diff.stdout, diff


@pytest.mark.parametrize("link", ["out/sub", "out/x.txt"])
def test_a_merge_never_writes_through_a_link_the_worker_made_in_the_main_tree(repo, tmp_path, link):
    """Unaudited (`--no-review`), a worker put a link in the main tree where its merge writes (a directory on the
    way, or the file itself) leading out of it: the merge must not write where the link leads. It is a conflict,
    nothing written, the link and what it leads to as they were."""
    project = project_in(repo)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "x.txt").write_text("not the project's\n")
    lead, path = (victim, "out/sub/x.txt") if link == "out/sub" else (victim / "x.txt", "out/x.txt")
    write_task(project.order(), "T", target_files=["out/"], max_rework=0, command=(
        f'mkdir -p {MAIN}/out && ln -s "{lead}" {MAIN}/{link} && mkdir -p out/sub && echo task > {path}'))
    proc = project.aipm("run", "ORD", "--no-review")
    row = project.json("status", "ORD")["tasks"][0]
    assert row["status"] == "REJECTED" and f"merge conflict in {path}" in row["reason"], (row, proc.stdout)
    assert (victim / "x.txt").read_text() == "not the project's\n" and sorted(p.name for p in victim.iterdir()) == [
        "x.txt"]
    assert (repo / link).is_symlink()


def test_a_run_killed_while_an_escaping_worker_runs_still_sends_it_back(repo, tmp_path):
    """SIGKILL of `run` while an unconfined worktree worker that wrote the main tree runs: the run that adopts it
    audits the main tree from the window the dead run opened (what git shows written since), and sends it back
    naming the path; nothing of it is merged."""
    project = project_in(repo)
    gate = tmp_path / "gate"
    write_task(project.order(), "T", target_files=["src/a.txt"], max_rework=0, command=(
        f'echo escaped >> {MAIN}/src/b.txt; touch "{tmp_path}/ready"; {wait_gate(gate)}echo work >> src/a.txt'))
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(repo), "run", "ORD"], cwd=repo,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (tmp_path / "ready").exists())
    run.kill()
    run.wait()
    gate.touch()
    proc = project.aipm("run", "ORD")
    row = project.json("status", "ORD")["tasks"][0]
    assert (row["status"], row["reason"]) == ("REJECTED", "scope: wrote src/b.txt"), proc.stdout
    assert not (repo / "src/a.txt").read_text().endswith("work\n")
    assert "+work" in (repo / ".aipm/patches/ORD/T.1.patch").read_text()


def test_after_a_worktree_replaced_by_a_link_the_next_attempt_starts_in_a_worktree_of_its_own(repo):
    """The attempt that left a link to the main tree in its worktree's place is sent back (above); its retry must
    get a new worktree there: the link and git's note of the old one go, never what the link leads to."""
    project = project_in(repo)
    marker = repo / "first-done"
    write_task(project.order(), "T", target_files=["src/"], max_rework=0, command=(
        f'if [ ! -e {marker} ]; then touch {marker}; W="$PWD"; M={MAIN}; cd / && rm -rf "$W" && ln -s "$M" "$W"; '
        'else echo second > src/b.txt; fi'))
    project.aipm("run", "ORD")
    assert project.json("status", "ORD")["tasks"][0]["status"] == "REJECTED"
    assert project.aipm("retry", "T").returncode == 0
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert project.json("status", "ORD")["tasks"][0]["status"] == "DONE"
    assert (repo / "src/b.txt").read_text() == "second\n" and (repo / "src/a.txt").exists()
    notes = list((repo / ".git" / "worktrees").iterdir()) if (repo / ".git" / "worktrees").exists() else []
    assert notes == [], notes  # its worktree gone once merged, and the old one's note with it
