"""Scope audit: did a worker write only inside its target files?

Before a worker starts, `snapshot(root)` records every dirty or untracked path of the git work tree (one
`git status` call) with a cheap fingerprint (size, mtime_ns). When the worker ends, a second snapshot is taken and
`changed(before, after)` gives the paths that appeared or whose fingerprint moved, so a file that was already dirty
and was written again (or reverted to clean, or deleted) is seen too. The commits made meanwhile (`findings`'
`in_commits`, from commits.py) hide from `git status` what they took, so each of their paths is asked the same
question, never charged for being committed: a path that was clean at the start changed (it held the old commit's
content), one dirty at the start changed when its fingerprint did, or its inode did after the start (rewritten with
its size kept and its mtime set back, committed or not: neither a commit nor `git status` changes a file's ctime).
A file a commit took as it was (a person's edit or another task's output from before, swept in by `git add -A`; the
statuses aipm wrote, committed by a person) was not written during the attempt.

`coverage.out_of_scope(paths, allowed)` names the ones no allowed target covers; a non-empty answer fails the review
with those paths named.

Limits, by design: files ignored by git are invisible (build output, caches, the runtime directory `.aipm/`, which
is also skipped explicitly); a file written and restored to its exact prior state between snapshots is not seen.

Concurrency: other workers run in the same tree at the same time, and their writes show up in the same
`git status`. The caller therefore passes as `allowed` the task's own targets plus the targets of every task that
was running at any moment between the two snapshots: those running when it started (kept in its record), those
running when it ends (the live records), and those that started and ended in between, whose records are gone by
then — every attempt that ends notes its targets with the time in a small log (`writtenlog.note_ended`, read back by
`written_since`). Target locks guarantee those sets do not overlap, so a write they cover is someone's legitimate
work; a write that none covers is out of scope for every task that ran, and is charged to the task being audited
(or to a human editing the tree meanwhile: the finding names the paths, so that is easy to tell apart).

Cost: inside `shared()`, one snapshot serves every task that ends or starts in the same wake-up (the "after" of
the tasks that ended is the "before" of the tasks that start then), so a run pays one `git status` per wake-up,
not two per task. The supervisor starts it (`prefetch`) as soon as it sees a task end, before it queues for the
launch lock, and reads it at its first use; the tasks that do not depend on the ones that ended start meanwhile,
with their "before" saved — and their go sent — only once it is read (`save_before`, at the round's durable
point), so no command ever begins before the snapshot it is audited from is complete. A confined task is not
audited: the kernel already held it to its targets. An unconfined worktree task is audited here too, in the main
tree: what its worker wrote there by a path out of its worktree (its worktree is checked exactly, workspace.py).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from aipm import durable, inodes, workerfiles
from aipm.gitstatus import (STATUS_ARGS, Git, as_fingerprint, changed, fingerprint, git_env, known_outside, run_git,
                            read_status, real_root, tree_prefix)
from aipm.coverage import dir_covered, out_of_scope
from aipm.paths import Target
from aipm.treewatch import CREATED, WROTE, TreeWatch

RUNTIME_DIR = ".aipm"


class Snapshot(dict):
    """Path relative to the root, "/"-separated → fingerprint; `taken_ns`: when `git status` was started; `head`:
    the commit checked out then (a worker that commits its writes leaves them clean, but HEAD moved)."""

    taken_ns: int = 0
    head: str | None = None


_SHARED: list[dict[str, "Snapshot | _Pending | None"]] = []  # the open sharing scope, if any


@contextmanager
def shared() -> Iterator[None]:
    """Within this block every snapshot of a root is taken once (nested blocks join the outer one)."""
    if _SHARED:
        yield
        return
    _SHARED.append({})
    try:
        yield
    finally:
        for value in _SHARED[0].values():
            if isinstance(value, _Pending):  # read if a task's "before" waits for it, else ended: no git left over
                value.result() if value.needed else value.cancel()
        _SHARED.clear()


def snapshot(root: Path) -> Snapshot | None:
    """Dirty and untracked paths under `root` with their fingerprints; None outside a git work tree or without git."""
    if not _SHARED:
        return _take(Path(root))
    cache = _SHARED[0]
    key = str(root)
    if key not in cache:
        cache[key] = _take(Path(root))
    value = cache[key]
    return value.result() if isinstance(value, _Pending) else value


def prefetch(root: Path) -> None:
    """Start the shared snapshot of `root` now and read it at its first use (snapshot()), so `git status` runs
    while the caller does what needs no snapshot (reaping, the launch lock, reading the task). Only inside
    shared(), and not while this process watches the tree (its attempts need no snapshot); the caller must not
    let anything write in the tree on a task's behalf before that first use."""
    if _SHARED and str(root) not in _SHARED[0] and real_root(root) not in _WATCHES:
        _SHARED[0][str(root)] = _start(Path(root))


def running_pids() -> set[int]:
    """The `git status` processes started by prefetch() and not yet read: children of ours, not strays."""
    return {v.proc.pid for cache in _SHARED for v in cache.values() if isinstance(v, _Pending) and not v._read}


def save_before(root: Path, path: Path, refuse: Callable[[], None], ours: bool = False) -> bool:
    """Save to `path` what a task starts from; False when there is none (not a git work tree, no git).

    With `ours` (this process owns the attempt and audits it) inside watching(), that is the moment its window
    of tree events opens: no snapshot is taken.

    While that snapshot is still being taken (a prefetch), the save waits for it at the durable end of the launch
    round, where the task's go waits too, registered after this: its command never begins before the snapshot
    it is audited against is complete and saved. Should that late save fail, `refuse()` stops the task before
    its command begins (nothing runs unaudited). Otherwise a failure to save raises OSError, as save() does."""
    watch = _WATCHES.get(real_root(root)) if ours else None
    if watch is not None:
        since = time.time_ns()  # before the events are read: what ended later may have written in the window
        _write_json(Path(path), ["watched", since])  # for an owner that adopts the attempt if we die
        watch.open_window(str(path), since)
        return True
    value = _SHARED[0].get(str(root)) if _SHARED else None
    if not isinstance(value, _Pending):
        snap = snapshot(root)
        if snap is not None:
            save(snap, path)
        return snap is not None
    value.needed = True

    def late(durable_ok: bool) -> None:
        if not durable_ok:
            return  # the go is withheld too: the command never runs
        snap = value.result()
        try:
            if snap is not None:
                save(snap, path)
        except OSError:
            refuse()

    durable.once_durable(late)
    return True


class _Pending:
    """A `git status` started for a snapshot, not yet read; read once, by whoever needs it first."""

    def __init__(self, root: Path, prefix: str, proc: "Git", taken_ns: int):
        self.root, self.prefix, self.proc, self.taken_ns = root, prefix, proc, taken_ns
        self.needed = False  # a task's "before" waits for it: read it, never cancel it
        self._result: Snapshot | None = None
        self._read = False

    def result(self) -> Snapshot | None:
        if not self._read:
            self._read = True
            self._result = self._parse()
        return self._result

    def _parse(self) -> Snapshot | None:
        out, code = self.proc.communicate()
        if code != 0:
            return None
        snap = Snapshot()
        snap.taken_ns = self.taken_ns
        root = str(self.root)
        snap.head, paths = read_status(out.decode("utf-8", "surrogateescape"))
        for path in paths:
            if not path.startswith(self.prefix):
                continue
            rel = path[len(self.prefix):].rstrip("/")
            if not rel or rel == RUNTIME_DIR or rel.startswith(RUNTIME_DIR + "/"):
                continue
            snap[rel] = fingerprint(f"{root}/{rel}")
        return snap

    def cancel(self) -> None:
        if not self._read:
            self._read = True
            self.proc.kill()


def _take(root: Path) -> Snapshot | None:
    pending = _start(root)
    return pending.result() if pending is not None else None


def _start(root: Path) -> _Pending | None:
    resolved = real_root(root)
    if known_outside(resolved):
        return None  # known: not in a work tree, or no git
    taken_ns = time.time_ns()
    try:
        proc = Git(["git", "-C", str(root), "--no-optional-locks", *STATUS_ARGS, "--", "."], git_env())
    except OSError:
        return None
    pending = _Pending(root, "", proc, taken_ns)
    prefix = tree_prefix(resolved)  # the first time, `git rev-parse` runs while that status does
    if prefix is None:
        pending.cancel()
        return None
    pending.prefix = prefix
    return pending


def save(snap: Snapshot, path: Path) -> None:
    """Write a snapshot as JSON (so an owner that adopts a worker can still audit it); the file's mtime is the
    moment it was taken."""
    _write_json(Path(path), ["snapshot", snap.head, snap], snap.taken_ns)


def _write_json(path: Path, data: object, mtime_ns: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # ours by name: what a worker left there (a FIFO would hold us) goes
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666),
                   "w") as handle:
        handle.write(json.dumps(data, sort_keys=True))
    if mtime_ns:
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
    os.replace(tmp, path)


class Watched:
    """What an attempt audited from tree events starts from: when its window opened."""

    def __init__(self, taken_ns: int):
        self.taken_ns = taken_ns


def load(path: Path) -> Snapshot | Watched | None:
    """What save() or save_before() wrote, or None when it is missing or unreadable."""
    try:  # beside its attempt's log: a FIFO the worker left there must not hold its owner (under the launch lock),
        # nor a sparse terabyte be read (a MemoryError): such a file is none, as one the worker removed
        raw, info = workerfiles.read_checked(path, workerfiles.STATE_FILE_MAX)
        data, taken = json.loads(raw), info.st_mtime_ns
    except (OSError, ValueError):
        return None
    if isinstance(data, list) and len(data) == 2 and data[0] == "watched" and isinstance(data[1], int):
        return Watched(data[1])
    if isinstance(data, dict):  # saved by an aipm from before HEAD was kept (an attempt adopted across versions)
        data = ["snapshot", None, data]
    if not (isinstance(data, list) and len(data) == 3 and data[0] == "snapshot" and isinstance(data[2], dict)):
        return None
    snap = Snapshot((str(k), as_fingerprint(v)) for k, v in data[2].items())
    snap.taken_ns = taken
    snap.head = data[1] if isinstance(data[1], str) else None
    return snap


def findings(root: Path, path: str | Path, allowed: Callable[[int], list[Target | str]],
             in_commits: set[str] | None = None, began_ns: int = 0) -> list[str]:
    """Sorted paths that the attempt whose start is saved at `path` changed and that nothing in
    `allowed(since_ns)` covers (the targets of every task that may write meanwhile, given the moment it began).
    `in_commits`: the paths committed during the attempt (commits.py), which `git status` no longer shows: each
    counts when it changed during the attempt (a window's events tell; where they cannot, its inode), not for
    being committed; None when its start did not note HEAD (an attempt of an older aipm): a snapshot's own HEAD
    then tells. `began_ns`: when the audit of
    the attempt began (0: it is not audited), what it falls back on when the file at `path` is gone."""
    path = os.fspath(path)
    watch = _WATCHES.get(real_root(root))
    # Our own window is kept here, not read back from its file: a worker may have cleaned the file away.
    since = watch.opened(path) if watch is not None else None
    if since is None:
        start = load(path)
        if isinstance(start, Snapshot):
            after = snapshot(root)
            if after is None:
                return []
            made = in_commits if in_commits is not None else committed(root, start.head, after.head)
            return out_of_scope(changed(start, after, os.fspath(root), made, start.taken_ns), allowed(start.taken_ns))
        if start is not None:
            since = start.taken_ns
        elif began_ns:  # saved, and gone (a worker's `git clean -fdx` of .aipm/): what git shows written since
            since = began_ns
        else:
            return []
    touched = watch.touched(path) if watch is not None else None
    writers_since = since
    seen = touched is not None and watch is not None  # the window's events: exact, where the watch sees
    touched_by_git = touched is None
    if touched is None:  # adopted from an owner that died, or events were lost: what git shows written since
        after = snapshot(root)
        if after is None:
            return []
        touched = {p: _UNSEEN for p in after}
        writers_since -= CTIME_SLACK_NS  # a write that recent counts as in the window: so does its writer
    # A commit hides from `git status` what it took, not from the events: a committed path with no event in the
    # window is as it was when the window opened (a file dirty before it, swept into a commit meanwhile), and was
    # not written. One the events cannot tell of (a directory not watched; a window without its events) counts
    # when it is gone or its inode changed since the window opened.
    unseen = {p for p in in_commits or () if p not in touched and not (seen and watch.sees(p))}
    if not touched and not in_commits:
        return []
    covered = allowed(writers_since)
    real = real_root(root)
    bad = out_of_scope({p for p in touched if not p.endswith("/")}, covered)
    bad = [p for p in bad if _changed_since(f"{real}/{p}", touched[p], since)]
    bad += [p for p in out_of_scope(unseen, covered) if _changed_since(f"{real}/{p}", WROTE, since)]
    # A commit took a path as it was only where HEAD now holds what the file does: one still dirty at the end was
    # committed as the index alone had it (`git rm --cached`, `git update-index`: no event, no inode changed).
    rest = [p for p in out_of_scope(set(in_commits or ()) - set(bad), covered) if not p.endswith("/")]
    if rest:
        now = after if touched_by_git else snapshot(root)
        bad += [p for p in rest if now is not None and p in now]
    # A directory moved away (one made in the window and moved on is no change: its files count by name).
    bad += [p for p in touched if p.endswith("/") and touched[p] != CREATED and not dir_covered(p[:-1], covered)]
    ignored = _ignored(real_root(root), bad)
    return sorted(p for p in bad if p not in ignored and p.rstrip("/") not in ignored)


def committed(root: Path, before: str | None, after: str | None) -> set[str]:
    """Paths under the root that the commits from `before` to `after` changed: a worker that commits what it
    wrote leaves `git status` clean. Empty when HEAD did not move (or there was none before)."""
    if before is None or after is None or before == after:
        return set()
    prefix = tree_prefix(real_root(root)) or ""
    try:
        proc = Git(["git", "-C", str(root), "diff", "--name-only", "-z", "--no-renames", before, after, "--", "."],
                   git_env())
    except OSError:
        return set()
    out, code = proc.communicate()
    if code != 0:  # `before` is gone (a history rewritten and collected): what HEAD holds now is all we know
        return set()
    return {p[len(prefix):] for p in out.decode("utf-8", "surrogateescape").split("\0") if p.startswith(prefix) and p}


_UNSEEN = -1  # the first event in the window is not known: a path gone now may have gone before it

CTIME_SLACK_NS = 50_000_000  # inode times come from a coarse clock: a write just after the window opened may
# carry a time a few milliseconds before it


def _changed_since(path: str, first: int, since_ns: int) -> bool:
    """Whether a path with events in the window differs from what was there when it opened: created and still
    there, removed (it was there: its first event was not its creation), or its inode changed since."""
    try:
        st = os.lstat(path)
    except OSError:
        return first not in (CREATED, _UNSEEN)
    return first == CREATED or st.st_ctime_ns >= since_ns - CTIME_SLACK_NS


def _ignored(root: str, paths: list[str]) -> set[str]:
    """The paths (relative to `root`) that git ignores; none when git cannot tell (fail closed)."""
    if not paths:
        return set()
    try:
        res = run_git(["git", "-C", root, "check-ignore", "-z", "--stdin"], env=git_env(),
                             input="\0".join(paths).encode("utf-8", "surrogateescape"), capture_output=True)
    except OSError:
        return set()
    if res.returncode not in (0, 1):
        return set()
    return set(res.stdout.decode("utf-8", "surrogateescape").split("\0")) - {""}


def ended(root: Path, path: str | Path) -> None:
    """The attempt whose start is saved at `path` has ended (its processes are gone): its window closes now,
    before anything else starts, even if it is audited later."""
    watch = _WATCHES.get(real_root(root))
    if watch is not None:
        watch.end_window(os.fspath(path))


def end(root: Path, path: str | Path) -> None:
    """The attempt whose start is saved at `path` is over: forget it."""
    path = os.fspath(path)
    inodes.remove(path)  # (most attempts saved none: a lookup, not an unlink that takes the directory's lock)
    watch = _WATCHES.get(real_root(root))
    if watch is not None:
        watch.close_window(path)


# -- the watch of a `run` ------------------------------------------------------------------------------

_WATCHES: dict[str, TreeWatch] = {}  # real root -> the watch this process holds over it (treewatch.py)


@contextmanager
def watching(root: Path, at_exit: bool = False) -> Iterator[None]:
    """Within this block the attempts this process starts and ends in `root` are audited from one watch of
    the tree's events instead of `git status` per wake-up (where inotify works and the tree is a git work tree
    of at most treewatch.MAX_DIRS directories; else as before). `at_exit`: the process ends with the block."""
    real = real_root(root)
    watch = None
    if real not in _WATCHES and tree_prefix(real) is not None:
        watch = TreeWatch.open(real, _ignored_dirs(real), RUNTIME_DIR, lambda dirs: _ignored(real, dirs))
        if watch is not None:
            _WATCHES[real] = watch
    try:
        yield
    finally:
        if watch is not None:
            del _WATCHES[real]
            watch.close(at_exit)


def _ignored_dirs(root: str) -> list[str]:
    """Directories below `root` that git ignores (relative, "/"-separated): not watched."""
    try:
        res = run_git(["git", "-C", root, "ls-files", "-z", "--others", "--ignored", "--exclude-standard",
                              "--directory", "--", "."], env=git_env(), capture_output=True)
    except OSError:
        return []
    out = res.stdout.decode("utf-8", "surrogateescape").split("\0") if res.returncode == 0 else []
    return [p.rstrip("/") for p in out if p.endswith("/")]
