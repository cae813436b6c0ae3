"""A worktree attempt that merges nothing keeps its work: its patch, and, kept beside it, what no patch can hold
(a git repository the worker made or cloned in its worktree: git sees at most a submodule entry there). The
worktree itself goes when the next attempt starts or by `aipm recover`; every line that names the patch names the
rest too. Real runs in a real repository (the `repo` fixture of test_workspace)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import wait_for, write_task
from test_agents import agent_env, journal
from test_budget_lowered import lower_task_limit
from test_workspace import (_lose_run_and_worker, _run_with_person, git, project_in, repo,  # noqa: F401 - a fixture
                            wait_gate)

PATCH, REST = ".aipm/patches/ORD/T.1.patch", ".aipm/patches/ORD/T.1.rest"

MADE = {  # a repository in the worktree, holding the only copy of "precious"; and a plain file beside it
    "committed": "mkdir -p lib/sub && cd lib/sub && git init -q . && echo precious > code.txt && git add . "
                 "&& git commit -qm sub",
    "without commits": "mkdir -p lib/sub && cd lib/sub && git init -q . && echo precious > code.txt",
    "cloned, then edited": 'git clone -q "$SOURCE" lib/sub && echo precious >> lib/sub/code.txt',
}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A repository a worker clones."""
    top = tmp_path / "source"
    top.mkdir()
    git(top, "init", "-q", "-b", "main")
    (top / "code.txt").write_text("upstream\n")
    git(top, "add", ".")
    git(top, "commit", "-q", "-m", "upstream")
    return top


def kept_precious(rest: Path, how: str) -> None:
    """The repository is kept whole at `rest`: its edited file, and its history when it had one."""
    code = (rest / "lib/sub/code.txt").read_text()
    assert code == ("upstream\nprecious\n" if how.startswith("cloned") else "precious\n"), code
    if how != "without commits":
        assert git(rest / "lib/sub", "log", "--format=%s").split() == ["upstream" if how.startswith("cloned")
                                                                       else "sub"]


@pytest.mark.parametrize("ending", ["exit 3", "exit 0"])
@pytest.mark.parametrize("how", list(MADE))
def test_a_repository_made_in_the_worktree_outlives_the_worktree(repo, source, how, ending):
    """The attempt fails (exit 3; exit 0: it cannot be merged) and its log said the repository's files "are only
    in <worktree>, until the next attempt starts or `aipm recover`": the recover then deleted them, and the finish
    line said "its changes are kept in <patch>", which held none of them."""
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["lib/"], command=f"({MADE[how]}) && echo other > lib/plain.txt"
                                                                    f" && {ending}")
    proc = project.aipm("run", "ORD", env={"SOURCE": str(source)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert project.aipm("recover").returncode == 0
    assert not (repo / ".aipm/worktrees/ORD/T").exists()
    assert [p.relative_to(repo) for p in (repo / ".aipm").rglob("code.txt")] == [Path(REST, "lib/sub/code.txt")]
    kept_precious(repo / REST, how)
    patch, rest = repo / PATCH, repo / REST
    finish = [line for line in proc.stdout.splitlines() if line.startswith("finish")]
    assert len(finish) == 1 and str(patch) in finish[0] and str(rest) in finish[0], proc.stdout
    assert "+other" in patch.read_text() and "Subproject" not in patch.read_text()
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert "only in" not in log and "lib/sub/: " in log and str(rest) in log, log


def test_removing_a_worktree_keeps_a_repository_made_in_it_after_its_end(repo):
    """Whatever put it there after the attempt's end was captured (a person looking into the kept worktree, a
    review): a worktree's removal deleted a repository in it, its only copy."""
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["lib/"], command="echo other > lib/plain.txt && exit 3")
    assert project.aipm("run", "ORD").returncode == 1
    tree = repo / ".aipm/worktrees/ORD/T"
    subprocess.run(f"mkdir -p lib/sub && cd lib/sub && git init -q . && echo precious > code.txt && git add . "
                   "&& git commit -qm sub", shell=True, cwd=tree, check=True)
    assert project.aipm("recover").returncode == 0
    assert not tree.exists()
    kept_precious(repo / REST, "committed")
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert "lib/sub/: a git repository" in log and str(repo / REST) in log, log


@pytest.mark.parametrize("stop", ["SIGINT", "SIGINT --json", "cancel"])
def test_the_line_of_a_stopped_attempt_names_what_its_patch_cannot_hold(repo, source, tmp_path, stop):
    """Ctrl-C, or `aipm cancel`: the stopped attempt's line named its patch only; its cloned repository was in its
    worktree alone, which the next recover's sweep removed."""
    project = project_in(repo)
    ready = tmp_path / "ready"
    write_task(project.order(), "T", target_files=["lib/"],
               command=f'({MADE["cloned, then edited"]}) && echo other > lib/plain.txt; touch "{ready}"; sleep 60')
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(repo), "run", "ORD", *stop.split()[1:]],
                           env=dict(os.environ, AIPM_ENABLE_MONITORING="false", SOURCE=str(source)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(ready.exists)
    if stop == "cancel":
        said = project.aipm("cancel", "T", check=True).stdout
    else:
        run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == (1 if stop == "cancel" else 130), stdout + stderr
    for _ in range(2):
        assert project.aipm("recover").returncode == 0
    assert not (repo / ".aipm/worktrees/ORD/T").exists()
    patch, rest = repo / PATCH, repo / REST
    kept_precious(rest, "cloned, then edited")
    if stop == "cancel":
        assert (f"T: the changes of its attempt are kept in {patch}, and what no patch can hold in {rest} (`git apply` "
                "the patch at the repository's top)\n") in said, said
    elif "--json" in stop:
        line = next(json.loads(line) for line in stdout.splitlines() if '"interrupted"' in line)
        assert (line["kept"], line["kept_rest"]) == ({"T": str(patch)}, {"T": str(rest)}), stdout
    else:
        line = next(line for line in stdout.splitlines() if line.startswith("stopped"))
        assert line == (f"stopped  by signal; re-queued: T; the changes of T are kept in {patch}, and what no patch "
                        f"can hold in {rest}"), stdout


@pytest.mark.parametrize("limit", ["order", "task"])
def test_the_line_of_a_budget_stop_names_the_patch_that_keeps_the_stopped_attempts_work(repo, tmp_path, limit):
    """`max_cost_usd` reached while a worktree attempt runs (the order's, or B's own, lowered): it is stopped and
    re-queued as by Ctrl-C, its work kept as a patch, but the line said only `stopped B, each counting what it
    spent` (`stopped it, ...`), not where B's work went."""
    # (the stand-in's journal is in the main tree: no write of the tasks')
    project = project_in(repo, config="workspace: worktree\nworker:\n  agent: claude\n"
                                      "scope_ignore: [journal.jsonl, stand-in-claude-costs.json]\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 1\n")
    gate, b_gate = tmp_path / "gate", tmp_path / "gate-b"
    write_task(order, "A", prompt=f"@cost 0.3\n@wait-for {gate}", target_files=["a.txt"], priority="P0")
    b_file = write_task(order, "B", prompt=f"@cost 0.3\n@write b.txt work of B\n@wait-for {b_gate}",
                        target_files=["b.txt"], **({"max_cost_usd": 1, "cost_usd": 0.3} if limit == "task" else {}))
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(repo), "run", "ORD"],
                           env={**os.environ, **agent_env(project), "AIPM_ENABLE_MONITORING": "false"},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: len(journal(project)) == 2 and (repo / ".aipm/worktrees/ORD/B/b.txt").exists())
        if limit == "task":
            lower_task_limit(b_file, 0.3)
        else:
            (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.3\n")
            gate.touch()  # A reports $0.30: the budget is reached, and B is stopped
        wait_for(lambda: yaml.safe_load(b_file.read_text())["status"] == "QUEUED")
    finally:
        gate.touch()
        b_gate.touch()
        stdout, _ = run.communicate(timeout=120)
    patch = repo / ".aipm/patches/ORD/B.1.patch"
    assert "+work of B" in patch.read_text()
    (line,) = [line for line in stdout.splitlines() if "stopped B" in line or "stopped it" in line]
    assert line.startswith("budget   ORD") and line.endswith(f"; the changes of B are kept in {patch}"), stdout


def test_ignored_files_a_failed_attempt_wrote_in_its_targets_outlive_its_worktree(repo):
    """`build/` is ignored: git captures none of it, so no patch held what the task was asked to make there, and the
    worktree's removal deleted it. An ignored file outside its targets (`.env`) is no work of the task's: it goes
    with the worktree, as git's own `worktree remove` deletes ignored files."""
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["build/", "src/a.txt"],
               command="mkdir -p build && echo made > build/out.bin && echo local > .env && echo more >> src/a.txt "
                       "&& exit 3")
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert project.aipm("recover").returncode == 0
    patch, rest = repo / PATCH, repo / REST
    assert (rest / "build/out.bin").read_text() == "made\n" and not (rest / ".env").exists()
    assert "+more" in patch.read_text() and "out.bin" not in patch.read_text()
    (finish,) = [line for line in proc.stdout.splitlines() if line.startswith("finish")]
    assert finish.endswith(f"its changes are kept in {patch}, and what no patch can hold in {rest}"), finish
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert f"build/: ignored by git, so in no patch; moved out of the worktree, whole, into {rest}" in log, log


@pytest.mark.parametrize("then", [["recover", "ORD"], ["recover", "--json"], ["run", "ORD"]], ids=" ".join)
def test_the_recovery_of_a_lost_attempt_names_what_its_patch_cannot_hold(repo, tmp_path, then):
    """A killed `aipm run` and its worker: the recovery's line named the patch only."""
    project = project_in(repo)
    _lose_run_and_worker(project, tmp_path, f"({MADE['committed']}) && echo more >> src/a.txt")
    proc = project.aipm(*then)
    patch, rest = repo / PATCH, repo / REST
    if "--json" in then:
        assert {"order": "ORD", "id": "T", "action": "requeued", "kept": str(patch), "kept_rest": str(rest)} \
            in json.loads(proc.stdout)["recovered"], proc.stdout
    elif then[0] == "recover":
        assert f"ORD/T: requeued; its changes are kept in {patch}, and what no patch can hold in {rest}\n" \
            in proc.stdout, proc.stdout
    else:
        assert ("recover  T: its worker was lost with its supervisor; re-queued, attempt not counted; the changes of T "
                f"are kept in {patch}, and what no patch can hold in {rest}\n") in proc.stdout, proc.stdout
    assert project.aipm("recover").returncode == 0
    kept_precious(rest, "committed")


@pytest.mark.parametrize("ending", ["exit 3", "exit 0"])
def test_an_attempt_git_cannot_capture_is_kept_whole(repo, ending):
    """A path git refuses (`GIT~1`: "invalid path") failed every capture of the worktree: no patch was written, the
    log said "could not be kept", and the worktree's removal deleted all of the attempt's work."""
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/"],
               command=f"echo refused > 'src/GIT~1' && echo precious >> src/a.txt && {ending}")
    proc = project.aipm("run", "ORD")
    assert "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    for _ in range(2):  # (exit 0: sent back; the second recover's sweep removes its worktree)
        assert project.aipm("recover").returncode == 0
    assert not (repo / ".aipm/worktrees/ORD/T").exists()
    rest = repo / REST
    assert (rest / "src/GIT~1").read_text() == "refused\n" and (rest / "src/a.txt").read_text().endswith("precious\n")
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert f"./: the whole worktree, as git cannot capture its changes; moved out of the worktree, whole, into {rest}" \
        in log, log


def test_what_a_worker_made_read_only_is_moved_to_the_rest_by_a_rename_never_a_copy(tmp_path):
    """Moving a kept path out of a worktree was shutil.move: where the rename is refused (a directory its worker
    made read-only cannot change parents, for anyone but root) it copied instead, writing out a sparse file's
    holes (a 1 TiB `truncate -s` filled the disk), and then could not remove the source. Now a rename alone, the
    directory made writable for it and given its mode back. Where the test runs as root, the move runs without
    the capability that lets root rename whatever the modes say (setpriv)."""
    import shutil

    top = tmp_path / "top"
    (top / "wt" / "build").mkdir(parents=True)
    (top / "rest").mkdir()
    with open(top / "wt" / "build" / "big.bin", "wb") as big:
        big.truncate(1 << 40)
    (top / "wt" / "build").chmod(0o555)
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root, and no setpriv to run the move without CAP_DAC_OVERRIDE")
        prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
    # (a copy fails at its first MiB instead of writing out the terabyte, should the move ever copy again)
    code = ("import resource, signal, sys; from pathlib import Path; from aipm.workspace.kept import _move; "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
            "_move(Path(sys.argv[1]) / 'wt' / 'build', Path(sys.argv[1]) / 'rest' / 'build')")
    try:
        proc = subprocess.run([*prefix, sys.executable, "-c", code, str(top)], capture_output=True, text=True,
                              timeout=60, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
        assert proc.returncode == 0, proc.stderr
        moved = top / "rest" / "build"
        assert not (top / "wt" / "build").exists() and (moved / "big.bin").stat().st_size == 1 << 40
        assert (moved / "big.bin").stat().st_blocks < 64  # still sparse: renamed, not copied
        assert moved.stat().st_mode & 0o777 == 0o555  # its mode given back
    finally:
        for path in (top / "wt" / "build", top / "rest" / "build"):
            if path.is_dir():
                path.chmod(0o755)


def test_why_names_where_the_work_of_a_last_attempt_that_merged_nothing_is_kept(repo):
    """After a `launch`, no one sees the finish line that names the patch: `why` and `status` said only what the
    attempt came to, read as its work lost. `why` names where it is kept while the task has not finished since,
    and not after a retry (a merged attempt keeps a patch too)."""
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/a.txt"], command="echo mine >> src/a.txt; exit 1")
    project.aipm("launch", "ORD", check=True)
    wait_for(lambda: project.statuses()["T"] == "FAILED")
    patch = repo / ".aipm/patches/ORD/T.1.patch"
    assert f"  its last attempt's changes are kept in {patch}\n" in project.aipm("why", "T").stdout
    assert project.json("why", "T")["kept"] == str(patch)
    assert project.aipm("retry", "T").returncode == 0
    assert "kept" not in project.json("why", "T")


@pytest.mark.parametrize("end", ["SIGINT", "setup fails"])
def test_what_an_attempt_stopped_in_its_workspace_setup_leaves_is_not_kept_as_the_tasks_work(repo, tmp_path, end):
    """Ctrl-C of `aipm run` while the setup ran (or the setup failing): the start is captured again only after the
    setup, so the attempt's patch held what the setup had written (in the targets and beside them, and git's
    ignored files in the targets moved to its rest), and the stop line said the task's changes were kept there."""
    ready = tmp_path / "ready"
    setup = (f"echo generated >> src/a.txt; echo gen > gen.txt; mkdir -p build; echo out > build/x.o; "
             + (f"touch {ready}; sleep 60" if end == "SIGINT" else "exit 3"))
    project = project_in(repo, config=f"workspace: worktree\nworkspace_setup: '{setup}'\n")
    write_task(project.order(), "T", target_files=["src/a.txt", "build/"], command="echo T >> src/a.txt")
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(repo), "run", "ORD"],
                           env=dict(os.environ, AIPM_ENABLE_MONITORING="false"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if end == "SIGINT":
        wait_for(ready.exists)
        run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == (130 if end == "SIGINT" else 1), stdout + stderr
    assert "kept" not in stdout, stdout
    shown = project.aipm("diff", "T")  # (its worktree is still there)
    assert "generated" not in shown.stdout and "no changes to show" in shown.stderr, shown.stdout + shown.stderr
    for _ in range(2):
        assert project.aipm("recover").returncode == 0
    assert not (repo / ".aipm/worktrees/ORD/T").exists()
    kept = sorted(str(p.relative_to(repo)) for p in (repo / ".aipm/patches").rglob("*") if p.is_file())
    assert kept == [], kept  # (an empty patch of its own: `diff` showed it, not the attempt before's)
    shown = project.aipm("diff", "T")
    assert "no changes to show: none recorded; only an attempt that ran its command" in shown.stderr, shown.stderr
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert ("attempt 1 ended in its workspace_setup, before its command ran: what the setup wrote is not the task's "
            "work, and none of it is kept") in log, log


def test_diff_after_an_attempt_stopped_in_its_workspace_setup_shows_the_attempt_before(repo, tmp_path):
    """Ctrl-C of `aipm run` while a retried task's workspace_setup ran: `aipm diff` showed that attempt's empty
    patch ("its last attempt changed nothing"), not the work of attempt 1 before it, though attempt 2 never ran
    its command. It shows attempt 1's patch, and says attempt 2 has none."""
    hang, ready = tmp_path / "hang", tmp_path / "ready"
    project = project_in(repo, config=f"workspace: worktree\nworkspace_setup: 'if [ -e {hang} ]; then "
                                      f"touch {ready}; sleep 60; fi'\n")
    write_task(project.order(), "T", target_files=["src/a.txt"], command="echo mine >> src/a.txt; exit 1")
    assert project.aipm("run", "ORD").returncode == 1
    assert project.statuses()["T"] == "FAILED"
    hang.touch()
    assert project.aipm("retry", "T").returncode == 0
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(repo), "run", "ORD"],
                           env=dict(os.environ, AIPM_ENABLE_MONITORING="false"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(ready.exists)
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 130, stdout + stderr
    assert (repo / ".aipm/logs/ORD/T.2.log").exists()
    for then in ([], ["recover"]):  # its worktree still there, then removed
        assert not then or project.aipm(*then).returncode == 0
        shown = project.aipm("diff", "T")
        assert shown.returncode == 0 and "+mine" in shown.stdout, shown.stdout + shown.stderr
        assert (f"aipm: ORD/T: attempt 2, the latest, has no patch (it ran no command in a worktree, or its end could "
                f"not be captured; its log says which): this is attempt 1's, {repo / PATCH}\n") in shown.stderr, \
            shown.stderr
        assert project.json("diff", "T")["source"] == str(repo / PATCH)


# -- diff of a worktree its worker moved off its start ---------------------------------------------------------------


def _your_uncommitted_edit(repo: Path) -> None:
    """A committed README.md, and your uncommitted edit of it (beside the fixture's staged file)."""
    (repo / "README.md").write_text("readme\n")
    git(repo, "add", "README.md")
    git(repo, "commit", "-q", "-m", "readme", "--", "README.md")
    (repo / "README.md").write_text("readme\nmy uncommitted work\n")


def _applied(repo: Path, patch: str) -> None:
    """`git apply` the diff at the repository's top, as workspaces.md says to."""
    proc = subprocess.run(["git", "apply"], cwd=repo, input=patch, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + patch


def test_diff_of_a_kept_worktree_its_worker_moved_off_its_start_does_not_undo_your_uncommitted_edit(repo):
    """A failed attempt whose worker ran `git checkout main` (its refs of its own allow it): its kept patch held its
    change alone, but `aipm diff` compared the worktree's files with the start, so the diff undid your uncommitted
    edit (and deleted the task file, so `git apply` refused it whole, or applied it and your edit was gone). It
    shows what the kept patch holds, and changes made in the kept worktree after the end (by hand) too.
    (Found by a fresh-user hunt.)"""
    _your_uncommitted_edit(repo)
    project = project_in(repo)
    write_task(project.order(), "T", workspace="worktree", target_files=["src/"],
               command="sh -c 'git checkout -q main && echo fix >> src/a.txt; exit 1'")
    assert project.aipm("run", "ORD").returncode == 1
    assert project.statuses() == {"T": "FAILED"}
    kept = (repo / PATCH).read_text()
    shown = project.aipm("diff", "ORD/T")
    assert shown.returncode == 0 and shown.stdout == kept, shown.stdout + shown.stderr
    assert "+fix" in shown.stdout and "my uncommitted work" not in shown.stdout, shown.stdout
    assert "its worktree was moved off its start" in shown.stderr, shown.stderr
    tree = repo / ".aipm/worktrees/ORD/T"
    with open(tree / "src/b.txt", "a") as later:  # a fix by hand in the kept worktree, after its end
        later.write("later\n")
    shown = project.aipm("diff", "ORD/T")
    assert "+fix" in shown.stdout and "+later" in shown.stdout, shown.stdout + shown.stderr
    _applied(repo, shown.stdout)
    assert (repo / "README.md").read_text() == "readme\nmy uncommitted work\n"
    assert (repo / "src/a.txt").read_text().endswith("a line 20\nfix\n")
    assert (repo / "src/b.txt").read_text().endswith("b line 20\nlater\n")


def test_diff_of_a_running_worktree_its_worker_moved_off_its_start_does_not_undo_your_uncommitted_edit(repo, tmp_path):
    """The same while the worker runs: it moved its worktree to your branch, wrote, and waits for the test."""
    _your_uncommitted_edit(repo)
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/"], command=(
        f'git checkout -q main && echo fix >> src/a.txt && touch "{tmp_path / "ready"}"; '
        f'{wait_gate(tmp_path / "gate")} exit 1'))
    seen = {}
    proc = _run_with_person(project, tmp_path, lambda: seen.update(diff=project.aipm("diff", "T")))
    assert proc.returncode == 1 and project.statuses() == {"T": "FAILED"}, proc.stdout + proc.stderr
    shown = seen["diff"]
    assert shown.returncode == 0 and "+fix" in shown.stdout, shown.stdout + shown.stderr
    assert [line for line in shown.stdout.splitlines() if line.startswith("diff --git")] == [
        "diff --git a/src/a.txt b/src/a.txt"], shown.stdout
    _applied(repo, shown.stdout)
    assert (repo / "README.md").read_text() == "readme\nmy uncommitted work\n"
    assert (repo / "src/a.txt").read_text().endswith("a line 20\nfix\n")


def test_diff_of_a_moved_worktree_whose_changes_overlap_your_edit_leaves_out_what_it_cannot_tell(repo):
    """Where its changes overlap what the move dropped (the merge would send it back), the diff cannot tell its
    change there from the undoing of your edit: it shows those paths as the start has them, says so on stderr (and
    where the attempt's versions of them are kept), and shows the rest, so that `git apply` of it keeps your edits."""
    _your_uncommitted_edit(repo)
    (repo / "src/a.txt").write_text((repo / "src/a.txt").read_text().replace("a line 15", "a line 15, mine"))
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/"], command=(
        "git reset -q --hard main && sed -i 's/a line 15/a line 15, the task/' src/a.txt && echo new > src/new.txt; "
        "exit 1"))
    assert project.aipm("run", "ORD").returncode == 1
    shown = project.aipm("diff", "T")
    assert shown.returncode == 0, shown.stderr
    assert "its changes overlap in src/a.txt what that undid" in shown.stderr, shown.stderr
    assert "so this patch leaves README.md" in shown.stderr and "as the attempt's start has them" in shown.stderr
    # ...and where its versions of them are: its failed end kept them in its rest (its kept worktree has them too)
    rest = repo / REST
    assert f"its end keeps its versions of README.md, src/a.txt in {rest}" in shown.stderr, shown.stderr
    assert "a line 15, the task\n" in (rest / "src/a.txt").read_text()
    assert [line for line in shown.stdout.splitlines() if line.startswith("diff --git")] == [
        "diff --git a/src/new.txt b/src/new.txt"], shown.stdout
    _applied(repo, shown.stdout)
    assert (repo / "README.md").read_text() == "readme\nmy uncommitted work\n"
    assert "a line 15, mine\n" in (repo / "src/a.txt").read_text()
    assert (repo / "src/new.txt").read_text() == "new\n"


@pytest.mark.parametrize("gone_by", ["recover", "next attempt"])
def test_a_tangled_attempts_patch_keeps_your_edits_and_its_rest_keeps_its_versions(repo, gone_by):
    """A worker that moved its worktree off its start (`git reset --hard`) and changed the lines of your uncommitted
    edit is sent back, nothing merged; but its kept patch was its files against the start, undoing your edits (the
    line the task changed, and README.md, which its move alone undid). Once the worktree went (`aipm recover`, or
    its next attempt's start), `aipm diff` showed that patch without a word, and `git apply` of it, as the docs and
    its log say, destroyed your edits. Now the patch leaves the paths the move dropped as the start has them, and
    the worktree's versions of those paths are kept in the attempt's rest, which its log, its finish line and
    `diff` name."""
    _your_uncommitted_edit(repo)
    (repo / "src/a.txt").write_text((repo / "src/a.txt").read_text().replace("a line 15", "a line 15, mine"))
    project = project_in(repo)
    write_task(project.order(), "T", workspace="worktree", target_files=["src/"],
               max_rework=int(gone_by == "next attempt"), command=(
                   'test "$AIPM_ATTEMPT" = 2 && exit 1; git reset -q --hard main && '
                   "sed -i 's/a line 15/a line 15, the task/' src/a.txt && echo new > src/new.txt"))
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    if gone_by == "recover":
        # (its reason, cut to a table cell's length, still names the path and why)
        reason = json.loads(project.aipm("status", "ORD", "--json").stdout)["tasks"][0]["reason"]
        assert "its changes overlap in src/a.txt what that undid" in reason, reason
        assert project.statuses() == {"T": "REJECTED"} and project.aipm("recover").returncode == 0
        assert not (repo / ".aipm/worktrees/ORD/T").exists()
    else:  # (the worktree there is attempt 2's)
        assert project.statuses() == {"T": "FAILED"} and "attempt 2" in (repo / ".aipm/logs/ORD/T.2.log").read_text()
    patch, rest = repo / PATCH, repo / REST
    # What aipm says to `git apply` (the diff shown once the worktree is gone; the patch its log names) keeps your
    # edits, and holds the task's change it can tell
    shown = project.aipm("diff", "T") if gone_by == "recover" else None
    _applied(repo, shown.stdout if shown else patch.read_text())
    assert (repo / "README.md").read_text() == "readme\nmy uncommitted work\n"
    assert "a line 15, mine\n" in (repo / "src/a.txt").read_text()
    assert (repo / "src/new.txt").read_text() == "new\n"
    assert [line for line in patch.read_text().splitlines() if line.startswith("diff --git")] == [
        "diff --git a/src/new.txt b/src/new.txt"], patch.read_text()
    # The worker's versions, whole, in its rest: its change of your line, and README.md as its move left it
    assert (rest / "src/a.txt").read_text().count("a line 15, the task\n") == 1
    assert "mine" not in (rest / "src/a.txt").read_text() and (rest / "README.md").read_text() == "readme\n"
    # ...named by its log, its finish line, and `diff` (--json: also_kept)
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert "its changes overlap in src/a.txt what that undid" in log and "nothing of attempt 1 was merged" in log, log
    assert f"its versions of README.md, src/a.txt are kept in {rest}" in log, log
    finish = [line for line in proc.stdout.splitlines() if line.startswith("finish") and "attempt 2" not in line]
    assert str(rest) in finish[0], proc.stdout
    if shown:
        assert shown.returncode == 0 and shown.stdout == patch.read_text(), shown.stdout + shown.stderr
        assert f"also its versions of README.md, src/a.txt are kept in {rest}" in shown.stderr, shown.stderr
        assert f"its patch, {patch}, leaves README.md, " in shown.stderr, shown.stderr
        listed = json.loads(project.aipm("diff", "T", "--json").stdout)["also_kept"]
        assert any(f"its versions of README.md, src/a.txt are kept in {rest}" in item for item in listed), listed


def test_a_tangled_attempts_patch_leaves_a_file_it_put_back_only_in_part_as_the_start_has_it(repo):
    """Your uncommitted edit of three lines; the worker's `git reset --hard` dropped them, it wrote two of them back
    (nearer the start's than the fork's, so not counted as dropped) and changed a line of its own. Its end is sent
    back, but its patch held that file as its worktree had it: `git apply` of it undid your third line. Every path
    of your edits that its files change is now left as the start has it, and its version kept in its rest."""
    text = (repo / "src/a.txt").read_text()
    mine = text.replace("a line 3\n", "a line 3, mine\n").replace("a line 15\n", "a line 15, mine\n").replace(
        "a line 18\n", "a line 18, mine\n")
    (repo / "src/a.txt").write_text(mine)
    project = project_in(repo)
    write_task(project.order(), "T", workspace="worktree", target_files=["src/"], max_rework=0, command=(
        "git reset -q --hard main && sed -i -e 's/^a line 3$/a line 3, mine/' -e 's/^a line 15$/a line 15, mine/' "
        "-e 's/^a line 16$/a line 16, the task/' src/a.txt && echo new > src/new.txt"))
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 1 and project.statuses() == {"T": "REJECTED"}, proc.stdout + proc.stderr
    assert project.aipm("recover").returncode == 0
    shown = project.aipm("diff", "T")
    _applied(repo, shown.stdout)
    assert (repo / "src/a.txt").read_text() == mine and (repo / "src/new.txt").read_text() == "new\n"
    kept = (repo / REST / "src/a.txt").read_text()
    assert "a line 16, the task\n" in kept and "a line 18\n" in kept, kept
    assert f"its versions of src/a.txt are kept in {repo / REST}" in shown.stderr, shown.stderr


@pytest.mark.parametrize("start, theirs", [("src/new/x.txt", "src/new"), ("src/x", "src/x/y")])
def test_a_tangled_attempts_file_where_the_start_has_a_directory_or_the_reverse_is_kept_in_its_rest(
        repo, start, theirs):
    """Your uncommitted new file; the worker's `git checkout main` dropped it and it wrote a file where the start
    has a directory (or a directory where the start has a file). Its end is tangled, and putting your path back as
    the start has it, git's index dropped the worker's file: it was in neither the patch nor the rest, the log said
    the attempt changed nothing, `diff` named a rest that did not exist, and `aipm recover` lost the work."""
    (repo / start).parent.mkdir(parents=True, exist_ok=True)
    (repo / start).write_text("my uncommitted new file\n")
    project = project_in(repo)
    write_task(project.order(), "T", workspace="worktree", target_files=["src/"], command=(
        f"git checkout -q main && mkdir -p {os.path.dirname(theirs)} && echo WORKERS_FILE > {theirs}; exit 1"))
    assert project.aipm("run", "ORD").returncode == 1 and project.statuses() == {"T": "FAILED"}
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert "changed nothing in its worktree" not in log and "~" not in log, log
    assert f"its versions of {theirs} are kept in {repo / REST}" in log, log
    shown = project.aipm("diff", "T")
    assert f"its end keeps its versions of {theirs} in {repo / REST}" in shown.stderr, shown.stderr
    assert project.aipm("recover").returncode == 0 and not (repo / ".aipm/worktrees/ORD/T").exists()
    assert (repo / REST / theirs).read_text() == "WORKERS_FILE\n"
    assert (repo / start).read_text() == "my uncommitted new file\n"
    shown = project.aipm("diff", "T")
    assert f"its versions of {theirs} are kept in {repo / REST}" in shown.stderr, shown.stderr


def test_a_tangled_attempts_versions_that_could_not_be_kept_at_its_end_are_kept_before_its_worktree_goes(
        repo, tmp_path):
    """A tangled end whose copy of the worktree's versions into its rest failed (here a smudge filter that refuses
    until the test allows it) said they were only in the worktree; `aipm recover` then removed it, and they were
    lost. The copy is tried again before the worktree is removed, which stays while it fails."""
    allowed = tmp_path / "allowed"
    allowed.touch()
    git(repo, "config", "filter.held.smudge", f'test -e "{allowed}" && cat')
    git(repo, "config", "filter.held.clean", "cat")
    git(repo, "config", "filter.held.required", "true")
    (repo / ".gitattributes").write_text("src/a.txt filter=held\n")
    git(repo, "add", ".gitattributes")
    git(repo, "commit", "-q", "-m", "a held file", "--", ".gitattributes")
    _your_uncommitted_edit(repo)
    (repo / "src/a.txt").write_text((repo / "src/a.txt").read_text().replace("a line 15", "a line 15, mine"))
    project = project_in(repo)
    write_task(project.order(), "T", workspace="worktree", target_files=["src/"], command=(
        "git reset -q --hard main && sed -i 's/a line 15/a line 15, the task/' src/a.txt && "
        f'rm "{allowed}"; exit 1'))
    assert project.aipm("run", "ORD").returncode == 1 and project.statuses() == {"T": "FAILED"}
    assert "could not be kept" in (repo / ".aipm/logs/ORD/T.1.log").read_text()
    refused = project.aipm("recover")  # failed again: the worktree, their only copy, stays
    assert "worktree not removed" in refused.stdout and "could not be kept" in refused.stdout, refused.stdout
    assert (repo / ".aipm/worktrees/ORD/T/src/a.txt").is_file()
    allowed.touch()
    assert project.aipm("recover").returncode == 0 and not (repo / ".aipm/worktrees/ORD/T").exists()
    assert "a line 15, the task\n" in (repo / REST / "src/a.txt").read_text()
    log = (repo / ".aipm/logs/ORD/T.1.log").read_text()
    assert f"before its worktree was removed: its versions of README.md, src/a.txt are kept in {repo / REST}" in log
