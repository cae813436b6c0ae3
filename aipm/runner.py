"""Starting, watching and stopping worker processes.

Each worker is a tiny wrapper in a new session (so its process group holds every grandchild): it waits for a
"go" on a pipe, runs the task's command, writes the exit code to an exit file, and exits with that code. The
wrapper is the compiled one of wrapper.py, where it could be built (a string command then runs as `sh -c` under
it), or else `/bin/sh`; a string of plain builtins, which ends at once, runs in `/bin/sh` alone. The wrapper also
keeps the attempt's time limit when no owner is left to (begin()). The go is sent only once the worker's record is
on disk and the status writes of its launch-lock round are durable (durable.py), so a launcher that dies in
between leaves no command running unrecorded (the wrapper sees EOF and exits). The exit file lets a supervisor that
was restarted learn the real outcome of a worker it did not start.

Waiting is event-driven: a pidfd per process in a selector, so the loop sleeps until something happens.
"""

from __future__ import annotations

import errno
import os
import select
import selectors
import shutil
import signal
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from contextlib import suppress
from functools import partial

from aipm import durable, offthread, posix_spawn, wrapper
from aipm.liveness import spawned_ctime, stat_fields
from aipm.shellwrap import NATIVE_BUILTINS, SHELL, SH_BUILTINS, WRAP_ARGV, WRAP_SHELL, plain_words
from aipm.workerfiles import NO_WAIT

# The go pipe is fd 3 (dash only redirects single-digit descriptors); $1 is the exit file.
# EOF instead of "go" means the launcher died before recording the worker: run nothing.
_GO_FD = 3

# Seconds after its owner's time limit that a worker's wrapper keeps it (begin()): past the grace a live owner's stop
# gives (stopping.KILL_GRACE, 5 s) and then some, so that the wrapper acts only where no owner did. At 2 s, a command
# that used its grace to save its session got a second SIGTERM from its wrapper in the middle of it.
LATE = 10


def inherit(fds: Sequence[int], above: int = _GO_FD) -> tuple[list[tuple], list[int]]:
    """Spawn actions that hand `fds` to the child, and the numbers they get there: each is dup2'd onto a number of
    its own above every descriptor in play (a dup2 onto another number never keeps close-on-exec, with any libc),
    so they are never inheritable here, where another thread may be starting another process at that moment."""
    base = max([above, *fds]) + 1
    given = list(range(base, base + len(fds)))
    return [(os.POSIX_SPAWN_DUP2, fd, to) for fd, to in zip(fds, given)], given


class SpawnError(Exception):
    """The worker could not be started (missing program, bad directory, ...)."""


def missing_program(argv: Sequence[str], env: Mapping[str, str], cwd: str) -> str | None:
    """The program of an argv command when it cannot be found, so launch fails before any status changes."""
    program = argv[0]
    if "/" in program:
        full = program if os.path.isabs(program) else os.path.join(cwd, program)
        return None if os.access(full, os.X_OK) else program
    return None if shutil.which(program, path=env.get("PATH", os.defpath)) else program


def not_found(program: str) -> str:
    """What is wrong with a program missing_program() named: a path is looked at itself, a name on PATH."""
    if "/" in program:
        return f"program {program!r} does not exist or is not executable"
    return f"program {program!r} not found on PATH"


def spawn(command: str | Sequence[str], **options) -> int:
    """Start `command` now, in the calling thread (begin()'s options); returns the pid (= pgid)."""
    return begin(command, background=False, **options).finish()


def begin(
    command: str | Sequence[str],
    *,
    exit_file: str,
    env: Mapping[str, str],
    cwd: str,
    log: str,
    stdin: str | None = None,
    pass_fds: Sequence[int] = (),
    started: Callable[[int, float], None] = lambda pid, ctime: None,
    prefix: Sequence[str] = (),
    background: bool = True,
    place_log: Callable[[str], None] = lambda log: None,
    limit: int | None = None,
) -> Spawning:
    """Start `command` in its own session; its stdout and stderr append to `log`.

    The wrapper starts now (in the helper thread when `background`) and waits for its go: the returned Spawning's
    finish() calls `started(pid, ctime)` (record the worker there; ctime as liveness.process_ctime gives it) and
    lets the command go once this round's writes are durable; if `started` raises, or abandon() is called instead,
    the command never runs. `prefix` is an argv the wrapper puts in front of the command (confinement); a string
    command then runs as `prefix /bin/sh -c COMMAND`. `place_log(log)` may put an empty file at `log` before it
    is opened; a start given up (abandon(), a failed spawn included) removes the log it left empty.

    A stop (terminate_group, a timeout) SIGTERMs the group and SIGKILLs what is left once the wrapper, its leader,
    has gone or the grace has passed; after the go the wrapper outlives SIGTERM, SIGINT and SIGHUP (the command
    gets them with their default action), so it goes when the command has ended.

    `limit` is the owner's time limit (seconds; None: none). The wrapper keeps it too, LATE seconds after, for when no
    owner is left to: it stops the group as the owner would and writes " timed-out" after the code in the exit file
    (runtime.read_exit), so that whoever records the attempt records a timeout."""
    if not isinstance(command, str):
        missing = missing_program(command, env, cwd)
        if missing:
            raise SpawnError(not_found(missing))
    if not os.path.isdir(cwd):
        raise SpawnError(f"working directory {cwd} does not exist")
    if prefix:  # the wrapper stays outside: it must write the exit file whatever the prefix forbids
        words = [*prefix, *([SHELL, "-c", command] if isinstance(command, str) else command)]
    elif isinstance(command, str):
        words = plain_words(command)
    else:
        words = list(command)
    # A builtin of plain words ends at once in the shell wrapper itself: one process, and no limit to keep.
    builtin = bool(words) and words[0] in SH_BUILTINS
    # (A list whose first word is a shell builtin, `[time, sleep, 40]`, runs in the shell wrapper too, but need not
    # end at once: only a string of plain words, never `exec`, `time` or `wait` there, goes without a limit.)
    late = str(limit + LATE) if limit and not (builtin and isinstance(command, str)) else "0"
    shell = [SHELL, "-c", WRAP_ARGV if words else WRAP_SHELL, "aipm-worker", exit_file, late, *(words or [command])]
    # `true` and `false` the compiled wrapper ends itself, as the shell would (wrapper.c's builtin()): no shell.
    native = builtin and words[0] in NATIVE_BUILTINS
    compiled = None if builtin and not native else wrapper.binary()
    if compiled and not native and not (words and "PATH" in env):
        # What the shell reads, or searches (without PATH, in its own default: dash's has the sbin directories), runs
        # as `sh -c` under the compiled wrapper too, which keeps the limit with no watchdog; the shell's parent is then
        # the wrapper, as a command's $PPID means.
        words = [SHELL, "-c", command] if words is None else [SHELL, "-c", 'exec "$@"', SHELL, *words]
    program, argv = (compiled, ["aipm-worker", exit_file, late, *words]) if compiled else (SHELL, shell)
    go_read, go_write = os.pipe()
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, stdin or os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | NO_WAIT, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
        (os.POSIX_SPAWN_DUP2, go_read, _GO_FD),
    ]
    actions += inherit(pass_fds, above=max(go_read, _GO_FD))[0]
    # posix_spawn has no cwd argument: the wrapper changes to $AIPM_ROOT itself ($PWD as a shell's cd sets it).
    env = dict(env, AIPM_ROOT=cwd, PWD=cwd)

    def placed(program: str, argv: list[str]) -> Callable[[], tuple[int, int, int]]:
        """The log's directory and file, and the spawn's arguments (posix_spawn.prepared), made ready here: in the
        helper thread each syscall would let go of the GIL and wait for it back, and the arguments' Python held it,
        while the main thread writes the status. The returned call only spawns: it takes the GIL once and lets go
        of it once, for the spawn itself."""
        os.makedirs(os.path.dirname(log), exist_ok=True)
        place_log(log)
        call = posix_spawn.prepared(program, argv, env, actions, setsid=True)

        def run() -> tuple[int, int, int]:
            before = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
            pid = call()
            return pid, before, time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        return run

    def start(first: Callable[[], tuple[int, int, int]]) -> tuple[int, int, int]:
        try:
            return first()
        except FileNotFoundError:
            # A worker deleted .aipm/ (git clean -fdx) meanwhile: make the log's directory again. Or the compiled
            # wrapper was aged out of /tmp: the shell does its work, and the next start looks for it again.
            if compiled and not os.path.exists(compiled):
                wrapper.forget()
            return placed(SHELL, shell)()
        except OSError as exc:
            if not compiled or exc.errno not in (errno.ENOEXEC, errno.EACCES, errno.EPERM):
                raise
            wrapper.discard(compiled)  # truncated, replaced, /tmp made noexec: the shell now, a new build later
            return placed(SHELL, shell)()

    def release() -> None:
        os.close(go_read)

    try:
        first = placed(program, argv)
    except OSError as exc:
        first = partial(_raise, exc)  # start() then tries the shell, in the helper thread, as after a failed spawn
    job = partial(start, first)
    pending = offthread.in_background(job) if background else offthread.Pending(job).run()
    return Spawning(pending, go_write, release, started, log)


def _raise(exc: BaseException) -> None:
    raise exc


class Spawning:
    """A wrapper on its way up, waiting for its go (see begin())."""

    def __init__(self, pending: offthread.Pending, go_write: int, release: Callable[[], None],
                 started: Callable[[int, float], None], log: str):
        self._pending, self._go, self._release, self._started, self._log = pending, go_write, release, started, log
        self.pid = 0

    def _spawned(self) -> tuple[int, int, int]:
        try:
            return self._pending.result()
        except OSError as exc:
            raise SpawnError(f"cannot start worker: {exc.strerror}") from None
        finally:
            self._release()
            self._release = lambda: None

    def finish(self) -> int:
        """Record the worker (`started`) and let its command go once this round's writes are durable."""
        try:
            self.pid, before, after = self._spawned()
            self._started(self.pid, spawned_ctime(self.pid, before, after))
        except BaseException:
            self.abandon()
            raise
        go, self._go = self._go, -1
        # The go waits until the status writes of this wake-up are durable (see durable.py); the record is already.
        durable.once_durable(lambda ok: _go(go, ok))
        return self.pid

    def abandon(self) -> None:
        """The launch failed: the wrapper reads EOF instead of its go, runs nothing, and is reaped."""
        if self._go < 0:
            return
        try:
            self.pid = self.pid or self._spawned()[0]
        except SpawnError:
            pass
        os.close(self._go)  # EOF: the wrapper exits without running the command
        self._go = -1
        if self.pid:
            reap(self.pid)
        with suppress(OSError):
            if os.path.getsize(self._log) == 0:
                os.unlink(self._log)  # no attempt began: its number stays free (Runtime.next_number)


def _go(go_write: int, ok: bool) -> None:
    try:
        if ok:
            os.write(go_write, b"go\n")
    except OSError:
        pass  # the wrapper is gone already (killed): it ran nothing
    finally:
        os.close(go_write)


def reap(pid: int) -> int | None:
    """Exit code of our own child (negative signal number if killed), or None if it is not our child."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status)


def signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class Watcher:
    """Wakes when a watched process exits or a watched descriptor becomes readable."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._pidfds: dict[Hashable, int] = {}

    def watch_pid(self, pid: int, key: Hashable) -> bool:
        """Start watching `pid`; False when it is already gone."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        self._pidfds[key] = fd
        self._sel.register(fd, selectors.EVENT_READ, key)
        return True

    def watch_fd(self, fd: int, key: Hashable) -> None:
        self._sel.register(fd, selectors.EVENT_READ, key)

    def forget(self, key: Hashable) -> None:
        fd = self._pidfds.pop(key, None)
        if fd is not None:
            self._sel.unregister(fd)
            os.close(fd)

    def ended(self, key: Hashable) -> bool:
        """The process watched as `key` has ended (its pidfd is readable), without waiting."""
        fd = self._pidfds.get(key)
        return fd is not None and bool(select.select([fd], [], [], 0)[0])

    def __len__(self) -> int:
        """How many processes are still watched."""
        return len(self._pidfds)

    def wait(self, timeout: float | None) -> list[Hashable]:
        return [key.data for key, _ in self._sel.select(timeout)]

    def pending(self, *ignored: Hashable) -> bool:
        """Whether a watched process has ended or a descriptor is ready (other than `ignored`'s), without
        waiting; what is ready stays ready for wait()."""
        return any(key.data not in ignored for key, _ in self._sel.select(0))

    def close(self) -> None:
        for key in list(self._pidfds):
            self.forget(key)
        self._sel.close()


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait (event-driven) until `pid` exits; True when it did within `timeout`."""
    watcher = Watcher()
    try:
        if not watcher.watch_pid(pid, pid):
            return True
        return bool(watcher.wait(timeout))
    finally:
        watcher.close()


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a group, from /proc; zombies hold no files and need no wait."""
    members = []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not name.isdigit():
            continue
        try:
            fields = stat_fields(int(name))
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(name))
    return members


def kill_group(pgid: int, timeout: float = 5.0) -> None:
    """SIGKILL what is left of a group and wait until it is gone, so its file locks are free on return."""
    if not signal_group(pgid, signal.SIGKILL):
        return  # the usual case: the group ended with its leader
    wait_all_gone(group_members(pgid), timeout)


def wait_all_gone(pids: list[int], timeout: float) -> None:
    """Wait (pidfd, no polling) until every one of `pids` has exited, or `timeout` passes."""
    watcher = Watcher()
    try:
        for pid in pids:
            watcher.watch_pid(pid, pid)
        deadline = time.monotonic() + timeout
        while len(watcher) and time.monotonic() < deadline:
            for pid in watcher.wait(max(0.0, deadline - time.monotonic())):
                watcher.forget(pid)
    finally:
        watcher.close()


def ask_to_stop(pgid: int) -> bool:
    """SIGTERM the whole group, and SIGCONT: a stopped group would otherwise never see the SIGTERM."""
    if not signal_group(pgid, signal.SIGTERM):
        return False
    signal_group(pgid, signal.SIGCONT)
    return True


def terminate_group(pgid: int, leader: int, grace: float = 5.0) -> None:
    """SIGTERM the whole group, then SIGKILL it if the leader has not gone within `grace` seconds."""
    if not ask_to_stop(pgid):
        return
    wait_gone(leader, grace)
    # Grandchildren that ignored SIGTERM still belong to the group: make sure none survives.
    kill_group(pgid)
