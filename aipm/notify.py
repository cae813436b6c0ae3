"""Signals to a person: the `notify` setting's command, run when a task ends FAILED or REJECTED (or INTERRUPTED,
its exit code lost), when a run waits for a person (a task file to fix, a stopped owner to let go on, a lock held
outside aipm), when an order's budget stops it, and when an order ends (told once per ending, by `aipm run` or by the
detached owner of its last task).

It never blocks or breaks the caller: the command starts detached, in a session of its own, through a shell that
backgrounds it and exits at once (so no process is left for us to reap), with standard input from /dev/null and
its output appended to `.aipm/notify.log`, which is rotated at 1 MiB (a regular file only: a FIFO a worker left
there would hold us; the output then goes nowhere). A command that cannot start is noted in that
log and otherwise ignored.
"""

from __future__ import annotations

import os
import time
from contextlib import suppress
from pathlib import Path

from aipm import workerfiles
from aipm.digest import sha1
from aipm.liveness import process_ctime
from aipm.model import Order
from aipm.runtime import Runtime
from aipm.settings import Settings

FAILED, REJECTED, BUDGET, ORDER_FINISHED = "failed", "rejected", "budget", "order_finished"
NEEDS_PERSON = "needs_person"
LOG_LIMIT = 1 << 20
# $1 is the log; the rest is the command, started in the background so this shell exits at once.
_TASK_VARS = frozenset({"AIPM_ORDER_ID", "AIPM_TASK_ID", "AIPM_ATTEMPT", "AIPM_LOG", "AIPM_TARGET_FILES",
                        "AIPM_MODEL", "AIPM_REVIEW_FEEDBACK"})
# In the project root, as workers and reviews run: a relative `./scripts/notify.sh` was "not found" from a subdirectory.
_DETACH = 'log=$1; shift; cd "$AIPM_ROOT" 2>>"$log" || exit 0; "$@" </dev/null >>"$log" 2>&1 & echo $!'
# The commands this process started, as (pid, start time): re-parented to an owner (a child subreaper), they are
# its to let finish, never an attempt's leftovers (subreaper.strays), even before their environment can be read.
STARTED: set[tuple[int, float]] = set()


def send(settings: Settings, runtime: Runtime, event: str, status: str, detail: str, **env: str) -> None:
    """Run the notify command (if one is set) with AIPM_EVENT, AIPM_STATUS, AIPM_DETAIL and `env` (AIPM_*)."""
    if settings.notify is None:
        return
    reap()
    command = ["/bin/sh", "-c", settings.notify] if isinstance(settings.notify, str) else list(settings.notify)
    try:
        runtime.ensure()
        log = runtime.notify_log()
        if log.exists() and log.stat().st_size > LOG_LIMIT:
            os.replace(log, log.with_suffix(".log.1"))
        try:
            _append(log, f"[aipm {time.strftime('%Y-%m-%d %H:%M:%S')}] {event} {status}: {detail}\n")
        except OSError:  # a worker left no file there (a FIFO, opened, held us for ever): the command still runs
            log = Path(os.devnull)
        # Our own caller may be a worker: its task's variables must not leak into an order's event.
        environ = {k: v for k, v in os.environ.items() if k not in _TASK_VARS}
        environ.update(AIPM_NOTIFY="1", AIPM_ROOT=str(runtime.root), AIPM_EVENT=event, AIPM_STATUS=status, AIPM_DETAIL=detail, **env)
        read, write = os.pipe()
        with os.fdopen(read, "rb") as said:
            try:
                pid = os.posix_spawn("/bin/sh", ["/bin/sh", "-c", _DETACH, "aipm-notify", str(log), *command],
                                     environ, setsid=True, file_actions=[(os.POSIX_SPAWN_DUP2, write, 1)])
            finally:
                os.close(write)
            started = said.read().strip()  # the command's pid, from the shell that forks it and exits
        os.waitpid(pid, 0)
        if started.isdigit():
            with suppress(OSError):
                STARTED.add((int(started), process_ctime(int(started))))
    except OSError as exc:
        with suppress(OSError):
            _append(runtime.notify_log(), f"[aipm] notify command could not start: {exc}\n")


def order_finished(settings: Settings, runtime: Runtime, order: Order, done: bool, detail: str) -> None:
    """`order_finished`, once per ending of the order (its tasks' statuses and attempts as they ended): told by
    whoever finds it first, a `run` or the detached owner of its last task, which may find it at the same moment:
    the one that takes the launch lock first."""
    if settings.notify is None:
        return
    end = sha1(repr(sorted((t.id, t.status.value, t.attempts, t.started_at) for t in order.tasks.values()))
               .encode(errors="surrogateescape")).hexdigest()
    with runtime.launch_lock():
        try:
            first = runtime.first_to_tell(order.id, end)
        except OSError:  # a full state directory: told, perhaps twice, rather than a crash at the end of a run
            first = True
        if first:
            send(settings, runtime, ORDER_FINISHED, "DONE" if done else "INCOMPLETE", detail, AIPM_ORDER_ID=order.id)


def needs_person(settings: Settings, runtime: Runtime, order_id: str, task_id: str, detail: str) -> None:
    """A run waits, for as long as it takes, on something only a person can do: `detail` says what."""
    send(settings, runtime, NEEDS_PERSON, "WAITING", f"{order_id}/{task_id}: {detail}", AIPM_ORDER_ID=order_id,
         AIPM_TASK_ID=task_id)


def reap() -> None:
    """Collect the notify commands of ours that have ended. Started detached, they are re-parented to us (a child
    subreaper: aipm.subreaper) once their shell exits, and nothing else waits for them: each one that ended stayed
    a zombie below a long `aipm run` until the run ended, one more per failed task."""
    for pid, ctime in list(STARTED):
        try:
            if process_ctime(pid) != ctime:  # reaped by its parent (not us), and the pid taken again
                STARTED.discard((pid, ctime))
                continue
            done, _ = os.waitpid(pid, os.WNOHANG)  # (pid and start time: our own notify command, no worker)
        except ChildProcessError:
            continue  # not our child (yet): still running below the shell, or under another parent
        except Exception:  # gone from /proc (psutil's NoSuchProcess off Linux): nothing left to collect
            STARTED.discard((pid, ctime))
            continue
        if done:
            STARTED.discard((pid, ctime))


def _append(log: Path, line: str) -> None:
    fd, info = workerfiles.open_checked(log, os.O_RDWR | os.O_CREAT | os.O_APPEND)
    try:
        workerfiles.append_line(fd, info.st_size, line)  # after a notify command's output without a newline
    finally:
        os.close(fd)
