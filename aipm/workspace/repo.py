"""The git plumbing of worktree workspaces: capture a tree's content as a commit, refs, worktrees, diffs.

Nothing here touches what the user owns: a capture uses a temporary index (GIT_INDEX_FILE), so the user's HEAD,
branches, index and stash never change; every ref lives under refs/aipm/; hooks are switched off, so checking out
a worktree runs none of the user's scripts. Nor does git run here with a worktree's git directory, which its
worker may write (config and all): see _reach, and ownrefs.view.
"""

from __future__ import annotations

import itertools
import re
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from aipm.digest import sha1
from aipm.errors import UserError
from aipm.workerfiles import read_git_file
from aipm.workspace import orphans

if TYPE_CHECKING:
    import subprocess

RUNTIME_DIR = ".aipm"
_GIT_WILDCARD = re.compile(r"[*?[\\]")
# Who "wrote" the capture commits (commit-tree needs an identity; the user's may not be configured).
_IDENTITY = {"GIT_AUTHOR_NAME": "aipm", "GIT_AUTHOR_EMAIL": "aipm@localhost",
             "GIT_COMMITTER_NAME": "aipm", "GIT_COMMITTER_EMAIL": "aipm@localhost"}
_counter = itertools.count()


class WorkspaceError(UserError):
    """A worktree cannot be made or read (no git, not a repository, git refused): one line saying why."""


class UnbornRepositories(WorkspaceError):
    """Git repositories without a commit inside a tree (a worker's `git init`, `cargo new`): `git add` refuses
    them ("does not have a commit checked out"), so a capture cannot hold their files. `paths` names them,
    relative to the repository's top, each ending in "/"."""

    def __init__(self, paths: list[str], refused: WorkspaceError):
        super().__init__(f"{refused}; {', '.join(paths)}: a git repository without commits, whose files git cannot "
                         "capture: commit in it, ignore it or remove its .git")
        self.paths = paths


GITLINK = "160000"  # a submodule's mode: a commit of another repository, not files


@dataclass(frozen=True)
class Change:
    """One path that differs between two commits (`git diff-tree --raw`): modes as git writes them."""

    path: str  # relative to the repository's top, "/"-separated
    old_mode: str  # "000000" when the path is new
    new_mode: str  # "000000" when the path was deleted


class Repo:
    """The git repository holding the project root `root`."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        if shutil.which("git") is None:
            raise WorkspaceError(f"{self.root}: workspace: worktree needs git, which is not on PATH")
        proc = self._run(self.root, ["rev-parse", "--show-toplevel", "--show-prefix"], check=False)
        lines = proc.stdout.decode("utf-8", "surrogateescape").splitlines()
        if proc.returncode != 0 or not lines:
            raise WorkspaceError(f"{self.root}: workspace: worktree needs a git repository; run `git init` there "
                                 "or use workspace: shared")
        self.top = Path(lines[0])
        self.prefix = lines[1] if len(lines) > 1 else ""  # the project root inside the repository: "" or "sub/"
        # The same in a pathspec's pattern, where git reads `*`, `?`, `[` and `\` as wildcards and escapes: a root at
        # `p[1]/` named p1/ there, not itself.
        self.prefix_pattern = _GIT_WILDCARD.sub(r"\\\g<0>", self.prefix)
        self._common: Path | None = None

    # -- running git --------------------------------------------------------------------------------------

    @staticmethod
    def _run(cwd: Path, args: list[str], env: dict[str, str] | None = None, check: bool = True,
             stdin: bytes | BinaryIO | None = None, stdout: BinaryIO | None = None) -> subprocess.CompletedProcess:
        import subprocess  # only here: a run whose tasks share the tree starts no git through it

        from aipm.gitstatus import run_git

        full = dict(os.environ, GIT_OPTIONAL_LOCKS="0", LC_ALL="C", **_IDENTITY)
        for key in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_PREFIX"):
            full.pop(key, None)  # a caller's git hook environment must not redirect us
        full.update(env or {})
        # (bytes are written to git's stdin; a file is given to it as its stdin)
        fed = {"input": stdin} if stdin is None or isinstance(stdin, bytes) else {"stdin": stdin}
        proc = run_git(["git", "-c", "core.hooksPath=/dev/null", *args], cwd=cwd, env=full, **fed,
                       stdout=stdout or subprocess.PIPE, stderr=subprocess.PIPE)
        if check and proc.returncode != 0:
            # Git's cause often comes before its last line ("error: 'x/' does not have a commit checked out",
            # then "fatal: adding files failed"): keep its error lines (the last few), else its last line.
            lines = [line.strip() for line in proc.stderr.decode("utf-8", "replace").splitlines() if line.strip()]
            why = [line for line in lines if line.startswith(("error:", "fatal:"))][-5:] or lines[-1:]
            raise WorkspaceError(f"{cwd}: git {args[0]} failed: {'; '.join(why) or f'exit {proc.returncode}'}")
        return proc

    def git(self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            stdin: bytes | BinaryIO | None = None) -> bytes:
        return self._run(cwd or self.top, list(args), env, stdin=stdin).stdout

    def rev(self, name: str, env: dict[str, str] | None = None) -> str | None:
        """The commit a ref or revision names, or None when it does not exist (`env`: in a worktree's view of its
        git, ownrefs.view)."""
        proc = self._run(self.top, ["rev-parse", "--verify", "--quiet", name + "^{commit}"], env, check=False)
        return proc.stdout.decode().strip() or None

    # -- capturing a tree ---------------------------------------------------------------------------------

    def capture(self, tree_dir: Path, scratch: Path, parent: str | None, message: str,
                leave_out: list[str] | tuple[str, ...] = ()) -> str:
        """Commit what `tree_dir` (the main work tree or a worktree) holds now: tracked, modified and untracked
        files that are not ignored. The index of `tree_dir` only seeds a temporary copy (its stat data spares
        re-reading unchanged files); the runtime directory, and the directories in `leave_out` (relative to the
        top), are always left out. UnbornRepositories: a repository without commits is in the way."""
        tree_env, seed = self._reach(tree_dir)
        scratch.mkdir(parents=True, exist_ok=True)
        index = scratch / f"index.{os.getpid()}.{next(_counter)}"
        if not tree_env:
            seed = tree_dir / os.fsdecode(self.git("rev-parse", "--git-path", "index", cwd=tree_dir).strip())
        try:
            index.unlink(missing_ok=True)  # a link a worker left under the name: copy2 would write where it leads
            if seed is not None and seed.is_file():
                # copy2 keeps the index's mtime: git reads again a file not older than its index (racy git), and
                # a copy stamped later made it trust a same-size edit made in the second of the checkout
                shutil.copy2(seed, index)
            env = {**tree_env, "GIT_INDEX_FILE": str(index)}
            try:
                self._unmark(tree_dir, env)
            except WorkspaceError:
                if not tree_env:
                    raise
                # An index its worker wrote over: start from the parent's tree (its files are read again).
                index.unlink(missing_ok=True)
                if parent:
                    self.git("read-tree", parent, cwd=tree_dir, env=env)
            # The runtime directory as a pattern ("[.]aipm/**"), not its literal name: git add refuses a pathspec,
            # excluding ones too, that names an ignored path ("paths are ignored by one of your .gitignore
            # files"), and many projects ignore .aipm/ themselves.
            runtime = f"{self.prefix_pattern}[{RUNTIME_DIR[0]}]{RUNTIME_DIR[1:]}/**"
            specs = [":/", f":(top,exclude){runtime}", *(f":(top,exclude){p}" for p in leave_out)]
            try:
                self.git("add", "--all", *_sparse(), "--", *specs, cwd=tree_dir, env=env)
            except WorkspaceError as exc:
                unborn = [p for p in self._nested(tree_dir, specs, env) if p not in leave_out
                          and self._refused(tree_dir, p, env)]
                if unborn:
                    raise UnbornRepositories(unborn, exc) from None
                raise
            tree = self.git("write-tree", cwd=tree_dir, env=env).decode().strip()
        finally:
            index.unlink(missing_ok=True)
        if parent is None:
            return tree  # a tree is enough for a diff that is only looked at
        args = ["commit-tree", tree, "-m", message] + (["-p", parent] if parent else [])
        return self.git(*args).decode().strip()

    def _unmark(self, tree_dir: Path, env: dict[str, str]) -> None:
        """Clear, in the capture's index, the marks that make `git add` skip a present file's edit: assume-unchanged
        and skip-worktree (`git update-index`, the usual way to keep a local edit of a tracked file out of
        commits). Seeded with them, a capture missed a worker's edit of a file it marked (merged as unchanged) and
        a user's local edit. A sparse checkout's marks on files absent from the tree stay."""
        out = self.git("ls-files", "-v", "-z", cwd=tree_dir, env=env).decode("utf-8", "surrogateescape")
        entries = [(e[0], e[2:]) for e in out.split("\0") if len(e) > 2 and not e.endswith("/")]
        for flag, marked in (("--no-assume-unchanged", lambda tag: tag.islower()),
                             ("--no-skip-worktree", lambda tag: tag in "Ss")):
            paths = [p for tag, p in entries if marked(tag) and os.path.lexists(tree_dir / p)]
            if paths:  # (update-index applies one of the two flags per call)
                self.git("update-index", flag, "-z", "--stdin", cwd=tree_dir, env=env,
                         stdin="".join(f"{p}\0" for p in paths).encode("utf-8", "surrogateescape"))

    def _reach(self, tree_dir: Path) -> tuple[dict[str, str], Path | None]:
        """(the environment that points git at `tree_dir`, the index that seeds its capture; None: git's own). None
        for the main work tree. For a worktree of ours, the repository's own git directory with the worktree's files,
        seeded with the index in git's note of it, so a capture sees the objects, config and excludes the main tree
        sees. Not through the `.git` file in the worktree, which a worker may have deleted or made a repository of
        its own (`git init`: the capture failed, and the work was never kept), nor through the note, which its
        worker may write (a confined one too: confine.py grants it): there git read its config.worktree (where the
        repository has extensions.worktreeConfig) and ran, unconfined, the fsmonitor the worker named in it."""
        if os.path.realpath(tree_dir) == os.path.realpath(self.top):
            return {}, None
        note = self.note_of(tree_dir)
        return {"GIT_DIR": str(self.common), "GIT_WORK_TREE": str(tree_dir)}, note and note / "index"

    def note_of(self, tree_dir: Path) -> Path | None:
        """git's note of the worktree at `tree_dir` as add_worktree() named it, None when there is none. Not the note
        whose `gitdir` names the worktree: each worker may write its own note's, a confined one too, and one that
        named another task's worktree there had that task's capture seeded with its index, and its stash (or, in
        turn, its own) moved and dropped as the other's."""
        note = self.common / "worktrees" / _note_name(tree_dir)
        if os.path.isdir(note) and not os.path.islink(note):
            return note
        # One an aipm before these names made (git named it after the directory): found by its `gitdir` as then,
        # so that an attempt running across the upgrade keeps its capture and its stash. Never a note named as
        # aipm names them: that name says whose it is, whatever its `gitdir` claims.
        for note, gitdir in self._notes():
            if not _AIPM_NOTE.search(note.name) and (
                    os.path.realpath(os.path.dirname(gitdir)) == os.path.realpath(tree_dir)):
                return note
        return None

    @property
    def common(self) -> Path:
        """The repository's common git directory (its objects, refs and config), as an absolute path."""
        if self._common is None:
            found = self.git("rev-parse", "--git-common-dir").decode("utf-8", "surrogateescape").strip()
            self._common = Path(os.path.realpath(self.top / found))
        return self._common

    def _nested(self, tree_dir: Path, specs: list[str], env: dict[str, str]) -> list[str]:
        """The untracked repositories nested in `tree_dir` (git lists each as one entry ending in "/")."""
        out = self.git("ls-files", "-z", "--others", "--exclude-standard", "--", *specs, cwd=tree_dir, env=env)
        return [p for p in out.decode("utf-8", "surrogateescape").split("\0") if p.endswith("/")]

    def _refused(self, tree_dir: Path, path: str, env: dict[str, str]) -> bool:
        """Whether `git add` refuses the repository nested at `path` (from the top): it has no commit checked out.
        Asked of `git add`, which reads only its HEAD and refs, never of a git run in it, which reads its config: a
        worker's there named programs for it to run (a partial clone's upload-pack, fetching what its HEAD names)."""
        args = ["add", "--dry-run", *_sparse(), "--", f":(top,literal){path}"]
        return self._run(tree_dir, args, env, check=False).returncode != 0

    def made_before(self, commit: str, message: str) -> str | None:
        """The newest commit of aipm's, `commit` or one of its ancestors, whose subject is `message`, or begins
        with it and a comma (`..., after workspace_setup`): a grep alone for "attempt 1" finds "attempt 10" too."""
        out = self.git("log", "--format=%H %s", "--fixed-strings", f"--grep={message}",
                       f"--author={_IDENTITY['GIT_AUTHOR_EMAIL']}", commit)
        for line in out.decode("utf-8", "surrogateescape").splitlines():
            found, _, subject = line.partition(" ")
            if subject == message or subject.startswith(message + ","):
                return found
        return None

    def head(self) -> str:
        """The user's HEAD commit, or "" in a repository without commits (a capture then has no parent)."""
        return self.rev("HEAD") or ""

    # -- refs and worktrees -------------------------------------------------------------------------------

    def set_ref(self, ref: str, commit: str) -> None:
        self.git("update-ref", ref, commit)

    def refs(self, prefix: str) -> list[str]:
        out = self.git("for-each-ref", "--format=%(refname)", prefix).decode()
        return out.split()

    def delete_refs(self, refs: list[str]) -> None:
        if refs:
            self.git("update-ref", "--stdin", stdin="".join(f"delete {r}\n" for r in refs).encode())

    def add_worktree(self, path: Path, commit: str) -> None:
        """Make a worktree at `path`, its note named by aipm (note_of): git names it after the directory alone,
        with a number added where that name is taken (two orders' task T)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with orphans.marked(self.root, path) as env:
            self.git("worktree", "add", "--detach", "--quiet", str(path), commit, env=env)
        made = Path(path / read_git_file(path / ".git").removeprefix("gitdir:").strip())  # (nothing runs there yet)
        note = self.common / "worktrees" / _note_name(path)
        if os.path.realpath(made) != str(note):
            shutil.rmtree(note, ignore_errors=True)  # (one a killed aipm left)
            os.rename(made, note)
            (path / ".git").write_text(f"gitdir: {note}\n", encoding="utf-8", errors="surrogateescape")

    def remove_worktree(self, path: Path) -> None:
        """Remove the worktree at `path` and git's note of it, whatever state a worker left it in."""
        if path.exists():
            with orphans.marked(self.root, path) as env:
                self._run(self.top, ["worktree", "remove", "--force", "--force", str(path)], env, check=False)
            shutil.rmtree(path, ignore_errors=True)
        note = self.note_of(path)
        if note is not None:  # (git finds a note by its `gitdir`, which its worker may have changed)
            shutil.rmtree(note, ignore_errors=True)
        self.prune_worktrees(path.parent)

    def prune_worktrees(self, under: Path) -> None:
        """Drop git's notes of the worktrees below `under` (aipm's) whose directories are gone. Not `git worktree
        prune`: it drops the notes of every worktree whose directory is missing, a person's on a disk that is not
        mounted now included, and with them that worktree's index and HEAD."""
        mine = os.path.realpath(under) + os.sep
        for note, gitdir in self._notes():
            worktree = os.path.realpath(os.path.dirname(gitdir))
            # The directory, not its `.git` file: a worker may delete that, and its capture finds it by this note
            if (worktree + os.sep).startswith(mine) and not os.path.isdir(worktree):
                shutil.rmtree(note, ignore_errors=True)

    def _notes(self) -> list[tuple[Path, str]]:
        """git's notes of the repository's worktrees: (the note's directory, the path of the worktree's `.git`)."""
        notes = self.common / "worktrees"
        found = []
        for note in notes.iterdir() if notes.is_dir() else ():
            try:
                gitdir = read_git_file(note / "gitdir")
            except OSError:  # (a FIFO or a sparse file the worktree's worker left there, too: no worktree named)
                continue
            found.append((note, os.path.join(note, gitdir)))  # (relative to the note with worktree.useRelativePaths)
        return found

    def ignores(self, path: str) -> bool:
        """Whether git ignores `path` (from the top) in the main tree, where it is not tracked."""
        return self._run(self.top, ["check-ignore", "-q", "--", path], check=False).returncode == 0  # (no pathspec)

    def ignored(self, tree_dir: Path, pathspecs: list[str]) -> list[str]:
        """Files in `tree_dir` that git ignores, among `pathspecs` (paths relative to its top); a directory
        ignored whole is one entry ending in "/" (node_modules/ is not listed file by file)."""
        out = self.git("ls-files", "-z", "--others", "--ignored", "--exclude-standard", "--directory", "--",
                       *pathspecs, cwd=tree_dir, env=self._reach(tree_dir)[0])
        return [p for p in out.decode("utf-8", "surrogateescape").split("\0") if p]

    # -- reading commits ----------------------------------------------------------------------------------

    def changes(self, old: str, new: str) -> list[Change]:
        """Every path whose content, mode or kind differs between two commits or trees (no rename pairing)."""
        return [Change(path, before[0], after[0]) for path, (before, after) in self.entries(old, new).items()]

    def blob(self, commit: str, path: str, limit: int) -> bytes | None:
        """A file's content at `commit` as it is checked out (the repository's filters and line endings); None
        when it is longer than `limit` (not read into memory)."""
        import tempfile  # here: a run's start loads this module (recovery), which needs none of it

        with tempfile.TemporaryFile() as out:  # read back at its size: a pipe's pieces joined held it twice
            self._run(self.top, ["cat-file", "--filters", f"{commit}:{path}"], stdout=out)
            if os.fstat(out.fileno()).st_size > limit:
                return None
            out.seek(0)
            return out.read()

    def blob_into(self, commit: str, path: str, consume: Callable[[bytes], object]) -> None:
        """`blob`, given to `consume` piece by piece."""
        import tempfile

        with tempfile.TemporaryFile() as out:
            self._run(self.top, ["cat-file", "--filters", f"{commit}:{path}"], stdout=out)
            out.seek(0)
            for piece in iter(lambda: out.read(1 << 20), b""):
                consume(piece)

    def link(self, commit: str, path: str) -> bytes:
        """A symbolic link's target at `commit`."""
        return self.git("cat-file", "blob", f"{commit}:{path}")

    def skipped(self, path: str) -> bool:
        """The main tree's index marks `path` skip-worktree: outside its sparse checkout, absent on purpose."""
        return self.git("ls-files", "-t", "-z", "--", f":(top,literal){path}").startswith(b"S ")

    def files(self, commit: str) -> list[str]:
        """Every file path in a commit's tree."""
        out = self.git("ls-tree", "-r", "-z", "--name-only", commit).decode("utf-8", "surrogateescape")
        return [p for p in out.split("\0") if p]

    def stash(self, env: dict[str, str] | None = None) -> list[tuple[str, str, list[str]]]:
        """The repository's stash, newest first (`env`: a worktree's own, ownrefs): (stash@{n}, commit, its
        parents)."""
        proc = self._run(self.top, ["log", "-g", "--format=%gd %H %P", "refs/stash", "--"], env, check=False)
        if proc.returncode != 0:  # no stash yet (or a worktree's git its worker broke: nothing to read there)
            return []
        return [(name, commit, parents) for name, commit, *parents in map(str.split, proc.stdout.decode().splitlines())]

    def missing(self, ref: str, env: dict[str, str] | None = None) -> str | None:
        """The object id `ref` names (`env`: in a worktree's own refs) when the repository lacks that object, else
        None."""
        oid = self._run(self.top, ["rev-parse", "--verify", "-q", ref], env, check=False).stdout.decode().strip()
        return oid if oid and self._run(self.top, ["cat-file", "-e", oid], check=False).returncode != 0 else None

    def config(self, file: Path, pattern: str) -> list[tuple[str, str]]:
        """The entries of the config file `file` whose keys match the regular expression `pattern`: (key, value)."""
        proc = self._run(self.top, ["config", "--file", str(file), "-z", "--get-regexp", pattern], check=False)
        entries = proc.stdout.decode("utf-8", "surrogateescape").split("\0")
        return [(key, value if sep else "true") for key, sep, value in (e.partition("\n") for e in entries if e)]

    def descends(self, commit: str, ancestor: str) -> bool:
        return self._run(self.top, ["merge-base", "--is-ancestor", ancestor, commit], check=False).returncode == 0

    def entries(self, old: str, new: str) -> dict[str, tuple[tuple[str, str], tuple[str, str]]]:
        """Each path that differs between two commits or trees → ((mode, id) in `old`, (mode, id) in `new`); an
        absent side is ("000000", all zeros), as git writes it."""
        out = self.git("diff-tree", "-r", "-z", "--no-renames", "--raw", old, new).decode("utf-8", "surrogateescape")
        fields = out.split("\0")
        found = {}
        for meta, path in zip(fields[0::2], fields[1::2]):
            if meta.startswith(":"):
                old_mode, new_mode, old_id, new_id = meta[1:].split()[:4]
                found[path] = ((old_mode, old_id), (new_mode, new_id))
        return found

    def merge_base(self, one: str, other: str) -> str | None:
        proc = self._run(self.top, ["merge-base", one, other], check=False)
        return proc.stdout.decode().strip() or None if proc.returncode == 0 else None

    def object_bytes(self, oid: str, limit: int) -> bytes | None:
        """An object's raw content, None when it is longer than `limit` (not read)."""
        size = int(self.git("cat-file", "-s", oid))
        return None if size > limit else self.git("cat-file", "-p", oid)

    def merge_tree(self, ours: str, theirs: str) -> tuple[str, list[str]] | None:
        """`git merge-tree --write-tree` of two commits, their merge base the ancestor: (the merged tree, the paths
        that conflict), or None where git cannot (no common history; a git older than 2.38)."""
        proc = self._run(self.top, ["merge-tree", "--write-tree", "--name-only", "--no-messages", "-z", ours, theirs],
                         check=False)
        if proc.returncode not in (0, 1):
            return None
        tree, *paths = proc.stdout.decode("utf-8", "surrogateescape").split("\0")
        return tree, sorted({p for p in paths if p})

    def with_entries(self, tree: str, entries: dict[str, tuple[str, str]], scratch: Path) -> str:
        """The tree `tree` with each path of `entries` as (mode, id) there (an all-zeros id: absent), written through
        a temporary index (`scratch`): no ref, and no index of a work tree, is touched."""
        with self._index_of(entries, scratch, tree) as env:
            return self.git("write-tree", env=env).decode().strip()

    def check_out(self, entries: dict[str, tuple[str, str]], dest: Path, scratch: Path) -> None:
        """Write each path of `entries` ((mode, id) of a file or symbolic link) under the directory `dest`, at that
        path, as git checks it out (filters, line endings, the executable bit, a link as a link): a copy of files
        as a capture holds them, through a temporary index (`scratch`); no work tree, index or ref is touched."""
        with self._index_of(entries, scratch) as env:
            self.git("checkout-index", "-f", "-z", "--stdin", f"--prefix={dest}/", env=env,
                     stdin="".join(f"{path}\0" for path in entries).encode("utf-8", "surrogateescape"))

    @contextmanager
    def _index_of(self, entries: dict[str, tuple[str, str]], scratch: Path, tree: str | None = None):
        """A temporary index (its environment) holding `tree` (or nothing) with `entries` put in, removed after."""
        scratch.mkdir(parents=True, exist_ok=True)
        index = scratch / f"index.{os.getpid()}.{next(_counter)}"
        env = {"GIT_INDEX_FILE": str(index)}
        try:
            index.unlink(missing_ok=True)
            if tree is not None:
                self.git("read-tree", tree, env=env)
            lines = "".join(f"{0 if set(oid) == {'0'} else mode} {oid}\t{path}\0"
                            for path, (mode, oid) in entries.items())
            self.git("update-index", "-z", "--replace", "--index-info", env=env,
                     stdin=lines.encode("utf-8", "surrogateescape"))
            yield env
        finally:
            index.unlink(missing_ok=True)

    def patch(self, old: str, new: str) -> bytes:
        return self.git("diff", *_AS_PATCH, old, new)

    def write_patch(self, old: str, new: str, out: BinaryIO) -> None:
        """`patch` written to `out` as git makes it: a large file's patch is never held in memory."""
        self._run(self.top, ["diff", *_AS_PATCH, old, new], stdout=out)


_AIPM_NOTE = re.compile(r"-[0-9a-f]{10}$")  # the end of _note_name's names


def _note_name(tree_dir: Path) -> str:
    """The name of git's note of aipm's worktree at `tree_dir`: its directory's, and a digest of its path."""
    where = os.path.realpath(tree_dir)
    return f"{os.path.basename(where)}-{sha1(where.encode('utf-8', 'surrogateescape')).hexdigest()[:10]}"


# A patch `git apply` reads, whatever the user's config says of diffs (diff.noprefix, color.ui=always, an external
# diff tool, a textconv filter, diff.context=0): with those, a kept patch did not apply, nor did a carried one.
# (diff.relative cannot reach it: git runs at the top.)
_AS_PATCH = ("--binary", "--no-renames", "--no-color", "--no-ext-diff", "--no-textconv", "--unified=3",
             "--src-prefix=a/", "--dst-prefix=b/")


@lru_cache(maxsize=None)
def _sparse() -> list[str]:
    """`--sparse` where git has it (2.34+): in a sparse checkout, `git add --all` refuses untracked files outside
    the sparse set (a task file, say) and every worktree task failed to launch; with it they are added and the
    entries outside the set are kept as they are."""
    from aipm.gitstatus import run_git

    out = run_git(["git", "version"], capture_output=True, text=True).stdout
    found = re.search(r"(\d+)\.(\d+)", out)
    return ["--sparse"] if found and (int(found[1]), int(found[2])) >= (2, 34) else []
