"""A worker whose owner was SIGKILLed ends on its own; the kernel then gives its pid (which is also its process
group's number) to another process, before the next `aipm run` adopts the dead worker from its exit file. The
adopter must neither signal the process that has the number now nor take its exit status for the worker's.

The pids are steered with ns_last_pid, so the scenarios run inside a private pid namespace: the outer test starts
this file again under `unshare --pid --fork --mount-proc` (root only), where the inner ones run as pid 1's
children; collected anywhere else, the inner ones skip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Project, wait_for, write_task
from invariants import worker_records
from test_chaos import Proc
from test_removed_state_directory import outcomes

INSIDE = os.getpid() == 1 and os.environ.get("AIPM_TEST_PID_NAMESPACE") == "1"
inner = pytest.mark.skipif(not INSIDE, reason="runs inside a private pid namespace (see the outer test)")
HOOK = Path(__file__).parent / "hooks" / "pid_reuse"


def test_pid_reuse_scenarios_in_a_private_pid_namespace():
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private pid namespace")
    done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "pytest", "-q",
                           "-p", "no:cacheprovider", "-n", "0", __file__, "-k", "not in_a_private"],
                          cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, AIPM_TEST_PID_NAMESPACE="1"))
    assert done.returncode == 0 and done.stdout.splitlines()[-1].startswith("2 passed"), done.stdout[-3000:] + done.stderr[-2000:]


def _gone(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # pid 1 of the namespace: orphans are ours to reap
    except ChildProcessError:
        pass
    return not os.path.exists(f"/proc/{pid}")


def _dead_adopted_worker(root: Path, tmp: Path, **more: str) -> tuple[Project, Path, int]:
    """Order ONE's task A runs; its `run` is SIGKILLed; A then exits 0 on its own and its pid is free again."""
    project = Project(root)
    one = project.order("ONE")
    go, started = tmp / "go", tmp / "started"
    write_task(one, "A", target_files=["x.py"], command=f'touch "{started}"; until [ -e "{go}" ]; do sleep 0.01; done')
    for task, command in more.items():
        write_task(one, task, target_files=[f"{task}.py"], command=command)
    first = Proc(root, "run", "ONE", "--max-workers", "1", "--no-resource-monitoring")
    wait_for(started.exists, timeout=60)
    first.p.kill()
    first.wait(60)
    [rec] = worker_records(root)
    assert rec["pgid"] == rec["pid"]
    go.touch()
    wait_for(lambda: _gone(rec["pid"]), timeout=30)
    return project, one, rec["pid"]


@inner
def test_the_group_number_of_a_dead_adopted_worker_given_to_another_process_is_not_signalled(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    project, one, pid = _dead_adopted_worker(root, tmp_path)
    with open("/proc/sys/kernel/ns_last_pid", "w") as handle:
        handle.write(str(pid - 1))
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)  # another terminal's job, say
    try:
        assert other.pid == pid
        project.aipm("run", "ONE", "--no-resource-monitoring")
        assert outcomes(one)["A"][:2] == ("DONE", 0)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


@inner
def test_the_pid_of_a_dead_adopted_worker_given_to_a_worker_started_since_is_not_taken_for_it(tmp_path):
    """B starts in the adopting round and its wrapper gets A's old pid: A's outcome is its exit file's (0), not B's
    exit status (3), and B's own outcome is B's."""
    root = tmp_path / "proj"
    root.mkdir()
    project, one, pid = _dead_adopted_worker(root, tmp_path, B="sleep 1; exit 3")
    project.aipm("run", "ONE", "--max-workers", "2", "--no-resource-monitoring",
                 env={"AIPM_REUSE_PID": str(pid), "PYTHONPATH": f"{HOOK}:{os.environ.get('PYTHONPATH', '')}"})
    assert outcomes(one)["A"][:2] == ("DONE", 0)
    assert outcomes(one)["B"][:2] == ("FAILED", 3)
