"""A review is held to the task's `timeout` (else the `timeout` setting), as its work is: a hung reviewer (an AI
review that never answers) held the task's files for ever. When the limit passes, the reviewer's whole process
group is killed and the review counts as a non-zero verdict (REWORK), reason `review timed out after N s`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import no_workers, wait_for, write_task
from invariants import pid_alive


def hung_review(project, gate, limit: dict) -> tuple:
    """A task whose review starts a helper that ignores SIGTERM, exits 0 on its own SIGTERM (no verdict either
    way), and otherwise waits for the gate (opened at teardown, so nothing outlives a failed test)."""
    helper = project.root / "helper.pid"
    wait = f'while [ ! -e "{gate}" ]; do sleep 0.05; done'
    review = f"(trap '' TERM; {wait}) & echo $! > \"{helper}\"; trap 'exit 0' TERM; {wait}; exit 0"
    path = write_task(project.order(), "T", command="true", target_files=["t.txt"], review=review, max_rework=0,
                      **limit)
    return path, helper


@pytest.mark.parametrize("limit", [{"timeout": 2}, {}], ids=["task-timeout", "setting-timeout"])
@pytest.mark.parametrize("how", ["run", "launch"])
def test_a_hung_review_times_out_and_sends_the_task_back(project, gate, how, limit):
    if not limit:
        (project.root / "aipm.yaml").write_text("timeout: 2\n")
    path, helper = hung_review(project, gate, limit)
    if how == "run":
        proc = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD",
                                 "--no-resource-monitoring"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        try:
            out, _ = proc.communicate(timeout=60)  # the review waits for the gate: without a timeout, this fails
        finally:
            gate.touch()
            proc.kill()
        assert proc.returncode == 1, out
        assert "finish   T → REJECTED (review timed out after 2 s)" in out, out
    else:
        project.aipm("launch", "ORD", "--no-resource-monitoring", check=True)  # a detached owner reviews
        wait_for(lambda: yaml.safe_load(path.read_text())["status"] == "REJECTED", timeout=60)
    task = yaml.safe_load(path.read_text())
    assert (task["status"], task["reason"], task["reworks"], task["attempts"]) == \
        ("REJECTED", "review timed out after 2 s", 0, 1)
    wait_for(lambda: no_workers(project.root))
    helper_pid = int(helper.read_text())
    assert not pid_alive(helper_pid)  # the reviewer's whole group, the helper that ignored SIGTERM too
    log = (project.root / ".aipm/logs/ORD/T.1.log").read_text()
    assert "review timed out after 2 s; process group killed" in log, log
    # The next attempt's feedback says why (a rework round, had max_rework allowed one).
    assert (project.root / ".aipm/feedback/ORD/T.txt").read_text().endswith("review timed out after 2 s\n")
