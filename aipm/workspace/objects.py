"""A confined worktree worker's objects: made in an object store of its own, brought into the repository's by aipm,
each one verified.

Landlock cannot tell git's adding of an object from the rewriting or deletion of one: a worker given write rights
where the repository's objects are added (its fan-out directories, `pack/`) could chmod an object your HEAD uses and
write over it, delete it, or shadow it with a pack of its own. So the own common directory of a confined attempt's
worktree (ownrefs.isolate) holds a store of its own, `objects/` in git's note of the worktree, in place of a link to
the repository's: its worker's git adds its commits, stash entries and staged files there, and reads the
repository's objects through that store's `info/alternates`. The kernel lets it write nothing in the repository's.

aipm brings what it made into the repository's store (take()) before it reads anything of that worktree's git (its
capture, which the worker's index seeds; its HEAD; its stash, moved to yours). Never by running git on that store:
its worker may write all of it (an `info/alternates` of its own, a FIFO or a link named as an object, a pack index
naming objects its pack does not hold). Its loose objects are read as files of their own (no link followed, nothing
but regular files), each inflated and hashed: one that is not as git writes it, or whose name is not its hash, is
left out; the others, those the repository lacks, go into a pack of aipm's. Its packs (a `git fetch` in the
worktree makes them) go to `git index-pack --stdin --fix-thin` as they are, which trusts no name in them either:
the worker's pack indexes are never read. Both are indexed in a store of aipm's first (their objects may name each
other in any order: a fetch's pack what an earlier fetch left loose), and what of them the repository lacks goes to
it as one pack that `git index-pack --strict` checks, each object's form and its links, in a store of aipm's
beside the repository's, and is moved into it only once git took it whole. What fsck only warns of (a tree's mode
written `040000`, as old git did) it lets pass, as git's fetch does (`--strict` alone would refuse it); not its
warnings about paths (_WARNINGS).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

from aipm.workspace.repo import Repo

_TYPES = {b"commit": 1, b"tree": 2, b"blob": 3, b"tag": 4}  # (the numbers a pack gives them)
_FAN_OUT = re.compile(r"[0-9a-f]{2}")
_LOOSE = re.compile(r"[0-9a-f]{38}|[0-9a-f]{62}")  # (sha1, sha256)
_PACK = re.compile(r"pack-[0-9a-f]{40,64}\.pack")
_CHUNK = 1 << 16
_HEADER_MAX = 32  # "commit 18446744073709551615\0" and less
# Objects the repository lacks are never fetched for a look (a partial clone's promisor): git 2.45+ reads this
_NO_FETCH = {"GIT_NO_LAZY_FETCH": "1"}
_TAKEN: set[tuple[str, str]] = set()  # (the repository's common directory, the trailer of a pack of a worker's taken)
# What fsck only warns of in some git's fsck.h (badFilemode up to 2.37.2, largePathname from 2.43) and history holds
# (a mode written `040000` by old git, a NUL in a message). `--strict` makes each an error, and naming one `=warn`
# leaves every other as `--strict` made it: all are named that this git knows (at an id it does not know, git dies).
# Not the warnings about paths (hasDotgit, hasDotdot, fullPathname, emptyName, a symlink into .git): a worker's tree
# naming `.git/hooks/...` or `../x` is refused, as a server with receive.fsckObjects refuses it.
_WARNINGS = ("badFilemode", "largePathname", "nulInCommit", "zeroPaddedFilemode")


def make(store: Path, repo: Repo) -> None:
    """Make the object store of a worktree's own at `store`: empty, the repository's objects read through it."""
    (store / "info").mkdir(parents=True)
    (store / "pack").mkdir()
    (store / "info" / "alternates").write_bytes(_quoted(os.fsencode(repo.common / "objects")) + b"\n")


def take(repo: Repo, top: Path, parts: list[str], known: set[str] | None = None) -> None:
    """Add to the repository's object store the objects of the store `top`/parts... (make()) that it lacks, each
    verified (see the module's docstring); none where that store is missing or reached through a link.
    `known`: the names (loose objects, packs) there that earlier takes of the caller's took, left alone; this one's
    are added (a look while its worker runs, intake.py). WorkspaceError: git refused what was found there (a
    malformed object, one naming objects that are in neither store): none of it was added."""
    try:
        fd = _directory(top, parts)
    except OSError:
        return  # (no store of its own: a worktree that shares the repository's, or one its worker replaced)
    try:
        loose, packs = _listed(fd)
        if known is not None:
            loose, packs = [n for n in loose if n not in known], [n for n in packs if n not in known]
        if not loose and not packs:
            return
        hash_name = _hash_of(repo.top)
        # Each pack, and its loose objects, first indexed by git in a store of aipm's (their links not yet looked
        # at): one may name what another holds, in any order (a fetch's pack the commits of the fetch before it,
        # unpacked as loose objects; a commit made after it that pack's), and what a pack is refused for is left
        # there. Then what of all of them the repository lacks goes to it as one pack, checked as a whole.
        with tempfile.TemporaryDirectory(prefix="aipm-objects.") as held:
            (Path(held) / "pack").mkdir()
            env = {**_NO_FETCH, "GIT_OBJECT_DIRECTORY": held,
                   "GIT_ALTERNATE_OBJECT_DIRECTORIES": _alternate(repo)}
            trailers = [t for t in (_take_pack(repo, fd, name, hash_name, env) for name in packs) if t]
            if loose:
                _take_loose(repo, fd, loose, hash_name, env)
            _bring_in(repo, Path(held), env)
        _TAKEN.update((str(repo.common), trailer) for trailer in trailers)
        if known is not None:
            known.update(loose, packs)
    finally:
        os.close(fd)


def _listed(fd: int) -> tuple[list[str], list[str]]:
    """(the names of the loose objects in the store open at `fd`, the names of its packs): files, not links."""
    loose, packs = [], []
    for entry in os.scandir(fd):
        if _FAN_OUT.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
            try:
                with _opened_at(fd, entry.name) as inner:
                    loose += [entry.name + e.name for e in os.scandir(inner)
                              if _LOOSE.fullmatch(e.name) and e.is_file(follow_symlinks=False)]
            except OSError:
                continue
        elif entry.name == "pack" and entry.is_dir(follow_symlinks=False):
            try:
                with _opened_at(fd, "pack") as inner:
                    packs = [e.name for e in os.scandir(inner)
                             if _PACK.fullmatch(e.name) and e.is_file(follow_symlinks=False)]
            except OSError:
                continue
    return sorted(loose), sorted(packs)


@lru_cache(maxsize=None)
def _hash_of(top: Path) -> str:
    """The object hash of the repository at `top`, as hashlib names it: "sha1" (git's default) or "sha256"."""
    proc = Repo._run(top, ["rev-parse", "--show-object-format"], check=False)
    return "sha256" if proc.stdout.strip() == b"sha256" else "sha1"


@lru_cache(maxsize=None)
def _strict(top: Path) -> str:
    """`--strict`, with what fsck only warns of (_WARNINGS, those the git at `top` knows) kept as warnings."""
    proc = Repo._run(top, ["help", "--config"], check=False)  # (git before 2.19 lists none: `--strict` as it is)
    known = {line[5:].lower() for line in proc.stdout.decode("utf-8", "replace").splitlines()
             if line.startswith("fsck.")}
    named = [f"{name}=warn" for name in _WARNINGS if name.lower() in known]
    return "--strict=" + ",".join(named) if named else "--strict"


def _take_pack(repo: Repo, fd: int, name: str, hash_name: str, env: dict[str, str]) -> str | None:
    """Give the worker's pack `name` to `git index-pack` in the store of aipm's that `env` names, unless the
    repository holds that pack already (or took it before): its trailer, None when it was not given."""
    size = hashlib.new(hash_name).digest_size
    try:
        pack = _file_at(fd, "pack", name)
    except OSError:
        return None  # (gone meanwhile, or no file)
    with pack:
        length = os.fstat(pack.fileno()).st_size
        if length <= size:
            return None  # (no pack: git refuses it anyway)
        pack.seek(length - size)
        trailer = pack.read(size).hex()  # (what git names a pack after)
        if ((str(repo.common), trailer) in _TAKEN
                or (repo.common / "objects" / "pack" / f"pack-{trailer}.idx").is_file()):  # (git reads a pack by it)
            return None
        pack.seek(0)
        repo.git("index-pack", "--stdin", "--fix-thin", stdin=pack, env=env)
        return trailer


def _take_loose(repo: Repo, fd: int, names: list[str], hash_name: str, env: dict[str, str]) -> None:
    """Give the loose objects `names` of the store open at `fd` that the repository lacks, as one pack of aipm's, to
    `git index-pack` in the store of aipm's that `env` names."""
    width = 2 * hashlib.new(hash_name).digest_size
    wanted = [name for name in names if len(name) == width]
    listed = repo.git("cat-file", "--batch-check=%(objectname)", stdin="".join(f"{n}\n" for n in wanted).encode(),
                      env=_NO_FETCH).decode()
    lacking = [line.split()[0] for line in listed.splitlines() if line.endswith(" missing")]
    if not lacking:
        return
    with tempfile.TemporaryFile() as out:  # (of aipm's: no one else can name it)
        out.write(b"PACK" + (2).to_bytes(4, "big") + (0).to_bytes(4, "big"))  # (the count is written at the end)
        count = 0
        for name in lacking:
            try:
                loose = _file_at(fd, name[:2], name[2:])
            except OSError:
                continue  # (gone meanwhile, or no file)
            with loose:
                count += _packed(loose, name, hash_name, out)
        if not count:
            return
        out.seek(8)
        out.write(count.to_bytes(4, "big"))
        out.seek(0)
        trailer = hashlib.new(hash_name)
        for piece in iter(lambda: out.read(_CHUNK), b""):
            trailer.update(piece)
        out.write(trailer.digest())
        out.seek(0)
        repo.git("index-pack", "--stdin", stdin=out, env=env)


def _bring_in(repo: Repo, held: Path, env: dict[str, str]) -> None:
    """Add to the repository what the store of aipm's at `held` (its packs, each indexed by git) holds and the
    repository lacks, as one pack (`git pack-objects`: each object once) that `git index-pack --strict` checks,
    each object's form and links, in a store of aipm's beside the repository's, then moves into it: nothing is
    added where git refuses it, and no file of a refused pack is left in the repository's store."""
    names: list[str] = []
    for index in sorted((held / "pack").glob("pack-*.idx")):
        with open(index, "rb") as fed:
            listed = repo.git("show-index", stdin=fed).decode()  # (an index git wrote: "offset name (crc)")
        names += [line.split()[1] for line in listed.splitlines() if len(line.split()) >= 2]
    if not names:
        return
    found = repo.git("cat-file", "--batch-check=%(objectname)", env=_NO_FETCH,
                     stdin="".join(f"{n}\n" for n in dict.fromkeys(names)).encode()).decode()
    lacking = [line.split()[0] for line in found.splitlines() if line.endswith(" missing")]
    if not lacking:
        return
    pack_dir = repo.common / "objects" / "pack"
    with tempfile.TemporaryFile() as out, \
            tempfile.TemporaryDirectory(prefix="tmp_objdir-aipm-", dir=repo.common / "objects") as checked:
        # ("tmp_": what `git gc` removes of it after a crash)
        repo._run(repo.top, ["pack-objects", "--stdout", "-q"], env,
                  stdin="".join(f"{n}\n" for n in lacking).encode(), stdout=out)
        out.seek(0)
        (Path(checked) / "pack").mkdir()
        repo.git("index-pack", "--stdin", _strict(repo.top), stdin=out,
                 env={**_NO_FETCH, "GIT_OBJECT_DIRECTORY": checked, "GIT_ALTERNATE_OBJECT_DIRECTORIES":
                      _alternate(repo)})
        # Its index last: git sees a pack by its index
        for made in sorted((Path(checked) / "pack").iterdir(), key=lambda p: (p.suffix == ".idx", p.name)):
            if not (pack_dir / made.name).exists():
                os.rename(made, pack_dir / made.name)


def _packed(loose: BinaryIO, name: str, hash_name: str, out: BinaryIO) -> int:
    """Append the loose object `loose` to the pack being written to `out` when it is one as git writes it (zlib: its
    type, its size, a NUL, then exactly that many bytes, nothing after) and its hash is `name`: 1; else 0, and
    nothing appended. Read a piece at a time: a blob may be large."""
    start = out.tell()
    digest = hashlib.new(hash_name)
    deflate = zlib.compressobj()
    header, size, got = b"", None, 0
    try:
        for data in _inflated(loose):
            if size is None:
                header += data
                if b"\0" not in header:
                    if len(header) > _HEADER_MAX:
                        raise ValueError("no object header")
                    continue
                header, _, data = header.partition(b"\0")
                kind, _, length = header.partition(b" ")
                if kind not in _TYPES or not length.isdigit() or len(header) > _HEADER_MAX:
                    raise ValueError("no object header")
                size = int(length)
                digest.update(header + b"\0")
                out.write(_entry_header(_TYPES[kind], size))
            got += len(data)
            if got > size:
                raise ValueError("longer than its header says")
            digest.update(data)
            out.write(deflate.compress(data))
        if size is None or got != size or digest.hexdigest() != name:
            raise ValueError("not the object its name says")
        out.write(deflate.flush())
        return 1
    except (ValueError, zlib.error):
        out.seek(start)
        out.truncate()
        return 0


def _inflated(loose: BinaryIO) -> Iterator[bytes]:
    """The content of a zlib stream, a piece at a time (none larger than a megabyte, whatever it inflates to).
    ValueError: it ends early, or goes on after its end."""
    inflate = zlib.decompressobj()
    pending = b""
    while not inflate.eof:
        if not pending:
            pending = loose.read(_CHUNK)
            if not pending:
                raise ValueError("cut short")
        data = inflate.decompress(pending, 1 << 20)
        pending = inflate.unconsumed_tail
        if data:
            yield data
    if inflate.unused_data or pending or loose.read(1):
        raise ValueError("garbage after the object")


def _entry_header(kind: int, size: int) -> bytes:
    """A pack entry's header: its type and size, 7 bits a byte after the first's 4, low bits first."""
    byte, size = (kind << 4) | (size & 0x0F), size >> 4
    out = bytearray()
    while size:
        out.append(byte | 0x80)
        byte, size = size & 0x7F, size >> 7
    out.append(byte)
    return bytes(out)


def _alternate(repo: Repo) -> str:
    """The repository's object store as GIT_ALTERNATE_OBJECT_DIRECTORIES names it: C-quoted (a path may hold the
    colon that separates them there)."""
    return os.fsdecode(_c_quoted(os.fsencode(repo.common / "objects")))


def _quoted(path: bytes) -> bytes:
    """A path as an `info/alternates` line: as it is, or C-quoted where git would read it otherwise."""
    if not any(c in path for c in b'"\\\n') and not path.startswith(b"#"):
        return path
    return _c_quoted(path)


def _c_quoted(path: bytes) -> bytes:
    return b'"' + path.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"\n", b"\\n") + b'"'


def _directory(top: Path, parts: list[str]) -> int:
    """A descriptor of the directory `top`/parts..., each part opened without following a link."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    for part in parts:
        try:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        finally:
            os.close(fd)
        fd = inner
    return fd


@contextmanager
def _opened_at(fd: int, name: str) -> Iterator[int]:
    inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    try:
        yield inner
    finally:
        os.close(inner)


def _file_at(fd: int, directory: str, name: str) -> BinaryIO:
    """The regular file `directory`/`name` below the directory open at `fd`, opened for reading without following a
    link nor waiting on a FIFO. OSError: it is none."""
    with _opened_at(fd, directory) as where:
        file = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=where)
    handle = open(file, "rb")
    if not stat.S_ISREG(os.fstat(file).st_mode):
        handle.close()
        raise OSError(f"{name}: no file of git's")
    return handle
