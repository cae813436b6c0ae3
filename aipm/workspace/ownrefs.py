"""A task's worktree gets refs of its own: its worker's git commands move none of the user's refs or stash entries,
nor another task's.

A plain `git worktree` shares refs/ with the main tree and every other worktree, refs/stash included: two tasks
that each ran `git stash` then `git stash pop` at the same time popped each other's entries (each attempt then held
the other's work, outside its targets), a `git stash pop` with nothing of its own to pop applied the user's entry,
a `git stash clear` cleared the user's stash, and a `git checkout <branch>` then a commit moved the user's branch.

git finds a worktree's shared files (refs, objects, config) in the directory its note's `commondir` names. Here it
names a directory of the worktree's own in that note (removed with it): refs of its own, seeded with a copy of the
repository's (so `git log main`, `git diff main` work); the repository's objects, hooks and excludes themselves
(links), so what the worker commits is in the repository; a config of its own that includes the repository's. A
confined attempt's has an object store of its own instead of the link (objects.py): the kernel cannot let its
worker add objects to the repository's without letting it rewrite or delete them; aipm takes them in, verified.
What aipm reads of a worktree (its capture) goes through the repository's own common directory, never this one.

Its worker may write all of the note (confine.py grants it), this directory's config and the note's `commondir`
and `config.worktree` too, and name there programs for git to run: an fsmonitor, a gpg.program (with
log.showSignature, `git log` verifies a signed commit), a partial clone's upload-pack (a HEAD naming an object the
repository lacks makes git fetch it). aipm's git, unconfined, ran them out of the sandbox. So aipm's git never runs
in the note: what it reads of the worktree's own refs and HEAD, it reads in a view of them (view()), a directory of
its own whose config is aipm's.

The worker's `git gc`, `git prune`, `git repack -a -d` there would see only these refs, and would drop from the
shared objects what only the repository reaches (the user's stash entries, staged files, reflogs, what the user
and other tasks commit meanwhile): its config marks the objects precious (extensions.preciousObjects), so git
deletes none from there.

The other way round, a `git gc --prune=now` or `git prune` run anywhere else in the repository walks, of a
worktree, its HEAD, its index and the reflogs of its per-worktree refs (refs/worktree/..., git 2.20+), never a
common directory of its own: the worker's stash entries (and what only its branches and tags held) were deleted
under it. So its refs and their logs are, on disk, per-worktree ones (`refs/worktree/aipm/...`, reached through
links from the own directory), and every ref there keeps a log (core.logAllRefUpdates=always).
"""

from __future__ import annotations

import itertools
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from aipm.workerfiles import STATE_FILE_MAX, read_git_file
from aipm.workspace.places import real_dirs, scratch
from aipm.workspace.repo import Repo, WorkspaceError

OWN = "aipm"  # the worktree's own common directory, inside git's note of the worktree
SHARED = ("objects", "info", "hooks", "lfs", "modules", "rr-cache", "shallow", "remotes", "branches")
# Refs each worktree keeps apart already (git resolves them in its note), and the stash, which must start empty.
_NOT_COPIED = ("refs/stash", "refs/bisect/", "refs/worktree/", "refs/rewritten/")
# The own directory's refs and their logs, links to the worktree's per-worktree ones (in its note)
_LINKS = (("refs", f"refs/worktree/{OWN}"), ("logs/refs", f"logs/refs/worktree/{OWN}"))
_FORMAT_0 = ("extensions.noop", "extensions.preciousobjects", "extensions.partialclone", "extensions.worktreeconfig")
_counter = itertools.count()


def isolate(repo: Repo, tree: Path, own_objects: bool = False) -> None:
    """Give the worktree at `tree` (just made, nothing running in it yet) refs and a stash of its own, and with
    `own_objects` (a confined attempt's) an object store of its own too (objects.py). Not in a repository whose refs
    are not files (extensions.refStorage, git 2.45+): those refs cannot be copied this way, and its worktree stays a
    plain one."""
    extensions = _extensions(repo)
    if extensions is None:
        return
    note = repo.note_of(tree)
    if note is None:
        raise WorkspaceError(f"{tree} is no longer a git work tree of its own")
    own = note / OWN
    for name, place in _LINKS:
        (note / place).mkdir(parents=True)
        (own / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(note / place, own / name)
    if own_objects:
        from aipm.workspace import objects  # (only here: a run whose tasks share the tree imports no hashlib, tempfile)

        objects.make(own / "objects", repo)
    _link_shared(repo, own)
    refs = repo.git("for-each-ref", "--format=%(objectname) %(refname)").decode("utf-8", "surrogateescape")
    kept = [line for line in refs.splitlines() if not line.split(" ", 1)[1].startswith(_NOT_COPIED)]
    (own / "packed-refs").write_bytes("".join(f"{line}\n" for line in kept).encode("utf-8", "surrogateescape"))
    (own / "config").write_text(_config(repo, extensions))
    # Last, and in one step: until the note names it, the worktree is a plain one.
    (note / "commondir.aipm").write_text(f"{OWN}\n")
    os.replace(note / "commondir.aipm", note / "commondir")


def _extensions(repo: Repo) -> list[tuple[str, str]] | None:
    """The repository's `extensions.*` that a config of format 1 may carry, None where its refs are not files."""
    found = repo.config(repo.common / "config", r"^(core\.repositoryformatversion|extensions\.)")
    extensions = [(key.lower(), value) for key, value in found if key.lower().startswith("extensions.")]
    if any(key == "extensions.refstorage" and value.lower() != "files" for key, value in extensions):
        return None
    if ("core.repositoryformatversion", "1") not in [(key.lower(), value.strip()) for key, value in found]:
        # Format 0 honours only these; copied into format 1, another (a stray `extensions.x`) made git refuse to
        # run there at all ("unknown repository extension").
        extensions = [(key, value) for key, value in extensions if key in _FORMAT_0]
    return extensions


def _link_shared(repo: Repo, own: Path) -> None:
    for name in SHARED:
        if os.path.lexists(repo.common / name) and not os.path.lexists(own / name):
            os.symlink(repo.common / name, own / name)


@contextmanager
def view(repo: Repo, note: Path, tree: Path) -> Iterator[dict[str, str]]:
    """The environment in which aipm's git sees the worktree at `tree` (git's note of it: `note`) as its worker's git
    does: its HEAD, and its own refs and stash (or, where it has none of its own, isolated(), the repository's).
    Through a directory of aipm's (removed after): copies of the note's HEAD and of the refs isolate() made, links
    to the repository's objects, and a config of aipm's. Nothing git reads there names a program that the worker
    chose. Copies, not links into the note: a process its worker left running (a `setsid` daemon, ended only with
    the owner's run when other attempts run beside it) could swap a linked directory for a link to the repository's
    refs once isolated() had looked, and the carry's deletion of the worktree's stash deleted the user's."""
    with suppress(WorkspaceError):  # (what git refuses of them stays out: what needs it is then missing)
        take_objects(repo, note)
    place = scratch(repo.root) / f"view.{os.getpid()}.{next(_counter)}"
    shutil.rmtree(place, ignore_errors=True)  # (one a killed aipm of the same pid left)
    place.mkdir(parents=True)
    try:
        try:
            head = read_git_file(note / "HEAD")
        except OSError:
            head = "ref: refs/heads/.invalid"  # (git takes the directory for a repository; HEAD names nothing)
        (place / "HEAD").write_text(head + "\n", encoding="utf-8", errors="surrogateescape")
        if isolated(note):
            (place / "logs").mkdir()
            for name, where in _LINKS:
                _copy(note, where.split("/"), place / name)
            with suppress(OSError):  # (none: git removes it, emptied)
                (place / "packed-refs").write_bytes(_read_in(note, [OWN], "packed-refs"))
            _link_shared(repo, place)
            (place / "config").write_text(_config(repo, _extensions(repo) or []))
        else:
            (place / "commondir").write_text(f"{repo.common}\n", encoding="utf-8", errors="surrogateescape")
        yield {"GIT_DIR": str(place), "GIT_WORK_TREE": str(tree)}
    finally:
        shutil.rmtree(place, ignore_errors=True)


def take_objects(repo: Repo, note: Path, known: set[str] | None = None) -> None:
    """Bring into the repository's object store, verified, what the git of the worktree whose git note is `note`
    added to the object store of its own (isolate(), own_objects), if it has one; `known` as objects.take has it.
    WorkspaceError: git refused them (objects.take)."""
    from aipm.workspace import objects

    try:
        objects.take(repo, note, [OWN, "objects"], known)
    except WorkspaceError as exc:
        raise WorkspaceError(f"the objects its git made in {note / OWN / 'objects'} are not added to the "
                             f"repository's: {exc}") from None


def drop_stash(note: Path) -> None:
    """Delete the stash of the worktree whose git note is `note` (isolated()): the ref, its log, and its line in the
    own packed-refs (a `git pack-refs` there). Reached in the note without a link, as view() reads it."""
    for where in ("refs", "logs/refs"):
        with suppress(OSError), _opened(note, [*where.split("/"), "worktree", OWN]) as fd:
            os.unlink("stash", dir_fd=fd)
    with suppress(OSError), _opened(note, [OWN]) as fd:
        lines = _read_in(note, [OWN], "packed-refs").splitlines(keepends=True)
        kept = [line for i, line in enumerate(lines) if not _stash_line(lines, i)]
        if kept != lines:
            with open(os.open("packed-refs.aipm", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644,
                              dir_fd=fd), "wb") as out:
                out.write(b"".join(kept))
            os.rename("packed-refs.aipm", "packed-refs", src_dir_fd=fd, dst_dir_fd=fd)


def _stash_line(lines: list[bytes], i: int) -> bool:
    """packed-refs' line `i` is refs/stash's, or the peeled line (`^...`) after it."""
    line = lines[i] if not lines[i].startswith(b"^") or i == 0 else lines[i - 1]
    return line.rstrip(b"\n").endswith(b" refs/stash")


@contextmanager
def _opened(top: Path, parts: list[str]) -> Iterator[int]:
    """A descriptor of the directory `top`/parts..., each part opened without following a link (OSError: one is
    no directory)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for part in parts:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = inner
        yield fd
    finally:
        os.close(fd)


def _read_in(top: Path, parts: list[str], name: str) -> bytes:
    """The regular file `name` in `top`/parts... (_opened), of at most STATE_FILE_MAX bytes."""
    with _opened(top, parts) as where:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=where)
    with open(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or os.fstat(fd).st_size > STATE_FILE_MAX:
            raise OSError(f"{name}: no file of git's")
        return handle.read(STATE_FILE_MAX)


def _copy(top: Path, parts: list[str], dest: Path) -> None:
    """Copy the directory `top`/parts... to `dest`: its directories and regular files (_read_in), nothing a link
    leads to, nor what is no file (a FIFO)."""
    dest.mkdir()
    with suppress(OSError), _opened(top, parts) as fd:
        for entry in os.scandir(fd):
            with suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    _copy(top, [*parts, entry.name], dest / entry.name)
                elif entry.is_file(follow_symlinks=False):
                    (dest / entry.name).write_bytes(_read_in(top, parts, entry.name))


def head_of(repo: Repo, tree: Path) -> str | None:
    """The HEAD commit of the worktree at `tree` (a worktree of ours), or None when it has none or git has no note
    of it (read in its view: a worker deleted its `.git`, or made a repository of its own there, `git init`)."""
    note = repo.note_of(tree)
    if note is None:
        return None
    with view(repo, note, tree) as env:
        return repo.rev("HEAD", env)


def isolated(note: Path) -> bool:
    """Whether the worktree whose git note is `note` has refs of its own: its `commondir` names ours, laid out as
    isolate() made it (broken). Not in a repository isolate() left alone (reftable refs), nor where a worker
    re-pointed it: its refs, and its stash, are then the repository's."""
    return _names_own(note) and broken(note) is None


def _names_own(note: Path) -> bool:
    try:
        return read_git_file(note / "commondir") == OWN
    except OSError:  # (a FIFO or a sparse file its worker left there, too)
        return False


def broken(note: Path) -> str | None:
    """Why the own directory that the git note `note` names is not as isolate() made it, or None (also where it
    names none). Its worker may write there (confine.py grants it its note): with `aipm/refs` linked to the
    repository's refs, git run through the worktree's own git directory reads and writes the user's (its end's
    `update-ref -d refs/stash` deleted the user's stash)."""
    if not _names_own(note):
        return None
    own, top = note / OWN, os.path.realpath(note)
    if not real_dirs(note, OWN, "logs"):
        return f"{own} is not a directory of its own"
    with suppress(FileNotFoundError):  # (git may remove it, emptied)
        if not stat.S_ISREG(os.lstat(own / "packed-refs").st_mode):  # a link: git rewrites what it leads to
            return f"{own / 'packed-refs'} is not a file of its own"
    for name, place in _LINKS:
        if os.path.realpath(own / name) != os.path.join(top, place) or not real_dirs(Path(top), *place.split("/")):
            return f"{own / name} does not lead to {os.path.join(top, place)}"
    return None


def _config(repo: Repo, extensions: list[tuple[str, str]]) -> str:
    """The worktree's own config: the repository's `extensions` (git reads them from this file alone, includes
    aside), objects that no git run there deletes, everything else from the repository's config, and then a log
    for every ref (what keeps its objects from a prune elsewhere, whatever the repository's config says), and a
    `git gc` that writes only packs: what it writes in the object store's `info/` (a commit-graph, `info/packs`)
    every git of the repository reads, where the store is the repository's (an unconfined attempt's)."""
    lines = [f"\t{key.partition('.')[2]} = {_quoted(value)}\n" for key, value in extensions
             if key != "extensions.preciousobjects"]
    # (extensions are honoured from format version 1 on)
    return ("[core]\n\trepositoryformatversion = 1\n[extensions]\n\tpreciousObjects = true\n" + "".join(lines)
            + f"[include]\n\tpath = {_quoted(str(repo.common / 'config'))}\n[core]\n\tlogAllRefUpdates = always\n"
            "[gc]\n\twriteCommitGraph = false\n[repack]\n\tupdateServerInfo = false\n")


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
