"""Ctrl-C in a terminal is SIGINT to the whole foreground process group, and `timeout` signals its command's group:
aipm's own git commands were in that group, so the step under way (an attempt's capture, its merge back) died with
them, and the attempt was charged for it (REJECTED or REWORK: `git add failed: exit -2`). They run in sessions of
their own now: the step is finished, as the stop promises (and says at once), and nothing new starts once a stop was
asked."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import wait_for, write_task
from test_workspace import git, project_in, repo  # noqa: F401 - repo is a fixture

# A git that, once the worker has armed it, takes a second over `git add` (aipm's capture of the worktree)
SLOW_GIT = """#!/bin/sh
sub=""; skip=""
for a in "$@"; do
  if [ -n "$skip" ]; then skip=""; continue; fi
  case "$a" in -c|-C) skip=1;; -*) ;; *) sub="$a"; break;; esac
done
if [ "$sub" = add ] && [ -e "$ARMED" ]; then touch "$CAPTURING"; sleep 1; fi
exec {git} "$@"
"""


def _slow_git(tmp: Path) -> dict[str, str]:
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "git").write_text(SLOW_GIT.format(git=shutil.which("git")))
    (bin_dir / "git").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "ARMED": str(tmp / "armed"),
            "CAPTURING": str(tmp / "capturing")}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "timeout"])
def test_a_stop_sent_to_the_runs_process_group_lets_the_capture_under_way_finish(repo, sig):  # noqa: F811
    project = project_in(repo)
    order = project.order()
    write_task(order, "T", target_files=["out/"], max_attempts=1,
               command=f"mkdir -p out && echo work > out/w.txt && touch {repo.parent / 'armed'}")
    write_task(order, "N", depends_on=["T"], target_files=["n.txt"], command="echo ran > n.txt")
    env = _slow_git(repo.parent)
    # As a terminal runs a job: the run leads a process group of its own, which the signal is sent to
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(repo), "run", "ORD"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: (repo.parent / "capturing").exists() or run.poll() is not None)
        os.killpg(run.pid, sig)
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130 if sig == signal.SIGINT else run.returncode in (130, 143), out + err
    assert "exit -" not in out + err, out + err
    # Said at once (it was said only at a second Ctrl-C: a merge back of thousands of files read as a hung aipm)
    assert "aipm: stopping once the end of ORD/T (its worktree's capture and merge back) is done; it is not cut " \
           "short\n" in err, err
    assert project.statuses() == {"T": "DONE", "N": "QUEUED"}, out + err  # T's step finished; N never started
    assert (repo / "out/w.txt").read_text() == "work\n"
    assert not (repo / "n.txt").exists(), out + err
