"""The compiled worker wrapper (aipm/wrapper.c): where it runs a command, the outcome is the shell wrapper's."""

from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aipm import runner, statedir, wrapper
from conftest import wait_for, write_task
from test_chaos import tiny_disk  # noqa: F401 (a fixture)

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
    assert not Path(f"{exit_file}.w").exists()  # the compiled wrapper's early exit file: named, or removed
    return code, written, log.read_text() if log.exists() else ""


def _programs_started(monkeypatch) -> list[str]:
    """The programs runner starts from now on (the wrapper each worker runs under), in order."""
    prepared, started = runner.posix_spawn.prepared, []
    monkeypatch.setattr(runner.posix_spawn, "prepared", lambda program, *a, **k: started.append(program) or prepared(
        program, *a, **k))
    return started


def _both(tmp_path: Path, monkeypatch, command, **options) -> tuple[tuple, tuple]:
    """The same command through the compiled wrapper, then through the shell; the first must really be compiled."""
    started = _programs_started(monkeypatch)
    compiled = _run(tmp_path, command, "compiled", **options)
    with monkeypatch.context() as m:
        m.setattr(wrapper, "binary", lambda: None)
        shell = _run(tmp_path, command, "shell", **options)
    assert started == [wrapper.binary(), runner.SHELL]
    return compiled, shell


@pytest.fixture
def private_state(tmp_path, monkeypatch):
    """A state directory of the test's own: what is built, broken or marked there touches no other test."""
    (tmp_path / "state").mkdir()
    monkeypatch.setattr(statedir, "STATE_BASE", str(tmp_path / "state"))
    wrapper.forget()
    yield tmp_path / "state" / f"aipm-{os.getuid()}" / "bin"
    wrapper.forget()


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
    if case in ("not executable", "not found"):  # as `sh -c` says it: "aipm-wrapper: ..." read as aipm's failure
        assert compiled[2] == {"not executable": "sh: 1: ./plain.txt: Permission denied\n",
                               "not found": "sh: 1: no-such-program-xyz: not found\n"}[case]
    elif case == "signal":  # each says why in its own words
        assert "killed by signal 15" in compiled[2]
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


def test_the_exit_file_is_made_at_the_start_and_named_with_its_code_when_the_command_ends(tmp_path):
    """The compiled wrapper makes its exit file before its go (under `.w`, empty) so that the command's end costs
    no new file; the real name appears only with the code in it. If the early file is removed meanwhile (a
    sweep, a cleaner), the exit file is written as before."""
    for sweep in (False, True):
        exit_file, gate = tmp_path / f"x{sweep}.exit", tmp_path / f"gate{sweep}"
        early = Path(f"{exit_file}.w")
        spawning = runner.begin(["sh", "-c", f'while [ ! -e "{gate}" ]; do sleep 0.01; done; exit 4'],
                                exit_file=str(exit_file), env=dict(os.environ), cwd=str(tmp_path),
                                log=str(tmp_path / "log"), background=False)
        pid = spawning.finish()
        wait_for(early.exists)
        assert early.read_text() == "" and not exit_file.exists()  # running: no outcome under the real name
        if sweep:
            early.unlink()
        gate.touch()
        assert runner.reap(pid) == 4
        assert exit_file.read_text() == "4\n" and not early.exists()


def test_a_link_planted_as_the_early_exit_file_is_not_written_through(tmp_path):
    """A worker may write anywhere the user can, the state directory included: a symlink planted where the early
    exit file goes is neither followed nor truncated; the exit file is then written as before."""
    exit_file, victim = tmp_path / "p.exit", tmp_path / "victim"
    victim.write_text("keep me\n")
    Path(f"{exit_file}.w").symlink_to(victim)
    spawning = runner.begin(["sh", "-c", "exit 3"], exit_file=str(exit_file), env=dict(os.environ),
                            cwd=str(tmp_path), log=str(tmp_path / "log"), background=False)
    assert runner.reap(spawning.finish()) == 3
    assert victim.read_text() == "keep me\n" and exit_file.read_text() == "3\n"


@pytest.mark.parametrize("command", ["true", "false", "true --help x", "false -x", ["true", "a"], ["false"]])
def test_true_and_false_end_in_the_compiled_wrapper_as_the_shells_builtins_do(tmp_path, monkeypatch, command):
    """No shell and no program of that name: the compiled wrapper says their code itself, whatever the arguments,
    as `sh -c '"$@"'` does with its builtins (a `true` or `false` earlier on PATH is not run)."""
    for name in ("true", "false"):
        fake = tmp_path / name
        fake.write_text(f"#!/bin/sh\necho ran >> {tmp_path}/ran\nexit 7\n")
        fake.chmod(0o755)
    compiled, shell = _both(tmp_path, monkeypatch, command)
    words = command.split() if isinstance(command, str) else command
    code = 0 if words[0] == "true" else 1
    assert compiled == shell == (code, f"{code}\n", "")
    assert not (tmp_path / "ran").exists()


def test_the_sweep_of_spent_exit_files_keeps_the_early_file_of_a_live_worker(project):
    """remove_spent_exit_files keeps what a recorded worker's wrapper will name, `.w` included, and removes the
    early files of wrappers that are gone with no record left (killed before their command ended)."""
    from aipm.record import Record
    from aipm.runtime import Runtime

    rt = Runtime(project.root)
    live = Record(order="O", order_dir="", task="T1", task_file="", attempt=1, targets=[], log="",
                  exit_file=str(rt.exit_path("O", "T1", 1)), started_at="")
    rt.write_record(live)
    for name in ("T1.1.w", "T1.1.review.w", "T2.1", "T2.1.w", "T2.1.review.w"):
        (Path(live.exit_file).parent / name).write_text("")
    rt.remove_spent_exit_files("O")
    assert sorted(os.listdir(Path(live.exit_file).parent)) == ["T1.1.review.w", "T1.1.w"]


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


def test_a_wrapper_aged_out_of_tmp_is_replaced_by_the_shell_then_built_again(tmp_path, private_state):
    built = wrapper.binary()
    assert built and built.startswith(str(private_state))
    os.unlink(built)  # as systemd-tmpfiles would, between two starts
    code, written, _ = _run(tmp_path, [sys.executable, "-c", "raise SystemExit(4)"], "fallback")
    assert (code, written) == (4, "4\n")
    assert wrapper.binary() == built and os.access(built, os.X_OK)


def test_where_the_wrapper_cannot_be_built_the_reason_is_kept_and_the_shell_runs_commands(
        tmp_path, monkeypatch, private_state):
    monkeypatch.setenv("CC", "false")
    assert wrapper.binary() is None
    [failed] = private_state.glob("*.failed")
    assert failed.read_text() == "false\nfalse exited 1\n"
    os.utime(failed, (1, 1))
    wrapper.forget()
    assert wrapper.binary() is None  # the same compiler, a day later: tried again
    assert failed.stat().st_mtime > 1
    stamp = failed.stat().st_mtime_ns
    wrapper.forget()
    assert wrapper.binary() is None  # the same compiler, just failed: not tried again
    assert failed.stat().st_mtime_ns == stamp
    code, written, _ = _run(tmp_path, [sys.executable, "-c", "raise SystemExit(6)"], "shell")
    assert (code, written) == (6, "6\n")
    monkeypatch.setenv("CC", "gcc -std=gnu11")  # another compiler (a value with flags, as `ccache gcc`): tried
    wrapper.forget()
    assert wrapper.binary() and not failed.exists()
    assert not stat.S_IMODE(os.stat(private_state.parent).st_mode) & 0o077


def test_a_broken_wrapper_binary_gives_way_to_the_shell_and_is_built_again(tmp_path, private_state):
    built = wrapper.binary()
    Path(built).write_bytes(b"")  # truncated: a crash after the rename, a full disk, a worker's mischief
    code, written, _ = _run(tmp_path, [sys.executable, "-c", "raise SystemExit(4)"], "broken")
    assert (code, written) == (4, "4\n")
    assert wrapper.binary() == built and os.path.getsize(built) > 0


def test_sigchld_ignored_by_whoever_started_aipm_changes_no_exit_code(tmp_path, private_state):
    old = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        assert wrapper.binary()  # built and proven with SIGCHLD ignored
        _, written, log = _run(tmp_path, [sys.executable, "-c", "raise SystemExit(3)"], "chld")
    finally:
        signal.signal(signal.SIGCHLD, old)
    assert written == "3\n", log


def test_without_path_a_program_is_searched_where_the_shell_searches(tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k != "PATH"}
    started = _programs_started(monkeypatch)
    exit_file = tmp_path / "ldconfig.exit"
    pid = runner.spawn("ldconfig -p", exit_file=str(exit_file), env=env, cwd=str(tmp_path), log=str(tmp_path / "log"))
    assert (runner.reap(pid), exit_file.read_text()) == (0, "0\n")  # dash's default PATH has /sbin
    assert started == [wrapper.binary()]  # which runs the shell to search (and keeps the time limit)


def test_the_path_search_goes_past_an_entry_that_cannot_run_as_a_shell_does(tmp_path, monkeypatch):
    for name in ("loop", "noexec", "good"):
        (tmp_path / name).mkdir()
    os.symlink("tool", tmp_path / "loop" / "tool")  # ELOOP
    (tmp_path / "noexec" / "tool").write_text("exit 9\n")  # EACCES
    (tmp_path / "good" / "tool").write_text("#!/bin/sh\nexit 5\n")
    (tmp_path / "good" / "tool").chmod(0o755)
    path = f"{tmp_path}/loop:{tmp_path}/noexec:{tmp_path}/good"
    monkeypatch.setenv("PATH", f"{path}:{os.environ['PATH']}")
    compiled, shell = _both(tmp_path, monkeypatch, "tool")
    assert compiled[:2] == shell[:2] == (5, "5\n")
    (tmp_path / "good" / "tool").unlink()
    compiled, shell = _both(tmp_path, monkeypatch, "tool")
    assert compiled[:2] == shell[:2] == (127, "127\n")  # a file it may not run is passed over, as by dash
    assert "tool: not found" in compiled[2]


def test_a_script_without_shebang_and_many_arguments_runs_on_a_small_stack(tmp_path, monkeypatch):
    (tmp_path / "ns").write_text('exit "$#"\n')
    (tmp_path / "ns").chmod(0o755)
    old = resource.getrlimit(resource.RLIMIT_STACK)
    resource.setrlimit(resource.RLIMIT_STACK, (160 * 1024, old[1]))
    try:
        compiled, shell = _both(tmp_path, monkeypatch, ["./ns", *[""] * 10000, "x"])
    finally:
        resource.setrlimit(resource.RLIMIT_STACK, old)
    assert compiled[:2] == shell[:2] == (10001 % 256, f"{10001 % 256}\n")


@pytest.mark.parametrize("argv", [False, True], ids=["string", "argv"])
def test_the_chaos_journal_names_each_worker_by_its_process_group(tmp_path, argv):
    """The chaos suite kills workers by the pid their journal line gives, and checks that group is gone at the
    end: that is the wrapper, not the inner sh, whichever wrapper runs it."""
    from invariants import journal_command

    journal = tmp_path / "journal.txt"
    check = "import os, sys; pid = int(open(sys.argv[1]).read().split()[3]); print(pid, os.getpgid(pid))"
    command = journal_command(journal, f"{sys.executable} -c '{check}' {journal}", argv=argv)
    exit_file = tmp_path / "exit"
    pid = runner.spawn(command, exit_file=str(exit_file), env=dict(os.environ, AIPM_TASK_ID="T1"), cwd=str(tmp_path),
                       log=str(tmp_path / "log"))
    assert runner.reap(pid) == 0, (tmp_path / "log").read_text()
    named, group = map(int, (tmp_path / "log").read_text().split()[:2])
    assert named == group == pid


def test_an_exit_code_the_full_disk_refused_is_left_in_the_log_by_either_wrapper(tmp_path, tiny_disk, monkeypatch):
    """/tmp full when the command ends: the exit file is made but its code cannot be written. The shell wrapper said
    the code on the log's last line (where an adopter reads it, workerfiles.exit_code_in_log); the compiled one
    said nothing, so an owner that was not the worker's parent found no code and left the task INTERRUPTED."""
    from aipm.workerfiles import exit_code_in_log

    gate, filler = tmp_path / "gate", tiny_disk / "filler"
    fill = f'while [ ! -e "{gate}" ]; do sleep 0.01; done; cat /dev/zero > "{filler}" 2>/dev/null; exit 3'
    started = _programs_started(monkeypatch)
    ends = []
    for tag, binary in (("compiled", wrapper.binary), ("shell", lambda: None)):
        with monkeypatch.context() as m:
            m.setattr(wrapper, "binary", binary)
            exit_file, log = tiny_disk / f"{tag}.exit", tmp_path / f"{tag}.log"
            spawning = runner.begin(["sh", "-c", fill], exit_file=str(exit_file), env=dict(os.environ),
                                    cwd=str(tmp_path), log=str(log), background=False)
            pid = spawning.finish()
            gate.touch()
            ends.append((runner.reap(pid), exit_file.read_text(), exit_code_in_log(str(log))))
            gate.unlink()
            filler.unlink()
    assert started[0] == wrapper.binary() and started[1] == runner.SHELL
    assert ends == [(3, "", 3), (3, "", 3)]
