"""Outcomes that could not be written to their task file (a full disk, a file broken, deleted or moved mid-run).

The owner holds such an outcome and retries while it runs; what it cannot write in the end is kept where it can
be: the worker's exit file, from which `aipm recover` (or the next run) records it once the file is writable.
An exit file that exists but holds no code means the worker ended and its result is unknown: that task is left
INTERRUPTED for a person to check, never run again blindly.
"""

from __future__ import annotations

import os
from pathlib import Path

from aipm.errors import UserError, ValidationError
from aipm.outcome import one_line
from aipm.record import Record
from aipm.runtime import StateWriteError, read_exit_file
from aipm.workerfiles import write_bytes


def keep_exit_code(rec: Record, code: int | None) -> bool:
    """Make sure the exit file holds `code` (the wrapper may have failed to write it); True when it does."""
    if code is None:
        return False
    if read_exit_file(rec.exit_file) == code:
        return True
    try:
        write_bytes(Path(rec.exit_file), f"{code}\n".encode())  # renamed over what a worker left (a FIFO waits)
    except OSError:
        return False
    return read_exit_file(rec.exit_file) == code


def exit_lost(path: str) -> bool:
    """The worker's wrapper got as far as its exit file but no code is in it (its write failed)."""
    return os.path.exists(path) and read_exit_file(path) is None


def cause(rec: Record, exc: Exception) -> str:
    """Why an outcome could not be written, in the few words its handed-over record keeps for `status` and `ps`."""
    place = exc.filename if isinstance(exc, StateWriteError) else rec.task_file
    if place == rec.task_file and not os.path.exists(place):
        return "its task file was deleted or moved"
    if isinstance(exc, ValidationError):
        return "its task file did not validate"
    return one_line(str(exc) if isinstance(exc, UserError) else f"{place}: {getattr(exc, 'strerror', None) or exc}")


def waiting(rec: Record) -> str | None:
    """What status says of an outcome its owner handed over (it lived: no supervisor died), or None if not so."""
    if not rec.unwritten:
        return None
    code = read_exit_file(rec.exit_file)
    how = f"exit {code}" if code is not None else "its exit code lost"
    return f"its outcome ({how}) waits to be recorded: its owner could not write it ({rec.unwritten}); " \
        "`aipm recover` records it"


def message(rec: Record, code: int | None, exc: Exception, kept: bool, review_unstarted: bool = False) -> str:
    """One line for a user: what could not be recorded, why, and what happens to the outcome (`review_unstarted`:
    the work's was written, IN_REVIEW, and its reviewer could not start)."""
    place = exc.filename if isinstance(exc, StateWriteError) else rec.task_file  # (a reviewer's record, say)
    gone = place == rec.task_file and not os.path.exists(place)  # deleted or moved: it may be put back
    why = (f"{place}: deleted or moved while it ran" if gone else str(exc) if isinstance(exc, UserError)
           else f"{place}: {getattr(exc, 'strerror', None) or exc}")
    if review_unstarted:
        where = "its work's outcome is written (IN_REVIEW), its review did not start: the next run (or `aipm " \
                "recover`) starts it"
    elif kept:
        fixed = "the file is back as it was (`git checkout` of it, say)" if gone else "that is fixed"
        where = f"its exit code is kept in {rec.exit_file}; once {fixed}, `aipm recover` records it" + (
            "" if gone else " (a run still going waits for a file saved invalid, and records it itself)")
    else:
        where = "its exit code could not be saved either, so `aipm recover` will leave it INTERRUPTED to check"
    return f"cannot record the outcome of {rec.task} (exit {code}): {why}; {where}"
