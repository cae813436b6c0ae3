"""A confined worktree worker's git adds objects to a store of its own (aipm/workspace/objects.py), which its worker
may write as it likes; aipm takes into the repository's store only objects that are as git writes them and named by
their hash, and reads that store without running git on it, following no link and opening no FIFO."""

from __future__ import annotations

import hashlib
import os
import subprocess
import zlib
from pathlib import Path

import pytest

from aipm.workspace import objects
from aipm.workspace.repo import Repo, WorkspaceError
from test_workspace import git, repo  # noqa: F401 - repo is a fixture


def in_store(store: Path, *args: str, stdin: bytes = b"", top: Path) -> str:
    """git in the repository `top` with `store` as its object store (the worker's git, as its own config has it)."""
    env = dict(os.environ, GIT_OBJECT_DIRECTORY=str(store))
    return subprocess.run(["git", *args], cwd=top, env=env, input=stdin, check=True, capture_output=True
                          ).stdout.decode().strip()


def loose(store: Path, name: str, raw: bytes) -> Path:
    """Write `raw` (an object's header and content) zlib-compressed as the loose object `name` of `store`."""
    path = store / name[:2] / name[2:]
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(zlib.compress(raw))
    return path


def has(top: Path, name: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", name], cwd=top, capture_output=True).returncode == 0


@pytest.fixture
def store(tmp_path: Path, repo: Path) -> Path:  # noqa: F811
    made = tmp_path / "note" / "aipm" / "objects"
    objects.make(made, Repo(repo))
    return made


def test_what_its_git_made_is_taken_and_nothing_else(repo: Path, store: Path):  # noqa: F811
    """Its commit (on your HEAD, its tree naming your blobs and its own) and a pack of its own are taken; an object
    under a name that is not its hash, one that is not as git writes it, a link and a FIFO named as objects are
    not, and taking them neither hangs nor fails. Taken twice, nothing is added again."""
    blob = in_store(store, "hash-object", "-w", "--stdin", stdin=b"its work\n", top=repo)
    tree = in_store(store, "mktree", stdin=f"100644 blob {blob}\tw.txt\n".encode(), top=repo)
    commit = in_store(store, "commit-tree", tree, "-p", "HEAD", "-m", "its commit", top=repo)
    assert (store / commit[:2] / commit[2:]).is_file() and not has(repo, commit)
    packed = in_store(store, "hash-object", "-w", "--stdin", stdin=b"packed\n", top=repo)
    in_store(store, "pack-objects", "-q", str(store / "pack" / "pack"), stdin=f"{packed}\n".encode(), top=repo)
    (store / packed[:2] / packed[2:]).unlink()
    # Named as another object: the bytes of "evil" under the name of "other"
    other = hashlib.sha1(b"blob 6\0other\n").hexdigest()
    evil = hashlib.sha1(b"blob 5\0evil\n").hexdigest()
    loose(store, other, b"blob 5\0evil\n")
    # Not as git writes it: content shorter, or longer, than its size says, an unknown type; bytes after its end
    wrong = {raw: hashlib.sha1(raw).hexdigest() for raw in (b"blob 9\0short\n", b"thing 2\0x\n", b"blob 1\0xy")}
    for raw, name in wrong.items():
        loose(store, name, raw)
    trailing = hashlib.sha1(b"blob 3\0yes").hexdigest()
    (store / trailing[:2]).mkdir(exist_ok=True)
    (store / trailing[:2] / trailing[2:]).write_bytes(zlib.compress(b"blob 3\0yes") + b"more")
    # A link and a FIFO named as objects (the link to a good object of its own elsewhere)
    linked_raw = b"blob 7\0linked\n"
    linked = hashlib.sha1(linked_raw).hexdigest()
    aside = loose(store.parent, linked, linked_raw)
    (store / linked[:2]).mkdir(exist_ok=True)
    os.symlink(aside, store / linked[:2] / linked[2:])
    fifo = hashlib.sha1(b"blob 4\0fifo").hexdigest()
    (store / fifo[:2]).mkdir(exist_ok=True)
    os.mkfifo(store / fifo[:2] / fifo[2:])

    objects.take(Repo(repo), store.parents[1], ["aipm", "objects"])
    assert all(has(repo, name) for name in (blob, tree, commit, packed))
    assert git(repo, "log", "-1", "--format=%s", commit) == "its commit\n"
    assert [name for name in (other, evil, linked, fifo, trailing, *wrong.values()) if has(repo, name)] == []
    git(repo, "fsck", "--strict", "--no-dangling")
    packs = sorted((repo / ".git/objects/pack").iterdir())
    objects.take(Repo(repo), store.parents[1], ["aipm", "objects"])
    assert sorted((repo / ".git/objects/pack").iterdir()) == packs


def test_a_malformed_object_named_by_its_hash_is_refused(repo: Path, store: Path):  # noqa: F811
    """A tree that is no tree (`git hash-object --literally`), named by its hash: git's check refuses it, and with
    it the loose objects taken in the same pack; the repository's store is as it was."""
    good = in_store(store, "hash-object", "-w", "--stdin", stdin=b"good\n", top=repo)
    bad = in_store(store, "hash-object", "-t", "tree", "--literally", "-w", "--stdin", stdin=b"not a tree", top=repo)
    with pytest.raises(WorkspaceError):
        objects.take(Repo(repo), store.parents[1], ["aipm", "objects"])
    assert not has(repo, bad) and not has(repo, good)
    git(repo, "fsck", "--strict", "--no-dangling")


def test_a_store_reached_through_a_link_is_not_read(repo: Path, store: Path, tmp_path: Path):  # noqa: F811
    """Its worker may replace its store by a link (to a store it filled elsewhere): nothing is taken through it."""
    blob = in_store(store, "hash-object", "-w", "--stdin", stdin=b"elsewhere\n", top=repo)
    os.rename(store, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", store)
    objects.take(Repo(repo), store.parents[1], ["aipm", "objects"])
    assert not has(repo, blob)


def test_objects_naming_each_other_across_its_packs_and_loose_objects_are_taken(repo: Path, store: Path):  # noqa: F811
    """Its git's objects name each other in any order of their files: a fetch's pack the commits of the fetch before
    it (unpacked as loose objects: fewer than transfer.unpackLimit), a commit made after it that pack's, a pack the
    commits of an earlier pack. Each pack was given to `git index-pack --strict` alone, packs in the order of their
    names, then the loose objects: one naming what was not taken yet was refused ("did not receive expected
    object"), and the capture with it. Now all are taken."""
    first = in_store(store, "commit-tree", "HEAD^{tree}", "-p", "HEAD", "-m", "loose, fetched first", top=repo)
    blob = in_store(store, "hash-object", "-w", "--stdin", stdin=b"fetched\n", top=repo)
    tree = in_store(store, "mktree", stdin=f"100644 blob {blob}\tw.txt\n".encode(), top=repo)
    fetched = in_store(store, "commit-tree", tree, "-p", first, "-m", "packed, fetched then", top=repo)
    in_store(store, "pack-objects", "-q", str(store / "pack" / "pack"), stdin=f"{fetched}\n{tree}\n{blob}\n".encode(),
             top=repo)
    for name in (fetched, tree, blob):
        (store / name[:2] / name[2:]).unlink()
    # Two packs, the one named first holding the commit whose parent the other holds
    packs, parent, n = set(os.listdir(store / "pack")), fetched, 0
    while True:
        one = in_store(store, "commit-tree", tree, "-p", fetched, "-m", f"packed {n}", top=repo)
        two = in_store(store, "commit-tree", tree, "-p", one, "-m", f"packed after {n}", top=repo)
        made = []
        for name in (one, two):
            in_store(store, "pack-objects", "-q", str(store / "pack" / "pack"), stdin=f"{name}\n".encode(), top=repo)
            (store / name[:2] / name[2:]).unlink()
            made.append(min(set(os.listdir(store / "pack")) - packs))
            packs |= set(os.listdir(store / "pack"))
        if made[1] < made[0]:
            break
        n += 1
    merge = in_store(store, "commit-tree", tree, "-p", two, "-p", first, "-m", "loose, made last", top=repo)
    objects.take(Repo(repo), store.parents[1], ["aipm", "objects"])
    assert all(has(repo, name) for name in (first, blob, tree, fetched, one, two, merge))
    git(repo, "fsck", "--strict", "--no-dangling")


def test_what_git_refuses_leaves_no_file_in_the_repositorys_store(repo: Path, store: Path):  # noqa: F811
    """A pack git refuses (here: naming an object in neither store) was written to the repository's `pack/` as a
    temporary file, left there by `git index-pack` at each take (four at an attempt's end), however large. Now it
    is checked in a store of aipm's: nothing of it reaches the repository's."""
    before = sorted(p.relative_to(repo) for p in (repo / ".git/objects").rglob("*"))
    missing = "1" * 40
    dangling = in_store(store, "mktree", "--missing", stdin=f"100644 blob {missing}\tw.txt\n".encode(), top=repo)
    in_store(store, "pack-objects", "-q", str(store / "pack" / "pack"), stdin=f"{dangling}\n".encode(), top=repo)
    bad = in_store(store, "hash-object", "-t", "tree", "--literally", "-w", "--stdin", stdin=b"not a tree", top=repo)
    for _ in range(2):
        with pytest.raises(WorkspaceError):
            objects.take(Repo(repo), store.parents[1], ["aipm", "objects"])
    assert not has(repo, dangling) and not has(repo, bad)
    assert sorted(p.relative_to(repo) for p in (repo / ".git/objects").rglob("*")) == before


def test_what_fsck_only_warns_of_is_taken(repo: Path, store: Path):  # noqa: F811
    """History git itself takes, that fsck only warns of: a tree naming its subtree with the mode `040000` (as old
    git and other tools wrote it: zeroPaddedFilemode), in a pack of its own (a fetch's), and a commit whose message
    holds a NUL (nulInCommit), loose, made after it. `git index-pack --strict` makes fsck's warnings errors: each
    take was refused, and the capture and the attempt with it. Now both are taken."""
    blob = in_store(store, "hash-object", "-w", "--stdin", stdin=b"old\n", top=repo)
    sub = in_store(store, "mktree", stdin=f"100644 blob {blob}\tf\n".encode(), top=repo)
    padded = in_store(store, "hash-object", "-t", "tree", "--literally", "-w", "--stdin",
                      stdin=b"040000 sub\0" + bytes.fromhex(sub), top=repo)
    old = in_store(store, "commit-tree", padded, "-m", "old history", top=repo)
    in_store(store, "pack-objects", "-q", str(store / "pack" / "pack"),
             stdin=f"{old}\n{padded}\n{sub}\n{blob}\n".encode(), top=repo)
    for name in (old, padded, sub, blob):
        (store / name[:2] / name[2:]).unlink()
    objects.take(Repo(repo), store.parents[1], ["aipm", "objects"])
    assert all(has(repo, name) for name in (blob, sub, padded, old))
    body = (f"tree {git(repo, 'rev-parse', 'HEAD^{tree}').strip()}\nparent {old}\n"
            "author A <a@example.com> 1700000000 +0000\ncommitter A <a@example.com> 1700000000 +0000\n\n").encode()
    raw = body + b"a NUL \0 in it\n"
    nul = hashlib.sha1(b"commit %d\0" % len(raw) + raw).hexdigest()
    loose(store, nul, b"commit %d\0" % len(raw) + raw)
    objects.take(Repo(repo), store.parents[1], ["aipm", "objects"])
    assert has(repo, nul)
    assert git(repo, "cat-file", "blob", f"{nul}^:sub/f") == "old\n"
    git(repo, "fsck", "--no-dangling")  # (warnings only)


@pytest.mark.parametrize("kind", ["badTimezone", "missing", "nullSha1", "hasDotgit"])
def test_what_fsck_finds_in_error_is_refused_still(repo: Path, store: Path, kind: str):  # noqa: F811
    """What fsck finds in error is refused as before, and so are its warnings about paths and object ids: a commit
    whose author's time zone is no time zone (badTimezone, an error), a tree naming an object in neither store, one
    naming the null object id (nullSha1) and one with an entry `.git` (hasDotgit: a checkout of it by a tool
    other than git writes the repository's own files)."""
    good = in_store(store, "hash-object", "-w", "--stdin", stdin=b"good\n", top=repo)
    if kind == "badTimezone":
        raw = (f"tree {git(repo, 'rev-parse', 'HEAD^{tree}').strip()}\nauthor A <a@example.com> 1700000000 +0x00\n"
               "committer A <a@example.com> 1700000000 +0000\n\nbad\n").encode()
        bad = in_store(store, "hash-object", "-t", "commit", "--literally", "-w", "--stdin", stdin=raw, top=repo)
    elif kind == "hasDotgit":
        bad = in_store(store, "hash-object", "-t", "tree", "--literally", "-w", "--stdin",
                       stdin=b"100644 .git\0" + bytes.fromhex(good), top=repo)
    else:
        named = bytes.fromhex("1" * 40 if kind == "missing" else "0" * 40)
        bad = in_store(store, "hash-object", "-t", "tree", "--literally", "-w", "--stdin",
                       stdin=b"100644 w.txt\0" + named, top=repo)
    with pytest.raises(WorkspaceError, match="did not receive expected" if kind == "missing" else kind):
        objects.take(Repo(repo), store.parents[1], ["aipm", "objects"])
    assert not has(repo, bad) and not has(repo, good)
