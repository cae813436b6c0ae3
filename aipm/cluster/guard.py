"""`python -m aipm.cluster.guard`: runs one attempt's command on a Ray node and ends its whole process tree.

Ray kills the worker process of a cancelled task and that worker's direct children, but nothing further down:
a command's grandchildren would keep running (and writing). So the guard is two processes. The relay, a direct
child of the Ray worker, forwards stop signals and reports the exit code (a command killed by a signal: the
keeper and the relay die of that signal too). The keeper, its child in a process group
of its own (out of reach of Ray's kill of the worker's children and of the worker's group), learns of the relay's
death by PR_SET_PDEATHSIG, is a child subreaper so descendants that `setsid` away are re-parented to it, runs the command in a new session, and when the command ends or it is told to stop,
kills every descendant left. The spec (JSON on stdin) names the command, its stdin, the attempt's log and the
Ray worker's pid (the relay's parent, known before the relay could see it gone).
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import select
import signal
import sys

from aipm.subreaper import become_subreaper, strays

PR_SET_PDEATHSIG = 1
STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
GRACE = 3.0  # below stopping.KILL_GRACE (5 s): the local worker waits for it (attempt.CANCEL_WAIT)


class _Stopped(Exception):
    pass


def _stop(signum, frame):
    raise _Stopped(signum)


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


def _kill_tree(leader: int) -> None:
    """SIGKILL the command's group and every other descendant, and reap them (we are their subreaper)."""
    try:
        os.killpg(leader, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    while True:
        rest = strays(os.getpid(), ())
        for pid in rest:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, 0):
                pass
        except ChildProcessError:
            pass
        if not rest:
            return


def _die_with_parent(parent: int) -> bool:
    """Arm SIGTERM for when our parent dies; False when it already has (the signal would never come). `parent`
    is its pid as known before we were started: read by us, it could be the reaper of an already dead one."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    return os.getppid() == parent


def _end_as(code: int) -> None:
    """Exit with `code`; a negative one (the command died of that signal) by dying of the same signal, so the
    process above sees what it would had the command been exec'd (an exit status cannot carry -9: it was 247)."""
    if code < 0:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the command's SIGSEGV must not dump our core
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def main() -> int:
    spec = json.loads(sys.stdin.read())
    if not _die_with_parent(spec.get("parent", os.getppid())):  # the Ray worker (by hand: whoever started us)
        return 128 + signal.SIGTERM
    spec["parent"] = os.getpid()  # the keeper's
    keeper = os.fork()
    if keeper == 0:
        code = 128 + signal.SIGTERM
        try:
            code = _keep(spec)
        finally:
            _end_as(code)
    for sig in STOPS:
        signal.signal(sig, lambda signum, frame: os.kill(keeper, signum))
    _, status = os.waitpid(keeper, 0)
    return os.waitstatus_to_exitcode(status)


def _keep(spec: dict) -> int:
    """The keeper: run the command in its own session and end every descendant when it ends or we are stopped."""
    for sig in STOPS:
        signal.signal(sig, _stop)
    if not _die_with_parent(spec["parent"]):
        return 128 + signal.SIGTERM
    # Out of the Ray worker's process group: when that worker exits (cancel, driver gone) Ray SIGKILLs its whole
    # group, which would kill us in the grace period and leave a command slow to stop running for good.
    os.setpgid(0, 0)
    become_subreaper()
    argv = ["/bin/sh", "-c", spec["shell"]] if spec.get("shell") is not None else spec["argv"]
    log = spec.get("log") or os.devnull
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, spec.get("stdin") or os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    leader = 0
    try:
        # A stop during the spawn waits until `leader` is set (else it would leave the command running, unknown);
        # the command starts with no signal blocked.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
        try:
            leader = os.posix_spawnp(argv[0], argv, spec["env"], file_actions=actions, setsid=True, setsigmask=())
        except OSError as exc:
            with open(log, "a") as handle:
                handle.write(f"[aipm] cannot start {argv[0]!r} on this node: {exc.strerror}\n")
            return 127
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)
        _, status = os.waitpid(leader, 0)
        return os.waitstatus_to_exitcode(status)
    except _Stopped as stop:
        # Asked to stop (timeout, cancel, or the Ray worker died): TERM the group, KILL what is left after GRACE.
        if leader:
            for sig in (signal.SIGTERM, signal.SIGCONT):
                try:
                    os.killpg(leader, sig)
                except ProcessLookupError:
                    pass
            try:
                fd = os.pidfd_open(leader)
                select.select([fd], [], [], GRACE)
                os.close(fd)
            except ProcessLookupError:
                pass
        return 128 + stop.args[0]
    finally:
        for sig in STOPS:
            signal.signal(sig, signal.SIG_IGN)
        if leader:
            _kill_tree(leader)


if __name__ == "__main__":
    _end_as(main())
