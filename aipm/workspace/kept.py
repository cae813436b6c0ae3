"""What of a worktree attempt is kept when nothing of it is merged: its patch (written by workspace.keep), and its
rest, what no patch can hold (a git repository made in the worktree, ignored files in its targets, or the whole
worktree where git cannot capture it), moved out of the worktree before anything removes it; and, where its worker
moved its worktree off its start and its changes there cannot be told from the undoing of your uncommitted edits,
its versions of those paths, which its patch leaves as the start has them. Every line that names the patch names
the rest too; `aipm diff` shows the patch, or the worktree while it is there.
"""

from __future__ import annotations

import glob
import os
import re
import stat
from contextlib import suppress
from pathlib import Path

from aipm.model import some
from aipm.record import Record
from aipm.runtime import Runtime
from aipm.workerfiles import append_log, read_bytes, write_bytes
from aipm.workspace import ownrefs
from aipm.workspace.places import (component, kept_words, later_patch_path, make_own_dir, own_dir, patch_path,
                                   refname, rest_path, scratch, tangled_path, worktree_path)
from aipm.workspace.moved import Onto, onto_start
from aipm.workspace.repo import Repo, WorkspaceError
from aipm.workspace.start import setup_unfinished


def kept_patch(root: Path, rec: Record) -> Path | None:
    """The patch that keeps the changes of `rec`'s worktree attempt, if it holds any: named wherever the attempt
    merged nothing (a finish line, a cancel, a recovery, a stop), since its worktree goes when the next attempt
    starts and the log alone said where its work is. None when it changed nothing, or its end could not be captured
    (its log says why)."""
    patch = patch_path(root, rec.order, rec.task, rec.serial)
    try:
        return patch if rec.workspace and patch.is_file() and patch.stat().st_size else None
    except OSError:  # removed meanwhile
        return None


def kept_rest(root: Path, rec: Record) -> Path | None:
    """Where what `rec`'s worktree attempt left that no patch can hold is kept (keep_rest), if it left any: named
    wherever its patch is (kept_patch)."""
    rest = rest_path(root, rec.order, rec.task, rec.serial)
    try:
        return rest if rec.workspace and any(rest.iterdir()) else None
    except OSError:  # none (or not a directory: what a worker may leave there is no rest of ours)
        return None


STAYS = "it could not be moved out of the worktree"
NOT_KEPT = "could not be kept"  # (a tangled end's versions: keep_tangled)
WHOLE = "the whole worktree, as git cannot capture its changes"


def keep_whole(root: Path, rec: Record) -> str:
    """An attempt whose changes git cannot capture (a path git refuses, `GIT~1`): no patch holds any of them, so its
    whole worktree is its rest (a rename), before anything removes it. A note for its log."""
    tree = worktree_path(root, rec.order, rec.task)
    if not tree.is_dir() or not own_dir(root, tree):
        return ""  # gone, or a link a worker put there: nothing of the attempt's
    left_out = {"./": WHOLE}
    keep_rest(root, rec.order, rec.task, rec.serial, tree, left_out)
    return f"; {left_out_note(left_out)}"


def keep_rest(root: Path, order: str, task: str, serial: int, tree: Path, left_out: dict[str, str],
              held: bool = True) -> None:
    """Move what no patch can hold (`left_out`: a repository with its .git, so its commits and its uncommitted edits
    too) out of the worktree to the attempt's rest, whole, before anything removes the worktree, its only copy;
    each path's note in `left_out` then says where it is. `held`: the worktree is kept while one of them could
    not be moved (keep_before_removal finds a repository again; ignored files it does not look for)."""
    rest = rest_path(root, order, task, serial)
    for path in left_out:
        name = "" if path == "./" else path.strip("/")  # ("./": the whole worktree, kept as the rest itself)
        dest, n = rest / name, 1
        while os.path.lexists(dest):  # kept there already by an earlier capture of this attempt
            n += 1
            dest = rest / f"{name or 'worktree'}.{n}"
        try:
            make_own_dir(root, dest.parent)  # (the only copy of the work: not where a worker's link leads)
            _move(tree / path, dest)
        except OSError as exc:
            left_out[path] += (f"; {STAYS} ({exc}): it is only in {tree / path}, which is not removed while it is "
                               "there" if held else f"; {STAYS} ({exc}): it goes with the worktree")
        else:
            left_out[path] += f"; moved out of the worktree, whole, into {rest}"


_FILE_MODES = ("100644", "100755", "120000")  # what a path of a capture holds that a checkout writes


def _files(onto: Onto) -> dict[str, tuple[str, str]]:
    """Of a tangled end's versions of your edits' paths (onto.theirs), those that are files its rest can hold."""
    return {path: entry for path, entry in onto.theirs.items() if entry[0] in _FILE_MODES}


def keep_tangled(root: Path, repo: Repo, rec: Record, onto: Onto) -> str:
    """An end its worker moved off its start whose changes overlap what the move dropped (moved.onto_start's
    tangled): its patch leaves the paths of your uncommitted edits that its files change as the start has them, as
    there its changes cannot be told from the undoing of those edits, which `git apply` of it (as the docs and
    `diff` say to) undid. Its versions of them, their only copy once the worktree goes, are written into its rest
    at those paths, from the capture (the worktree is left as it is: `diff` and a later patch read it). The note,
    for its log and outcome, is kept beside its patch too (tangled_path), for `diff` to say when it shows it."""
    rest = rest_path(root, rec.order, rec.task, rec.serial)
    present = _files(onto)
    gone = [path for path in onto.theirs if path not in present]
    left = (f"its patch, {patch_path(root, rec.order, rec.task, rec.serial)}, leaves {some(list(onto.theirs))} as "
            "the attempt's start has them, where its changes cannot be told from the undoing of the main tree's "
            "uncommitted edits") + (f" (its worktree has no {some(gone)})" if gone else "")
    try:
        if present:
            make_own_dir(root, rest)  # (the only copy of the work: not where a worker's link leads)
            repo.check_out(present, rest, scratch(root))
    except (WorkspaceError, OSError) as exc:
        note = (f"{left}; its versions of them {NOT_KEPT} ({exc}): they are only in {rec.workspace}, which is not "
                "removed until they are (tried again at its next attempt's start and by `aipm recover`)")
    else:
        note = f"its versions of {some(list(present))} are kept in {rest}, at those paths: {left}" if present else left
    with suppress(OSError):  # (`diff` then names its rest as for any other)
        write_bytes(tangled_path(root, rec.order, rec.task, rec.serial), note.encode(errors="surrogateescape"))
    return note


def tangled_again(root: Path, repo: Repo, order: str, task: str, serial: int, log: str) -> str:
    """Before the worktree of attempt `serial` is removed: keep_tangled's copy that failed at its end (its note says
    so), tried again, its files as its end captured them. Returns the note ("" when none failed); WorkspaceError
    when it failed again: the worktree, their only copy, stays."""
    try:
        before = read_bytes(tangled_path(root, order, task, serial), 1 << 16).decode(errors="surrogateescape")
    except OSError:
        return ""
    files = repo.rev(refname(order, task, "captured", prefix=repo.prefix)) if NOT_KEPT in before else None
    if files is None:
        return ""
    tree = worktree_path(root, order, task)
    onto = onto_start(repo, tree, repo.rev(refname(order, task, "base", prefix=repo.prefix)) or "", files)
    if not onto.tangled:
        return ""
    note = keep_tangled(root, repo, Record(order, "", task, "", serial, [], log, "", "", workspace=str(tree)), onto)
    append_log(log, f"before its worktree was removed: {note}")
    if NOT_KEPT in note:
        raise WorkspaceError(f"{tree} is not removed: {note}")
    return note


def _move(src: Path, dest: Path) -> None:
    """A rename (both are under .aipm/, on one file system), never a copy: shutil.move's copy, where a rename is
    refused, writes out a sparse file's holes (a worker's `truncate -s 1T`) and leaves the source when it cannot
    remove it. A directory its worker made read-only (`chmod -w`, as some build tools leave their output) cannot
    change parents: it is made writable for the rename, and given its mode back."""
    try:
        os.rename(src, dest)
        return
    except PermissionError:
        info = os.lstat(src)
        if not stat.S_ISDIR(info.st_mode) or info.st_mode & stat.S_IWUSR:
            raise
    mode = stat.S_IMODE(info.st_mode)
    os.chmod(src, mode | stat.S_IWUSR)
    try:
        os.rename(src, dest)
    except OSError:
        os.chmod(src, mode)
        raise
    with suppress(OSError):  # (moved: what is kept does not hang on its mode)
        os.chmod(dest, mode)


def left_out_note(left_out: dict[str, str]) -> str:
    """What a capture left out (capture.capture, ignored.ignored_in_targets), and where each is kept (keep_rest)."""
    kinds: dict[str, list[str]] = {}
    for path, what in left_out.items():
        kinds.setdefault(what, []).append(path)
    return "; ".join(f"{some(paths)}: {what}" for what, paths in kinds.items())


def kept_beside(root: Path, order: str, task: str, patch: Path) -> list[str]:
    """What else is kept of the attempt whose patch `diff` shows: its later patch (changes made in its worktree
    after its end, by its review or by hand, kept when the worktree went) and its rest (what no patch can hold)."""
    serial, out = _serial(task, patch), []
    if serial is None:
        return []
    later = later_patch_path(root, order, task, serial)
    with suppress(OSError):
        if later.is_file() and later.stat().st_size:
            out.append(f"changes made in its worktree after attempt {serial}'s end (by its review, or by hand) are "
                       f"kept in {later} (`git apply` it after this one)")
    with suppress(OSError, UnicodeDecodeError):  # (none: no end of it was tangled)
        out.append(read_bytes(tangled_path(root, order, task, serial), 1 << 16).decode(errors="surrogateescape"))
    rest = kept_rest(root, Record(order, "", task, "", serial, [], "", "", "", workspace="kept"))
    if rest is not None and not any(str(rest) in note for note in out):  # (not named by its tangled note)
        out.append(f"what no patch can hold of attempt {serial} is kept in {rest}")
    return out


def shown_instead(root: Path, order: str, task: str, patch: Path) -> str | None:
    """When the patch `diff` shows is not the latest attempt's, in words: that one has none of its own (it never ran
    its command, as one stopped in its workspace_setup; ran in the shared tree; or its end could not be captured).
    Its empty patch was shown, read as the task's work gone."""
    serial, serials = _serial(task, patch), Runtime(root).logs(order, task)
    if serial is None or not serials or max(serials) <= serial:
        return None
    return (f"attempt {max(serials)}, the latest, has no patch (it ran no command in a worktree, or its end could not "
            f"be captured; its log says which): this is attempt {serial}'s, {patch}")


def _serial(task: str, patch: Path) -> int | None:
    """The attempt whose patch is `patch` (None: not an attempt's own patch)."""
    number = re.fullmatch(re.escape(component(task)) + r"\.(\d+)\.patch", patch.name)
    return int(number.group(1)) if number else None


def last_kept(root: Path, order: str, task: str) -> str | None:
    """Where the work of the task's latest attempt is kept, in words (kept_words), or None: after a `launch`, whose
    finish lines no one sees, `why` said only `nothing of it was merged` (or part of it), read as lost. For a
    task whose latest attempt ran in a worktree and which has not finished since (a merged attempt keeps a patch
    too)."""
    serials = Runtime(root).logs(order, task)
    if not serials:
        return None
    rec = Record(order, "", task, "", max(serials), [], "", "", "", workspace="kept")
    patch, rest = kept_patch(root, rec), kept_rest(root, rec)
    return kept_words(patch, rest) if patch or rest else None


def diff(root: Path, order: str, task: str) -> tuple[str | None, bytes | Path, list[str]]:
    """(where it comes from, patch, notes for stderr): the running (or kept) worktree against its start, else the
    last patch kept, as its file (to be read a chunk at a time: a worker may have left gigabytes, or a sparse
    terabyte, there); (None, b"", []) when there is neither (it has not run, or not in a worktree)."""
    name = re.compile(re.escape(component(task)) + r"\.(\d+)\.patch")  # (not a `.later.patch`)
    patches = sorted((p for p in patch_path(root, order, task, 0).parent.glob(f"{glob.escape(component(task))}.*.patch")
                      if name.fullmatch(p.name)), key=lambda p: int(name.fullmatch(p.name).group(1)))
    tree = worktree_path(root, order, task)
    if own_dir(root, tree):  # (not a link a worker left in its place: through it, another tree's changes)
        repo = Repo(root)
        base = repo.rev(refname(order, task, "base", prefix=repo.prefix))
        if base is not None and not setup_unfinished(repo, base):  # (that: only its setup's output is there)
            note = repo.note_of(tree)
            if note is not None:  # (what its git added to a store of its own, which its index names: capture.py)
                ownrefs.take_objects(repo, note)
            now, notes = _as_taken(repo, root, order, task, base, repo.capture(tree, scratch(root), None, ""))
            return f"worktree {tree}", repo.patch(base, now), notes
    if patches:
        return str(patches[-1]), patches[-1], []
    return None, b"", []


def _as_taken(repo: Repo, root: Path, order: str, task: str, base: str, files: str) -> tuple[str, list[str]]:
    """The worktree's files (a captured tree) as its end would be taken (moved.onto_start), for `diff` to show what
    its merge and its patch take: a worker that moved its worktree off its start (`git checkout main`) has files
    that undo what the start held beside its commits, your uncommitted edits, and shown as they are, `git apply`
    of the diff undid them. Where its changes overlap what the move dropped (its end would be sent back), the paths
    of those edits that its files change are shown as the start has them, as its end's patch has them, and a note
    says so and where its versions of them are: no patch shown undoes your edits. Nothing is written but objects:
    no ref (the end's capture reads its own), no log."""
    tree = worktree_path(root, order, task)
    onto = onto_start(repo, tree, base, files)
    if onto.tangled:
        serial = max(Runtime(root).logs(order, task), default=None)  # (the worktree's: the latest attempt's)
        present = some(list(_files(onto)))
        kept = (f"; its end keeps its versions of {present} in {rest_path(root, order, task, serial)}"
                if serial is not None and present else "")
        return onto.tree, [
            f"{onto.tangled}; so this patch leaves {some(list(onto.left))} as the attempt's start has them: its "
            f"changes there cannot be told from the undoing of those edits (its files are in {tree}{kept})"]
    return onto.tree or files, [onto.note] if onto.note else []
