"""The compiled worker wrapper (aipm/wrapper.c): where it runs a command, the outcome is the shell wrapper's."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aipm import locks, runner, wrapper
from conftest import write_task

pytestmark = pytest.mark.skipif(wrapper.binary() is None, reason="the wrapper cannot be built here (no cc / x86-64)")


def _run(tmp_path: Path, command, tag: str, cwd: Path | None = None, abandon: bool = False) -> tuple:
    """(exit code, exit file, log) of one worker started the way the launcher starts it."""
    exit_file, log = tmp_path / f"{tag}.exit", tmp_path / f"{tag}.log"
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    spawning = runner.begin(command, exit_file=str(exit_file), env=env, cwd=str(cwd or tmp_path), log=str(log),
                            background=False)
    if abandon:
        spawning.abandon()
        code = None
    else:
        code = runner.reap(spawning.finish())
    written = exit_file.read_text() if exit_file.exists() else None
    return code, written, log.read_text() if log.exists() else ""


def _both(tmp_path: Path, monkeypatch, command, **options) -> tuple[tuple, tuple]:
    """The same command through the compiled wrapper, then through the shell; the first must really be compiled."""
    spawn, started = runner.posix_spawn.spawn, []
    monkeypatch.setattr(runner.posix_spawn, "spawn", lambda program, *a, **k: started.append(program) or spawn(
        program, *a, **k))
    compiled = _run(tmp_path, command, "compiled", **options)
    with monkeypatch.context() as m:
        m.setattr(wrapper, "binary", lambda: None)
        shell = _run(tmp_path, command, "shell", **options)
    assert started == [wrapper.binary(), runner.SHELL]
    return compiled, shell


SCRIPT = "echo from a script without a shebang\nexit 5\n"
ARGS = ["a b", "$HOME", "*", "", "--x=1;2"]


@pytest.mark.parametrize("case", ["exit code", "signal", "no shebang", "not executable", "not found", "arguments",
                                  "directory"])
def test_a_program_ends_the_same_through_either_wrapper(tmp_path, monkeypatch, case):
    py = sys.executable
    (tmp_path / "noshebang").write_text(SCRIPT)
    (tmp_path / "noshebang").chmod(0o755)
    (tmp_path / "plain.txt").write_text("not a program\n")
    (tmp_path / "sub").mkdir()
    command, cwd = {
        "exit code": ([py, "-c", "print('out'); raise SystemExit(3)"], None),
        "signal": ([py, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"], None),
        "no shebang": ("noshebang", None),  # found on PATH, run by /bin/sh as a shell would
        "not executable": ("./plain.txt", None),
        "not found": ("no-such-program-xyz", None),
        "arguments": ([py, "-c", "import sys; print(sys.argv[1:])", *ARGS], None),
        "directory": ([py, "-c", "import os; print(os.getcwd(), os.environ['PWD'])"], tmp_path / "sub"),
    }[case]
    compiled, shell = _both(tmp_path, monkeypatch, command, cwd=cwd)
    assert compiled[:2] == shell[:2]
    expected = {"exit code": 3, "signal": 128 + 15, "no shebang": 5, "not executable": 126, "not found": 127,
                "arguments": 0, "directory": 0}[case]
    assert compiled[:2] == (expected, f"{expected}\n")
    if case in ("not executable", "not found", "signal"):  # each says why in its own words
        assert {"not executable": "plain.txt: Permission denied", "not found": "no-such-program-xyz: not found",
                "signal": "killed by signal 15"}[case] in compiled[2]
    else:
        assert compiled[2] == shell[2]
    if case == "arguments":
        assert compiled[2] == f"{ARGS}\n"
    if case == "directory":
        assert compiled[2] == f"{tmp_path / 'sub'} {tmp_path / 'sub'}\n"


def test_an_abandoned_launch_runs_nothing_through_either_wrapper(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    compiled, shell = _both(tmp_path, monkeypatch, ["touch", str(marker)], abandon=True)
    assert compiled == shell == (None, None, "")
    assert not marker.exists()


def test_a_run_starts_programs_through_the_compiled_wrapper_and_shell_builtins_through_the_shell(project):
    order = project.order()
    parent = "import os, sys; print(os.readlink(f'/proc/{os.getppid()}/exe'))"
    (project.root / "parent.py").write_text(parent)
    write_task(order, "PROGRAM", command=f"{sys.executable} parent.py")
    write_task(order, "BUILTIN", command="echo -e -n x")  # dash's echo prints its options; coreutils' reads them
    proc = project.aipm("run", "ORD")
    assert proc.returncode == 0, proc.stderr
    statuses = {p.stem: yaml.safe_load(p.read_text())["status"] for p in order.glob("*.yaml")}
    assert statuses == {"PROGRAM": "DONE", "BUILTIN": "DONE"}
    logs = project.root / ".aipm" / "logs" / "ORD"
    assert (logs / "PROGRAM.1.log").read_text().splitlines()[0] == wrapper.binary()
    builtin = subprocess.run(["/bin/sh", "-c", "echo -e -n x"], capture_output=True, text=True).stdout
    assert (logs / "BUILTIN.1.log").read_text().startswith(builtin)


def test_a_wrapper_aged_out_of_tmp_is_replaced_by_the_shell_then_built_again(tmp_path, monkeypatch):
    (tmp_path / "state").mkdir()
    monkeypatch.setattr(locks, "STATE_BASE", str(tmp_path / "state"))
    wrapper.forget()
    try:
        built = wrapper.binary()
        assert built and built.startswith(str(tmp_path / "state"))
        os.unlink(built)  # as systemd-tmpfiles would, between two starts
        code, written, _ = _run(tmp_path, [sys.executable, "-c", "raise SystemExit(4)"], "fallback")
        assert (code, written) == (4, "4\n")
        assert wrapper.binary() == built and os.access(built, os.X_OK)
    finally:
        wrapper.forget()


def test_where_the_wrapper_cannot_be_built_the_reason_is_kept_and_the_shell_runs_commands(tmp_path, monkeypatch):
    (tmp_path / "state").mkdir()
    monkeypatch.setattr(locks, "STATE_BASE", str(tmp_path / "state"))
    monkeypatch.setenv("CC", "false")
    wrapper.forget()
    try:
        assert wrapper.binary() is None
        failed = list((tmp_path / "state" / f"aipm-{os.getuid()}" / "bin").glob("*.failed"))
        assert len(failed) == 1 and "false exited 1" in failed[0].read_text()
        monkeypatch.setenv("CC", "/no/such/compiler")  # the marker is read: no second attempt
        wrapper.forget()
        assert wrapper.binary() is None
        assert "false exited 1" in failed[0].read_text()
        code, written, _ = _run(tmp_path, [sys.executable, "-c", "raise SystemExit(6)"], "shell")
        assert (code, written) == (6, "6\n")
        assert not stat.S_IMODE(os.stat(tmp_path / "state" / f"aipm-{os.getuid()}").st_mode) & 0o077
    finally:
        wrapper.forget()
