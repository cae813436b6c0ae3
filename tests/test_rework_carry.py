"""A worktree attempt its review sent back is continued by the next attempt (workspace/carry.py): its worktree
starts from the main tree with the rejected attempt's changes applied, so the review's feedback speaks of work the
attempt has. And what was changed in a kept worktree after its attempt's end (by its review, by a person) is kept
in a later patch before the worktree goes. Real runs in a real repository (the `repo` fixture of test_workspace)."""

from __future__ import annotations

import pytest
import yaml

from conftest import write_task
from test_workspace import git, project_in, repo  # noqa: F401 - repo is a fixture

LOGS = ".aipm/logs/ORD"
# The first attempt adds a feature with a flaw its review rejects; a next one (it has feedback) fixes the flaw, and
# says in its log what it was told and whether it found the feature.
WORKER = ('if [ -n "$AIPM_REVIEW_FEEDBACK" ]; then cat "$AIPM_REVIEW_FEEDBACK"; '
          'grep -q "^feature" src/a.txt && echo FOUND || echo FRESH; sed -i s/BUG/fixed/ src/a.txt; '
          'else printf "feature BUG\\nfeature 2\\n" >> src/a.txt; fi')
REVIEW = "! grep -q BUG src/a.txt || { echo fix the word BUG; exit 1; }"


def status(repo, task="T") -> dict:
    return yaml.safe_load((repo / "orders/ORD" / f"{task}.yaml").read_text())


def run_one(repo, command: str) -> None:
    """One task on src/a.txt, reviewed by REVIEW, run to its end (which must be exit 0)."""
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/a.txt"], command=command, review=REVIEW)
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("setup", [None, "echo generated > src/gen.txt"], ids=["plain", "workspace_setup"])
def test_the_attempt_after_a_review_s_rejection_continues_the_rejected_work(repo, setup):
    """It started from the main tree: the feature was in no worktree, the fix found nothing to fix, the review
    approved, and the task ended COMPLETED without its feature. With a `workspace_setup`, the work is applied after
    the setup's capture: applied before, it would be part of the start, and never merged."""
    project = project_in(repo, config="workspace: worktree\n" + (f"workspace_setup: {setup}\n" if setup else ""))
    write_task(project.order(), "T", target_files=["src/a.txt"], command=WORKER, review=REVIEW)
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (repo / "src/a.txt").read_text().endswith("a line 20\nfeature fixed\nfeature 2\n")
    assert status(repo)["status"] == "COMPLETED" and status(repo)["reworks"] == 1
    assert not (repo / "src/gen.txt").exists()  # (the setup's output is no change of the task's)
    first = (repo / LOGS / "T.1.log").read_text()
    assert f"the changes of attempt 1 are kept in {repo / '.aipm/patches/ORD/T.1.patch'}; its next attempt " \
           "continues them" in first, first  # (the log names the patch, as a failure's does)
    second = (repo / LOGS / "T.2.log").read_text()
    said = "this attempt continues attempt 1, which its review sent back"
    assert said in second and "FOUND" in second and "FRESH" not in second, second
    assert f"aipm: {said}" in second  # the worker read it in its feedback


def test_carried_work_that_no_longer_applies_leaves_the_attempt_starting_from_the_main_tree(repo):
    """The main tree changed where the work goes (here its review edits it, between the attempts): `git apply`
    applies nothing, and the log and the feedback say so and where the work is."""
    project = project_in(repo)
    review = 'sed -i "s/a line 20/a line twenty/" "$MAIN/src/a.txt"; ' + REVIEW
    write_task(project.order(), "T", target_files=["src/a.txt"], command=WORKER, review=review)
    proc = project.aipm("run", "ORD", env={"MAIN": str(repo)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    second = (repo / LOGS / "T.2.log").read_text()
    assert "the changes of attempt 1, which its review sent back, do not apply to the main tree as it is now" \
           in second and "FRESH" in second, second
    assert f"kept in {repo / '.aipm/patches/ORD/T.1.patch'}" in second
    assert "+feature BUG" in (repo / ".aipm/patches/ORD/T.1.patch").read_text()
    assert (repo / "src/a.txt").read_text().endswith("a line twenty\n")  # the main tree's, and no half of the work


def test_after_a_scope_failure_the_next_attempt_starts_anew(repo):
    """A scope audit's feedback asks for the work again from the main tree (as a merge conflict's does): the
    mark a review's rejection left is dropped."""
    run_one(repo, 'case "$AIPM_ATTEMPT" in 1) printf "feature BUG\\n" >> src/a.txt;; 2) echo out >> src/b.txt;; '
                  '*) grep -q "^feature" src/a.txt && echo FOUND || echo FRESH; echo feature >> src/a.txt;; esac')
    assert "continues attempt 1" in (repo / LOGS / "T.2.log").read_text()
    assert "src/b.txt" in (repo / LOGS / "T.2.log").read_text()  # (sent back for its scope)
    third = (repo / LOGS / "T.3.log").read_text()
    assert "FRESH" in third and "continues" not in third, third
    assert (repo / "src/a.txt").read_text().endswith("a line 20\nfeature\n")


def test_a_review_s_edits_in_the_worktree_are_carried_with_the_work_within_its_targets(repo):
    """What the rejecting review changed in the kept worktree after the end's capture is in no patch: kept in the
    attempt's later patch, and carried with the work, but for what no target covers (its notes beside them): the
    next attempt was sent back for a file it never wrote, and the one after started anew, without the work."""
    project = project_in(repo)
    review = ('if grep -q BUG src/a.txt; then echo "review note" >> src/notes.txt; echo notes > REVIEW_NOTES.md; '
              'echo fix BUG; exit 1; fi')
    write_task(project.order(), "T", target_files=["src/a.txt", "src/notes.txt"], command=WORKER, review=review)
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0 and status(repo)["reworks"] == 1, proc.stdout + proc.stderr
    assert (repo / "src/notes.txt").read_text() == "review note\n" and not (repo / "REVIEW_NOTES.md").exists()
    assert (repo / "src/a.txt").read_text().endswith("feature fixed\nfeature 2\n")
    later = repo / ".aipm/patches/ORD/T.1.later.patch"
    assert "+review note" in later.read_text() and "+review note" not in (repo / ".aipm/patches/ORD/T.1.patch"
                                                                          ).read_text()
    second = (repo / LOGS / "T.2.log").read_text()
    assert str(later) in second and "but for what is outside its target files: REVIEW_NOTES.md" in second, second
    # (applied with the work: no one is told to `git apply` it)
    assert "`git apply` it after" not in second and "the next attempt continues attempt 1 with it" in second, second


def test_a_start_killed_after_its_worktree_got_the_carried_work_leaves_no_attempt_behind(repo):
    """The carry's note went into the new attempt's log at once: a start then killed (or rolled back) left a log,
    and the worktree's removal took it for an attempt whose end was lost (a patch of it, a line saying so)."""
    project = project_in(repo)
    hold = repo / "orders/HOLD"  # a person's hold on the file, which the review puts there: the run stops
    review = (f'if grep -q BUG src/a.txt; then mkdir -p "{hold}"; printf "id: H\\nstatus: IN_PROGRESS\\n'
              f'target_files: [src/a.txt]\\n" > "{hold}/H.yaml"; echo fix BUG; exit 1; fi')
    write_task(project.order(), "T", target_files=["src/a.txt"], command=WORKER, review=review)
    assert project.aipm("run", "ORD").returncode == 1 and status(repo)["status"] == "QUEUED"
    (hold / "H.yaml").unlink()
    killed = project.aipm("launch", "ORD", env={"AIPM_TEST_KILL_AT": "prepare"})
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert not (repo / LOGS / "T.2.log").exists()
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0 and status(repo)["status"] == "COMPLETED", proc.stdout + proc.stderr
    logs = "".join(p.read_text() for p in (repo / LOGS).glob("T.*.log"))
    assert "no patch of attempt" not in logs and "continues attempt 1" in (repo / LOGS / "T.2.log").read_text()
    assert sorted(p.name for p in (repo / ".aipm/patches/ORD").glob("*.patch")) == ["T.1.patch", "T.2.patch"]
    assert (repo / "src/a.txt").read_text().endswith("feature fixed\nfeature 2\n")


def test_a_person_s_fix_in_a_kept_worktree_outlives_the_worktree(repo):
    """`aipm diff` shows a kept worktree as it is now, a person's fixes in it included; its removal (the next
    attempt's start, `aipm recover`) deleted them, in no patch."""
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/a.txt"],
               command='echo "attempt $AIPM_ATTEMPT" >> src/a.txt; [ "$AIPM_ATTEMPT" != 1 ]')
    assert project.aipm("run", "ORD").returncode == 1
    tree = repo / ".aipm/worktrees/ORD/T"
    with open(tree / "src/a.txt", "a") as fh:
        fh.write("my manual fix\n")
    (tree / "notes.txt").write_text("notes\n")
    assert "my manual fix" in project.aipm("diff", "ORD/T").stdout
    recovered = project.aipm("recover")
    later = repo / ".aipm/patches/ORD/T.1.later.patch"
    # Said where it went (it was said in the old attempt's log alone, and `diff` then showed the fix gone)
    assert recovered.returncode == 0 and f"ORD/T: worktree removed; its worktree held changes made after attempt " \
        f"1's end (by its review, or by hand), kept in {later}" in recovered.stdout, recovered.stdout
    assert not tree.exists()
    text = later.read_text()
    assert "+my manual fix" in text and "+notes" in text and "+attempt 1" not in text, text
    assert str(later) in (repo / LOGS / "T.1.log").read_text()
    # Applied after the attempt's own patch, at the repository's top, it gives the worktree as it was.
    git(repo, "apply", "--check", str(repo / ".aipm/patches/ORD/T.1.patch"))
    proc = project.aipm("diff", "ORD/T")  # (the attempt's patch: a later patch is not one of the attempts')
    assert proc.returncode == 0 and "+attempt 1" in proc.stdout and "my manual fix" not in proc.stdout, proc.stderr
    assert proc.stderr == (f"aipm: ORD/T: also changes made in its worktree after attempt 1's end (by its review, or "
                           f"by hand) are kept in {later} (`git apply` it after this one)\n"), proc.stderr
    assert project.json("diff", "ORD/T")["also_kept"] == [proc.stderr.split(": also ", 1)[1].rstrip("\n")]


def test_the_carry_works_whatever_the_users_git_config_says_of_diffs(repo):
    """`git diff` followed the user's config: with diff.noprefix (or color.ui=always) the patches it wrote did not
    apply, and the carried work was lost with a false reason ("do not apply to the main tree as it is now")."""
    git(repo, "config", "diff.noprefix", "true")
    git(repo, "config", "color.ui", "always")
    git(repo, "config", "diff.context", "0")  # (a patch of no context lines does not apply mid-file)
    run_one(repo, 'if [ -n "$AIPM_REVIEW_FEEDBACK" ]; then sed -i s/BUG/fixed/ src/a.txt; '
                  'else sed -i "s/^a line 10$/a line 10, feature BUG/" src/a.txt; fi')
    assert "a line 10, feature fixed\n" in (repo / "src/a.txt").read_text()
    assert (repo / ".aipm/patches/ORD/T.1.patch").read_text().startswith("diff --git a/src/a.txt b/src/a.txt\n")


def test_a_directory_a_worker_made_at_the_carry_mark_stops_no_outcome(repo):
    """`carry.unmark` unlinked a directory a worker had made there: the outcome of its scope failure could not be
    recorded, and the task stayed IN_PROGRESS through every run."""
    project = project_in(repo)
    write_task(project.order(), "T", target_files=["src/a.txt"], max_rework=0,
               command=f'mkdir -p "{repo}/.aipm/feedback/ORD/T.carry/x" && echo out >> src/b.txt')
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 1 and status(repo)["status"] == "REJECTED", proc.stdout + proc.stderr
    assert "cannot record" not in proc.stdout + proc.stderr
