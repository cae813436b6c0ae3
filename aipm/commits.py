"""Commits made in the shared work tree while an attempt ran.

An agent often ends with `git add -A && git commit` (or `git commit -am`). Each shared-tree attempt notes HEAD
as it starts (`at_start`: read from .git's files, no git process; nothing outside a git work tree), and its end
compares (`moved`): when the ref files' inode, size and mtime are as they were, no commit happened, and that
costs a few stats and no git. Only when HEAD moved does one `git diff` name the files (scope.committed). The
scope audit treats them as the attempt's writes (recording.py): `git status` no longer shows what was committed.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from aipm.gitstatus import git_env, real_root
from aipm.record import Record
from aipm.scope import committed
from aipm.workerfiles import reading

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
                end = f" {ref}\n".encode()
                oid = next((line.split(b" ", 1)[0].decode() for line in packed if line.endswith(end)), "")
        except (OSError, UnicodeDecodeError):
            oid = ""
    return oid, ref


def _git(root: Path, *args: str) -> str:
    """What a git command prints, stripped; "" when it fails."""
    try:
        res = subprocess.run(["git", "-C", str(root), *args], env=git_env(), capture_output=True, text=True)
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
    """A small file of .git, "" when missing or no regular file (a worker may leave a FIFO there: never wait)."""
    try:
        with reading(path) as handle:
            return handle.read(4096).decode("utf-8", "replace").strip()
    except OSError:
        return ""
