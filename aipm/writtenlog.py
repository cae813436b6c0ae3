"""What ended while an audit was in flight: the targets of attempts (and worktree merges) that wrote, with the time.

An audit allows the writes of every task that ran at any moment of the audited attempt's run; those that started
and ended in between have no record left by then, so each notes its targets here when it ends (see scope.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from aipm import ownoutput
from aipm.gitstatus import real_root, tree_prefix
from aipm.paths import PathError, Target, normalize, quote, real_relative
from aipm.record import Record
from aipm.runtime import Runtime
from aipm.workerfiles import STATE_FILE_MAX, open_regular, read_bytes, write_bytes

# In the state directory, a line per note: "<time_ns> <json list of targets>" (patterns, as a person writes them),
# "<time_ns> {"targets": [...], "order": <its directory, an exact name>}" (an attempt ended, or a person's command
# wrote task files: order_files) or "<time_ns> {"files": <json list of exact file names>}" (what a merge wrote:
# `a*.md` is that one file). An attempt's end also says which it was: "task" (ORDER/TASK), "targets_of" (its
# targets, a worktree one's too) and "began" (ns: ended_since). A dict may also hold "output": the noting aipm
# process's own output files in the tree ([path, device, inode], ownoutput.files), so that another run's audits in
# flight do not charge them to a worker once that process holds them no more (a second `aipm run > run2.log` that
# has ended).
WRITTEN_LOG = "written.log"


def note_ended(rt: Runtime, rec: Record) -> None:
    """`rec`'s attempt is over: note its targets and its order's task files (its outcome was just written there)
    for the audits still in flight, which may see those writes once its record is gone. Caller holds the launch
    lock."""
    if tree_prefix(real_root(rt.root)) is None:
        return  # nothing here is audited
    # A worktree attempt wrote in its own worktree (merges note themselves); its status, here. Which attempt it was,
    # and when it began, tell a commit's notice who was running at the commit (ended_since).
    note_order(rt, rec.order_dir, () if rec.workspace else rec.targets,
               {"task": rec.key, "targets_of": list(rec.targets), "began": began_ns(rec)})


def began_ns(rec: Record) -> int:
    """When `rec`'s attempt began (ns): its audit's start, else its worker's start, else the second it was
    stamped with (0 when none is known)."""
    if rec.scope_since:
        return rec.scope_since
    if rec.ctime:
        return int(rec.ctime * 1e9)
    try:
        return int(dt.datetime.fromisoformat(rec.started_at).timestamp()) * 10**9 if rec.started_at else 0
    except ValueError:
        return 0


def ended_since(rt: Runtime, since_ns: int) -> list[tuple[str, list[str], int, int]]:
    """The attempts that ended at or after `since_ns` (see note_ended): (ORDER/TASK, its targets, when it began,
    when its end was noted), in the order they ended."""
    found = []
    for stamp, entry in _entries_since(rt, since_ns, stamped=True):
        if not isinstance(entry, dict):
            continue
        key, targets, began = entry.get("task"), entry.get("targets_of"), entry.get("began")
        if (isinstance(key, str) and isinstance(targets, list) and all(isinstance(t, str) for t in targets)
                and type(began) is int):
            found.append((key, targets, began, stamp))
    return found


def order_files(root: Path, order_dir: str | Path) -> list[Target]:
    """What aipm writes in an order directory, as targets: its task files and the temp files it writes them
    through (none when the directory is outside the project). Named by its real path, as git names them."""
    rel = _order_path(root, order_dir)
    return [] if rel is None else _files_in(rel)


def _order_path(root: Path, order_dir: str | Path) -> str | None:
    return real_relative(str(root), os.path.relpath(order_dir, root))


def _files_in(rel: str) -> list[Target]:
    # The directory is this one alone: `*`, `?` and `[` in its name are characters (`O[1]/*.yaml` covered O1/,
    # `or*/` every orx/), and a backslash too (as a target a person writes, `or\ders` was refused: nothing
    # covered the task's own file, and every attempt was charged with it).
    base = quote(rel) + "/" if rel else ""
    return [Target(base + name, False, True) for name in ("*.yaml", ".*.tmp")]


def note_written(rt: Runtime, targets: Iterable[str]) -> None:
    """Something aipm did on a task's behalf (an attempt that ended, a worktree merge) just wrote `targets`: note
    them for the audits in flight. Caller holds the launch lock."""
    _note(rt, list(targets))


def note_order(rt: Runtime, order_dir: str | Path, targets: Iterable[str] = (), attempt: dict | None = None) -> None:
    """aipm just wrote task files of the order in `order_dir` (not a worker's write), and an attempt that ended
    there (`attempt`: which, see note_ended) may have written `targets`: note them for the audits in flight. Caller
    holds the launch lock."""
    entry: dict = {"targets": list(targets), **(attempt or {})}
    rel = _order_path(rt.root, order_dir)
    if rel is not None:
        entry["order"] = rel
    _note(rt, entry)


def note_merged(rt: Runtime, files: Iterable[str]) -> None:
    """A merge just wrote `files` (exact names, relative to the project root): note them for the audits in
    flight. Caller holds the launch lock."""
    _note(rt, {"files": list(files)})


def has_output(rt: Runtime) -> bool:
    """Whether this process writes its output into an audited tree (note_output has something to note)."""
    return tree_prefix(real_root(rt.root)) is not None and bool(ownoutput.files(rt.root))


def note_output(rt: Runtime) -> None:
    """This process is done writing its output (a run's end): note its output files in the tree, if it has any, for
    the audits in flight, which may see its last lines. Caller holds the launch lock."""
    if has_output(rt):
        _note(rt, {})


def _note(rt: Runtime, entry: list[str] | dict) -> None:
    """Append `entry` with the time; past WRITTEN_LOG_BYTES the log is cut to the lines an audit may still need."""
    if isinstance(entry, dict):
        output = ownoutput.files(rt.root)
        if output and not by_a_worker(rt):
            entry["output"] = output
    log = rt.state / WRITTEN_LOG
    try:
        # (regular files only, never through a link: any unconfined worker can write the state directory)
        fd = open_regular(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            # JSON in ASCII escapes every character that splits lines (`\n`, `\r`, U+2028...): a name that holds
            # one stays in its own note, never a line of its own.
            os.write(fd, f"{time.time_ns()} {json.dumps(entry, ensure_ascii=True)}\n".encode())
            size = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
        if size > WRITTEN_LOG_BYTES:
            _prune(rt, log)
    except OSError:
        pass  # a full disk: an audit in flight may then charge these writes (fail closed), never a lost outcome


def by_a_worker(rt: Runtime) -> bool:
    """This aipm runs inside a worker (its command started it, `env -u AIPM_TASK_ID` or not): what it writes is that
    worker's, and its output is never noted as aipm's (a worker's `aipm status >> stray.txt` escaped its audit).
    Asked once a process and project: the record of a worker that started us was written before its command began,
    and no later one can enclose us (each attempt's end notes, where the output is a file: `aipm run > run.log`)."""
    key = str(rt.state)
    if key not in _BY_A_WORKER:
        _BY_A_WORKER[key] = any(rec.encloses_us() for rec in rt.records())
    return _BY_A_WORKER[key]


_BY_A_WORKER: dict[str, bool] = {}


WRITTEN_LOG_BYTES = 64 * 1024
# A snapshot is taken before its owner queues for the launch lock and saved once it has it: lines that recent are
# kept even when no saved snapshot needs them yet.
WRITTEN_LOG_GRACE_NS = 600 * 10**9


def _prune(rt: Runtime, log: Path) -> None:
    """Keep the lines at least as new as the oldest audit in flight (and the last WRITTEN_LOG_GRACE_NS)."""
    since = [time.time_ns() - WRITTEN_LOG_GRACE_NS]
    for other in rt.records():  # (a worktree task's too: its main tree is audited unless it is confined)
        try:
            since.append(os.stat(other.scope_file).st_mtime_ns)
        except OSError:
            continue
    kept = [line for line in _lines(log) if int(line.split(" ", 1)[0]) >= min(since)]
    write_bytes(log, "".join(f"{line}\n" for line in kept).encode(errors="surrogateescape"))


def written_since(rt: Runtime, since_ns: int) -> list[Target]:
    """What the attempts (and merges) that ended at or after `since_ns` wrote (see note_ended): their targets, their
    orders' task files, and the files a merge wrote, each exactly (its `*`, `?`, `[`, blanks and backslashes are
    the name's)."""
    found: list[Target] = []
    for entry in _entries_since(rt, since_ns):
        try:
            if not isinstance(entry, dict):  # (a list of targets; anything else, a worker's, fails below)
                entry = {"targets": entry}
            for raw in entry.get("targets", ()):
                with contextlib.suppress(PathError):  # (`../x`: no target of ours, from a worker; it excuses nothing)
                    found.append(normalize(str(raw)))
            if isinstance(entry.get("order"), str):
                found.extend(_files_in(entry["order"]))
            found.extend(Target(str(name), False, False) for name in entry.get("files", ()))
        except (ValueError, TypeError):
            continue  # no note of ours (the state directory is in a worker's reach)
    return found


def outputs_since(rt: Runtime, since_ns: int) -> list[list]:
    """The output files of the aipm processes that noted something at or after `since_ns` (see _note), as
    ownoutput.not_own_output takes them: [path, device, inode]."""
    found: list[list] = []
    for entry in _entries_since(rt, since_ns):
        output = entry.get("output") if isinstance(entry, dict) else None
        for item in output if isinstance(output, list) else ():
            # (exactly what files() notes: anything else is no note of ours, the state directory is in reach)
            if (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                    and all(type(n) is int for n in item[1:]) and item not in found):
                found.append(item)
    return found


def _entries_since(rt: Runtime, since_ns: int, stamped: bool = False) -> Iterator:
    """The notes (parsed JSON) made at or after `since_ns`, with their time when `stamped`; a line that is no JSON
    is skipped."""
    for line in _lines(rt.state / WRITTEN_LOG):
        stamp, _, noted = line.partition(" ")
        try:
            if int(stamp) >= since_ns:
                entry = json.loads(noted)
                yield (int(stamp), entry) if stamped else entry
        except (ValueError, RecursionError):  # (a worker's `[[[[...` nests deeper than the parser goes)
            continue


def _lines(log: Path) -> list[str]:
    try:
        # (a worker's sparse terabyte there is no log of ours: none, and the next note writes it anew)
        return [line for line in read_bytes(log, STATE_FILE_MAX).decode(errors="surrogateescape").splitlines()
                if line.split(" ", 1)[0].isdigit()]
    except (OSError, UnicodeDecodeError):
        return []
