"""`--runner ray`: a real local Ray cluster in a network namespace that has only loopback.

The head node runs inside `unshare -n` (loopback only, so nothing leaves the machine and Ray picks 127.0.0.1);
every aipm command of these tests enters that namespace with `nsenter`. Checked on a journal the workers
write: dependencies first, no two tasks sharing files alive together, the worker limit, each task once; that
every command ran below a Ray worker process; that a timeout ends a grandchild (also one that setsid'd away)
on the node; and that a SIGKILLed `aipm run` is recovered by the next one with nothing lost or run twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from aipm.runtime import Runtime
from conftest import Project, snapshot, task_statuses, wait_for, write_task
from invariants import check, journal_command, pid_alive, spans

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Ray tests need Linux network namespaces")

RAY = Path(sys.executable).with_name("ray")
PORT = 6391

# Walks the ppid chain of the command and appends "TASK ray" or "TASK local" to a file: proof of where it ran.
ANCESTRY = r'''
import os, sys
pid, where = os.getppid(), "local"
while pid > 1:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        if f.read().startswith(b"ray::"):
            where = "ray"
            break
    with open(f"/proc/{pid}/stat", "rb") as f:
        pid = int(f.read().rsplit(b")", 1)[1].split()[1])
with open(sys.argv[1], "a") as f:
    f.write(f"{os.environ['AIPM_TASK_ID']} {where}\n")
'''


class Cluster:
    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="aipm-ray-")
        # The holder keeps the namespace alive; `ray start` daemons are started inside it by nsenter.
        self.holder = subprocess.Popen(
            ["unshare", "-n", "sh", "-c", "ip link set lo up && exec sleep infinity"], start_new_session=True)
        wait_for(lambda: _has_loopback(self.holder.pid), 20)
        self.env = dict(os.environ, RAY_ADDRESS=f"127.0.0.1:{PORT}", RAY_USAGE_STATS_ENABLED="0",
                        AIPM_ENABLE_MONITORING="false")
        self.env.pop("AIPM_FAKE_LOAD", None)
        self.env.pop("OMP_NUM_THREADS", None)  # else Ray leaves the node's value to its tasks
        # Ray then hides the GPUs from a task that asks for none (an empty CUDA_VISIBLE_DEVICES), as before 2.4x.
        self.env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "1"
        start = self.ns([str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={PORT}",
                         "--num-cpus=2", "--num-gpus=2", "--include-dashboard=false", "--object-store-memory=80000000",
                         "--disable-usage-stats", f"--temp-dir={self.tmp}"], timeout=180)
        if start.returncode != 0:
            self.close()
            raise RuntimeError(f"ray start failed:\n{start.stdout}\n{start.stderr}")

    def ns(self, argv: list[str], timeout: float = 180, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "-t", str(self.holder.pid), "-n", *argv], capture_output=True,
                              text=True, env=kw.pop("env", self.env), timeout=timeout, **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(["nsenter", "-t", str(self.holder.pid), "-n", *argv], env=self.env, **kw)

    def close(self) -> None:
        """Kill the processes of this namespace only: `ray stop` kills every Ray process on the machine, the
        clusters of other namespaces (another test run, a developer's own) too."""
        try:
            mine = os.readlink(f"/proc/{self.holder.pid}/ns/net")
            for _ in range(3):  # what a dying raylet starts meanwhile is caught by the next pass
                for pid in _in_namespace(mine) - {self.holder.pid}:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        finally:
            self.holder.kill()
            self.holder.wait()
            shutil.rmtree(self.tmp, ignore_errors=True)


def _in_namespace(net: str) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/net") == net:
                    found.add(int(entry))
    return found


def _has_loopback(pid: int) -> bool:
    """`pid` is in a network namespace of its own, its loopback up. Read before `unshare` has made the namespace
    (a loaded machine), the holder's namespace is still ours, whose loopback is up too: `ray start` then ran in it,
    on this machine's address, the run in the namespace never reached it, and close() left it running."""
    if os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net"):
        return False
    out = subprocess.run(["nsenter", "-t", str(pid), "-n", "ip", "-o", "link", "show", "up"],
                         capture_output=True, text=True)
    return "lo:" in out.stdout


@pytest.fixture(scope="module")
def cluster():
    if not RAY.exists():
        pytest.skip("ray is not installed (pip install '.[ray]')")
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"):
        pytest.skip("needs root with unshare/nsenter to give Ray a loopback-only network namespace")
    c = Cluster()
    yield c
    c.close()


def aipm(c: Cluster, project: Project, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return c.ns([sys.executable, "-m", "aipm", "--root", str(project.root), *args], timeout=timeout,
                cwd=project.root)


def test_an_order_runs_on_ray_with_every_invariant(cluster, tmp_path):
    project = Project(tmp_path)
    order = project.order()
    journal, where = tmp_path / "journal", tmp_path / "where"
    probe = tmp_path / "ancestry.py"
    probe.write_text(ANCESTRY)
    work = f"{sys.executable} {probe} {where}; sleep 0.3"
    shape = {  # a diamond, two tasks on one file, one with a declared resource request
        "A": ([], ["src/a.py"]), "B": (["A"], ["src/b.py"]), "C": (["A"], ["src/c.py"]),
        "D": (["B", "C"], ["src/"]), "E": ([], ["docs/x.md"]), "F": ([], ["docs/x.md"]),
    }
    for tid, (deps, targets) in shape.items():
        extra = {"resources": {"cpus": 1, "memory_mb": 64}} if tid == "E" else {}
        write_task(order, tid, depends_on=deps, target_files=targets, command=journal_command(journal, work), **extra)
    result = aipm(cluster, project, "run", "ORD", "--runner", "ray", "--max-workers", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(task_statuses(order).values()) == {"DONE"}
    assert check(journal, order, max_workers=2, root=tmp_path) == []
    ran = dict(line.split() for line in where.read_text().splitlines())
    assert ran == dict.fromkeys(shape, "ray")
    log = (tmp_path / ".aipm" / "logs" / "ORD" / "A.1.log").read_text()
    assert "ran on Ray node" in log


def test_a_timeout_ends_the_whole_tree_on_the_node(cluster, tmp_path):
    project = Project(tmp_path)
    order = project.order()
    # One grandchild stays in the command's group; one escapes it with setsid.
    # The timeout covers the Ray start-up of the attempt too: generous, so the command surely runs first.
    write_task(order, "T", timeout=20, command=(
        f"sleep 600 & echo $! > {tmp_path}/kept.pid; "
        f"setsid sleep 600 & echo $! > {tmp_path}/escaped.pid; wait"))
    result = aipm(cluster, project, "run", "ORD", "--runner", "ray")
    assert result.returncode == 1
    assert task_statuses(order) == {"T": "FAILED"}
    pids = [int((tmp_path / name).read_text()) for name in ("kept.pid", "escaped.pid")]
    wait_for(lambda: not any(pid_alive(p) for p in pids), 60)
    assert "timed out" in (tmp_path / ".aipm" / "logs" / "ORD" / "T.1.log").read_text()


def test_a_killed_run_is_recovered_with_nothing_lost_or_run_twice(cluster, tmp_path):
    project = Project(tmp_path)
    order = project.order()
    journal, gate, out = tmp_path / "journal", tmp_path / "gate", tmp_path / "second.out"
    # Each command waits for the gate (at most 60 s): T0 and T2 run until the second run has adopted them.
    work = f"for i in $(seq 1200); do [ -e {gate} ] && break; sleep 0.05; done"
    for i in range(4):
        deps = [f"T{i - 1}"] if i % 2 else []
        write_task(order, f"T{i}", depends_on=deps, target_files=[f"f{i}"],
                   command=journal_command(journal, work))
    try:
        run = cluster.popen([sys.executable, "-m", "aipm", "--root", str(tmp_path), "run", "ORD", "--runner", "ray",
                             "--max-workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
        wait_for(lambda: len(spans(journal)) >= 2, 120)  # two commands are running on the cluster
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        with out.open("w") as said:
            second = cluster.popen([sys.executable, "-m", "aipm", "--root", str(tmp_path), "run", "ORD", "--runner",
                                    "ray", "--max-workers", "2"], stdout=said, stderr=subprocess.STDOUT, text=True,
                                   cwd=tmp_path)
        wait_for(lambda: all(f"adopt    {t}" in out.read_text() for t in ("T0", "T2")), 120)
    finally:
        gate.touch()
    assert second.wait(300) == 0, out.read_text()
    assert set(task_statuses(order).values()) == {"DONE"}
    assert check(journal, order, max_workers=2, root=tmp_path) == []


def test_runner_ray_without_ray_is_one_line_and_exit_2(project):
    write_task(project.order(), "T", command="true")
    code = ("import sys; sys.modules['ray'] = None; from aipm.cli import main; "
            f"sys.argv = ['aipm', '--root', {str(project.root)!r}, 'run', 'ORD', '--runner', 'ray']; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "pip install 'aipm[ray]'" in proc.stderr
    assert task_statuses(project.order()) == {"T": "QUEUED"}


def test_a_ray_too_old_is_one_line_and_exit_2(project, tmp_path):
    """pyproject said ray>=2.9, but the attempt uses internals of Ray 2.54 (find_node_ids): with an older Ray each
    attempt's reach of the cluster failed on an import, said as "cannot reach the Ray cluster (...): cannot import
    name ...". A Ray 2.53 (its package and metadata, first on the path) is refused by its version."""
    site = tmp_path / "old-site"
    (site / "ray").mkdir(parents=True)
    (site / "ray" / "__init__.py").write_text("")
    (site / "ray-2.53.0.dist-info").mkdir()
    (site / "ray-2.53.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: ray\nVersion: 2.53.0\n")
    write_task(project.order(), "T", command="true")
    before = snapshot(project.root)
    proc = project.aipm("run", "ORD", "--runner", "ray", env={"PYTHONPATH": str(site), "RAY_ADDRESS": "127.0.0.1:1"})
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stdout + proc.stderr
    assert proc.stderr == ("aipm: error: runner ray: Ray 2.53.0 is too old (aipm needs Ray 2.54 or later); upgrade "
                           "it with `pip install 'ray>=2.54'`\n"), proc.stderr
    assert _untouched(project, before)


def _untouched(project: Project, before: dict[str, str]) -> bool:
    return snapshot(project.root) == before and not (project.root / ".aipm").exists()


def test_a_cluster_that_cannot_be_reached_is_one_line_and_exit_2_before_any_attempt(project):
    """Found once, before the first launch: each attempt found it only once started (exit 75), so every task
    spent all its max_attempts on it, and the run ended 1 with them FAILED."""
    if not RAY.exists():
        pytest.skip("ray is not installed (pip install '.[ray]')")
    for tid in ("A", "B"):
        write_task(project.order(), tid, command="true", target_files=[f"{tid}.txt"], max_attempts=3)
    before = snapshot(project.root)
    for command in ("run", "launch"):
        proc = project.aipm(command, "ORD", "--runner", "ray", env={"RAY_ADDRESS": "127.0.0.1:1"}, timeout=120)
        assert (proc.returncode, proc.stdout) == (2, ""), proc.stdout + proc.stderr
        assert proc.stderr == ("aipm: error: runner ray: cannot reach the Ray cluster (127.0.0.1:1): Connection "
                               "refused\n")
        assert _untouched(project, before)


@pytest.mark.parametrize("where", ["env", "file"])
def test_an_address_without_a_port_is_named_before_any_attempt(project, where):
    """`10.0.0.5` (the port forgotten) passed the check at the run's start (forms not host:port were left to Ray),
    and each attempt then failed with Ray's "Invalid address format", the task FAILED after all its attempts."""
    if not RAY.exists():
        pytest.skip("ray is not installed (pip install '.[ray]')")
    write_task(project.order(), "T", command="true", max_attempts=3)
    env = {"RAY_ADDRESS": "10.0.0.5"} if where == "env" else {"RAY_ADDRESS": ""}
    if where == "file":
        (project.root / "aipm.yaml").write_text("max_workers: 5\nray:\n  address: 10.0.0.5\n")
    before = snapshot(project.root)
    said = "RAY_ADDRESS" if where == "env" else "aipm.yaml: ray.address"
    # `config --runner ray` says it too (it showed the address, exit 0); without Ray as the runner, RAY_ADDRESS is
    # Ray's own variable (`ray job` reads another form) and stops nothing.
    for command in (["run", "ORD"], ["config"]):
        proc = project.aipm(*command, "--runner", "ray", env=env, timeout=120)
        assert (proc.returncode, proc.stdout) == (2, ""), proc.stdout + proc.stderr
        assert proc.stderr == (f"aipm: error: {said}: '10.0.0.5' is not a Ray cluster address; use HOST:PORT (the "
                               "head's GCS port: 6379 unless its `ray start --port` said another), ray://HOST:PORT or "
                               "auto\n"), proc.stderr
    assert project.aipm("config", env=env).returncode == 0
    assert _untouched(project, before)


def test_an_attempt_that_cannot_reach_the_cluster_ends_at_once_and_says_why(tmp_path):
    """The cluster gone after the run's start: ray.init would retry 127.0.0.1:1 for some 14 minutes, holding the
    place and the locks. The task's reason is the attempt's line (it said "exit 75"); a command of its own that
    exits 75 with such a line is no Ray attempt: its exit code is its reason."""
    if not RAY.exists():
        pytest.skip("ray is not installed (pip install '.[ray]')")
    from aipm.cluster import failure

    log, exit_file = tmp_path / "log", str(tmp_path / "exit")
    argv = [sys.executable, "-m", "aipm.cluster.attempt", "--address", "127.0.0.1:1", "--exit-file", exit_file,
            "--", "true"]
    with log.open("w") as out:
        assert subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=120).returncode == 75
    why = "cannot reach the Ray cluster (127.0.0.1:1): Connection refused"
    assert f"[aipm] {why}" in log.read_text()
    assert failure(exit_file, argv, 75) == why
    assert failure(exit_file, ["/bin/sh", "-c", "exit 75"], 75) is None


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_guard_dies_of_the_signal_its_command_died_of(tmp_path, sig):
    """Both the keeper and the relay: an exit status cannot carry -9 (the keeper's os._exit(-9) was exit 247)."""
    spec = {"env": {"PATH": os.defpath}, "shell": f"kill -{sig.value} $$", "log": str(tmp_path / "log")}
    guard = subprocess.run([sys.executable, "-m", "aipm.cluster.guard"], input=json.dumps(spec), text=True,
                           capture_output=True, timeout=60)
    assert guard.returncode == -sig, guard.stderr


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    return []


def test_a_stop_while_the_guard_starts_the_command_ends_the_command(tmp_path):
    """A SIGTERM that reached the keeper inside posix_spawnp was handled before the command's pid was kept: the
    keeper gave up with nothing to kill and left the command running. The log is a FIFO, so the spawn waits (in
    its child's open of it) until the stop is surely pending, then is let go."""
    log = tmp_path / "log"
    os.mkfifo(log)
    spec = {"env": {"PATH": os.defpath}, "shell": "sleep 600", "log": str(log)}
    guard = subprocess.Popen([sys.executable, "-m", "aipm.cluster.guard"], stdin=subprocess.PIPE, text=True)
    guard.stdin.write(json.dumps(spec))
    guard.stdin.close()
    keeper = wait_for(lambda: (_children(guard.pid) or [None])[0], 60)
    command = wait_for(lambda: (_children(keeper) or [None])[0], 60)  # in the spawn, opening the log
    os.kill(keeper, signal.SIGTERM)
    reader = os.open(log, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert guard.wait(60) == 128 + signal.SIGTERM
        wait_for(lambda: not pid_alive(command), 30)
    finally:
        os.close(reader)
        if pid_alive(command):
            os.killpg(command, signal.SIGKILL)


def test_the_command_starts_with_no_signal_blocked(tmp_path):
    """The keeper blocks the stop signals around the spawn; the command (here a program, no shell to reset its
    mask) must not inherit that, or a SIGTERM would wait for the KILL after the grace."""
    log = tmp_path / "log"
    spec = {"env": {"PATH": os.defpath}, "argv": ["grep", "SigBlk", "/proc/self/status"], "log": str(log)}
    subprocess.run([sys.executable, "-m", "aipm.cluster.guard"], input=json.dumps(spec), text=True, check=True,
                   timeout=60)
    assert log.read_text().split() == ["SigBlk:", "0" * 16]


def test_a_keeper_whose_relay_died_before_it_armed_its_death_signal_runs_nothing(tmp_path):
    """The keeper compared its parent after arming PR_SET_PDEATHSIG with its parent read just before: a relay
    already dead by then went unnoticed, and the command ran with nothing left to stop it. Here the relay exits
    right after the fork and the keeper waits to be re-parented before it starts."""
    marker, code_file = tmp_path / "ran", tmp_path / "code"
    spec = {"env": {"PATH": os.defpath}, "shell": f"touch {marker}", "log": os.devnull}
    script = f"""
import os, time
from aipm.cluster import guard
relay = os.getpid()
if os.fork() == 0:
    while os.getppid() == relay:
        time.sleep(0.01)
    code = guard._keep(dict({spec!r}, parent=relay))
    with open({str(code_file)!r} + ".tmp", "w") as f:
        f.write(str(code))
    os.replace({str(code_file)!r} + ".tmp", {str(code_file)!r})  # (seen whole: the test waits for the name)
    os._exit(0)
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    wait_for(code_file.exists, 60)
    assert not marker.exists()
    assert code_file.read_text() == str(128 + signal.SIGTERM)


def test_a_command_killed_by_a_signal_on_ray_is_recorded_as_one_run_here_is(cluster, tmp_path):
    """As a local argv command killed by SIGKILL: the wrapper's 128+N, the signal named (it was "exit 247")."""
    project = Project(tmp_path)
    write_task(project.order(), "T", command="kill -9 $$")
    assert aipm(cluster, project, "run", "ORD", "--runner", "ray", "--no-review").returncode == 1
    task = yaml.safe_load((project.order() / "T.yaml").read_text())
    assert (task["exit_code"], task["reason"]) == (128 + signal.SIGKILL, "exit 137 (SIGKILL)")
    assert "), killed by SIGKILL" in (tmp_path / ".aipm" / "logs" / "ORD" / "T.1.log").read_text()


def test_an_agents_cost_on_ray_is_recorded(cluster, tmp_path):
    """On the node the agent writes the log itself (the guard opens it by name), so nothing of its output passes
    through the local worker: its usage is read from the log, as before the meter (aipm.meter)."""
    project = Project(tmp_path)
    (tmp_path / "aipm.yaml").write_text("worker:\n  agent: claude\n")
    write_task(project.order(), "T", prompt="@cost 0.25\n@tokens 3 2 0 0", target_files=["t.txt"])
    stand_ins = Path(__file__).parent / "agents"
    proc = cluster.ns([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD", "--runner", "ray"],
                      env=dict(cluster.env, PATH=f"{stand_ins}{os.pathsep}{cluster.env['PATH']}"), cwd=project.root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert yaml.safe_load((project.order() / "T.yaml").read_text())["cost_usd"] == 0.25


def test_a_command_on_ray_that_prints_aipms_lost_line_and_exits_75_keeps_its_own_reason(cluster, tmp_path):
    """The reason was the last such `[aipm] ...` line of the log, which the command on the node writes too (the
    driver's own closing line does not match): a command's line and exit 75 became "cannot reach the Ray cluster".
    The driver notes its reason beside the exit file, outside the log."""
    project = Project(tmp_path)
    write_task(project.order(), "T", command="echo '[aipm] cannot reach the Ray cluster (x): forged'; exit 75")
    assert aipm(cluster, project, "run", "ORD", "--runner", "ray", "--no-review").returncode == 1
    task = yaml.safe_load((project.order() / "T.yaml").read_text())
    assert (task["exit_code"], task["reason"]) == (75, "exit 75"), task


@pytest.mark.parametrize("ray_address", [None, " "], ids=["unset", "blank"])
def test_auto_naming_a_dead_cluster_is_found_before_any_attempt(project, tmp_path, ray_address):
    """`auto` is the cluster `ray start` last wrote in Ray's temp directory: one gone is probed like any address
    (ray.init retried it until the task's timeout). A blank RAY_ADDRESS is unset for Ray too, as for aipm's
    settings (Ray took it for an address: "Invalid address format"). In a namespace of its own, so no cluster of
    this machine's answers."""
    if not RAY.exists():
        pytest.skip("ray is not installed (pip install '.[ray]')")
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root with unshare for a loopback-only network namespace")
    (tmp_path / "raytmp" / "ray").mkdir(parents=True)
    (tmp_path / "raytmp" / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")
    write_task(project.order(), "T", command="true", timeout=60)
    before = snapshot(project.root)
    env = dict(os.environ, RAY_TMPDIR=str(tmp_path / "raytmp"), AIPM_ENABLE_MONITORING="false")
    env.pop("RAY_ADDRESS", None)
    env.update({"RAY_ADDRESS": ray_address} if ray_address else {})
    proc = subprocess.run(["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "-", sys.executable, "-m",
                           "aipm", "--root", str(project.root), "run", "ORD", "--runner", "ray"],
                          capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # (auto: 127.0.0.1:1), or a cluster of this machine's that Ray finds first: none answers in the namespace
    assert proc.stderr.startswith("aipm: error: runner ray: cannot reach the Ray cluster (auto: ") and \
        proc.stderr.endswith("Connection refused\n") and proc.stderr.count("\n") == 1, proc.stderr
    assert _untouched(project, before)


def test_an_address_whose_port_answers_but_is_no_ray_cluster_is_found_before_any_attempt(project, tmp_path):
    """Another service's port (a web server here): the probe connected, and ray.init retried its GCS for some 12
    minutes, deaf to signals and holding the attempt's place and locks, until the task's timeout. In a namespace of
    its own, with the web server inside it."""
    if not RAY.exists():
        pytest.skip("ray is not installed (pip install '.[ray]')")
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root with unshare for a loopback-only network namespace")
    write_task(project.order(), "T", command="true", timeout=90)
    before = snapshot(project.root)
    env = dict(os.environ, RAY_ADDRESS="127.0.0.1:8899", AIPM_ENABLE_MONITORING="false")
    script = (f"ip link set lo up && {sys.executable} -m http.server -b 127.0.0.1 8899 >/dev/null 2>&1 & web=$!; "
              f"for i in $(seq 100); do {sys.executable} -c 'import socket; socket.create_connection((\"127.0.0.1\", "
              f"8899))' 2>/dev/null && break; sleep 0.1; done; "
              f'"$@"; s=$?; kill $web; exit $s')
    proc = subprocess.run(["unshare", "-n", "sh", "-c", script, "-", sys.executable, "-m", "aipm", "--root",
                           str(project.root), "run", "ORD", "--runner", "ray"],
                          capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("aipm: error: runner ray: cannot reach the Ray cluster (127.0.0.1:8899): no Ray "
                                  "cluster answers at this port") and proc.stderr.count("\n") == 1, proc.stderr
    assert _untouched(project, before)


def test_a_bad_runner_setting_names_it(project):
    write_task(project.order(), "T", command="true")
    (project.root / "aipm.yaml").write_text("runner: slurm\n")
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 2 and "runner" in proc.stderr and "slurm" in proc.stderr
    (project.root / "aipm.yaml").write_text("max_workers: 5\n")
    proc = project.aipm("run", "ORD", env={"AIPM_RUNNER": "k8s"})
    assert proc.returncode == 2 and "AIPM_RUNNER" in proc.stderr
    assert task_statuses(project.order()) == {"T": "QUEUED"}


def test_a_worktree_task_runs_on_ray_in_its_worktree_and_is_merged(cluster, tmp_path):
    top = tmp_path / "repo"
    top.mkdir()
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@e", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@e", GIT_CONFIG_GLOBAL=os.devnull)
    project = Project(top)
    (top / "src").mkdir()
    (top / "src" / "a.txt").write_text("start\n")
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "init"]):
        subprocess.run(["git", *args], cwd=top, env=env, check=True, capture_output=True)
    where, probe = tmp_path / "where", tmp_path / "ancestry.py"
    probe.write_text(ANCESTRY)
    write_task(project.order(), "W", workspace="worktree", target_files=["src/a.txt"],
               command=f'{sys.executable} {probe} {where}; pwd >> {where}; echo "from W" >> src/a.txt')
    result = aipm(cluster, project, "run", "ORD", "--runner", "ray")
    assert result.returncode == 0, result.stdout + result.stderr
    assert where.read_text().splitlines() == ["W ray", str(top / ".aipm" / "worktrees" / "ORD" / "W")]
    assert (top / "src" / "a.txt").read_text() == "start\nfrom W\n"
    assert subprocess.run(["git", "worktree", "list"], cwd=top, capture_output=True, text=True).stdout.count("\n") == 1


def test_a_command_gets_the_gpus_ray_gave_its_task(cluster, tmp_path):
    """Ray's per-task variables reach the command (they stayed in the Ray worker: both saw no GPU). The cluster has
    two (fake) GPUs; each task waits for the other, so both hold one at once and must see different ones."""
    project = Project(tmp_path)
    seen = tmp_path / "seen"
    for tid in ("G1", "G2"):
        write_task(project.order(), tid, target_files=[f"{tid}.txt"], resources={"cpus": 1, "gpus": 1}, command=(
            f'echo "$CUDA_VISIBLE_DEVICES $OMP_NUM_THREADS" >> {seen}; '
            f'for i in $(seq 300); do [ "$(wc -l < {seen})" -ge 2 ] && break; sleep 0.2; done'))
    result = aipm(cluster, project, "run", "ORD", "--runner", "ray", "--max-workers", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(seen.read_text().splitlines()) == ["0 1", "1 1"]


def test_a_command_that_asks_for_no_gpu_sees_its_nodes_devices_not_the_submitters(cluster, tmp_path):
    """The visible-devices variables are Ray's on the node, as a Ray task sees them: here the head hides its GPUs
    from a task that asks for none (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1). The command got the submitting shell's
    CUDA_VISIBLE_DEVICES, which names a device of another machine (on the node, maybe one Ray gave another task)."""
    project = Project(tmp_path)
    seen = tmp_path / "seen"
    write_task(project.order(), "T", command=f'echo "[${{CUDA_VISIBLE_DEVICES-unset}}]" > {seen}')
    result = cluster.ns([sys.executable, "-m", "aipm", "--root", str(tmp_path), "run", "ORD", "--runner", "ray"],
                        env=dict(cluster.env, CUDA_VISIBLE_DEVICES="7"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert seen.read_text() == "[]\n"


def test_cancel_ends_a_command_slow_to_stop_on_the_node(cluster, tmp_path):
    """A command that ignores SIGTERM is SIGKILLed after the guard's grace: Ray's kill of the Ray worker's
    process group must not take the guard's keeper down with it before that."""
    project = Project(tmp_path)
    pid_file = tmp_path / "pid"
    write_task(project.order(), "T", target_files=["a.txt"],
               command=f'trap "" TERM; echo $$ > {pid_file}; while true; do sleep 0.2; done')
    assert aipm(cluster, project, "launch", "ORD", "--runner", "ray").returncode == 0
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 120)
    pid = int(pid_file.read_text())
    try:
        assert aipm(cluster, project, "cancel", "ORD/T").returncode == 0
        wait_for(lambda: not pid_alive(pid), 30)  # the guard's grace is 3 s
    finally:
        if pid_alive(pid):
            os.killpg(pid, signal.SIGKILL)


def _attempt_process(pgid: int) -> int | None:
    """The local worker's `python -m aipm.cluster.attempt` in the worker's process group, if it runs yet."""
    for pid in _in_group(pgid):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"aipm.cluster.attempt" in f.read():
                    return pid
    return None


def _in_group(pgid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[2]) == pgid:
                        found.append(int(entry))
    return found


def test_cancel_waits_until_the_command_has_ended_on_the_node(cluster, tmp_path):
    """The local worker holds the locks: on `aipm cancel` (SIGTERM) it must cancel the Ray task itself and stay
    until the command has ended on the node. ray.init's handlers made it die at once ('*** SIGTERM received'),
    leaving the command to Ray's fate-sharing while the locks were already free."""
    import select
    import threading
    import time


    project = Project(tmp_path)
    beats, dead, pid_file = tmp_path / "beats", tmp_path / "dead", tmp_path / "pid"
    # On TERM the command goes on writing heartbeats for a while (within the guard's grace), then says it died.
    stamp = f"date +%s.%N >> {beats}"
    write_task(project.order(), "T", target_files=["a.txt"], command=(
        f"trap '{stamp}; sleep 0.5; {stamp}; sleep 0.5; {stamp}; echo x > {dead}; exit 0' TERM; "
        f"echo $$ > {pid_file}; while true; do {stamp}; sleep 0.2; done"))
    assert aipm(cluster, project, "launch", "ORD", "--runner", "ray").returncode == 0
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 120)
    command = int(pid_file.read_text())
    rec = Runtime(project.root).read_record("ORD", "T")
    worker = wait_for(lambda: _attempt_process(rec.pgid), 30)
    fd = os.pidfd_open(worker)
    exited: list[float] = []

    def watch() -> None:
        select.select([fd], [], [], 120)
        exited.append(time.time())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert aipm(cluster, project, "cancel", "ORD/T").returncode == 0
        watcher.join(120)
        wait_for(lambda: not pid_alive(command), 30)
        assert exited, "the local worker did not exit"
        log = (tmp_path / ".aipm" / "logs" / "ORD" / "T.1.log").read_text()
        assert "[aipm] stopped by signal 15: Ray task cancelled" in log, log
        assert dead.exists(), "the command was not let run its TERM trap to the end"
        last_beat = float(beats.read_text().split()[-1])
        assert last_beat <= exited[0], f"the command wrote {last_beat - exited[0]:.2f} s after the worker exited"
    finally:
        os.close(fd)
        if pid_alive(command):
            os.killpg(command, signal.SIGKILL)


def test_a_machine_that_is_no_node_of_the_cluster_is_found_before_any_attempt(cluster, tmp_path):
    """A Ray driver joins its cluster through a raylet of its own machine: here aipm runs in a PID namespace of its
    own, where Ray finds none. Each attempt's ray.init waited a minute for one, then ended it with exit 75 ("Failed
    to connect to Ray cluster at ..."), a cluster that answers named as the one not reached."""
    project = Project(tmp_path)
    write_task(project.order(), "T", command="true", target_files=["a.txt"])
    before = snapshot(project.root)
    proc = cluster.ns(["unshare", "-p", "-f", "--mount-proc", sys.executable, "-m", "aipm", "--root", str(tmp_path),
                       "run", "ORD", "--runner", "ray"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr == (f"aipm: error: runner ray: cannot reach the Ray cluster (127.0.0.1:{PORT}): this machine "
                           f"is no node of it (a Ray driver needs one: `ray start --address=127.0.0.1:{PORT}` here)\n")
    assert _untouched(project, before)


def test_a_stop_while_the_attempt_reaches_the_cluster_ends_it_at_once(tmp_path):
    """Ray's GCS check of a port that takes the connection and never answers lasts some 15 s, ray.init can last
    long too, and both ran with the stop signals blocked: a stop waited for them, past the supervisor's 5 s grace,
    which SIGKILLed the group (nothing said). The attempt is let go only once it is in Ray's start (its threads)."""
    if not RAY.exists():
        pytest.skip("ray is not installed (pip install '.[ray]')")
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, never accepts: the kernel takes connections
        argv = [sys.executable, "-m", "aipm.cluster.attempt", "--address", f"127.0.0.1:{silent.getsockname()[1]}",
                "--", "true"]
        attempt = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(lambda: len(os.listdir(f"/proc/{attempt.pid}/task")) > 1, 60)
            attempt.send_signal(signal.SIGTERM)
            out, _ = attempt.communicate(timeout=120)
        finally:
            if attempt.poll() is None:
                attempt.kill()
    assert attempt.returncode == 128 + signal.SIGTERM, out
    assert "[aipm] stopped by signal 15 while reaching the Ray cluster: no Ray task was submitted" in out, out


def test_a_request_no_node_can_hold_fails_with_the_reason(cluster, tmp_path):
    """4 CPUs of a cluster whose only node has 2: the attempt waited in Ray's queue, its log silent, until its
    timeout ended it ("timed out after 60 s"). Ray's autoscaler (here the one of a cluster started by hand, whose
    node types are its nodes) says no node type can hold it: the attempt ends so, with that reason."""
    project = Project(tmp_path)
    write_task(project.order(), "T", command="true", resources={"cpus": 4}, timeout=60)
    assert aipm(cluster, project, "run", "ORD", "--runner", "ray").returncode == 1
    task = yaml.safe_load((project.order() / "T.yaml").read_text())
    why = ("Ray cannot place the attempt: no node of the cluster can hold resources {cpus: 4}, and its autoscaler "
           "can add none")
    assert (task["status"], task["exit_code"], task["reason"]) == ("FAILED", 75, why), task


def _kill_the_cluster(c: Cluster, keep: set[int]) -> None:
    """Every process of the cluster's namespace but `keep` and the holder: the head's GCS and raylet, its Ray
    workers, the guards and commands on it (a node that died), while aipm and its local workers live on."""
    mine = os.readlink(f"/proc/{c.holder.pid}/ns/net")
    for _ in range(3):
        for pid in _in_namespace(mine) - keep - {c.holder.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_cluster_lost_mid_run_stops_the_run_and_spends_no_attempt(tmp_path):
    """Each attempt Ray lost was a failed attempt (exit 75): a cluster gone mid-run spent every task's max_attempts
    on it, one after the other, and the run ended 1 with them all FAILED. The run now stops at the first such loss
    with one line, the tasks QUEUED with their attempts not counted, exit 2 as at a start where it cannot be
    reached."""
    if not RAY.exists() or os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs ray and root with unshare/nsenter")
    c = Cluster()  # its own: this test kills it
    try:
        project = Project(tmp_path)
        told = tmp_path / "told"
        (tmp_path / "aipm.yaml").write_text(f"notify: 'echo \"$AIPM_EVENT $AIPM_STATUS $AIPM_DETAIL\" >> {told}'\n")
        order = project.order()
        for tid in ("A", "B", "C"):
            write_task(order, tid, target_files=[f"{tid}.txt"], max_attempts=3,
                       command=f"touch {tmp_path}/{tid}.started; sleep 600")
        run = c.popen([sys.executable, "-m", "aipm", "--root", str(tmp_path), "run", "ORD", "--runner", "ray",
                       "--max-workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                      start_new_session=True)
        wait_for(lambda: len(list(tmp_path.glob("*.started"))) == 2, 120)
        rt = Runtime(tmp_path)
        keep = {run.pid} | {pid for rec in rt.records() for pid in _in_group(rec.pgid)}
        _kill_the_cluster(c, keep)
        out, err = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        c.close()
    tasks = {tid: yaml.safe_load((order / f"{tid}.yaml").read_text()) for tid in ("A", "B", "C")}
    assert {tid: (t.get("status", "QUEUED"), t.get("attempts", 0)) for tid, t in tasks.items()} == dict.fromkeys(
        ("A", "B", "C"), ("QUEUED", 0)), (tasks, out, err)
    assert run.returncode == 1, out + err  # (as a budget stop: what finished is kept)
    lines = [line for line in err.splitlines() if line.startswith("aipm: error: runner ray:")]
    assert len(lines) == 1 and "the Ray cluster was lost (cannot reach the Ray cluster" in lines[0], err
    assert err.endswith("ORD: QUEUED 3\n"), err  # the closing counts, as every run ends
    wait_for(told.exists, 30)  # and the notify command, as every end of a run but Ctrl-C
    assert told.read_text().startswith("order_finished INCOMPLETE ORD: runner ray: the Ray cluster was lost"), \
        told.read_text()


def test_a_run_whose_one_attempt_was_lost_with_the_cluster_says_its_stop_once(tmp_path):
    """The attempt lost with the cluster is re-queued as it ends (said so); the stop of the rest then said
    "stopped the Ray cluster was lost (...); re-queued: none" too, with nothing left to stop."""
    if not RAY.exists() or os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs ray and root with unshare/nsenter")
    c = Cluster()  # its own: this test kills it
    try:
        project = Project(tmp_path)
        write_task(project.order(), "A", target_files=["a.txt"], command=f"touch {tmp_path}/A.started; sleep 600")
        run = c.popen([sys.executable, "-m", "aipm", "--root", str(tmp_path), "run", "ORD", "--runner", "ray"],
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for((tmp_path / "A.started").exists, 120)
        _kill_the_cluster(c, {run.pid, *_in_group(Runtime(tmp_path).read_record("ORD", "A").pgid)})
        out, _ = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()
        c.close()
    assert run.returncode == 1, out
    stops = [line for line in out.splitlines() if line.startswith("stopped")]
    assert len(stops) == 1 and stops[0].endswith("re-queued: A"), out


def test_a_cluster_lost_under_a_launch_requeues_its_task_and_starts_no_successor(tmp_path):
    """`aipm launch`: the detached worker that owns A finds A's attempt lost with the cluster; A is QUEUED again,
    its attempt not counted, and B (which depends on A) is not started to be lost the same way."""
    if not RAY.exists() or os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs ray and root with unshare/nsenter")
    c = Cluster()  # its own: this test kills it
    try:
        project = Project(tmp_path)
        order = project.order()
        write_task(order, "A", target_files=["a.txt"], max_attempts=3,
                   command=f"touch {tmp_path}/A.started; sleep 600")
        write_task(order, "B", target_files=["b.txt"], depends_on=["A"], command="true")
        assert aipm(c, project, "launch", "ORD", "--runner", "ray").returncode == 0
        wait_for((tmp_path / "A.started").exists, 120)
        rt = Runtime(tmp_path)
        [rec] = rt.records()
        keep = {pid for pid in _in_group(rec.pgid)} | {rec.owner_pid}
        _kill_the_cluster(c, keep)
        wait_for(lambda: not rt.records() and task_statuses(order)["A"] == "QUEUED", 120)
    finally:
        c.close()
    a, b = (yaml.safe_load((order / f"{t}.yaml").read_text()) for t in ("A", "B"))
    assert (a["status"], a["attempts"]) == ("QUEUED", 0), a
    assert b.get("status", "QUEUED") == "QUEUED" and not b.get("attempts"), b
    assert "the Ray cluster was lost" in (tmp_path / ".aipm" / "logs" / "ORD" / "A.1.log").read_text()


def test_an_agent_attempt_whose_ray_worker_died_before_its_first_event_counts_its_cap(cluster, tmp_path):
    """Ray lost the attempt (its worker killed: the OOM killer, a node gone) while claude ran on the node, before its
    first event: exit 75 was taken for an attempt that exited by itself, so one that never began, and its cap was
    not counted, though what it did on the node is unseen. The cluster lives on: a failed attempt, its cap counted."""
    project = Project(tmp_path)
    (tmp_path / "aipm.yaml").write_text("max_workers: 1\nworker:\n  agent: claude\n")
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.3\n")
    write_task(order, "A", prompt="@hang", max_attempts=1, max_cost_usd=0.1, target_files=["a.txt"])
    journal = tmp_path / "journal.jsonl"
    env = dict(cluster.env, PATH=f"{Path(__file__).parent / 'agents'}{os.pathsep}{os.environ['PATH']}",
               FAKE_AGENT_JOURNAL=str(journal))
    run = subprocess.Popen(["nsenter", "-t", str(cluster.holder.pid), "-n", sys.executable, "-m", "aipm", "--root",
                            str(tmp_path), "run", "ORD", "--runner", "ray"], env=env, cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(journal.exists, 120)  # claude runs on the node, before its first event
        workers = [pid for pid in _in_namespace(os.readlink(f"/proc/{cluster.holder.pid}/ns/net"))
                   if _cmdline(pid).startswith(b"ray::run_on_node")]
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)
        out, _ = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            run.kill()
    task = yaml.safe_load((order / "A.yaml").read_text())
    assert (task["status"], task["exit_code"]) == ("FAILED", 75), (task, out)
    assert task["reason"].startswith("Ray ended the attempt: "), task
    assert task.get("cost_unreported_usd") == 0.1, (task, out)


def _cmdline(pid: int) -> bytes:
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    return b""


def test_ps_says_a_ray_attempts_cpu_and_memory_are_not_measured_here(cluster, tmp_path):
    """`aipm ps` showed the CPU and memory of the local Ray driver (a Python waiting on the cluster) as the
    attempt's: a command burning a whole CPU on its node read as the driver's few per cent. They are n/a here."""
    project = Project(tmp_path)
    gate, busy = tmp_path / "gate", tmp_path / "busy"
    write_task(project.order(), "T", target_files=["a.txt"],
               command=f"touch {busy}; while [ ! -e {gate} ]; do :; done")  # a whole CPU, until the gate
    try:
        assert aipm(cluster, project, "launch", "ORD", "--runner", "ray").returncode == 0
        wait_for(busy.exists, 120)
        ps = aipm(cluster, project, "ps", "--json")
        [worker] = json.loads(ps.stdout)["workers"]
        assert (worker["cpu_percent"], worker["memory_mb"]) == (None, None), worker
        assert worker["runner"] == "ray", worker
        assert worker["elapsed"] is not None and worker["state"] == "alive", worker
        table = aipm(cluster, project, "ps").stdout
        assert "n/a: Ray node" in table, table
    finally:
        gate.touch()
    wait_for(lambda: task_statuses(project.order()) == {"T": "DONE"}, 120)


@pytest.mark.parametrize("stopped", [False, True], ids=["cluster-not-reached", "stopped-while-reaching"])
def test_an_agent_attempt_whose_ray_task_was_never_submitted_counts_no_cap(tmp_path, stopped):
    """A claude attempt stopped (Ctrl-C of the run, a timeout, a cancel) while its driver still reached the cluster,
    or that found the cluster gone (re-queued when the run stops for it), ended without claude ever starting; but
    killed, or re-queued, it counted its cap as spent: a Ctrl-C right after a run's start put every such attempt's
    cap against the order's budget. The real driver reaches a port that refuses, or one that never answers and is
    stopped meanwhile; the re-queue is recovery.interrupt, as a run's stop does it."""
    import socket

    from aipm import recovery
    from aipm.record import Record
    from aipm.restore import counters
    from aipm.store import load_task

    if not RAY.exists():
        pytest.skip("ray is not installed (pip install '.[ray]')")
    project = Project(tmp_path)
    path = write_task(project.order(), "A", prompt="do it", target_files=["a.txt"], max_cost_usd=0.1,
                      status="IN_PROGRESS", attempts=1, started_at="2026-01-01T00:00:00+00:00")
    log, exit_file = tmp_path / "A.1.log", str(tmp_path / "A.1.exit")
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, never accepts
        address = f"127.0.0.1:{silent.getsockname()[1]}" if stopped else "127.0.0.1:1"
        argv = [sys.executable, "-m", "aipm.cluster.attempt", "--address", address, "--exit-file", exit_file,
                "--", "claude", "-p"]
        with log.open("w") as out:
            driver = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            if stopped:
                wait_for(lambda: len(os.listdir(f"/proc/{driver.pid}/task")) > 1, 60)  # in Ray's start
                driver.send_signal(signal.SIGTERM)
            assert driver.wait(120) == (128 + signal.SIGTERM if stopped else 75)
        finally:
            if driver.poll() is None:
                driver.kill()
    task = load_task(path, tmp_path)
    rec = Record(order="ORD", order_dir=str(path.parent), task="A", task_file=str(path), attempt=1,
                 targets=["a.txt"], log=str(log), exit_file=exit_file, started_at=task.started_at, pid=driver.pid,
                 command=argv, agent="claude", cost_cap=0.1, counters=counters(task))
    recovery.interrupt(Runtime(tmp_path), task, rec, "stopped by the user (Ctrl-C)")
    after = yaml.safe_load(path.read_text())
    assert (after["status"], after["attempts"]) == ("QUEUED", 0), after
    assert "cost_unreported_usd" not in after, after


def test_an_attempt_whose_driver_gives_up_on_a_dead_gcs_first_spends_no_attempt(tmp_path):
    """Only the cluster's GCS dies. The attempt's Ray driver may give up on it before its task is found lost: Ray
    ends it with exit 1 ("Failed to connect to GCS within 60 seconds"), not the driver's exit 75, so it counted as a
    failed attempt (about one run in five). Here the driver's wait for the GCS is made short
    (RAY_gcs_rpc_server_reconnect_timeout_s, the driver's own: the raylet keeps its minute), so it always gives up
    first: its result never came back, and the lost-cluster check re-queues the task, attempt not counted."""
    if not RAY.exists() or os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs ray and root with unshare/nsenter")
    c = Cluster()  # its own: this test kills its GCS
    try:
        project = Project(tmp_path)
        write_task(project.order(), "A", target_files=["a.txt"], max_attempts=3,
                   command=f"touch {tmp_path}/A.started; sleep 600")
        env = dict(c.env, RAY_gcs_rpc_server_reconnect_timeout_s="3")
        run = subprocess.Popen(["nsenter", "-t", str(c.holder.pid), "-n", sys.executable, "-m", "aipm", "--root",
                                str(tmp_path), "run", "ORD", "--runner", "ray"], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: (tmp_path / "A.started").exists() or run.poll() is not None, 120)
        assert run.poll() is None, run.communicate()[0]
        gcs = [pid for pid in _in_namespace(os.readlink(f"/proc/{c.holder.pid}/ns/net"))
               if b"gcs_server" in _cmdline(pid)]
        assert gcs, "no gcs_server in the cluster's namespace"
        for pid in gcs:
            os.kill(pid, signal.SIGKILL)
        out, _ = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()
        c.close()
    log = (tmp_path / ".aipm" / "logs" / "ORD" / "A.1.log").read_text()
    assert "Failed to connect to GCS" in log, log  # the driver's end was Ray's exit 1, not the driver's 75
    task = yaml.safe_load((project.order() / "A.yaml").read_text())
    assert (task.get("status", "QUEUED"), task.get("attempts", 0)) == ("QUEUED", 0), (task, out, log)
    assert run.returncode == 1 and "the Ray cluster was lost" in out, out
