"""A task's worktree gets refs of its own: its worker's git commands move none of the user's refs or stash entries,
nor another task's.

A plain `git worktree` shares refs/ with the main tree and every other worktree, refs/stash included: two tasks
that each ran `git stash` then `git stash pop` at the same time popped each other's entries (each attempt then held
the other's work, outside its targets), a `git stash pop` with nothing of its own to pop applied the user's entry,
a `git stash clear` cleared the user's stash, and a `git checkout <branch>` then a commit moved the user's branch.

git finds a worktree's shared files (refs, objects, config) in the directory its note's `commondir` names. Here it
names a directory of the worktree's own in that note (removed with it): refs of its own, seeded with a copy of the
repository's (so `git log main`, `git diff main` work); the repository's objects, hooks and excludes themselves
(links), so what the worker commits is in the repository; a config of its own that includes the repository's.
What aipm reads of a worktree (its capture) goes through the repository's own common directory, never this one.

The worker's git directory is not git's note either: the main tree reads the note's HEAD to know which branch each
worktree has checked out, and resolved a worker's `git checkout -b feat` there as the user's `feat`, checked out in
the worktree (`git checkout feat` and `git branch -d feat` in the main tree refused while the task ran). The
worktree's `.git` file names a directory of its own in the note (its HEAD, index, reflogs; removed with it); the
note's HEAD stays detached at the start, and its index and HEAD reflog are the worker's (a link, one file), so the
main tree's `git gc` still keeps what the worker staged and committed.

The worker's `git gc`, `git prune`, `git repack -a -d` there would see only these refs, and would drop from the
shared objects what only the repository reaches (the user's stash entries, staged files, reflogs, what the user
and other tasks commit meanwhile): its config marks the objects precious (extensions.preciousObjects), so git
deletes none from there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from aipm.workspace.repo import Repo, WorkspaceError

OWN = "aipm"  # the worktree's own common directory, inside git's note of the worktree
WORKER = "aipm.git"  # the worker's git directory, beside it
SHARED = ("objects", "info", "hooks", "lfs", "modules", "rr-cache", "shallow", "remotes", "branches")
# Refs each worktree keeps apart already (git resolves them in its note), and the stash, which must start empty.
_NOT_COPIED = ("refs/stash", "refs/bisect/", "refs/worktree/", "refs/rewritten/")
_FORMAT_0 = ("extensions.noop", "extensions.preciousobjects", "extensions.partialclone", "extensions.worktreeconfig")


def isolate(repo: Repo, tree: Path) -> None:
    """Give the worktree at `tree` (just made, nothing running in it yet) refs and a stash of its own. Not in a
    repository whose refs are not files (extensions.refStorage, git 2.45+): those refs cannot be copied this way,
    and its worktree stays a plain one."""
    found = repo.config(repo.common / "config", r"^(core\.repositoryformatversion|extensions\.)")
    extensions = [(key.lower(), value) for key, value in found if key.lower().startswith("extensions.")]
    if any(key == "extensions.refstorage" and value.lower() != "files" for key, value in extensions):
        return
    if ("core.repositoryformatversion", "1") not in [(key.lower(), value.strip()) for key, value in found]:
        # Format 0 honours only these; copied into format 1, another (a stray `extensions.x`) made git refuse to
        # run there at all ("unknown repository extension").
        extensions = [(key, value) for key, value in extensions if key in _FORMAT_0]
    note = repo.note_of(tree)
    if note is None:
        raise WorkspaceError(f"{tree} has no note of its worktree")
    own = note / OWN
    (own / "refs").mkdir(parents=True)
    for name in SHARED:
        if os.path.lexists(repo.common / name):
            os.symlink(repo.common / name, own / name)
    refs = repo.git("for-each-ref", "--format=%(objectname) %(refname)").decode("utf-8", "surrogateescape")
    kept = [line for line in refs.splitlines() if not line.split(" ", 1)[1].startswith(_NOT_COPIED)]
    (own / "packed-refs").write_bytes("".join(f"{line}\n" for line in kept).encode("utf-8", "surrogateescape"))
    (own / "config").write_text(_config(repo, extensions))
    # The note's too: aipm's reads of the worker's stash go through it when a worker removed its git directory.
    (note / "commondir.aipm").write_text(f"{OWN}\n")
    os.replace(note / "commondir.aipm", note / "commondir")
    worker = note / WORKER
    worker.mkdir()
    (worker / "commondir").write_text(f"../{OWN}\n")
    (worker / "gitdir").write_bytes(os.fsencode(tree / ".git") + b"\n")  # (a path in any bytes)
    shutil.copy2(note / "HEAD", worker / "HEAD")
    # What the worker stages and commits stays reachable for the main tree's `git gc`, which reads the note's
    # index and HEAD reflog: the index is a link to the worker's, the reflog one file with its (git appends to it;
    # a link there is passed over).
    os.replace(note / "index", worker / "index")
    os.symlink(f"{WORKER}/index", note / "index")
    (worker / "logs").mkdir()
    (note / "logs").mkdir(exist_ok=True)
    (note / "logs" / "HEAD").touch()
    os.link(note / "logs" / "HEAD", worker / "logs" / "HEAD")
    # Last, and in one step: until its `.git` file names the worker's git directory, the worktree is a plain one.
    (tree / ".git.aipm").write_bytes(b"gitdir: " + os.fsencode(worker) + b"\n")
    os.replace(tree / ".git.aipm", tree / ".git")


def git_dir(note: Path) -> Path:
    """The worker's git directory of the worktree whose note is `note` (the note itself for a plain one)."""
    return note / WORKER if (note / WORKER).is_dir() else note


def isolated(git: Path) -> bool:
    """Whether the worktree whose git directory is `git` (the worker's, git_dir(); or the note, for one isolate()
    left plain) has refs of its own: its `commondir` leads to ours in the note. Not in a repository isolate() left
    alone (reftable refs), nor where a worker re-pointed it: its refs, and its stash, are then the repository's."""
    note = git.parent if git.name == WORKER else git
    try:
        common = (git / "commondir").read_text(errors="surrogateescape").strip()
    except OSError:
        return False
    return bool(common) and os.path.realpath(git / common) == os.path.realpath(note / OWN)


def _config(repo: Repo, extensions: list[tuple[str, str]]) -> str:
    """The worktree's own config: the repository's `extensions` (git reads them from this file alone, includes
    aside), objects that no git run there deletes, and everything else from the repository's config."""
    lines = [f"\t{key.partition('.')[2]} = {_quoted(value)}\n" for key, value in extensions
             if key != "extensions.preciousobjects"]
    # (extensions are honoured from format version 1 on)
    return ("[core]\n\trepositoryformatversion = 1\n[extensions]\n\tpreciousObjects = true\n" + "".join(lines)
            + f"[include]\n\tpath = {_quoted(str(repo.common / 'config'))}\n")


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
