"""A worktree task's git is its own: what an agent does with git in its worktree (stash, checkout, branch, commit)
neither reaches the user's refs and stash nor another task's, and its work is still captured whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from conftest import wait_for, write_task
from test_confine import needs_landlock
from test_workspace import git, project_in, repo, wait_gate  # noqa: F401 - repo is a fixture


def test_two_tasks_stashing_at_once_each_pop_their_own_work(repo, tmp_path):
    """refs/stash was the repository's, shared by every worktree: A stashed, B stashed, A's `git stash pop` took
    B's entry and B's took A's. Each attempt then held the other's work, outside its targets: both were sent back
    and neither task's work was merged. Now each worktree has a stash of its own."""
    users = git(repo, "stash", "list", "--format=%H")
    project = project_in(repo)
    gates = tmp_path / "gates"
    gates.mkdir()
    write_task(project.order(), "A", target_files=["src/a.txt"], max_rework=0, command=(
        f'echo "from A" >> src/a.txt && git stash -q && touch "{gates}/A1"; {wait_gate(gates / "B1")}'
        f'git stash pop -q && touch "{gates}/A2"'))
    write_task(project.order(), "B", target_files=["src/b.txt"], max_rework=0, command=(
        f'{wait_gate(gates / "A1")}echo "from B" >> src/b.txt && git stash -q && touch "{gates}/B1"; '
        f'{wait_gate(gates / "A2")}git stash pop -q'))
    proc = project.aipm("run", "ORD")
    assert project.statuses() == {"A": "DONE", "B": "DONE"}, (proc.stdout, proc.stderr)
    assert (repo / "src/a.txt").read_text().endswith("from A\n") and "from B" not in (repo / "src/a.txt").read_text()
    assert (repo / "src/b.txt").read_text().endswith("from B\n") and "from A" not in (repo / "src/b.txt").read_text()
    assert git(repo, "stash", "list", "--format=%H") == users


def test_a_worker_reaches_neither_the_users_stash_nor_their_branches(repo):
    """A worker's `git stash pop` with nothing of its own to pop applied the user's entry (the stash was the
    repository's), its `git stash clear` cleared the user's stash, and its `git branch -f` moved the user's branch.
    Now they act on the worktree's own refs; what the worker wrote is merged as usual. Its `git gc --prune=now`
    sees only those refs: the repository's objects are precious to it."""
    (repo / "src" / "c.txt").write_text("second\n")
    git(repo, "stash", "push", "-q", "-m", "second", "--", "src/c.txt")
    git(repo, "branch", "feature")
    stash, refs = git(repo, "stash", "list", "--format=%H %gs"), git(repo, "for-each-ref", "refs/heads", "refs/tags")
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/new.txt"], max_rework=0, command=(
        "git stash pop -q; git stash pop -q; git stash clear; echo new > src/new.txt && git add src/new.txt && "
        "git commit -qm mine && git branch -q -f feature HEAD && git tag mine && git log -1 --format=%s feature && "
        "git gc -q --prune=now; git prune; true"))
    project.aipm("run", "ORD")
    assert project.statuses() == {"T": "DONE"}
    assert git(repo, "stash", "list", "--format=%H %gs") == stash
    assert git(repo, "for-each-ref", "refs/heads", "refs/tags") == refs
    assert (repo / "src/new.txt").read_text() == "new\n" and (repo / "src/c.txt").read_text().startswith("c line")
    assert "stashed" not in (repo / "src/d.txt").read_text()
    # The objects only the user's stash and index reach are still there: the worker's gc saw only its own refs.
    assert "+stashed" in git(repo, "stash", "show", "-p", "stash@{1}") and "src/staged.txt" in git(repo, "diff",
                                                                                                  "--cached", "--stat")
    git(repo, "fsck", "--no-dangling")


@pytest.mark.parametrize("breaks", ['rm -rf "$(git rev-parse --git-dir)"', 'rm -rf "$(git rev-parse --git-common-dir)"',
                                    'echo garbage > "$(git rev-parse --git-dir)/HEAD"',
                                    'echo garbage > "$(git rev-parse --git-dir)/index"'])
def test_a_worker_that_breaks_its_worktrees_git_directory_still_has_its_work_merged(repo, breaks):
    """A worker that removed or wrote over its worktree's git directory (git's note of the worktree, or its common
    directory) failed every capture: REJECTED with a git error, its work in no patch, and gone with the worktree
    at the next attempt. The common directory was the repository's own `.git`. Now the capture reads the files
    with the repository's git directory, and the worker's `rm -rf` reaches only the worktree's own refs."""
    project = project_in(repo)
    head, stash = git(repo, "rev-parse", "HEAD"), git(repo, "stash", "list", "--format=%H")
    write_task(project.order(), "T", target_files=["src/new.txt"], max_rework=0,
               command=f"echo work > src/new.txt && {breaks}")
    proc = project.aipm("run", "ORD")
    assert project.statuses() == {"T": "DONE"}, proc.stdout + (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert (repo / "src/new.txt").read_text() == "work\n"
    assert git(repo, "rev-parse", "HEAD") == head and git(repo, "stash", "list", "--format=%H") == stash


def test_a_scope_finding_says_which_of_the_attempts_changes_went_to_the_stash(repo):
    """An attempt sent back for writing outside its targets said its changes were kept in its patch; those its
    worker had stashed were not in it (they were in the stash), and nothing said so: the user looked for them in
    the patch. Now the reason names the stash entry that holds them."""
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/a.txt", "src/new.txt"], max_rework=0,
               command="echo work >> src/a.txt && git stash -q && echo new > src/new.txt && echo x >> src/b.txt")
    project.aipm("run", "ORD")
    stashed = git(repo, "rev-parse", "refs/stash").strip()
    row = project.json("status", "ORD")["tasks"][0]
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert row["status"] == "REJECTED" and "src/b.txt" in row["reason"], row
    assert f"src/a.txt (stash@{{0}}, {stashed[:10]}): stashed by the worker, so not merged" in log, log
    assert "+new" in (repo / ".aipm/patches/ORD/T.1.patch").read_text()


@pytest.mark.parametrize("key, value, own", [("extensions.refStorage", "reftable", False),
                                             ("extensions.stray", "true", True)])
def test_the_repositorys_extensions_do_not_stop_the_workers_git(repo, tmp_path, key, value, own):
    """The worktree's own config is format 1 and copied every `extensions.*` of the repository's: a key format 0
    ignores (a stray one) made every git command of the worker refuse to run ("unknown repository extension"); and
    a reftable repository (extensions.refStorage, git 2.45+) has no packed-refs to copy, so its worktree's own refs
    would be files its git does not read: its worktrees stay plain ones. (Both set here in a format-0
    repository, where this git ignores them.)"""
    git(repo, "config", key, value)
    project = project_in(repo)
    seen = tmp_path / "common"
    write_task(project.order(), "T", target_files=["src/new.txt"],
               command=f'echo new > src/new.txt && git rev-parse --path-format=absolute --git-common-dir > "{seen}"')
    project.aipm("run", "ORD")
    assert project.statuses() == {"T": "DONE"} and (repo / "src/new.txt").exists()
    common = seen.read_text().strip()
    assert common.endswith("/aipm") if own else common == str(repo / ".git")


def test_a_run_killed_while_moving_a_workers_stash_entries_moves_each_once(repo):
    """SIGKILL of the run after the worker's entries were stored in the repository's stash and before they were
    dropped from its worktree's own: the next run captures the attempt's end again and moves each entry once."""
    project = project_in(repo)
    users = git(repo, "stash", "list", "--format=%H").split()
    write_task(project.order(), "T", target_files=["src/a.txt", "src/b.txt"],
               command="echo one >> src/a.txt && git stash -q && echo two >> src/b.txt && git stash -q")
    killed = project.aipm("run", "ORD", env={"AIPM_TEST_KILL_AT": "carry"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    project.aipm("run", "ORD")
    entries = git(repo, "stash", "list", "--format=%H %s").splitlines()
    assert project.statuses() == {"T": "DONE"} and len(entries) == 3 and entries[2].split()[0] == users[0], entries
    assert [git(repo, "stash", "show", "--name-only", f"stash@{{{n}}}").strip() for n in (0, 1)] == ["src/b.txt",
                                                                                                  "src/a.txt"]


@pytest.mark.parametrize("then", ["", ' && rm "$(git rev-parse --git-path logs/refs/stash)"'],
                         ids=["kept", "its log removed"])
def test_a_workers_stash_outlives_a_gc_that_prunes_in_the_main_tree(repo, tmp_path, then):
    """The worktree's own stash lived where the reachability walk of a `git gc --prune=now` (or `git prune`) in the
    main tree does not look: run during the attempt, it deleted the entry's commit; the worker's `git stash list`
    said "fatal: bad object refs/stash", and the stashed work was in no patch and no stash, with nothing said.
    The entries' log is what keeps them: a worker that removes it (as an old git would not walk it) is told of."""
    project = project_in(repo)
    users = git(repo, "stash", "list", "--format=%H").split()
    stashed, gate = tmp_path / "stashed", tmp_path / "gate"
    write_task(project.order(), "T", target_files=["src/"], command=(
        f'echo wip-work >> src/a.txt && git stash -q{then} && touch "{stashed}"; {wait_gate(gate)}'
        "git stash list; echo done >> src/b.txt"))
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"],
                           cwd=project.root, env=dict(os.environ, AIPM_ENABLE_MONITORING="false"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(stashed.exists)
        git(repo, "gc", "-q", "--prune=now")
    finally:
        gate.touch()
    out = run.communicate(timeout=120)[0]
    assert run.returncode == 0 and project.statuses() == {"T": "DONE"}, out
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    if then:
        assert "what the worker stashed is lost" in log and git(repo, "stash", "list", "--format=%H").split() == users
        return
    entries = git(repo, "stash", "list", "--format=%H").split()
    assert entries[1:] == users, entries
    assert "+wip-work" in git(repo, "stash", "show", "-p", "stash@{0}")
    assert f"src/a.txt (stash@{{0}}, {entries[0][:10]}): stashed by the worker, so not merged" in log, log


def test_a_workers_stash_whose_log_it_removed_is_moved_to_the_users_stash(repo):
    """A worker that stashed and then removed its stash's log: `git stash list` there shows nothing, so nothing was
    moved, and the entry (refs/stash still names it) went with the worktree. Its newest entry is moved now, and the
    log says the others could not be found."""
    project = project_in(repo)
    users = git(repo, "stash", "list", "--format=%H").split()
    write_task(project.order(), "T", target_files=["src/"], command=(
        'echo wip-work >> src/a.txt && git stash -q && rm "$(git rev-parse --git-path logs/refs/stash)" && '
        "echo done >> src/b.txt"))
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0 and project.statuses() == {"T": "DONE"}, proc.stdout + proc.stderr
    entries = git(repo, "stash", "list", "--format=%H").split()
    assert entries[1:] == users, entries
    assert "+wip-work" in git(repo, "stash", "show", "-p", "stash@{0}")
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert f"the worker removed its stash's log, so only its newest entry ({entries[0]}) could be found" in log, log


def test_a_stash_entry_the_worker_made_on_another_commit_is_named_too(repo):
    """Entries are told from the user's by their first parent, the attempt's start: one a worker made on a branch
    it checked out (here the user's main, copied into its own refs) was moved to the user's stash unnamed."""
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/new.txt"], command=(
        "git checkout -q main && echo other >> src/a.txt && git stash -q && git checkout -q - && "
        "echo new > src/new.txt"))
    project.aipm("run", "ORD")
    moved = git(repo, "rev-parse", "refs/stash").strip()
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert project.statuses() == {"T": "DONE"}, log
    assert f"made on another commit than its start: {moved[:10]} (\"WIP on main:" in log, log
    assert "other" in git(repo, "stash", "show", "-p", moved)


@pytest.mark.parametrize("shared_refs", ["reftable repository", "worker re-points its git"])
def test_a_worktree_whose_refs_are_the_repositorys_never_has_the_users_stash_moved_or_deleted(repo, shared_refs):
    """A worktree whose git directory has no refs of its own (a reftable repository's, which ownrefs leaves plain;
    or one whose worker wrote `../..` into its note's commondir) sees the repository's stash as its own: the end
    capture "moved" the user's entries to the repository's stash (all there already) and then deleted refs/stash,
    the user's whole stash, gone. Now a stash that is not the worktree's own is neither moved nor deleted."""
    if shared_refs == "reftable repository":
        git(repo, "config", "extensions.refStorage", "reftable")  # (ignored by git in a format-0 repository)
        command = "echo new > src/new.txt"
    else:
        command = 'echo ../.. > "$(git rev-parse --git-dir)/commondir" && echo new > src/new.txt'
    stash = git(repo, "stash", "list", "--format=%H %gs")
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/new.txt"], command=command)
    proc = project.aipm("run", "ORD")
    assert project.statuses() == {"T": "DONE"}, proc.stdout
    assert (repo / "src/new.txt").read_text() == "new\n"
    assert git(repo, "stash", "list", "--format=%H %gs") == stash


@pytest.mark.parametrize("confine", [pytest.param(True, marks=needs_landlock), False], ids=["confined", "unconfined"])
@pytest.mark.parametrize("links", ["aipm/refs", "aipm/logs/refs", "aipm"])
def test_a_worker_that_links_its_own_refs_to_the_repositorys_never_has_the_users_stash_deleted(repo, confine, links):
    """A worker (a confined one too: Landlock grants it its worktree's git note) replaced the links `aipm/refs` and
    `aipm/logs/refs` of its own git directory with links to the repository's: its end's capture, whose `commondir`
    still named its own, read the user's stash as the worker's, "moved" it, then deleted refs/stash through that
    git, and the user's stash was gone. Now a layout other than aipm made is no stash of the worktree's own: nothing
    is moved or deleted, and the log says why."""
    common = repo / ".git"
    relink = {"aipm/refs": f'rm -rf "$N/aipm/refs" && ln -s "{common}/refs" "$N/aipm/refs"',
              "aipm/logs/refs": f'rm -rf "$N/aipm/logs/refs" && ln -s "{common}/logs/refs" "$N/aipm/logs/refs"',
              "aipm": f'cp -a "$N/aipm" "$N/own" && rm -rf "$N/own/refs" "$N/own/logs/refs" && '
                      f'ln -s "{common}/refs" "$N/own/refs" && ln -s "{common}/logs/refs" "$N/own/logs/refs" && '
                      'rm -rf "$N/aipm" && ln -s own "$N/aipm"'}[links]
    stash = git(repo, "stash", "list", "--format=%H %gs")
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/new.txt"], confine=confine,
               command=f'N=$(git rev-parse --git-dir) && {relink} && echo new > src/new.txt')
    proc = project.aipm("run", "ORD")
    assert project.statuses() == {"T": "DONE"}, proc.stdout + proc.stderr
    assert git(repo, "stash", "list", "--format=%H %gs") == stash
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert "the worker's stash was not moved, and nothing was deleted there" in log, log


@pytest.mark.parametrize("move", ["git checkout -q main && git checkout -q -b feature",
                                  "git reset -q --hard main", "git reset -q --hard HEAD~1"])
def test_a_worker_that_moves_its_worktree_to_your_branch_does_not_undo_your_uncommitted_edits(repo, move):
    """Its refs of its own let `git checkout main` work in the worktree (plain git refuses: main is checked out in
    the main tree), and a `git reset --hard` works anywhere: the files then lost your uncommitted edit the start
    held, the end undid it, and the merge wrote that over your edit as the task's change. The end is taken since
    where its history left the start's, as `git merge` would."""
    (repo / "src/a.txt").write_text((repo / "src/a.txt").read_text().replace("a line 15", "a line 15, mine"))
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/a.txt"],
               command=f"{move} && sed -i 's/a line 2$/a line 2, the task/' src/a.txt && git commit -qam task")
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0 and project.statuses() == {"T": "DONE"}, proc.stdout + proc.stderr
    text = (repo / "src/a.txt").read_text()
    assert "a line 15, mine\n" in text and "a line 2, the task\n" in text, text
    patch = (repo / ".aipm/patches/ORD/T.1.patch").read_text()
    assert "+a line 2, the task" in patch and "a line 15" not in patch, patch  # the task's change, alone
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert "its worktree was moved off its start" in log and "later.patch" not in log, log


def test_a_moved_worktree_whose_changes_overlap_your_uncommitted_edit_is_sent_back_and_your_edit_kept(repo):
    """Taken as a merge would take it, its change of your line conflicts with your edit there: sent back, nothing
    merged, and nothing of either lost."""
    project = project_in(repo)
    (repo / "src/a.txt").write_text((repo / "src/a.txt").read_text().replace("a line 15", "a line 15, mine"))
    write_task(project.order(), "T", target_files=["src/a.txt"], max_rework=0,
               command="git reset -q --hard main && sed -i 's/a line 15/a line 15, the task/' src/a.txt")
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 1 and project.statuses() == {"T": "REJECTED"}, proc.stdout + proc.stderr
    assert "a line 15, mine\n" in (repo / "src/a.txt").read_text()
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert "its changes overlap in src/a.txt what that undid" in log and "nothing of attempt 1 was merged" in log, log
    # Its patch undid your edit there (`git apply` it, as its log said, and your line was gone); its version of the
    # file, which its patch leaves as the start has it, is kept in its rest, which its log and finish line name.
    assert "a line 15" not in (repo / ".aipm/patches/ORD/T.1.patch").read_text()
    rest = repo / ".aipm/patches/ORD/T.1.rest"
    assert "a line 15, the task\n" in (rest / "src/a.txt").read_text() and str(rest) in log, log
    assert str(rest) in proc.stdout, proc.stdout


@pytest.mark.parametrize("move", ["git reset -q --soft HEAD~1", "git reset -q HEAD~1"])
def test_a_worker_that_moves_its_head_but_keeps_its_files_is_taken_as_it_is(repo, move):
    """A soft or mixed reset keeps the files, your uncommitted edit included: nothing was dropped, and the task's
    change beside your edit (the next line) is merged as it is, not sent back as overlapping what the move undid."""
    (repo / "src/a.txt").write_text((repo / "src/a.txt").read_text().replace("a line 15", "a line 15, mine"))
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/a.txt"], max_rework=0,
               command=f"{move} && sed -i 's/^a line 16$/a line 16, the task/' src/a.txt")
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0 and project.statuses() == {"T": "DONE"}, proc.stdout + proc.stderr
    text = (repo / "src/a.txt").read_text()
    assert "a line 15, mine\na line 16, the task\n" in text, text
    assert "moved off its start" not in (repo / ".aipm/logs/ORD/T.1.log").read_text()


def test_a_moved_worktree_keeps_your_uncommitted_mode_change_and_a_big_file_s_edit(repo):
    """Each file the start held beside the fork is looked at by its mode and content: an uncommitted `chmod +x`
    (no content change) was taken as kept, and a big file's edit (over the size compared by lines) too; the end,
    which a `git reset --hard` had put back, was merged over them."""
    big = repo / "src/big.txt"
    big.write_text("".join(f"line {i} {'x' * 80}\n" for i in range(60_000)))  # ~5 MB: over the lines compared
    git(repo, "add", "src/big.txt")
    git(repo, "commit", "-q", "-m", "big")
    (repo / "src/a.txt").chmod(0o755)
    big.write_text(big.read_text().replace("line 100 x", "line 100 MINE x"))
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/"],
               command="git reset -q --hard HEAD~1 && echo TASK >> src/b.txt && "
                       "sed -i 's/^line 50000 /line 50000 TASK /' src/big.txt")
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0 and project.statuses() == {"T": "DONE"}, proc.stdout + proc.stderr
    assert os.access(repo / "src/a.txt", os.X_OK)
    text = big.read_text()
    assert "line 100 MINE x" in text and "line 50000 TASK x" in text
    assert (repo / "src/b.txt").read_text().endswith("TASK\n")
