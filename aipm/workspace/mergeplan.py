"""The saved plan of a merge-back (mergeback.py): written whole and durable before any file of the user's is touched,
read back to apply it exactly once, after any crash.

`.aipm/merges/<ORDER>/<TASK>/` holds plan.json (the attempt and its steps: each path, the digest of the main
tree's state when planned and of the result), each step's result and planned state (`N.state`, `N.before`: a
line of JSON, then the content), and `applied`, the journal of the steps done. `.aipm/` is in a worker's reach:
a file there is never waited for (a FIFO) nor read whole past PLAN_MAX or STATE_MAX (a sparse terabyte), and one
that cannot be read stops the merge (MergeStopped) and is kept for a person, never taken for no plan.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from aipm.digest import sha256
from aipm.durable import fsync_dir
from aipm.workerfiles import read_bytes, reading
from aipm.workspace import MergeStopped

# The most read of a plan's plan.json or `applied` journal (a worker can leave a FIFO or a sparse terabyte there:
# `.aipm/` is in its reach). A plan's step is about 170 bytes and its JSON-escaped path, a journal's fewer (a step
# number, an inode, a conflict's why): 256 MiB holds a million steps of 90-byte paths, ten times every file of
# Linux (85,000) changed by one task; planning that many would first hold every result's content in memory.
PLAN_MAX = 256 << 20
# The most of one file's content a merge holds in memory: each state it compares, merges or writes (the task's file,
# the main tree's, the task's start where both changed it, the merged result) and each step's file read back. Read
# whole, a file of gigabytes (a worker's sparse terabyte) in the task's result, the main tree or `.aipm/merges/` was
# a MemoryError, or hours of reading. A file over it is not merged: its path is a conflict (the attempt's patch keeps
# the change), and a step's file over it, which aipm never writes, stops the merge.
STATE_MAX = 256 << 20


class TooLarge(OSError):
    """A file's content over STATE_MAX, refused unread; `what` names the file ("the main tree's file")."""

    def __init__(self, what: str):
        super().__init__(errno.EFBIG, f"{what} is over {STATE_MAX >> 20} MiB, more than a merge holds in memory")


def read_within(handle: BinaryIO, what: str) -> bytes:
    """The rest of an open file; TooLarge when it holds more than STATE_MAX (never read: a sparse terabyte)."""
    if os.fstat(handle.fileno()).st_size - handle.tell() > STATE_MAX:
        raise TooLarge(what)
    data = handle.read(STATE_MAX + 1)  # (one grown since its fstat: still never more)
    if len(data) > STATE_MAX:
        raise TooLarge(what)
    return data


@dataclass(frozen=True)
class State:
    """What is at a path: a file (content, executable bit) or a symbolic link (target); None when nothing is."""

    kind: str  # "file", "link" or "other" (a directory, a socket: never merged into)
    data: bytes = b""
    exec: bool = False

    def digest(self) -> str:
        found = sha256(f"{self.kind}:{int(self.exec)}:".encode())
        found.update(self.data)  # (not head + data: a copy of a large file's content)
        return found.hexdigest()


def digest(state: State | None) -> str | None:
    return None if state is None else state.digest()


@dataclass
class Step:
    path: str  # relative to the repository's top
    before: str | None  # digest of the main tree's state when planned (None: nothing there)
    after: str | None  # digest of the result (None: the path is deleted)


class Planned(NamedTuple):
    step: Step
    result: State | None  # None: the path is deleted
    before: State | None = None  # the main tree's state when planned: the ancestor if it changes before its step


def save(directory: Path, attempt: int, steps: list[Planned]) -> None:
    """Write the plan so that it is complete on disk before any file of the user's is touched."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for i, (_, result, before) in enumerate(steps):
        for name, state in ((f"{i}.state", result), (f"{i}.before", before)):
            if state is not None and state.kind != "other":
                meta = json.dumps({"kind": state.kind, "exec": state.exec}).encode() + b"\n"
                write_durably(directory / name, meta, state.data)
    # Whole or not at all, by its rename: a plan.json there was complete when written, and one that cannot be read
    # is stopped at (load), never taken for no plan.
    write_durably(directory / "plan.json.tmp", json.dumps({"attempt": attempt,
                                                           "steps": [asdict(s.step) for s in steps]}).encode())
    os.replace(directory / "plan.json.tmp", directory / "plan.json")
    fsync_dir(directory)


def pending(directory: Path, attempt: int) -> bool:
    """A saved plan for `attempt` exists: it must be applied before anything else happens."""
    data = load(directory)
    return data is not None and data["attempt"] == attempt


def progress(directory: Path) -> tuple[int, int, int] | None:
    """(attempt, steps applied, steps) of a saved plan, or None when there is none."""
    data = load(directory)
    if data is None:
        return None
    return data["attempt"], len(journal(journal_text(directory))[0]), len(data["steps"])


def paths(directory: Path) -> list[str]:
    """The paths a saved plan writes, relative to the repository's top."""
    data = load(directory)
    return [raw["path"] for raw in data["steps"]] if data is not None else []


def journal_text(directory: Path) -> bytes:
    return _plan_file(directory / "applied") or b""


def journal(data: bytes) -> tuple[dict[int, str], dict[int, int]]:
    """The journal of the steps applied so far: step number -> "" (written) or why its result was not written;
    and step number -> the inode of the file its write was about to rename into place (a step begun, whose end
    a crash may have cut off). A last line a crash cut short counts for nothing: its step is applied again."""
    whole = data.rfind(b"\n") + 1
    done: dict[int, str] = {}
    begun: dict[int, int] = {}
    for line in data[:whole].splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, int):
            done[entry] = ""  # a plan's journal from before the lines were JSON
        elif not isinstance(entry, list) or len(entry) not in (2, 3) or type(entry[0]) is not int:
            continue  # no line of ours (a list, a step number first), as one that is no JSON
        elif len(entry) == 2:
            done[entry[0]] = entry[1]
        else:
            begun[entry[0]] = entry[2]
    return done, begun


def load(directory: Path) -> dict | None:
    """The saved plan; None when there is none. One that cannot be read is MergeStopped: taken for none, the merge
    it plans, perhaps half applied, was forgotten (its directory removed with the worktree)."""
    path = directory / "plan.json"
    text = _plan_file(path)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise unreadable(path, f"not JSON ({exc})") from None
    if not _plan_shaped(data):
        raise unreadable(path, "not a merge plan aipm wrote")
    return data


def _plan_shaped(data) -> bool:
    """`data` is as save() writes a plan (anything else would be a traceback half-way through applying it)."""
    return (isinstance(data, dict) and type(data.get("attempt")) is int and isinstance(data.get("steps"), list)
            and all(isinstance(step, dict) and step.keys() == {"path", "before", "after"}
                    and isinstance(step["path"], str)
                    and all(step[key] is None or isinstance(step[key], str) for key in ("before", "after"))
                    for step in data["steps"]))


def _plan_file(path: Path) -> bytes | None:
    """A file of the plan's directory (plan.json, the journal); None when there is none. Not waited for (a FIFO)
    nor read whole (a sparse terabyte): one that cannot be read is MergeStopped."""
    try:
        return read_bytes(path, PLAN_MAX)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise unreadable(path, exc) from None


def unreadable(path: Path, problem: OSError | str) -> MergeStopped:
    """The one line for a plan's file that cannot be read, which leaves the plan in place for a person."""
    why = problem if isinstance(problem, str) else problem.strerror or str(problem)
    return MergeStopped(f"merge stopped: {path}: {why}; the merge it plans (perhaps half applied) stays pending "
                        f"until the file is repaired, or {path.parent} removed to drop the rest of it (the attempt's "
                        "changes are kept in its patch)")


def load_state(path: Path, expected: str) -> State:
    """A step's result or planned state (`N.state`, `N.before`), as save() wrote it (`expected`: its digest in the
    plan); MergeStopped when it is not: a worker can write anything there (a FIFO, a sparse terabyte, other
    content, which was written into the main tree as the task's)."""
    try:
        # (A FIFO: refused, never waited for. Not read whole then split: a large file's content copied.)
        with reading(path) as handle:
            meta = _meta(handle.readline(_META_MAX))
            if meta is None:
                raise unreadable(path, "not a step's file aipm wrote")
            state = State(meta["kind"], read_within(handle, "the file"), meta["exec"])
    except OSError as exc:
        raise unreadable(path, exc) from None
    if state.digest() != expected:
        raise unreadable(path, "not what the plan saved there (its digest differs)")
    return state


_META_MAX = 64  # the line save() writes before a state's content ({"kind": "file", "exec": false}: 33 bytes)


def _meta(line: bytes) -> dict | None:
    """The first line of a step's file, when it is save()'s."""
    try:
        meta = json.loads(line)
    except ValueError:
        return None
    shaped = isinstance(meta, dict) and meta.keys() == {"kind", "exec"}
    return meta if shaped and meta["kind"] in ("file", "link") and type(meta["exec"]) is bool else None


def write_durably(path: Path, *chunks: bytes) -> None:
    with open(path, "wb") as handle:
        for chunk in chunks:  # (written one after the other: joined, a large file's content was copied)
            handle.write(chunk)
        handle.flush()
        os.fsync(handle.fileno())
