"""The compiled worker wrapper (wrapper.c): built once per machine and user, used where it can be.

Starting `/bin/sh` costs ~0.6 ms of CPU on a virtual machine (the dynamic loader's CPU probing traps to the
hypervisor), and a command that is a program costs that twice: the shell, then the program. wrapper.c does the
shell wrapper's job (wait for the go, run the command, keep its time limit, write its exit code) as a static binary
without libc that starts in ~0.05 ms. It is built with the machine's C compiler (`$CC`, else `cc`) on first use
into the user's state directory (`/tmp/aipm-<uid>/bin/`, named by a checksum of the source and flags), proven by one
real run before it is renamed into place, and not rebuilt while that file exists and starts. Where it cannot
be built (no compiler, not x86-64 Linux) a `.failed` file says why and runner.py keeps using the shell; it is
tried again with another compiler, or a day later.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import time
import zlib
from pathlib import Path

from aipm.statedir import user_base

SOURCE = Path(__file__).with_name("wrapper.c")
_FLAGS = ["-O2", "-static", "-nostdlib", "-fno-pie", "-no-pie", "-fno-stack-protector", "-fno-builtin",
          "-fno-tree-loop-distribute-patterns", "-fno-asynchronous-unwind-tables", "-Wl,--build-id=none"]
_RETRY_FAILED_AFTER = 86400  # seconds: a failure may have been passing (a full disk, a compiler being upgraded)
_found: dict[str, str | None] = {}


def binary() -> str | None:
    """The wrapper's path, built now if need be; None where it cannot be (the shell wrapper is used instead)."""
    if "path" not in _found:
        try:
            _found["path"] = _locate()
        except OSError:  # an unusable /tmp/aipm-<uid>: the shell needs nothing from there
            _found["path"] = None
    return _found["path"]


def forget() -> None:
    """The binary went away (a cleaner aged it out of /tmp): look again on the next start."""
    _found.clear()


def discard(path: str) -> None:
    """The binary would not start (truncated, replaced, /tmp made noexec): remove it; the next start rebuilds."""
    try:
        os.unlink(path)
    except OSError:
        pass
    forget()


def _locate() -> str | None:
    source = SOURCE.read_bytes()
    key = zlib.crc32(" ".join(_FLAGS).encode(), zlib.crc32(source))
    directory = user_base() / "bin"
    path = directory / f"aipm-wrapper-{key:08x}"
    if os.access(path, os.X_OK):
        return str(path)
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or ""]
    if not compiler[0]:
        return None
    failed = path.with_suffix(".failed")
    try:
        recorded = failed.read_text().split("\n", 1)[0]
        if recorded == shlex.join(compiler) and time.time() - failed.stat().st_mtime < _RETRY_FAILED_AFTER:
            return None
    except FileNotFoundError:
        pass
    directory.mkdir(exist_ok=True)
    return _build(compiler, path, failed)


def _build(compiler: list[str], path: Path, failed: Path) -> str | None:
    import subprocess  # only here: once per machine

    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        built = subprocess.run([*compiler, *_FLAGS, "-o", temp, SOURCE], capture_output=True, text=True, timeout=30)
        why = built.stderr.strip() or f"{shlex.join(compiler)} exited {built.returncode}"
        if built.returncode == 0:
            why = _prove(temp)
        if not why:
            os.replace(temp, path)
            failed.unlink(missing_ok=True)
            return str(path)
    except (OSError, subprocess.SubprocessError) as exc:
        why = str(exc)
    finally:
        temp.unlink(missing_ok=True)
    failed.write_text(f"{shlex.join(compiler)}\n{why}\n")  # first line: the compiler this failure belongs to
    return None


def _prove(program: Path) -> str:
    """Run the new binary once as runner.py will: "" if it waited for its go and recorded a real exit code."""
    exit_file = program.with_name(program.name + ".exit")
    go_read, go_write = os.pipe()
    try:
        pid = os.posix_spawn(program, ["aipm-worker", str(exit_file), "0", "/bin/sh", "-c", "exit 7"],
                             {"AIPM_ROOT": "/", "PATH": os.defpath}, setsigdef=(signal.SIGCHLD,),
                             file_actions=[(os.POSIX_SPAWN_DUP2, go_read, 3)])
        os.write(go_write, b"go\n")
    finally:
        os.close(go_read)
        os.close(go_write)
    try:
        try:
            code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        except ChildProcessError:  # SIGCHLD ignored (by whoever started aipm): the child is gone, its file tells
            code = None
        written = exit_file.read_text() if exit_file.exists() else None
        return "" if code in (7, None) and written == "7\n" else f"self-test: exit {code}, exit file {written!r}"
    finally:
        exit_file.unlink(missing_ok=True)

