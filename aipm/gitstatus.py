"""git plumbing for the scope audit: where a root sits in its work tree, `git status` started off the main
thread, and the fingerprints a snapshot compares (scope.py holds the audit itself).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

from aipm import offthread, posix_spawn

Fingerprint = tuple[int, int] | None  # (size, mtime_ns) of the path, or None when it no longer exists


class Git:
    """`git status` for a snapshot, its output read from a pipe. Started with posix_spawn from the helper thread
    (aipm.offthread): a run starts one per wake-up, and the caller goes on (reaping, the launch lock) while the
    process starts; Popen's fork and bookkeeping cost more than git's own start."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        program = _GIT.get("git") or shutil.which("git", path=env.get("PATH"))
        if program is None:
            raise FileNotFoundError("git")
        _GIT["git"] = program  # once per process: no search of PATH per snapshot
        self._out, write = os.pipe()
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0), (os.POSIX_SPAWN_DUP2, write, 1),
                   (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)]

        def start() -> int:
            try:
                return posix_spawn.spawn(program, argv, env, actions, setsid=True)  # (as run_git)
            finally:
                os.close(write)  # git holds the only write end: its exit is our EOF (a failed start: at once)

        self._started = offthread.in_background(start)

    @property
    def pid(self) -> int | None:
        try:
            return self._started.result()
        except OSError:
            return None

    def communicate(self) -> tuple[bytes, int]:
        """All of its output and its exit code (negative: killed by that signal; 127: it could not start)."""
        chunks = []
        try:
            while chunk := os.read(self._out, 1 << 16):
                chunks.append(chunk)
        finally:
            os.close(self._out)
        if self.pid is None:
            return b"", 127
        _, status = os.waitpid(self.pid, 0)
        return b"".join(chunks), os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.communicate()


_GIT: dict[str, str] = {}


def changed(before: Mapping[str, Fingerprint], after: Mapping[str, Fingerprint], root: str,
            committed: Iterable[str] = (), since_ns: int = 0) -> set[str]:
    """Paths written between the two snapshots of the tree at `root`: those whose fingerprint now differs from the
    one they had then. A path clean in `before` (not in it) counts when it is dirty in `after` or `committed` (the
    commits made meanwhile changed it: clean at the start, it held the old commit's content, and the new one's
    differs). A path dirty in `before` counts when its fingerprint now differs (written, reverted, or deleted), or
    when its inode changed after `since_ns` (the first snapshot's start): rewritten to the same size with its mtime
    set back, committed or not, it was written (a commit or `git status` reads a file, never changes its ctime).
    One committed and dirty in `after` counts: the commit took something other than the file. One a commit took as
    it was (`git add -A` of a file dirty before, a person's `git commit` of the statuses aipm wrote earlier) was not
    written."""
    found, committed = set(), set(committed)
    for p in before.keys() | after.keys() | committed:
        if p not in before:
            found.add(p)
        elif as_fingerprint(before[p]) != (as_fingerprint(after[p]) if p in after else fingerprint(f"{root}/{p}")):
            found.add(p)
        elif p in committed and p in after:
            # Committed, and dirty at the end: what the commit took is not the file's (the worker's write put back
            # as it measured, or a change made in the index alone: `git rm --cached`, `git update-index`)
            found.add(p)
        elif since_ns and _changed_after(f"{root}/{p}", since_ns):
            found.add(p)
    return found


def _changed_after(path: str, since_ns: int) -> bool:
    try:
        return os.lstat(path).st_ctime_ns > since_ns
    except OSError:
        return False  # gone: its fingerprint (None) differed already


_PREFIXES: dict[str, str | None] = {}  # per process: a supervisor must not fork git per task outside a repo


_REAL: dict[Path, str] = {}


def known_outside(root: str) -> bool:
    """Already found not to be in a work tree (or without git), in this process."""
    return _PREFIXES.get(root, "") is None


def real_root(root: Path) -> str:
    """The project root with symlinks resolved, once per process (every attempt's end asks)."""
    if root not in _REAL:
        _REAL[root] = str(root.resolve())
    return _REAL[root]


def tree_prefix(root: str) -> str | None:
    """The root's path inside its work tree ("" at the top, else "sub/dir/"); None when not in a work tree."""
    if root in _PREFIXES:
        return _PREFIXES[root]
    if shutil.which("git") is None:
        return None
    try:
        res = run_git(["git", "rev-parse", "--is-inside-work-tree", "--show-prefix"], cwd=root,
                             capture_output=True, text=True, errors="surrogateescape", env=git_env())
    except OSError:
        return None
    lines = res.stdout.splitlines()
    inside = res.returncode == 0 and lines and lines[0] == "true"
    _PREFIXES[root] = (lines[1] if len(lines) > 1 else "") if inside else None
    return _PREFIXES[root]


def run_git(argv: list[str], **options) -> subprocess.CompletedProcess:
    """subprocess.run of a git of aipm's own, in a session of its own. Ctrl-C in a terminal is SIGINT to the whole
    foreground process group, and `timeout` signals its command's group: in aipm's group, the git of the step under
    way (an attempt's capture, its merge back) died with aipm's stop, and the attempt was charged for it (REJECTED,
    `git add failed: exit -2`). aipm hears the stop, and finishes that step first."""
    return subprocess.run(argv, start_new_session=True, **options)


def git_env() -> dict[str, str]:
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0", LC_ALL="C")
    for key in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        env.pop(key, None)  # audit the tree at root, whatever the caller's git hooks exported
    return env


STATUS_ARGS = ("status", "--porcelain=v2", "-z", "--branch", "--untracked-files=all", "--no-renames")


def read_status(out: str) -> tuple[str | None, list[str]]:
    """(HEAD's commit, None before the first; the paths) of `git <STATUS_ARGS>` output. A rename or copy yields
    both its paths."""
    fields = out.split("\0")
    head, paths = None, []
    i = 0
    while i < len(fields):
        entry = fields[i]
        i += 1
        kind = entry[:2]
        if entry.startswith("# branch.oid "):
            oid = entry[len("# branch.oid "):]
            head = oid if oid != "(initial)" else None
        elif kind == "1 ":
            paths.append(entry.split(" ", 8)[8])
        elif kind == "2 ":
            paths.append(entry.split(" ", 9)[9])
            if i < len(fields) and fields[i]:  # the source path follows as its own field
                paths.append(fields[i])
            i += 1
        elif kind == "u ":
            paths.append(entry.split(" ", 10)[10])
        elif kind == "? ":
            paths.append(entry[2:])
    return head, paths


def fingerprint(path: str) -> Fingerprint:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


def as_fingerprint(value: object) -> Fingerprint:
    return tuple(value) if isinstance(value, (list, tuple)) else None  # type: ignore[return-value]
