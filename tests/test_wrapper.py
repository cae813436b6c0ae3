"""The worker wrapper: a string command of plain words runs as argv (no subshell); the shell reads the rest."""

from __future__ import annotations

import sys

import yaml

from conftest import write_task

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

    from aipm import runner, runtime

    read = runtime.process_ctime
    fallbacks = []
    monkeypatch.setattr(runtime, "process_ctime", lambda pid: fallbacks.append(pid) or read(pid))
    seen = []
    for n in range(200):
        pid = runner.spawn(["true"], exit_file=str(tmp_path / f"{n}.exit"), env=dict(os.environ), cwd=str(tmp_path),
                           log=str(tmp_path / "log"), started=lambda pid, ctime: seen.append((pid, ctime)))
        assert seen[-1] == (pid, read(pid))  # unreaped, even if done: /proc still shows its start
        os.kill(pid, 9)
        runner.reap(pid)
    assert len(fallbacks) < 100  # a spawn straddles a 10 ms tick rarely (22 of 600 when measured)
