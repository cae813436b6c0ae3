"""Merging a task's changes back into the main tree: plan every file first, then apply the plan exactly once.

Planning reads three states per changed path — the task's start (base), its end, and the main tree now — and
decides: nothing to do (the main tree already holds the result), a plain write or delete (the main tree still
holds the start), or a three-way merge (`git merge-file`) where a person changed the file meanwhile. Any
conflict and nothing is written at all.

Applying is resumable. The plan (each file's state when planned and its result, with their digests) is written
to `.aipm/merges/...` and made durable before the first file is touched; each file is then replaced atomically
(temp file in its directory, fsync, rename, directory fsync) and its step number appended to a journal. After a
crash the next owner applies the same plan again: a step in the journal, or whose file already holds its result,
is skipped, so every change lands exactly once. A file a person changed after the plan was made (while a
crash held the merge up) is merged three ways again, its state when planned the ancestor; where that cannot be
done the person's file is kept, the step is journalled as a conflict, and every later application reports it.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aipm.digest import sha256
from aipm.durable import fsync_dir
from aipm.gitstatus import run_git
from aipm.workerfiles import open_regular, reading
from aipm.workspace import Conflict, MergeStopped, mergeplan
from aipm.workspace.mergeplan import STATE_MAX, Planned, State, Step, TooLarge, digest, read_within
from aipm.workspace.repo import GITLINK, Change, Repo

ABSENT = "000000"
LINK = "120000"
_TEMP = ".aipm-merge.tmp"  # suffix of our temp files in the user's tree: a crashed write leaves one, we remove it
def read_state(path: Path) -> State | None:
    """What is at `path`; TooLarge for a file over STATE_MAX (only the main tree's files are read here)."""
    st = _lstat(path)
    if st is None:
        return None
    if stat.S_ISLNK(st.st_mode):
        return State("link", os.fsencode(os.readlink(path)))
    if stat.S_ISREG(st.st_mode):
        with reading(path) as handle:  # (a FIFO put in its place since: refused, never waited for)
            return State("file", read_within(handle, "the main tree's file"), bool(st.st_mode & stat.S_IXUSR))
    return State("other")


def same_state(one: Path, other: Path) -> bool:
    """read_state(one) == read_state(other), never holding a file whole: a worker's sparse terabyte in its worktree
    was a MemoryError. Files of other sizes or executable bits differ unread; others are compared a chunk at a
    time. One that cannot be read (a FIFO in its place since) is not the same."""
    stats = [_lstat(path) for path in (one, other)]
    if None in stats:
        return stats == [None, None]
    files = [stat.S_ISREG(st.st_mode) for st in stats]
    if not any(files):
        return read_state(one) == read_state(other)  # links or neither a file: no content held
    if not all(files) or len({(st.st_size, bool(st.st_mode & stat.S_IXUSR)) for st in stats}) > 1:
        return False
    try:
        with reading(one) as first, reading(other) as second:
            while (chunk := first.read(1 << 20)) == second.read(1 << 20):
                if not chunk:
                    return True
            return False
    except OSError:
        return False


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def commit_digest(repo: Repo, commit: str, path: str, mode: str) -> str | None:
    """digest(commit_state(...)), a file's content hashed piece by piece: a large file is never in memory whole."""
    if mode in (ABSENT, LINK):
        return digest(commit_state(repo, commit, path, mode))
    found = sha256(f"file:{int(mode == '100755')}:".encode())
    repo.blob_into(commit, path, found.update)
    return found.hexdigest()


def commit_state(repo: Repo, commit: str, path: str, mode: str, what: str = "the task's file") -> State | None:
    """A path's state at `commit`; TooLarge for a file over STATE_MAX, `what` naming it."""
    if mode == ABSENT:
        return None
    if mode == LINK:
        return State("link", repo.link(commit, path))
    data = repo.blob(commit, path, STATE_MAX)
    if data is None:
        raise TooLarge(what)
    return State("file", data, mode == "100755")


@dataclass
class Applied:
    """What applying a plan did beyond writing its results."""

    notes: list[str] = field(default_factory=list)  # for the attempt's log
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # (path, why) of each result not written
    steps: int = 0


def plan(repo: Repo, base: str, end: str, changes: list[Change]) -> list[Planned]:
    """Steps (with each result) that bring the task's changes into the main tree; Conflict when impossible."""
    steps: list[Planned] = []
    problems: list[tuple[str, str]] = []  # (path, why)
    unseen: list[str] = []  # of those, what every attempt meets: files git ignores, repositories
    own: list[str] = []  # and those of the task's own doing
    details: list[str] = []
    deleted = {c.path for c in changes if c.new_mode == ABSENT}
    for change in changes:
        if GITLINK in (change.old_mode, change.new_mode):
            problems.append((change.path, "a submodule; its changes are not merged back (commit them there)"))
            own.append(change.path)  # (the task's doing, not the main tree's: a next attempt may leave it be)
            continue
        # The start's content only as a digest, unless both sides changed the file: a large file changed by the
        # task alone is held once (its result), not three times.
        old = commit_digest(repo, base, change.path, change.old_mode)
        try:
            new = commit_state(repo, end, change.path, change.new_mode)
            now = read_state(repo.top / change.path)
        except TooLarge as exc:
            problems.append((change.path, exc.strerror))
            continue
        if new is not None:
            # Checked here, not found half-way through applying: a write needs every parent to be a directory
            # and its own path free, once the plan's own deletions are done.
            blocked = _blocked_parent(repo.top, change.path, deleted)
            if blocked:
                problems.append((change.path, f"{blocked} is not a directory in the main tree"))
                continue
            if now is not None and now.kind == "other":
                if not _emptied(repo.top / change.path, repo.top, deleted):
                    # What keeps it there may be no one's edit: files git ignores, or a repository, which no
                    # capture holds, so every attempt meets them again (said so: retried, it was blamed on "your
                    # edit" until REJECTED).
                    hidden = _unseen_in(repo, change.path, deleted)
                    problems.append((change.path, _UNSEEN_DIR if hidden else
                                     "a directory in the main tree, where the task has a file"))
                    if hidden:
                        unseen.append(change.path)
                    continue
                now = None  # a directory the plan's deletions empty (and apply's pruning removes)
        if now == new:
            if now is None and old is not None and repo.skipped(change.path):  # absent by choice: still in HEAD
                problems.append((change.path, _SPARSE.format("deletion")))
            continue  # already there (a person made the same change, or a crashed merge got this far)
        if digest(now) == old:
            steps.append(Planned(Step(change.path, old, digest(new)), new, now))
            continue
        try:
            start = commit_state(repo, base, change.path, change.old_mode, "the file at the task's start")
            merged, why, text = _three_way(start, now, new)
        except TooLarge as exc:
            merged, why, text = None, exc.strerror, b""
        if merged is None:
            if now is None and repo.skipped(change.path):  # absent by choice: no one deleted it
                why = _SPARSE.format("change")
            elif old is None and now is not None and repo.ignores(change.path):
                # Not a change of the main tree's: no capture holds a file git ignores, so the start had none
                # (a worker's `git add -f` put the task's in its end). Said so, every attempt hits it again.
                why = _IGNORED_THERE
                unseen.append(change.path)
            problems.append((change.path, why))
            if text:
                details.append(f"--- {change.path}: the task's changes and the main tree's, with conflict markers\n"
                               + text.decode("utf-8", "replace"))
            continue
        steps.append(Planned(Step(change.path, digest(now), digest(merged)), merged, now))
    if problems:
        paths = [path for path, _ in problems]
        changed = len(unseen) + len(own) < len(paths)  # a person's edit meanwhile may be among them
        # The first line is the task's reason: it names the paths (the lines below give each one's why).
        message = (f"merge conflict in {', '.join(paths)}: " + (
            "the main tree changed meanwhile and cannot be combined with this attempt's changes" if changed else
            "the main tree holds what no attempt starts with there (files git ignores, a repository of its own), "
            "which the task's would replace" if unseen else "the task changed what is not merged back")
                   + "; nothing of it was merged\n"
                   + "".join(f"  {path}: {why}\n" for path, why in problems) + "".join(f"\n{d}" for d in details))
        # Met again by every attempt: what is in the way is in none of their worktrees, so no agent can see it
        raise Conflict(message, paths, main_tree=changed, lasting=not changed and not own)
    # Deletions first: a path may turn from a directory into a file (or back) between start and end.
    return sorted(steps, key=lambda s: (s.result is not None, s.step.path))


_SPARSE = ("outside the main tree's sparse checkout; `git sparse-checkout add` its directory to have the task's {} "
           "merged")


def _blocked_parent(top: Path, path: str, deleted: set[str]) -> str | None:
    """The first parent of `path` that exists in the main tree but is not a directory (a file, a symbolic link),
    unless the plan deletes it; None when all are directories or absent."""
    parts = path.split("/")[:-1]
    for n in range(1, len(parts) + 1):
        parent = "/".join(parts[:n])
        try:
            mode = os.lstat(top / parent).st_mode
        except FileNotFoundError:
            return None
        if not stat.S_ISDIR(mode):
            return None if parent in deleted else parent
    return None


def _emptied(directory: Path, top: Path, deleted: set[str]) -> bool:
    """Every file below `directory` is one the plan deletes, and no directory below it is empty (the plan
    cannot remove one that holds nothing of its own)."""
    for here, dirs, files in os.walk(directory):
        if not dirs and not files:
            return False
        links = [d for d in dirs if os.path.islink(os.path.join(here, d))]  # git's files; walk skips them
        if any(os.path.relpath(os.path.join(here, f), top) not in deleted for f in files + links):
            return False
    return True


def _unseen_in(repo: Repo, directory: str, deleted: set[str]) -> bool:
    """Whether all that the main tree's `directory` (from the top) keeps, beside what the plan deletes, is what no
    capture holds: files git ignores, and repositories (a `.git` of their own) with all they hold."""
    top, found = repo.top, False
    for here, dirs, files in os.walk(top / directory):
        if ".git" in dirs or ".git" in files:
            dirs.clear()  # a repository: none of its files is in any attempt's start
            found = True
            continue
        for name in files + [d for d in dirs if os.path.islink(os.path.join(here, d))]:
            path = os.path.relpath(os.path.join(here, name), top)
            if path not in deleted:
                if not repo.ignores(path):
                    return False
                found = True
    return found  # (empty directories alone: a person's `mkdir` meanwhile, which may go)


_UNSEEN_DIR = ("a directory in the main tree, where the task has a file, holding what no attempt starts with (files "
               "git ignores, or a repository of its own): every attempt meets them again; move them away to have the "
               "task's merged, or take it from the attempt's patch")

_IGNORED_THERE = ("the main tree has a file here that git ignores (so the attempt started without it), and the task "
                  "made one (`git add -f`): yours is not written over; move it away to have the task's merged, or "
                  "take it from the attempt's patch")


def _three_way(old: State | None, now: State | None, new: State | None) -> tuple[State | None, str, bytes]:
    """(merged state, "", b"") or (None, why not, the conflicted text when there is one)."""
    if now is None:
        return None, "deleted in the main tree since the task started, changed by the task", b""
    if new is None:
        return None, "changed in the main tree since the task started, deleted by the task", b""
    if now.kind != "file" or new.kind != "file" or (old is not None and old.kind != "file"):
        return None, "changed on both sides, and not a regular file on each", b""
    ancestor = old.data if old is not None else b""
    if any(b"\0" in data for data in (ancestor, now.data, new.data)):  # (not joined: a copy of all three)
        return None, "a binary file changed on both sides", b""
    with tempfile.TemporaryDirectory(prefix="aipm-merge-") as tmp:
        names = []
        for name, data in (("main", now.data), ("start", ancestor), ("task", new.data)):
            Path(tmp, name).write_bytes(data)
            names.append(str(Path(tmp, name)))
        proc = run_git(["git", "merge-file", "-p", "-L", "main tree", "-L", "task start", "-L", "task",
                               *names], capture_output=True)
    if proc.returncode != 0:
        return None, "changed on both sides in overlapping lines", proc.stdout if proc.returncode > 0 else b""
    if len(proc.stdout) > STATE_MAX:  # (both sides' additions): saved as its step's result, never read back
        return None, TooLarge("the merged file").strerror, b""
    # The executable bit follows whichever side changed it (the task's, when both did).
    exec_bit = new.exec if old is None or new.exec != old.exec else now.exec
    return State("file", proc.stdout, exec_bit), "", b""


# -- applying the saved plan (mergeplan.py) -------------------------------------------------------------------


def apply(top: Path, directory: Path, after_each=lambda steps_done: None) -> Applied:
    """Apply a saved plan, skipping what is already done; the conflicts it met, now and in earlier applications.

    `after_each(n)` runs once n steps are done (the test seam that kills a merge midway hooks in there)."""
    data = mergeplan.load(directory)
    if data is None:
        return Applied()
    journal = directory / "applied"
    text = mergeplan.journal_text(directory)
    if not text.endswith(b"\n") and text:  # a last line a crash cut short: cut off, else the next would extend it
        os.truncate(journal, text.rfind(b"\n") + 1)
    done, begun = mergeplan.journal(text)
    applied = Applied(steps=len(data["steps"]))
    try:
        fd = open_regular(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    except OSError as exc:
        raise mergeplan.unreadable(journal, exc) from None
    with os.fdopen(fd, "a") as log:
        def note(*line) -> None:
            log.write(json.dumps(line) + "\n")
            log.flush()
            os.fsync(log.fileno())

        for i, raw in enumerate(data["steps"]):
            step = Step(**raw)
            try:
                if i not in done:
                    # A temp still there: the crash came before its rename, so the step's inode never landed.
                    renamed = not _remove_temp(top / step.path)
                    done[i] = _step(top, directory, i, step, begun.get(i) if renamed else None, applied.notes,
                                    lambda inode: note(i, None, inode))
                    note(i, done[i])
            except OSError as exc:
                raise MergeStopped(f"merge stopped at {step.path}: {exc.strerror or exc}; {i} of "
                                   f"{len(data['steps'])} steps applied, the rest stays pending in "
                                   f"{directory} until it can be written") from None
            if done[i]:
                applied.conflicts.append((step.path, done[i]))
            after_each(i + 1)
    return applied


def _step(top: Path, directory: Path, i: int, step: Step, begun: int | None, notes: list[str],
          renaming: Callable[[int], None]) -> str:
    """Apply one step: "" when the path holds its result, else why it was left as the main tree has it.

    A change made since the plan to a file the step has not written yet is merged with the step's three ways;
    where that cannot be done the main tree's file is kept (and the step's change stays in the attempt's
    patch): a conflict. `begun`: the inode this step's write renamed into place, when a crash may have cut
    the step short after it (a person's edit since then kept that inode only if made in place)."""
    target = top / step.path
    blocked = step.after and _blocked_parent(top, step.path, set())  # the plan's deletions are done by now
    if blocked:
        return f"{blocked} became a file in the main tree after the merge was planned"
    st = _lstat(target)
    if begun is not None and st is not None and st.st_ino == begun:
        return ""  # written (then perhaps changed in place by a person: their change is on top of ours)
    try:
        state = read_state(target)
    except TooLarge as exc:  # neither the step's result nor its planned state: both were read, within the bound
        return f"changed in the main tree after the merge was planned; {exc.strerror}"
    now = digest(state)
    if now == step.after:
        if step.after is None:
            _prune_empty(target.parent, top)  # a crash may have come between the deletion and the pruning
        return ""
    result = mergeplan.load_state(directory / f"{i}.state", step.after) if step.after else None
    if now != step.before:
        ancestor = directory / f"{i}.before"
        if step.before is not None and not ancestor.exists():
            return ("changed in the main tree after the merge was planned; the plan, saved by an older aipm, "
                    "keeps no copy of the file as planned to merge the two with")
        result, why, _ = _three_way(mergeplan.load_state(ancestor, step.before) if step.before else None, state,
                                    result)
        if result is None:
            return f"changed in the main tree after the merge was planned; {why}"
        notes.append(f"{step.path}: changed in the main tree after the merge was planned; merged with it")
    _put(target, result, top, renaming)
    return ""


def _put(target: Path, state: State | None, top: Path, renaming: Callable[[int], None] = lambda inode: None
         ) -> None:
    """Make `target` hold `state` (None: remove it) in one atomic step; `renaming(inode)` just before the file
    that holds it is renamed into place."""
    if state is None:
        try:
            target.unlink()
        except FileNotFoundError:
            pass
        fsync_dir(target.parent)
        _prune_empty(target.parent, top)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + _TEMP)
    tmp.unlink(missing_ok=True)
    if state.kind == "link":
        os.symlink(os.fsdecode(state.data), tmp)
    else:
        mergeplan.write_durably(tmp, state.data)
        mode = _mode(target)
        os.chmod(tmp, mode | 0o111 if state.exec else mode & ~0o111)
    renaming(os.lstat(tmp).st_ino)
    os.replace(tmp, target)
    fsync_dir(target.parent)


def _mode(target: Path) -> int:
    """Keep a file's permission bits; a new file gets the usual ones (0666 less the umask)."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _prune_empty(directory: Path, top: Path) -> None:
    """Remove directories a deletion left empty, as git does on checkout (never the top itself)."""
    while directory != top and top in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def _remove_temp(target: Path) -> bool:
    """Remove what a crashed write left; whether there was one."""
    try:
        target.with_name(target.name + _TEMP).unlink()
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


