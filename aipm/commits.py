"""Commits made in the shared work tree while an attempt ran.

An agent often ends with `git add -A && git commit` (or `git commit -am`). In the shared tree that sweeps into
its commit the half-written files of the tasks still running beside it, and files outside its own targets. Each
shared-tree attempt notes HEAD as it starts (`at_start`: read from .git's files, no git process; nothing outside
a git work tree), and its end compares (`moved`): when the ref files' inode, size and mtime are as they were, no
commit happened, and that costs a few stats and no git. Only when HEAD moved does one `git diff` name the files
(scope.committed), and `notice` says which of them lie outside the attempt's targets, and whose they are.

Which worker committed is not known (git records no process, and nothing else ties a commit to one): the notice
names every attempt running when HEAD last moved (the ref file's time; the ended ones from the written log), the
one whose end it is first. The scope audit asks of each committed file whether it changed during the attempt
(scope.findings): `git status` no longer shows what was committed, and a commit alone writes nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from aipm import writtenlog
from aipm.errors import UserError
from aipm.gitstatus import git_env, real_root, run_git
from aipm.model import Task
from aipm.paths import Target
from aipm.record import Record
from aipm.runtime import Runtime
from aipm.coverage import out_of_scope
from aipm.project import Project
from aipm.scope import CTIME_SLACK_NS, committed
from aipm.store import load_task, task_files
from aipm.workerfiles import GIT_FILE_MAX, read_git_file, reading

_DIRS: dict[str, tuple[str, str] | None] = {}  # real root -> (git dir, common dir), or None outside a work tree


def at_start(root: Path) -> list:
    """HEAD as an attempt starts, for Record.head: [commit ("" before the first), the branch's ref ("" when
    detached), the stamps of the ref files]; [] outside a git work tree."""
    dirs = _git_dirs(real_root(root))
    if dirs is None:
        return []
    oid, ref = _resolve(root, *dirs)
    return [oid, ref, _stamps(*dirs, ref)]


def moved(root: Path, start: list) -> tuple[str, str] | None:
    """(old, new) commit when HEAD is not what `start` (at_start) saw; None when it is, or nothing was seen."""
    if len(start) != 3:
        return None  # outside a git work tree, or a record from an aipm before this
    dirs = _git_dirs(real_root(root))
    old, ref, stamps = start
    if dirs is None or _stamps(*dirs, ref) == stamps:
        return None  # git replaces a ref file (lock file, rename) whenever it moves it
    new = _resolve(root, *dirs)[0]
    return (old, new) if new != old else None


def notice(rt: Runtime, rec: Record, old: str, new: str, paths: set[str], orders_dir: str = "orders"
           ) -> tuple[str, dict]:
    """The line (for the task's log and run's output) and the `committed` event of an attempt during which HEAD
    moved from `old` to `new`, `paths` changed by those commits. `orders_dir`: where the project's orders are (their
    task files are aipm's)."""
    at = _moved_at(rt.root, rec.head)
    records = [r for r in rt.records() if r.key != rec.key and r.alive()]
    ended = writtenlog.ended_since(rt, writtenlog.began_ns(rec))
    # Running at the commit: begun by then (a tick of the ref file's coarse clock later) and not ended before it.
    # (`at` is when HEAD last moved; 0 when not known: every attempt that ran beside it.)
    at_commit = [r.key for r in records if not at or writtenlog.began_ns(r) <= at + CTIME_SLACK_NS]
    at_commit += [key for key, _, began, end in ended if not at or began <= at + CTIME_SLACK_NS and end >= at]
    # Whose a swept-in file is: a running task's first (a task may have ended and started again), then one that
    # ended during the attempt, then one of its order that ended before.
    beside = [(r.key, r.targets, "running") for r in records]
    beside += [(key, targets, "ended") for key, targets, _, _ in reversed(ended)]
    beside += [(f"{rec.order}/{t.id}", t.targets, "ended") for t in _ended(rt, rec)]

    def name(key: str) -> str:
        return key.split("/", 1)[1] if key.startswith(rec.order + "/") else key

    running = [rec.task, *sorted({name(key) for key in at_commit} - {rec.task})]
    aipms = [f for d in {*(r.order_dir for r in [rec, *records]), *_order_dirs(rt.root, orders_dir)}
             for f in writtenlog.order_files(rt.root, d)]
    swept = []
    for path in out_of_scope(paths, rec.targets):
        whose = next(((name(key), state) for key, targets, state in beside if _covers(targets, path)), None)
        if whose is None:
            whose = (None, "task_file" if _covers(aipms, path) else "none")
        swept.append({"path": path, "task": whose[0], "state": whose[1]})
    text = (f"HEAD moved {_short(old)} → {_short(new)} during attempt {rec.serial} (running then: "
            f"{', '.join(running)}); ")
    text += ("swept in: " + ", ".join(f"{s['path']} ({_SAYS[s['state']].format(task=s['task'])})" for s in swept)
             if swept else "every committed file is among its targets")
    event = {"event": "committed", "order": rec.order, "task": rec.task, "attempt": rec.serial, "from": old or None,
             "to": new, "running": running, "swept_in": swept, "detail": text}
    return text, event


_SAYS = {"running": "target of {task}, still running", "ended": "target of {task}, ended",
         "task_file": "a task file aipm writes", "none": "no running task's target"}


def _covers(targets: Iterable[Target | str], path: str) -> bool:
    return not out_of_scope({path}, targets)


def _order_dirs(root: Path, orders_dir: str) -> list[Path]:
    """Every order directory under `orders_dir`: the task files there are aipm's, whether their order runs or not."""
    try:
        return Project(root, orders_dir).order_dirs()
    except (UserError, OSError):
        return []


def _ended(rt: Runtime, rec: Record) -> list[Task]:
    """The other tasks of `rec`'s order that have ended (whose files those are, when no attempt that ran beside it
    names them)."""
    found = []
    for path in task_files(Path(rec.order_dir)):
        try:
            task = load_task(path, rt.root)
        except (UserError, OSError):
            continue  # broken or gone meanwhile: the run's view reports it
        if task.id != rec.task and task.finished_at:
            found.append(task)
    return found


def _moved_at(root: Path, start: list) -> int:
    """When HEAD last moved (ns): the newest of the ref files that changed since `start` (at_start); 0 when not
    known."""
    dirs = _git_dirs(real_root(root))
    if dirs is None or len(start) != 3:
        return 0
    now = _stamps(*dirs, start[1])
    return max((s[2] for s, was in zip(now, start[2]) if s and s != was), default=0)


def _short(oid: str) -> str:
    return oid[:10] if oid else "(no commit)"


def committed_during(root: Path, rec: Record) -> tuple[str, str, set[str]] | None:
    """(old, new, paths changed by the commits) when HEAD moved while `rec`'s attempt ran, else None."""
    heads = moved(root, rec.head)
    if heads is None:
        return None
    old, new = heads
    # From the first commit on: what the commits hold is what they changed, so diff them with the empty tree.
    return old, new, committed(root, old or _git(root, "hash-object", "-t", "tree", os.devnull), new or None)


# -- .git's files ---------------------------------------------------------------------------------------

def _git_dirs(root: str) -> tuple[str, str] | None:
    """The git dir holding HEAD and the common dir holding the refs (they differ in a linked worktree) of the
    work tree `root` is in; looked for once per process, by stats alone."""
    if root not in _DIRS:
        _DIRS[root] = _find(root)
    return _DIRS[root]


def _find(root: str) -> tuple[str, str] | None:
    ceilings = {os.path.realpath(c) for c in os.environ.get("GIT_CEILING_DIRECTORIES", "").split(":") if c}
    here = root
    while True:
        dot = os.path.join(here, ".git")
        if os.path.isdir(dot):
            gitdir = dot
        elif os.path.isfile(dot):  # a linked worktree or a submodule: "gitdir: <path>"
            text = _read(dot)
            if not text.startswith("gitdir: "):
                return None
            gitdir = os.path.join(here, text[len("gitdir: "):])
        else:
            parent = os.path.dirname(here)
            if parent == here or parent in ceilings:
                return None
            here = parent
            continue
        common = _read(os.path.join(gitdir, "commondir"))
        return gitdir, os.path.normpath(os.path.join(gitdir, common)) if common else gitdir


def _resolve(root: Path, gitdir: str, common: str) -> tuple[str, str]:
    """(HEAD's commit, "" before the first or when it is not one; the branch's ref, "" when detached)."""
    oid, ref = _read_head(root, gitdir, common)
    # Only a commit id goes on to git's command line: what a worker writes in .git could be an option.
    return (oid if _OID.fullmatch(oid) else ""), ref


_OID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # SHA-1 or SHA-256


def _read_head(root: Path, gitdir: str, common: str) -> tuple[str, str]:
    head = _read(os.path.join(gitdir, "HEAD"))
    if os.path.isdir(os.path.join(common, "reftable")):
        # A reftable repository's refs are no plain text to read: git says.
        ref = head[len("ref: "):] if head.startswith("ref: ") else ""
        return _git(root, "rev-parse", "-q", "--verify", "HEAD"), ref
    if not head.startswith("ref: "):
        return head, ""
    ref = head[len("ref: "):]
    oid = _read(os.path.join(common, ref))
    if not oid:
        try:
            with reading(os.path.join(common, "packed-refs")) as packed:
                end = f" {ref}\n".encode(errors="surrogateescape")  # (a name in any bytes, as read)
                for line in iter(lambda: packed.readline(GIT_FILE_MAX), b""):
                    if not line.endswith(b"\n"):
                        # longer than a ref's line (an id and a name): a sparse terabyte a worker left, where
                        # reading to the line's end was a MemoryError (or the last line, cut short)
                        break
                    if line.endswith(end):
                        oid = line.split(b" ", 1)[0].decode()
                        break
        except (OSError, UnicodeDecodeError):
            oid = ""
    return oid, ref


def _git(root: Path, *args: str) -> str:
    """What a git command prints, stripped; "" when it fails."""
    try:
        res = run_git(["git", "-C", str(root), *args], env=git_env(), capture_output=True, text=True,
                             errors="surrogateescape")
    except OSError:
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


def _stamps(gitdir: str, common: str, ref: str) -> list:
    """(inode, size, mtime) of every file whose change may move HEAD, [] for one missing."""
    paths = [os.path.join(gitdir, "HEAD"), os.path.join(common, "packed-refs"),
             os.path.join(common, "reftable", "tables.list")]
    if ref:
        paths.append(os.path.join(common, ref))
    stamps = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamps.append([])
            continue
        stamps.append([st.st_ino, st.st_size, st.st_mtime_ns])
    return stamps


def _read(path: str) -> str:
    """A small file of .git, "" when missing or not one git wrote (a worker may leave a FIFO there: never wait)."""
    try:
        return read_git_file(path)
    except OSError:
        return ""
