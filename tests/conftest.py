"""Shared test helpers: a real project in tmp_path, the real CLI in a subprocess, tree snapshots."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"

# The files that take longest, first (a full run's test time per file, most first; Ray's starts a cluster): xdist's
# `--dist loadfile` hands each worker the next whole file in collection order, and test_workspace, near the end of
# the alphabet, kept one worker busy for minutes after the other had run out of files.
HEAVY_FIRST = ("test_workspace.py", "test_ray_runner.py", "test_agents.py", "test_commands.py", "test_validation.py",
               "test_unowned_timeout.py", "test_ui.py", "test_removed_state_directory.py", "test_scope.py",
               "test_chaos.py", "test_hostile_workers.py", "test_launch.py")


def pytest_collection_modifyitems(items) -> None:
    rank = {name: n for n, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (stable: each file's tests in their order)


def write_task(order_dir: Path, task_id: str, **fields) -> Path:
    order_dir.mkdir(parents=True, exist_ok=True)
    path = order_dir / f"{task_id}.yaml"
    path.write_text(yaml.safe_dump({"id": task_id, **fields}, sort_keys=False))
    return path


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (except the runtime directory) → its content hash."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and ".aipm" not in path.relative_to(root).parts:
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


class Project:
    def __init__(self, root: Path):
        self.root = root
        (root / "aipm.yaml").write_text("max_workers: 5\n")
        (root / "orders").mkdir(exist_ok=True)

    def order(self, name: str = "ORD") -> Path:
        d = self.root / "orders" / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def aipm(self, *args: str, env: dict | None = None, timeout: float = 120, check: bool = False, preexec_fn=None):
        full_env = dict(os.environ)
        full_env.pop("AIPM_FAKE_LOAD", None)
        # The machine's real load (other tests, CI neighbours) must not decide what a test launches.
        full_env["AIPM_ENABLE_MONITORING"] = "false"
        full_env.update(env or {})
        proc = subprocess.run(
            [sys.executable, "-m", "aipm", "--root", str(self.root), *args],
            capture_output=True, text=True, env=full_env, timeout=timeout, cwd=self.root, preexec_fn=preexec_fn,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"aipm {' '.join(args)} → {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def aipm_all(self, calls: list[tuple[str, ...]], **kw) -> list:
        """Each call's aipm at once (a process each; two cores: half the time), for tests of many read-only calls."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(lambda call: self.aipm(*call, **kw), calls))

    def json(self, *args: str, **kw):
        proc = self.aipm(*args, "--json", **kw)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def statuses(self, order: str = "ORD") -> dict[str, str]:
        data = self.json("status", order)
        return {t["id"]: t["status"] for t in data["tasks"]}


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


@pytest.fixture(autouse=True)
def _remove_state_dirs(request):
    """After each test, the state directories (/tmp/aipm-<uid>/...) of the projects it made under its tmp_path:
    left, a suite run piled up thousands of them. Only this test's: another run's may be in use."""
    if "tmp_path" not in request.fixturenames:
        yield
        return
    base = request.getfixturevalue("tmp_path")  # now, so that it is torn down after this
    yield
    import shutil

    from aipm.statedir import state_dir

    for root in [base, *base.glob("*/"), *base.glob("*/*/")]:
        try:
            shutil.rmtree(state_dir(root))
        except OSError:
            pass


def capped_memory() -> None:
    """A preexec_fn: aipm gets a 3 GiB address space, so a hostile file it reads whole by mistake (a sparse terabyte)
    is a MemoryError at once, never the machine's memory."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05):
    """Poll until predicate() is truthy; fail the test (not time it) when it never becomes so."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s: {predicate.__doc__ or predicate}")


def race_threads(threads) -> None:
    """Start and join `threads` with a switch between threads as often as the interpreter allows (between any two
    bytecodes), so that a race in what they share shows in one run."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(before)


def task_statuses(order_dir: Path) -> dict[str, str]:
    """Statuses read straight from the files (no aipm process), for polling."""
    out = {}
    for path in order_dir.glob("*.yaml"):
        if path.name != "order.yaml":
            try:
                out[path.stem] = (yaml.safe_load(path.read_text()) or {}).get("status", "QUEUED")
            except (yaml.YAMLError, FileNotFoundError):  # mid-write by a worker (`git checkout` unlinks first)
                out[path.stem] = "?"
    return out


def state(root: Path, make: bool = False) -> Path:
    """The project's state directory (locks, worker records, exit files), outside the work tree; with `make`,
    created as aipm creates it (its parent private to this user)."""
    from aipm.statedir import make_state_dir, state_dir

    path = state_dir(root)
    if make:
        make_state_dir(path)
    return path


def stop_outside_a_round(project: Project, run) -> None:
    """SIGSTOP `run` (as Ctrl-Z does), again until it is stopped with the launch lock free."""
    import fcntl
    import signal

    while True:
        run.send_signal(signal.SIGSTOP)
        wait_for(lambda: open(f"/proc/{run.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T")
        with open(state(project.root) / "launch.lock") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:  # stopped inside a round: let it finish that one
                run.send_signal(signal.SIGCONT)


HELD_STOPPED = """
import os, signal, sys
from aipm.launchlock import exclusive
from aipm.runtime import Runtime
rt = Runtime(sys.argv[1])
rt.ensure()
with exclusive(rt.state / "launch.lock"):
    print("held", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # an `aipm run` stopped by Ctrl-Z inside a round
"""


def stopped_launch_lock_holder(project: Project) -> subprocess.Popen:
    """A process that holds the project's launch lock and is stopped, as an `aipm run` stopped by Ctrl-Z inside a
    round (SIGKILL or SIGCONT it to free the lock)."""
    holder = subprocess.Popen([sys.executable, "-c", HELD_STOPPED, str(project.root)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline() == "held\n"
    wait_for(lambda: open(f"/proc/{holder.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T")
    return holder


def no_workers(root: Path) -> bool:
    """No worker record left and no process of ours still alive."""
    workers = state(root) / "workers"
    return not any(workers.rglob("*.json")) if workers.exists() else True



@pytest.fixture
def gate(project: Project):
    """A file workers wait for; opened at teardown too, so a failed test leaves no worker waiting forever."""
    path = project.root / "gate"
    yield path
    path.touch()
