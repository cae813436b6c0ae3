"""aipm processes that own no attempt and write their output into the project tree: `nohup aipm ui &` (nohup.out)
or `aipm logs ORD -f > all.log` in another terminal, `aipm status > status.txt`. None of those writes is a worker's.

The audits know a run's own output (ownoutput.py): the files its session holds open for writing while it lives, its
notes in the written log once it has ended. A command that owns no attempt left neither, and every attempt running
while it wrote was sent back (`scope: wrote ui.log`), an agent paid again. So such a command, only when its standard
output or error is a regular file in the tree and no worker's command started it, is an observer for its life: a
file in the state directory (`observers/<pid>`: its pid and start time; alive only while both match) adds it to the
live aipm processes whose sessions' files audits leave alone; and at its end it notes its output in the written
log for the audits still in flight.
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

from aipm import ownoutput, writtenlog
from aipm.liveness import process_alive, process_ctime
from aipm.runtime import Runtime
from aipm.statedir import make_state_dir
from aipm.attemptfiles import entries
from aipm.workerfiles import read_bytes, write_bytes

OBSERVERS = "observers"
_registered: list[tuple[Runtime, Path]] = []  # this process's own file, while it observes


def begin(root: Path) -> None:
    """Be an observer of the project at `root` if this command writes its output into its tree."""
    if _registered or "AIPM_TASK_ID" in os.environ or not ownoutput.files(root):
        return  # (an aipm a worker's command runs writes what that worker does)
    rt = Runtime(root)
    if writtenlog.by_a_worker(rt):
        return  # (and so does one whose environment was cleared on the way: `env -i`, sudo, a container)
    try:
        make_state_dir(rt.state)  # (not rt.ensure(): no `.aipm/` made in a tree where nothing ran yet)
        directory = rt.state / OBSERVERS
        directory.mkdir(exist_ok=True)
        path = directory / str(os.getpid())
        write_bytes(path, f"{os.getpid()} {process_ctime(os.getpid())}\n".encode())
    except OSError:
        return  # a full /tmp: its writes may be charged (fail closed), the command itself goes on
    _registered.append((rt, path))


def end() -> None:
    """The command is done writing: no observer any more, and its output noted for the audits in flight."""
    if not _registered:
        return
    rt, path = _registered.pop()
    with suppress(OSError):
        path.unlink()
    with suppress(OSError):
        if not rt.records():
            return  # (and no launch lock taken: it would make `.aipm/` in a tree where nothing ran)
        with rt.launch_lock():  # (read again under it: an attempt starting now is seen)
            if rt.records():
                writtenlog.note_output(rt)


def live(rt: Runtime) -> set[int]:
    """The pids of the project's observers alive now; the files of those that are gone are removed."""
    found = set()
    directory = rt.state / OBSERVERS
    for entry in entries(directory):
        name, path = entry.name, directory / entry.name
        if not name.isdigit():
            continue  # (one being written: `.<pid>.<writer>.tmp`)
        try:
            pid, ctime = read_bytes(path, 64).split()
            pid_number, started = int(pid), float(ctime)
        except (OSError, ValueError):
            continue  # being written, or no file of ours (the state directory is in an unconfined worker's reach)
        if name == str(pid_number) and process_alive(pid_number, started):
            found.add(pid_number)
        else:
            with suppress(OSError):
                path.unlink()  # killed before its end(): its pid may be another process's by now
    return found
