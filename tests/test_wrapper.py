"""The worker wrapper: a string command of plain words runs as argv (no subshell); the shell reads the rest."""

from __future__ import annotations

import sys

import pytest
import yaml

from conftest import wait_for, write_task

# Who started me: the wrapper (the session leader, pid = pgid) or a subshell of it.
PARENT = "import os, sys; open(sys.argv[1], 'w').write(str(os.getppid() == os.getpgid(0)))\n"


def test_plain_commands_run_straight_from_the_wrapper_and_shell_commands_keep_their_subshell(project):
    order = project.order()
    (project.root / "parent.py").write_text(PARENT)
    py = sys.executable
    write_task(order, "PLAIN", command=f"{py} parent.py plain.txt")
    write_task(order, "SHELL", command=f"{py} parent.py shell.txt; exit 3", max_attempts=1)
    write_task(order, "EXIT", command="exit 4", max_attempts=1)  # a builtin that would end the wrapper itself
    write_task(order, "MISSING", command="no-such-program-xyz --flag", max_attempts=1)
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 1, proc.stderr
    assert (project.root / "plain.txt").read_text() == "True"
    assert (project.root / "shell.txt").read_text() == "False"
    codes = {p.stem: yaml.safe_load(p.read_text()) for p in order.glob("*.yaml")}
    assert {tid: (t["status"], t.get("exit_code")) for tid, t in codes.items()} == {
        "PLAIN": ("DONE", 0), "SHELL": ("FAILED", 3), "EXIT": ("FAILED", 4), "MISSING": ("FAILED", 127)}


def test_the_start_time_given_at_spawn_is_the_one_proc_shows(tmp_path, monkeypatch):
    """runner.spawn hands `started` the worker's start time, mostly without reading /proc (a spawn within one
    clock tick); it must equal what /proc shows, or a later owner would take the live worker for a reused pid."""
    import os

    from aipm import liveness, runner

    read = liveness.process_ctime
    fallbacks = []
    monkeypatch.setattr(liveness, "process_ctime", lambda pid: fallbacks.append(pid) or read(pid))
    seen = []
    for n in range(200):
        pid = runner.spawn(["true"], exit_file=str(tmp_path / f"{n}.exit"), env=dict(os.environ), cwd=str(tmp_path),
                           log=str(tmp_path / "log"), started=lambda pid, ctime: seen.append((pid, ctime)))
        assert seen[-1] == (pid, read(pid))  # unreaped, even if done: /proc still shows its start
        os.kill(pid, 9)
        runner.reap(pid)
    assert len(fallbacks) < 100  # a spawn straddles a 10 ms tick rarely (22 of 600 when measured)


def test_posix_spawn_through_libc_applies_the_file_actions_and_the_new_session(tmp_path):
    """aipm.posix_spawn (ctypes, off the GIL) behaves as os.posix_spawn for what the wrapper uses."""
    import os

    from aipm import posix_spawn

    log = tmp_path / "log"
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
               (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
               (os.POSIX_SPAWN_DUP2, 1, 2)]
    pid = posix_spawn.spawn("/bin/sh", ["sh", "-c", 'echo "$GREETING"; echo oops >&2; exec sleep 30'],
                            {"GREETING": "hello", "PATH": os.defpath}, actions, setsid=True)
    try:
        assert os.getsid(pid) == pid and os.getpgid(pid) == pid  # its own session and process group
        wait_for(lambda: log.read_text() == "hello\noops\n")
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    missing = [(os.POSIX_SPAWN_OPEN, 1, str(tmp_path / "gone" / "log"), os.O_WRONLY | os.O_CREAT, 0o644)]
    with pytest.raises(FileNotFoundError):
        posix_spawn.spawn("/bin/true", ["true"], {}, missing)
    with pytest.raises(FileNotFoundError):
        posix_spawn.spawn(str(tmp_path / "no-such-program"), ["x"], {}, [])


def test_a_wrapper_started_ahead_runs_nothing_when_its_launch_is_abandoned(tmp_path):
    """runner.begin starts the wrapper before the task's status is written; a launch that fails after that
    ends it without its command ever running, and reaps it."""
    import os
    import sys

    from aipm import offthread, runner

    marker = tmp_path / "ran"
    spawning = runner.begin(["touch", str(marker)], exit_file=str(tmp_path / "exit"), env=dict(os.environ),
                            cwd=str(tmp_path), log=str(tmp_path / "log"))
    spawning.abandon()
    assert spawning.pid and not marker.exists() and not (tmp_path / "exit").exists()
    # The helper thread that started it gets the GIL within 0.1 ms of asking, not CPython's 5 ms (offthread.py)
    assert sys.getswitchinterval() <= offthread.SWITCH_INTERVAL
    with pytest.raises(ChildProcessError):  # reaped: nothing of it is left
        os.waitpid(spawning.pid, os.WNOHANG)


def test_a_failed_status_write_ends_the_wrapper_started_for_it_and_requeues(project, monkeypatch):
    """The launch starts the worker's wrapper while it writes IN_PROGRESS; when that write fails, the task is
    QUEUED, the wrapper is gone, and the command never ran."""
    import os

    from aipm import starting
    from aipm import offthread, subreaper
    from aipm.launcher import Launcher
    from aipm.project import Project
    from aipm.settings import load_settings
    from aipm.supervisor import Supervisor
    from aipm.view import OrderView
    from aipm.writer import StaleWrite

    order = project.order()
    marker = project.root / "ran"
    write_task(order, "A", command=f"touch {marker}", target_files=["a.txt"])
    real = starting.update_task

    def failing(path, updates, expect=None, root=None):
        if isinstance(updates, dict) and updates.get("status") == "IN_PROGRESS":
            offthread.in_background(lambda: None).result()  # the wrapper is up (it waits for its go)
            raise StaleWrite("A changed meanwhile")
        return real(path, updates, expect=expect, root=root)

    monkeypatch.setattr(starting, "update_task", failing)
    settings = load_settings(project.root, {"enable_monitoring": False})
    launcher = Launcher(Project(project.root, settings.orders_dir), settings)
    sup = Supervisor(launcher)
    before = set(subreaper.children(os.getpid()))
    try:
        report = launcher.launch(OrderView(order, project.root, watch=False), owner=sup)
        assert [f["id"] for f in report.failed] == ["A"] and not report.launched
        offthread.in_background(lambda: None).result()  # whatever the helper thread was starting has started
        assert set(subreaper.children(os.getpid())) - before == set()  # the wrapper was ended and reaped
        assert yaml.safe_load((order / "A.yaml").read_text()).get("status", "QUEUED") == "QUEUED"
        assert not marker.exists()
    finally:
        sup.close()


def test_a_worker_starts_with_no_signal_blocked_and_sigpipe_at_its_default(tmp_path):
    """Python ignores SIGPIPE and SIGXFSZ, and a thread may block signals: a worker gets neither (a pipeline such
    as `yes | head` ends quietly, and a timeout's SIGTERM reaches it)."""
    import os
    import signal

    from aipm import runner

    log, exit_file = tmp_path / "log", tmp_path / "exit"
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        runner.spawn(["grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"], exit_file=str(exit_file),
                     env=dict(os.environ), cwd=str(tmp_path), log=str(log))
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    wait_for(lambda: exit_file.exists() and exit_file.read_text().strip() == "0")
    masks = dict(line.split(":\t") for line in log.read_text().splitlines())
    assert int(masks["SigBlk"], 16) == 0
    ignored = int(masks["SigIgn"], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1)) and not ignored & (1 << (signal.SIGXFSZ - 1))


def test_a_background_spawns_arguments_are_built_in_the_calling_thread(tmp_path, monkeypatch):
    """A worker's wrapper is spawned in a helper thread while the run's thread writes the task's status. The helper
    gets only the spawn call: where it also built the spawn's arguments (the environment encoded, the file actions),
    it held the GIL meanwhile and the run's thread waited for it (futex waits of 0.38 ms a B2 hand-over)."""
    import os
    import threading

    from aipm import posix_spawn, runner

    prepared, threads = posix_spawn.prepared, {}

    def watched(*args, **kwargs):
        threads["built"] = threading.current_thread()
        call = prepared(*args, **kwargs)

        def spawn():
            threads["spawned"] = threading.current_thread()
            return call()
        return spawn

    monkeypatch.setattr(posix_spawn, "prepared", watched)
    spawning = runner.begin(["true"], exit_file=str(tmp_path / "exit"), env=dict(os.environ), cwd=str(tmp_path),
                            log=str(tmp_path / "log"), background=True)
    assert runner.reap(spawning.finish()) == 0
    assert threads["built"] is threading.main_thread(), threads
    assert threads["spawned"] is not threading.main_thread(), threads
