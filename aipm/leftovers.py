"""What an attempt's command left running when it ended: the processes below its wrapper, outside its group.

The compiled wrapper (wrapper.c) is a child subreaper: what the command's processes leave when they end (a `setsid`
daemon, a double fork) is re-parented to it, not to aipm. aipm runs other attempts beside it, and could not tell
whose such a process is once it has emptied its environment (no AIPM_* marker) and closed its descriptors (no lock):
it wrote on into the attempt's files after the attempt had ended and its files were given to the next task. When
the command ends, the wrapper lists them in EXIT_FILE.left, a "PID STARTTIME" line each (the start in clock ticks,
/proc/PID/stat field 22: a later process given the pid is never taken for one); a stop that SIGKILLs a wrapper
still alive lists them first (note), as the wrapper then cannot. subreaper.py and recovery.py end them. The shell
wrapper (no C compiler on the machine) is no subreaper: there the marker and the locks are all aipm has.
"""

from __future__ import annotations

import os

from aipm.liveness import children, process_alive, read_small, stat_fields
from aipm.record import Record

SUFFIX = ".left"


def note(rec: Record) -> None:
    """Before a SIGKILL of the group of `rec`'s wrapper, which may still be alive: list what is below it outside its
    group (its group dies with the SIGKILL), as the wrapper would have at its end. Nothing when it is gone."""
    if not rec.pid or not process_alive(rec.pid, rec.ctime):
        return  # (its pid may be another process's by now)
    lines = []
    for pid in children(rec.pid):
        try:
            fields = stat_fields(pid)
        except OSError:
            continue
        if int(fields[2]) != rec.pgid:
            lines.append(f"{pid} {fields[19].decode()}\n")
    if lines:
        fd = os.open(rec.exit_file + SUFFIX, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        try:
            os.write(fd, "".join(lines).encode())
        finally:
            os.close(fd)


def running(exit_file: str) -> list[int]:
    """The processes listed for the attempt whose exit file is `exit_file` that are still there (the same pid and
    start; ended ones too, not yet reaped). The usual case: no list, one failed open."""
    try:
        text = read_small(exit_file + SUFFIX)
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        pid, _, start = line.partition(b" ")
        if not pid.isdigit():
            continue
        try:
            if stat_fields(int(pid))[19] == start:
                found.append(int(pid))
        except (OSError, IndexError):
            continue
    return found
